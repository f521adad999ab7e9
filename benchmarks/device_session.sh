#!/usr/bin/env bash
# The GPU measurements still owed by issues 12, 13 and 15, as stages of one script for the lent
# device machine (docs/benchmarks.md notes 22-23 name them). Run from the repository root there:
#
#   bash benchmarks/device_session.sh STAGE [STAGE...]        (carry [".device"])
#
# `.device/` (git-ignored, on this machine) holds what the device lacks: `whl/` (wheels the
# server needs: grpcio, protobuf, msgspec, structlog, xgrammar, pydantic...) and `tok/` (a
# Llama-2 tokenizer folder). Every stage has its own time limit, writes its JSON to $OUT and
# prints a summary line per variant; a stage that fails prints its last error lines and the
# next stage still runs. Stages and their rough cost on an H200 (seconds):
#   gpu-test    one -k expression (GPU_TEST) of tests/test_gpu.py (or GPU_TEST_FILES)
#   gpu-tests   tests/test_gpu.py (bf16 checks incl. packed chunks)                      ~150
#   w4-chunks   W4 at 10 req/s, paged, chunks 0, 512, 1024 (W4_CHUNKS), one forward a step   ~240
#   w1-chunks   W1 in process, paged, once per chunk size in W1_CHUNKS (0,768)                ~120
#   w3-paired   W3 and W3 alone, alternating, W3_PAIRS (3) pairs; W3_BOUND (2048), W3_CHUNK (0),
#               W3_GRAPHS (auto: the engine's default; 0 off, 1 on)                                ~120
#   chunks-probe  benchmarks/profile_chunks.py: first-run vs later runs, synced or not      ~150
#   prefill-probe  benchmarks/probe_prefill.py: a packed prefill forward eager vs graphed buckets  ~150
#   epilogues-probe  benchmarks/probe_epilogues.py: the fused step, fused epilogues on vs off        ~90
#   host-probe  benchmarks/probe_host_copy.py: a prefix-cache load of 16 host blocks, the link's rate  ~40
#   flex-probe  benchmarks/probe_flex_decode.py: paged decode attention, flex's SPLIT_KV etc.  ~200
#   w4-overlap  W4 at 10 req/s, paged, decode launched before the prefill vs after (note 26)  ~150
#   w4-order    W4 at 10 req/s, paged: decode first vs prefill first x prefill graphs off/on  ~260
#   w4          W4 at W4_RATES (10,20) req/s, paged, the engine's defaults (W4_ARGS: more bench flags)                  ~150
#   w4-async    W4 at W4_RATES (10,20) req/s, paged: next decode launched before a steady step's events, on vs off  ~300
#   w4-serve    W4 at W4_SERVE_RATES (10) req/s through gRPC and the engine process (issue 12's target)  ~150
#   w4-sort     W4 at W4_RATES (10) req/s, paged: decode rows longest first vs in row order     ~150
#   w4-graphs   W4 at 10 and 20 req/s, paged, prefill graphs off vs on (note 26)            ~330
#   decode-chat decode step at batch 48-256, chat lengths, paged, rows longest first and in row order,
#               and without fused epilogues: vs real floor, GPU time by kernel kind         ~240
#   w4-split    W4 at 10 and 20 req/s, paged, SPLIT_KV 0 (flex's) and $SPLIT_KV (default 8)     ~300
#   rows        W4 at 40 req/s, batch up to 512 at 4,096 context: peak concurrent rows (issue 12:
#               >= 250 rows of ~600 tokens where the slab holds 53)                       ~200
#   w5          W5 multi-turn chat (16 x 8 turns), prefix cache variants W5_VARIANTS, chunks W5_CHUNK,
#               W5_REPEATS rounds of them (gains per round and their median)   ~30 a variant a round
#   allreduce-probe  (2 GPUs) the TP step's all-reduces in one graph: NCCL, symm-mem one-shot, copy  ~60
#   allreduce-norm-probe  (2 GPUs) one kernel for all-reduce + residual add + RMSNorm (symmetric memory)
#               against NCCL + liger: exact? faster in a graph, back to back and between GEMMs?  ~60
#   gemm-probe  benchmarks/probe_gemm.py: the 7B step's GEMMs at 32 and 128 rows, cuBLAS vs max-autotune  ~300
#   tp7-stall   (2 GPUs) tpN as is, NCCL_RUNTIME_CONNECT=0, CUDA_MODULE_LOADING=EAGER, a 600-token warm-up   ~260
#   tp7         (2 GPUs) 7B: tp1, tpN (fused + graphs), tpN-unfused (TP7_VARIANTS; also tpN-nccl, tpN-one-shot,
#               tp1-shard...); TP_ARGS e.g. "--profile-steps 24", "--repeats 2"                       ~200
#   tp70        (2 GPUs) 70B shape on the meta device: tpN (TP70_VARIANTS, e.g. tpN,tpN-unfused)  ~150
#   tp70-serve  (2 GPUs) 70B through `baton serve --tensor-parallel 2`: W1 and W4 @ 2/s   ~400
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device/whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/clients/python BATON_TEST_TOKENIZER=.device/tok
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1   # NVLink multicast off (device README)
TOK=.device/tok
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

