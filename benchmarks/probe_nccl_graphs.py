"""Can c10d's NCCL all-reduce be captured in a CUDA graph here, and does the process group survive?

    torchrun --nproc-per-node 2 benchmarks/probe_nccl_graphs.py MODE

MODE: nccl (capture, replay, eager collectives after, then destroy_process_group), nccl-tl (the
same, capture_error_mode thread_local), nccl-abort (_abort_process_group instead of destroy),
nccl-exit (plain exit, no teardown), symm (symmetric-memory one-shot all-reduce instead of NCCL).
Each rank prints each stage it passes. On 2x H200, torch 2.11 (docs/benchmarks.md note 23): every
stage passes up to the teardown; destroy and abort then hang (pytorch/pytorch#115388), a plain
exit does not.
"""
import os, sys, time, torch, torch.distributed as dist
mode = sys.argv[1]
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank)
def say(*a): print(mode, rank, *a, flush=True)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
say("init")
x = torch.full((32, 4096), float(rank + 1), device="cuda", dtype=torch.bfloat16)
w = torch.eye(4096, device="cuda", dtype=torch.bfloat16)
if mode == "symm":
    import torch.distributed._symmetric_memory as symm_mem
    name = dist.group.WORLD.group_name
    try:
        symm_mem.enable_symm_mem_for_group(name)
    except Exception as e:
        say("enable", repr(e)[:200])
    buf = symm_mem.empty((32, 4096), dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buf, name)
    say("rendezvous")
def step():
    y = x @ w
    if mode == "symm":
        buf.copy_(y)
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
    dist.all_reduce(y)
    return y
r = step(); torch.cuda.synchronize(); say("eager", r[0, 0].item())
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    step()
torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
say("warm ok")
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g, capture_error_mode="thread_local" if mode == "nccl-tl" else "global"):
    out = step()
say("captured")
x.fill_(10.0 * (rank + 1)); g.replay(); torch.cuda.synchronize()
say("replay", out[0, 0].item(), "expect 30")
t = time.perf_counter()
for _ in range(100): g.replay()
torch.cuda.synchronize(); say("replay us", (time.perf_counter() - t) * 1e4)
y = torch.ones(8, device="cuda"); dist.all_reduce(y); torch.cuda.synchronize(); say("eager after", y[0].item())
g.replay(); dist.all_reduce(y); torch.cuda.synchronize(); say("mixed ok", y[0].item())
if mode == "nccl-exit":
    say("exiting"); sys.exit(0)
elif mode == "nccl-abort":
    dist.distributed_c10d._abort_process_group(); say("aborted")
else:
    dist.destroy_process_group(); say("destroyed")
