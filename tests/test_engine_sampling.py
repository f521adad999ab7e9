"""Sampling and stopping in the engine: seeded draws are batch-independent, the repetition
penalty matches Hugging Face, stop sequences cut the text, EOS and max_new_tokens stop."""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from tests.conftest import CPU, drive, hf_reference, make_engine


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)


def _sampled(request_id: str, seed: int) -> GenerateInput:
    return GenerateInput(request_id=request_id, prompt="The weather today is", max_new_tokens=24,
                         temperature=0.9, top_k=200, top_p=0.95, seed=seed, ignore_eos=True)


def test_seeded_sampling_is_batch_independent(tiny_llama):
    engine, limits = make_engine(tiny_llama)
    alone = drive(engine, limits, {0: [_sampled("s", 7)]})["s"].token_ids
    crowd = {0: [GenerateInput(request_id="g0", prompt="Other traffic " * 5, max_new_tokens=30, ignore_eos=True)],
             2: [_sampled("s", 7), _sampled("other-seed", 8)],
             4: [GenerateInput(request_id="g1", prompt="More", max_new_tokens=10, temperature=1.0, ignore_eos=True)]}
    outputs = drive(engine, limits, crowd)
    assert outputs["s"].token_ids == alone
    assert outputs["other-seed"].token_ids != alone   # a different seed draws differently


def test_repetition_penalty_greedy_matches_hf(tiny_llama):
    hf_model, tokenizer, _spec = tiny_llama
    engine, limits = make_engine(tiny_llama)
    inp = GenerateInput(request_id="p", prompt="a b a b a b", max_new_tokens=20,
                        repetition_penalty=1.5, ignore_eos=True)
    got = drive(engine, limits, {0: [inp]})["p"].token_ids
    expected = hf_reference(hf_model, tokenizer(inp.prompt)["input_ids"], 20, (), repetition_penalty=1.5)
    assert got == expected


@pytest.mark.slow
def test_stop_sequence_and_eos(smollm2):
    engine, limits = make_engine(smollm2)
    outputs = drive(engine, limits, {0: [
        GenerateInput(request_id="stop", prompt="1, 2, 3, 4,", max_new_tokens=40, stop=(" 7",)),
        GenerateInput(request_id="eos", messages=(("user", "Say hello."),), max_new_tokens=200),
        GenerateInput(request_id="len", prompt="1, 2, 3, 4,", max_new_tokens=5),
    ]})
    stop = outputs["stop"]
    assert stop.final.finish_reason.name == "STOP_SEQUENCE"
    assert stop.text == " 5, 6,"                      # cut before " 7", which is not emitted
    assert outputs["eos"].final.finish_reason.name == "EOS"
    assert outputs["eos"].token_ids[-1] in smollm2[2].eos_token_ids
    assert outputs["len"].final.finish_reason.name == "LENGTH"
    assert len(outputs["len"].token_ids) == 5
