"""Structured output (params.response_format) end to end through the engine with a tiny random
model: a random model left alone would never write JSON, so every completion that parses and
validates was made so by the grammar. Constrained rows share the batch with a free one, which must
be unchanged by them. Invalid schemas, regexes and grammars are INVALID_ARGUMENT naming the field.
The property test draws JSON schemas (objects of string/integer/boolean/enum properties with a
required list) and checks that every completion, greedy and sampled, parses and validates.

Completion rule: the schemas drawn are bounded (strings have maxLength, integers a range, and
the output is compact JSON), so the grammar closes well within max_new_tokens; a completion must
end with EOS (the grammar only allows EOS once complete), never LENGTH."""
from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.v1 import baton_pb2 as pb
from baton_client import BatonClient
from engine import model_loader
from engine.grammar import Grammars
from engine.inputs import GenerateInput, InvalidInput, ResponseFormatInput, build_request
from engine.request import FinishReason
from tests.conftest import CPU, drive, make_engine

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "admin": {"type": "boolean"},
                                           "team": {"enum": ["red", "blue"]}},
          "required": ["name", "age", "admin", "team"]}
GRAMMAR = 'root ::= "answer: " ("yes" | "no") "."'
REGEX = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, max_batch_size=4, max_seq_len=512)


def _fmt(kind: str, value: str = "", **kwargs) -> GenerateInput:
    return GenerateInput(prompt="Write it:", max_new_tokens=200,
                         response_format=ResponseFormatInput(kind, value), **kwargs)


def _check(kind: str, value: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(value))
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(value, text), text
    else:
        assert text in ("answer: yes.", "answer: no."), text


CASES = [("json_schema", json.dumps(PERSON)), ("json_object", ""), ("regex", REGEX), ("grammar", GRAMMAR)]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.95, "seed": 7}], ids=["greedy", "sampled"])
def test_every_kind_in_one_batch(engine, sampling):
    engine_, limits = engine
    free = GenerateInput(request_id="free", prompt="Other traffic", max_new_tokens=30, ignore_eos=True)
    alone = drive(engine_, limits, {0: [free]})["free"].token_ids
    # Any JSON object is unbounded: a random model sampling may write one string for longer than
    # any budget (finish LENGTH), so that kind runs greedy only (which closes it here).
    cases = [(kind, value) for kind, value in CASES if not (sampling and kind == "json_object")]
    asks = [GenerateInput(**{**_fmt(kind, value, **sampling).__dict__, "request_id": kind}) for kind, value in cases]
    # Some arrive with the free row, the others join it mid-decode (prefill and decode both constrained).
    outputs = drive(engine_, limits, {0: [*asks[:2], free], 3: asks[2:]})
    for kind, value in cases:
        out = outputs[kind]
        assert out.final.finish_reason == FinishReason.EOS, (kind, out.text)
        _check(kind, value, out.text)
    assert outputs["free"].token_ids == alone


def test_every_kind_pipelined_gives_the_same_tokens(engine, tiny_llama):
    """The pipelined decode (the CUDA default, forced here) launches a grammar row's next forward
    before the host has advanced its grammar by this step's token; its sampling still takes the
    mask of the advanced state. Every kind's tokens equal the plain engine's, in one batch."""
    plain, limits = engine
    pipelined, _ = make_engine(tiny_llama, max_batch_size=4, max_seq_len=512, overlap_decode=True)
    asks = [GenerateInput(**{**_fmt(kind, value).__dict__, "request_id": kind}) for kind, value in CASES]
    arrivals = {0: asks[:2], 3: asks[2:]}
    want, got = drive(plain, limits, arrivals), drive(pipelined, limits, arrivals)
    for kind, value in CASES:
        assert got[kind].token_ids == want[kind].token_ids, kind
        _check(kind, value, got[kind].text)
    assert pipelined.stats().pipelined_steps > 0


@pytest.mark.parametrize("kind, value, needle", [
    ("json_schema", "{\"type\": \"foo\"}", "foo"),
    ("json_schema", "{\"type\": ", "not valid JSON"),
    ("regex", "[a-", "Unclosed"),
    ("grammar", "root ::= ", "line 1"),
    ("grammar", "start ::= \"x\"", "root"),
])
def test_invalid_format_names_the_field(engine, kind, value, needle):
    engine_, limits = engine
    with pytest.raises(InvalidInput) as err:
        build_request(_fmt(kind, value), engine_.tokenizer, limits, engine_.grammars)
    assert err.value.field == f"params.response_format.{kind}"
    assert needle in str(err.value)


