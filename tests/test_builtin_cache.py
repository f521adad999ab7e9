"""The built-in model's dequantized cache (engine/model_loader.py): the first float32 load
dequantizes the GGUF and keeps the result; a load from the cache has the very same weights,
tokenizer and chat template; a cache that cannot be written costs nothing but time."""
from __future__ import annotations

import pytest
import torch

from engine import model_loader

pytestmark = pytest.mark.slow


def test_a_cached_load_equals_the_gguf_load(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    folder, gguf = model_loader.builtin_model_path()
    cache = model_loader.builtin_cache_dir(folder / gguf)
    assert not cache.exists()
    model, tokenizer, spec = model_loader.load(None, torch.device("cpu"), torch.float32)   # from the GGUF
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]                     # no leftovers
    cached_model, cached_tokenizer, cached_spec = model_loader.load(None, torch.device("cpu"), torch.float32)
    assert cached_spec == spec
    ours, theirs = model.state_dict(), cached_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for text in ("Hello, world!", "def f(x):\n    return x ** 2  # ünïcödé 世界 🙂"):
        assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (cached_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))

    # a cache that cannot be written (its parent is a file): no exception, a warning, and the
    # GGUF-loaded model keeps its quantizer (set aside only while saving)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    quantizer = model.hf_quantizer
    assert quantizer is not None
    model_loader._keep(blocked / "cache", model, tokenizer)
    assert model.hf_quantizer is quantizer and blocked.read_text() == ""