summary() {   # one line per variant of a bench result file
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "itl_p99_s", "tok_per_s", "delivered_over_offered",
        "delivered_over_offered_while_arriving", "overlapped_steps", "pipelined_steps",
        "goodput_requests_fraction", "peak_rows_on_device", "seconds_prefill", "decode_step_p50_ms",
        "floor_per_gpu_p50_ms", "step_p50_ms", "step_over_floor_p50", "decode_step_vs_real_floor_p50", "low_priority_tok_per_s", "ttft_growth")
for k, v in d.items():
    if isinstance(v, dict) and "tpot_p50_s" in v:
        prio = {p: round(q["p99_s"], 3) for p, q in v.get("ttft_by_priority", {}).items()}
        print(" ", k, {x: round(v[x], 4) if isinstance(v[x], float) else v[x] for x in keys if x in v},
              f"ttft p99 by priority {prio}" if prio else "")
    elif "_over_" in k or "same_tokens" in k:   # ratios, token checks
        print(" ", k, round(v, 4) if isinstance(v, float) else v)
PY
}

stage() {   # stage NAME SECONDS RESULT-JSON COMMAND...
  local name=$1 limit=$2 result=$3; shift 3
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "rc=$?"
  grep -E "Error|error:" "$OUT/$name.err" | tail -3
  if [ -n "$result" ] && [ -f "$result" ]; then
    [ "$(dirname "$result")" = "$OUT" ] || cp "$result" "$OUT/"
    summary "$result"
  fi
}

# pytest, ended once it has printed its summary line: after every test had passed it sat at exit
# until the stage's limit in sessions 28 and 29 (rc 124). $1: the file its output goes to.
PYTEST_ENDED='log=$1; shift; python3 -m pytest -q "$@" & p=$!
while kill -0 $p 2>/dev/null; do
  if grep -qE "(passed|failed|error|no tests ran).* in [0-9.]+s" "$log"; then sleep 3; kill $p 2>/dev/null; wait $p; ! grep -qE "[0-9]+ (failed|error)" "$log"; exit; fi
  sleep 2
done
wait $p'