@pytest.mark.parametrize("extra, field", [({"ignore_eos": True}, "params.ignore_eos"),
                                          ({"min_new_tokens": 3}, "params.min_new_tokens")])
def test_conflicting_params_are_refused(engine, extra, field):
    engine_, limits = engine
    with pytest.raises(InvalidInput) as err:
        build_request(_fmt("regex", REGEX, **extra), engine_.tokenizer, limits, engine_.grammars)
    assert err.value.field == field


def test_a_grammar_the_engine_cannot_compile_ends_only_its_request(engine):
    """Unvalidated input straight to the engine (the server always validates first): the request
    ends with ERROR naming the format; its batch-mate runs as if alone."""
    engine_, limits = engine
    free = GenerateInput(request_id="free", prompt="Other traffic", max_new_tokens=12, ignore_eos=True)
    alone = drive(engine_, limits, {0: [free]})["free"].token_ids
    bad = GenerateInput(**{**_fmt("regex", "[a-").__dict__, "request_id": "bad"})
    outputs = drive(engine_, limits, {0: [bad, free]})
    assert outputs["bad"].final.finish_reason == FinishReason.ERROR
    assert "response_format" in outputs["bad"].final.error and "Unclosed" in outputs["bad"].final.error
    assert outputs["free"].token_ids == alone


def test_compiles_once_per_format(tiny_llama):
    _, tokenizer, spec = tiny_llama
    grammars = Grammars(tokenizer, spec.vocab_size, spec.eos_token_ids)
    first = grammars.start("regex", REGEX)
    assert grammars.start("regex", REGEX) is first
    assert grammars.start("regex", REGEX + "x") is not first


# ---- property: generated schemas ---------------------------------------------------------------
_NAMES = st.text("abcdefghij_", min_size=1, max_size=6)
_PROPERTY = st.one_of(
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 500)).map(
        lambda lo_w: {"type": "integer", "minimum": lo_w[0], "maximum": lo_w[0] + lo_w[1]}),
    st.just({"type": "boolean"}),
    st.lists(st.text("xyz ", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
)


@st.composite
def _schemas(draw) -> dict:
    properties = draw(st.dictionaries(_NAMES, _PROPERTY, min_size=1, max_size=4))
    required = [name for name in properties if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required}


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=_schemas(), seed=st.integers(0, 2**31))
def test_generated_schemas_always_validate(engine, schema, seed):
    engine_, limits = engine
    value = json.dumps(schema)
    asks = [GenerateInput(request_id="greedy", prompt="{", max_new_tokens=200,
                          response_format=ResponseFormatInput("json_schema", value)),
            GenerateInput(request_id="sampled", prompt="{", max_new_tokens=200, temperature=1.0, seed=seed,
                          response_format=ResponseFormatInput("json_schema", value))]
    for rid, out in drive(engine_, limits, {0: asks}).items():
        assert out.final.finish_reason == FinishReason.EOS, (rid, schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


# ---- through the real server (built-in model) ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt, check", [
    (pb.ResponseFormat(json_schema=json.dumps(PERSON)), lambda t: jsonschema.validate(json.loads(t), PERSON)),
    (pb.ResponseFormat(json_object=True), lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
    (pb.ResponseFormat(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    (pb.ResponseFormat(grammar=GRAMMAR), lambda t: t in ("answer: yes.", "answer: no.") or pytest.fail(t)),
], ids=["json_schema", "json_object", "regex", "grammar"])
def test_through_the_server(server, fmt, check):
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Describe a team member as JSON: name, age, admin, team.")],
        params=pb.GenerationParams(max_new_tokens=120, response_format=fmt))
    with BatonClient(server.target) as client:
        messages = list(client.stub.Generate(request, timeout=120))
    assert messages[-1].finish_reason == pb.EOS
    check("".join(m.text for m in messages))
    with BatonClient(server.target) as client, pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(pb.GenerateRequest(prompt="x", params=pb.GenerationParams(
            response_format=pb.ResponseFormat(regex="(unclosed"))), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("params.response_format.regex:"), err.value.details()
