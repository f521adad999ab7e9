"""Plots the committed benchmark results into docs/benchmarks.png (python -m benchmarks.plot)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = Path(__file__).parent.parent / "docs" / "benchmarks.png"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def main() -> None:
    main_run = load("llama2-7b-h200-fused-b.json")       # floor, engine, HF CB in one run
    final = load("llama2-7b-h200-proc-b.json")           # engine, gRPC (engine process, engine thread)
    bars = {
        "HF generate\nstatic x32": load("llama2-7b-h200-fused-a.json")["hf_static"]["tok_per_s"],
        "HF continuous\nbatching": main_run["hf_cb"]["tok_per_s"],
        "Baton engine\neager": load("llama2-7b-h200-eager-and-grouped-prefill.json")["engine_eager"]["tok_per_s"],
        "Baton engine\nfused + graphs": final["engine"]["tok_per_s"],
        "Baton via gRPC\nengine thread": final["grpc_thread"]["tok_per_s"],
        "Baton via gRPC\nengine process": final["grpc"]["tok_per_s"],
    }
    floor = main_run
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(list(bars), list(bars.values()), color=["#999", "#999", "#7aa", "#2a7", "#7aa", "#2a7"])
    ax1.axhline(floor["floor_w1_tok_per_s_b32"], ls="--", color="k", lw=1)
    ax1.text(0, floor["floor_w1_tok_per_s_b32"] * 1.02, "memory floor at batch 32", fontsize=8)
    ax1.tick_params(axis="x", labelsize=7)
    ax1.set_ylabel("useful tokens / s")
    ax1.set_title("W1: 128 requests, Llama-2-7B shape, bf16, one H200")
    for i, v in enumerate(bars.values()):
        ax1.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    steps = sorted(((k, v) for k, v in floor.items() if k.startswith("decode_step") and "eager" not in k),
                   key=lambda kv: (kv[1]["batch"], "hf" not in kv[0]))
    labels = [f"b{v['batch']} {'HF forward' if 'hf' in k else 'fused'}" for k, v in steps]
    ax2.bar(labels, [v["step_ms"] for _, v in steps], color="#2a7")
    ax2.scatter(labels, [v["floor_ms"] for _, v in steps], color="k", marker="_", s=600, label="floor")
    ax2.set_ylabel("ms per decode step (1024 context)")
    ax2.set_title("CUDA-graph decode step vs (weights + K/V bytes) / copy bandwidth")
    ax2.legend()
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