R=$OUT   # results straight to $OUT: a run cut by the call's limit still returns the variants saved so far
for s in "$@"; do
  case $s in
    gpu-test)    # one test of tests/test_gpu.py: GPU_TEST=<-k expression>
      stage gpu-test 200 "" bash -c "$PYTEST_ENDED" _ "$OUT/gpu-test.txt" ${GPU_TEST_FILES:-tests/test_gpu.py} -k "${GPU_TEST}"
      tail -3 "$OUT/gpu-test.txt" ;;
    gpu-tests)
      stage gpu-tests 240 "" bash -c "$PYTEST_ENDED" _ "$OUT/gpu-tests.txt" tests/test_gpu.py
      tail -3 "$OUT/gpu-tests.txt" ;;
    w4-chunks)
      stage w4-chunks 330 $R/llama2-7b-h200-w4-fused-chunks${W4_BOUND:+-bound$W4_BOUND}.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --prefill-chunk-tokens ${W4_CHUNKS:-0,512,1024} --runs w4 --rates 10 \
        --max-prefill-tokens ${W4_BOUND:-8192} \
        --requests 192 --same-process --name $R/llama2-7b-h200-w4-fused-chunks${W4_BOUND:+-bound$W4_BOUND} ;;
    w1-chunks)   # W1 (128 requests at once) in process, paged, once per --prefill-chunk-tokens in W1_CHUNKS (0,768)
      for c in $(echo ${W1_CHUNKS:-0,768} | tr , ' '); do
        stage w1-chunks$c 170 $R/llama2-7b-h200-w1-chunks$c.json python3 -m benchmarks.bench --preset llama2-7b \
          --tokenizer $TOK --runs engine --kv-layout paged --max-batch-size 256 --prefill-chunk-tokens $c \
          --name $R/llama2-7b-h200-w1-chunks$c
      done ;;
    w3-paired)   # W3_BOUND (default 2048) and W3_CHUNK (default 0): one configuration, W3_PAIRS pairs
      n=llama2-7b-h200-w3-paired-bound${W3_BOUND:-2048}-chunk${W3_CHUNK:-0}${W3_GRAPHS:+-graphs$W3_GRAPHS}
      stage w3-paired 300 $R/$n.json python3 -m benchmarks.bench --preset llama2-7b --tokenizer $TOK \
        --max-batch-size 128 --kv-layout paged --max-prefill-tokens ${W3_BOUND:-2048} \
        --prefill-chunk-tokens ${W3_CHUNK:-0} --runs w3-paired --w3-pairs ${W3_PAIRS:-3} --name $R/$n \
        --prefill-graphs ${W3_GRAPHS:-auto}
      python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['w3_paired']; print('  low ratios', [round(x,3) for x in d['low_ratios']], 'high ttft p99', [round(x,3) for x in d['high_ttft_p99_s']])" $R/$n.json ;;
    chunks-probe)
      stage chunks-probe 300 "" python3 -m benchmarks.profile_chunks --tokenizer $TOK --chunks 512 ${PROBE_ARGS:-} \
        --sync-after "membership"
      cp "$OUT/chunks-probe.txt" "$OUT/profile-chunks.jsonl"
      grep -v '^{"versions' "$OUT/chunks-probe.txt" | cut -c1-300 ;;
    prefill-probe)   # benchmarks/probe_prefill.py: one packed prefill forward eager vs graphed (coarse/fine buckets)
      stage prefill-probe 300 "" python3 -m benchmarks.probe_prefill --tokenizer $TOK
      cp "$OUT/prefill-probe.txt" "$OUT/probe-prefill.jsonl"
      cut -c1-400 "$OUT/prefill-probe.txt" ;;
    epilogues-probe)   # benchmarks/probe_epilogues.py: the fused step with and without fused epilogues, graphed
      stage epilogues-probe 200 "" python3 -m benchmarks.probe_epilogues
      cp "$OUT/epilogues-probe.txt" "$OUT/probe-epilogues.jsonl"
      cat "$OUT/epilogues-probe.txt" ;;
    host-probe)   # benchmarks/probe_host_copy.py: a prefix-cache load of 16 host blocks, and the link's rate
      stage host-probe 200 "" python3 -m benchmarks.probe_host_copy
      cp "$OUT/host-probe.txt" "$OUT/probe-host-copy.jsonl"
      cut -c1-300 "$OUT/host-probe.txt" ;;
    flex-probe)
      stage flex-probe 300 "" python3 -m benchmarks.probe_flex_decode ${FLEX_ARGS:-}
      cp "$OUT/flex-probe.txt" "$OUT/probe-flex-decode.jsonl"
      cut -c1-250 "$OUT/flex-probe.txt" ;;
    w4-overlap)   # decode_before_prefill on vs off (the old order), W4 at 10 req/s, whole prompts
      stage w4-overlap 300 $R/llama2-7b-h200-w4-overlap.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --decode-first 1,0 --runs w4 --rates 10 \
        --requests 192 --same-process --name $R/llama2-7b-h200-w4-overlap ;;
    w4-async)   # overlap_decode on vs off (note 28), W4 at W4_RATES (10,20) req/s, in process
      stage w4-async 420 $R/llama2-7b-h200-w4-async.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --overlap-decode 1,0 --runs w4 \
        --rates ${W4_RATES:-10,20} --requests 192 --same-process --name $R/llama2-7b-h200-w4-async ;;
    w4-order)   # decode first vs prefill first, x prefill graphs off/on, W4 at 10 req/s (note 27)
      stage w4-order 460 $R/llama2-7b-h200-w4-order.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --decode-first 1,0 --prefill-graphs 0,1 --runs w4 \
        --rates 10 --requests 192 --same-process --name $R/llama2-7b-h200-w4-order ;;
    w4-sort)   # paged decode rows longest first vs in row order, W4 at W4_RATES (10) req/s (note 27)
      stage w4-sort 400 $R/llama2-7b-h200-w4-sort.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --decode-sort 1,0 --runs w4 \
        --rates ${W4_RATES:-10} --requests 192 --same-process --name $R/llama2-7b-h200-w4-sort ;;
    w4)   # W4 at W4_RATES (10,20) req/s, paged, the engine's defaults
      stage w4 400 $R/llama2-7b-h200-w4.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --runs w4 ${W4_ARGS:-} \
        --rates ${W4_RATES:-10,20} --requests 192 --same-process --name $R/llama2-7b-h200-w4 ;;
    w4-serve)   # W4 at W4_SERVE_RATES (10) req/s through the engine process as `baton serve` runs it
      stage w4-serve 300 $R/llama2-7b-h200-grpc-w4.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --runs grpc-w4 \
        --rates ${W4_SERVE_RATES:-10} --requests 192 --name $R/llama2-7b-h200-grpc-w4 ;;
    w4-graphs)   # prefill_graphs off vs on, W4 at 10 and 20 req/s, whole prompts (note 26's prediction)
      stage w4-graphs 420 $R/llama2-7b-h200-w4-graphs.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --prefill-graphs 0,1 --runs w4 --rates 10,20 \
        --requests 192 --same-process --name $R/llama2-7b-h200-w4-graphs ;;
    decode-chat)   # issue 12's decode step at batch 48/64/128/256, chat lengths, vs the real floor, by kernel kind
      stage decode-chat 360 $R/llama2-7b-h200-decode-chat.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --kv-layout paged --runs decode-chat --name $R/llama2-7b-h200-decode-chat
      python3 -c "
