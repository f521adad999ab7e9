"""The v1 sampling additions end to end through the engine, against Hugging Face `generate` on each
request alone: log-probabilities (log-softmax of HF's logits), logit bias with min_new_tokens,
presence/frequency penalties (the OpenAI formula as an HF logits processor written here), stop
token ids, and the matched stop sequence with include_stop_sequence. Both K/V layouts, one model
load; requests share the batch with others that ask for nothing."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from engine import model_loader
from engine.inputs import GenerateInput
from tests.conftest import CPU, drive, make_engine
from tests.test_engine_exact import LAYOUT_IDS, LAYOUTS

PROMPTS = ["The weather today is", "Once upon a time, in a land far away", "1, 2, 3,"]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)


class OpenAIPenalties(LogitsProcessor):
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence over the generated ids (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token in input_ids[0, self.prompt_len:].tolist():
            scores[0, token] -= self.frequency
        for token in set(input_ids[0, self.prompt_len:].tolist()):
            scores[0, token] -= self.presence
        return scores


def _hf(hf_model, prompt_ids, n, eos=None, **kwargs):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=eos, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits).float().log_softmax(-1)


def _bystander(i: int) -> GenerateInput:
    return GenerateInput(request_id=f"plain{i}", prompt="Other traffic " * (i + 2), max_new_tokens=9, ignore_eos=True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_logprobs_equal_hf_log_softmax(tiny_llama, layout):
    hf_model, tokenizer, _ = tiny_llama
    engine, limits = make_engine(tiny_llama, max_batch_size=4, max_seq_len=128, **layout)
    asks = [GenerateInput(request_id=f"lp{i}", prompt=p, max_new_tokens=12, ignore_eos=True, logprobs=True,
                          top_logprobs=k) for i, (p, k) in enumerate(zip(PROMPTS, (0, 5, 20)))]
    outputs = drive(engine, limits, {0: [asks[0], _bystander(0)], 2: asks[1:], 3: [_bystander(1)]})
    assert all(e.logprobs == () for e in outputs["plain0"].events + outputs["plain1"].events)
    for inp in asks:
        got = outputs[inp.request_id]
        expected_ids, reference = _hf(hf_model, tokenizer(inp.prompt)["input_ids"], 12)
        assert got.token_ids == expected_ids
        logprobs = [lp for e in got.events for lp in e.logprobs]
        for e in got.events:
            assert [lp.token_id for lp in e.logprobs] == list(e.token_ids)   # one per token, per message
        for pos, lp in enumerate(logprobs):
            assert lp.logprob == pytest.approx(float(reference[pos, lp.token_id]), abs=1e-4)
            assert len(lp.top) == inp.top_logprobs
            top_ids = [t for t, _ in lp.top]
            values = torch.tensor([v for _, v in lp.top])
            if top_ids:
                torch.testing.assert_close(values, reference[pos].topk(inp.top_logprobs).values, rtol=0, atol=1e-4)
                torch.testing.assert_close(values, reference[pos, top_ids], rtol=0, atol=1e-4)
                assert top_ids[0] == lp.token_id                     # greedy: the chosen one is the best


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_bias_min_tokens_penalties_match_hf(tiny_llama, layout):
    hf_model, tokenizer, _ = tiny_llama
    eos = 2
    engine, limits = make_engine(tiny_llama, max_batch_size=4, max_seq_len=128, **layout)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    # EOS biased to the top: ends right after min_new_tokens; HF: sequence bias + min new tokens.
    biased = GenerateInput(request_id="bias", prompt=PROMPTS[0], max_new_tokens=20, min_new_tokens=6,
                           logit_bias=((eos, 30.0), (100, 5.0)))
    counted = GenerateInput(request_id="pf", prompt=PROMPTS[1], max_new_tokens=20, ignore_eos=True,
                            presence_penalty=0.8, frequency_penalty=1.5)
    stop_id = GenerateInput(request_id="stopid", prompt=PROMPTS[2], max_new_tokens=20, ignore_eos=True,
                            logit_bias=((777, 30.0),), stop_token_ids=(777,), min_new_tokens=3)
    outputs = drive(engine, limits, {0: [biased, _bystander(0)], 1: [counted, stop_id]})
    assert eos in engine.eos_token_ids
    expected, _ = _hf(hf_model, ids[0], 20, eos=list(engine.eos_token_ids),
                      sequence_bias={(eos,): 30.0, (100,): 5.0}, min_new_tokens=6)
    assert outputs["bias"].token_ids == expected
    assert len(expected) == 7 and outputs["bias"].final.finish_reason.name == "EOS"
    expected, _ = _hf(hf_model, ids[1], 20, logits_processor=LogitsProcessorList(
        [OpenAIPenalties(len(ids[1]), 0.8, 1.5)]))
    assert outputs["pf"].token_ids == expected
    assert len(set(expected)) > 10           # the penalties did change the greedy path (no loop)
    expected, _ = _hf(hf_model, ids[2], 20, eos=[777], sequence_bias={(777,): 30.0}, min_new_tokens=3)
    assert outputs["stopid"].token_ids == expected and expected[-1] == 777 and len(expected) == 4
    assert outputs["stopid"].final.finish_reason.name == "EOS"


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_sequence_reported_and_optionally_included(tiny_llama, include, pipelined):
    """Also with the pipelined decode (the CUDA default, forced here): the step after the one
    whose text met the stop sequence was already launched, and is dropped."""
    _hf_model, tokenizer, _ = tiny_llama
    engine, limits = make_engine(tiny_llama, max_batch_size=2, max_seq_len=128, overlap_decode=pipelined)
    free = drive(engine, limits, {0: [GenerateInput(request_id="free", prompt=PROMPTS[0], max_new_tokens=30,
                                                    ignore_eos=True)]})["free"].text
    stop = free[10:14]                         # a piece of what it will generate
    assert stop.strip()
    out = drive(engine, limits, {0: [GenerateInput(request_id="s", prompt=PROMPTS[0], max_new_tokens=30,
                                                   ignore_eos=True, stop=("never there", stop),
                                                   include_stop_sequence=include)]})["s"]
    assert out.final.finish_reason.name == "STOP_SEQUENCE" and out.final.stop_sequence == stop
    cut = free.index(stop)
    assert out.text == (free[:cut + len(stop)] if include else free[:cut])
    assert (engine.stats().pipelined_steps > 0) == pipelined
    plain = drive(engine, limits, {0: [GenerateInput(request_id="p", prompt=PROMPTS[0], max_new_tokens=3)]})["p"]
    assert plain.final.stop_sequence == ""