import json, sys
for k, v in json.load(open(sys.argv[1])).items():
    if k.startswith('decode_chat') and v.get('fits'):
        print(' ', k, round(v['step_ms'], 2), 'ms', round(v['ratio_to_real_floor'], 2), 'x floor; graph replay',
              round(v.get('replay_ms', 0), 2), 'kernels', v['kernel_ms'], v['kernel_ms_by_kind'])
" $R/llama2-7b-h200-decode-chat.json ;;
    w4-split)
      stage w4-split 420 $R/llama2-7b-h200-w4-split.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 256 --kv-layout paged --decode-split-kv 0,${SPLIT_KV:-8} --runs w4 \
        --rates 10,20 --requests 192 --same-process --name $R/llama2-7b-h200-w4-split ;;
    rows)
      stage rows 300 $R/llama2-7b-h200-w4-rows.json python3 -m benchmarks.bench --preset llama2-7b \
        --tokenizer $TOK --max-batch-size 512 --kv-layout paged --runs w4 --rates 40 --requests 600 \
        --same-process --name $R/llama2-7b-h200-w4-rows ;;
    w5)   # W5 multi-turn chat, prefix cache variants (W5_VARIANTS), 16 conversations x 8 turns, paged
      stage w5 560 $R/llama2-7b-h200-w5.json python3 -m benchmarks.bench --preset llama2-7b --tokenizer $TOK \
        --kv-layout paged --runs w5 --w5-conversations ${W5_CONVERSATIONS:-16} --w5-turns 8 --same-process \
        --w5-repeats ${W5_REPEATS:-1} \
        --prefill-chunk-tokens ${W5_CHUNK:-0} \
        --w5-variants ${W5_VARIANTS:-off,device_full,device_squeezed,device_host_squeezed} --name $R/llama2-7b-h200-w5
      python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
for k,v in d.items():
    if isinstance(v,dict) and 'mean_ttft_p50_turns_2_on_s' in v:
        print(' ',k,'mean ttft p50 turns 2+',round(v['mean_ttft_p50_turns_2_on_s'],4),'turn1',round(v['ttft_by_turn']['1']['ttft_p50_s'],4),
              'computed',v['prefill_tokens_computed'],'dev',v['cached_tokens_device'],'host',v['cached_tokens_host'],'wall',round(v['wall_s'],1),
              v.get('prefix_cache_counts', ''))
    elif 'gain_over_full_gain' in k: print(' ',k,[round(x,3) for x in v] if isinstance(v,list) else round(v,3))
" $R/llama2-7b-h200-w5.json ;;
    gemm-probe)
      stage gemm-probe 540 "" python3 -m benchmarks.probe_gemm
      cp "$OUT/gemm-probe.txt" "$OUT/probe-gemm.jsonl"
      cut -c1-400 "$OUT/gemm-probe.txt" ;;
    allreduce-probe)   # (2 GPUs) benchmarks/probe_allreduce.py: the TP step's all-reduces in a graph, NCCL vs one-shot vs copy
      stage allreduce-probe 150 "" torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce
      cp "$OUT/allreduce-probe.txt" "$OUT/probe-allreduce.jsonl"
      cut -c1-300 "$OUT/allreduce-probe.txt" ;;
    allreduce-norm-probe)   # (2 GPUs) benchmarks/probe_allreduce_norm.py: all-reduce + add + RMSNorm in one kernel vs NCCL + liger
      stage allreduce-norm-probe 150 "" torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce_norm
      cp "$OUT/allreduce-norm-probe.txt" "$OUT/probe-allreduce-norm.jsonl"
      cut -c1-400 "$OUT/allreduce-norm-probe.txt" ;;
    tp7-stall)   # (2 GPUs) note 33's TTFT stall of a fresh TP process: tpN as is, with NCCL's connections made
                 # at start-up (NCCL_RUNTIME_CONNECT=0), with every CUDA module loaded at start-up
                 # (CUDA_MODULE_LOADING=EAGER), and with a warm-up prompt of 600 tokens (TP_STALL_HOW picks)
      for how in ${TP_STALL_HOW:-default connect0 eagerload warm600}; do
        env=(); extra=()
        [ $how = connect0 ] && env=(NCCL_RUNTIME_CONNECT=0)
        [ $how = eagerload ] && env=(CUDA_MODULE_LOADING=EAGER)
        [ $how = warm600 ] && extra=(--warmup-prompt 600)
        stage tp7-stall-$how 200 $OUT/tp7-stall-$how.json env "${env[@]}" python3 -m benchmarks.tp_bench \
          --preset llama2-7b --tokenizer $TOK --tp 2 --batch 32 --max-output 128 --variants tpN "${extra[@]}" \
          --out $OUT/tp7-stall-$how.json
      done ;;
    tp7)
      stage tp7 330 $OUT/tp7.json python3 -m benchmarks.tp_bench --preset llama2-7b --tokenizer $TOK --tp 2 \
        --batch 32 --max-output 128 --variants ${TP7_VARIANTS:-tp1,tpN,tpN-unfused} ${TP_ARGS:-} --out $OUT/tp7.json ;;
    tp70)
      stage tp70 330 $OUT/tp70.json python3 -m benchmarks.tp_bench --preset llama2-70b --tokenizer $TOK --tp 2 \
        --lazy --variants ${TP70_VARIANTS:-tpN} --batch 32 --max-output 64 ${TP_ARGS:-} --out $OUT/tp70.json ;;
    tp70-serve)
      stage tp70-serve 560 $R/llama2-70b-2xh200-serve.json python3 -m benchmarks.bench --preset llama2-70b \
        --tokenizer $TOK --tensor-parallel 2 --runs grpc,grpc-w4 --rates 2 --requests 64 --max-batch-size 128 \
        --name $R/llama2-70b-2xh200-serve ;;
    *) echo "unknown stage $s" ;;
  esac
done
