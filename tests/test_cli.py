"""The client commands of `baton` (baton_client/cli.py) as subprocesses against the session server:
info, tokenize, preempt, generate --logprobs and --json-schema, and how errors are reported."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from baton_client import BatonClient, GenerationOptions
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def baton(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client(server):
    with BatonClient(server.target) as c:
        yield c


def test_info_prints_the_model_info(server, client):
    info = client.model_info()
    as_json = baton("info", "--target", server.target, "--json")
    assert as_json.returncode == 0, as_json.stderr
    fields = json.loads(as_json.stdout)
    assert fields["model_name"] == info.model_name and fields["vocab_size"] == info.vocab_size
    assert fields["eos_token_ids"] == list(info.eos_token_ids)
    assert fields["has_chat_template"] is info.has_chat_template
    text = baton("info", "--target", server.target)
    assert text.returncode == 0, text.stderr
    assert f"max_context_length: {info.max_context_length}" in text.stdout.splitlines()
    assert f"model_name: {info.model_name}" in text.stdout.splitlines()


def test_tokenize_prompt_and_chat(server, client):
    out = baton("tokenize", "--target", server.target, "Hello world")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [int(i) for i, _ in rows] == client.tokenize("Hello world")
    assert [json.loads(p) for _, p in rows] == [p for _, p in client.tokenize_pieces("Hello world")]
    assert f"[{len(rows)} tokens]" in out.stderr
    chat = baton("tokenize", "--target", server.target, "--chat", "--json", "Hello world")
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["token_ids"] == client.tokenize(messages=[("user", "Hello world")])


ROW = re.compile(r'\s*(?P<text>".*")? +(?P<token_id>\d+) +(?P<logprob>-?\d+\.\d{4})(?P<top>(  \d+:-?\d+\.\d{4})*)')


def test_generate_logprobs_prints_one_row_per_token(server, client):
    out = baton("generate", "--target", server.target, "--raw", "--max-new-tokens", "6", "--ignore-eos",
                "--logprobs", "2", "The capital of France is")
    assert out.returncode == 0, out.stderr
    reference = client.complete("The capital of France is",
                                options=GenerationOptions(max_new_tokens=6, ignore_eos=True, top_logprobs=2))
    table = out.stdout.split("[log-probabilities: text, token id, logprob, top alternatives id:logprob]\n")[1]
    rows = [ROW.fullmatch(line) for line in table.splitlines()]
    assert len(rows) == 6 and all(rows), table
    for row, lp in zip(rows, reference.logprobs):
        assert int(row["token_id"]) == lp.token_id and abs(float(row["logprob"]) - lp.logprob) < 2e-4
        top = [item.split(":") for item in row["top"].split()]
        assert [int(i) for i, _ in top] == [t.token_id for t in lp.top]
        assert all(abs(float(v) - t.logprob) < 2e-4 for (_, v), t in zip(top, lp.top))
    assert reference.text.startswith("".join(json.loads(row["text"]) for row in rows if row["text"]))
    assert out.stdout.startswith(reference.text)


def test_generate_json_schema_sends_response_format(server, tmp_path):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = baton("generate", "--target", server.target, "--json-schema", str(path), "--max-new-tokens", "40",
                "Answer in JSON: what is 2 + 2?")
    if out.returncode == 0:   # a server with structured output: the completion matches the schema
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(json.loads(out.stdout), schema)
    else:                     # today's server refuses it by name; the CLI shows its status and message
        assert out.returncode == 1
        assert re.search(r"^error: (UNIMPLEMENTED|INVALID_ARGUMENT): params\.response_format", out.stderr, re.M), \
            out.stderr


def test_generate_reports_the_servers_status_and_bad_arguments(server, tmp_path):
    bad = baton("generate", "--target", server.target, "--min-p", "1.5", "Hi")
    assert bad.returncode == 1 and re.search(r"^error: INVALID_ARGUMENT: params\.min_p", bad.stderr, re.M), bad.stderr
    not_json = tmp_path / "not.json"
    not_json.write_text("{type: object")
    for args in (["--logprobs", "21"], ["--logit-bias", "7"], ["--json-schema", str(not_json)]):
        out = baton("generate", "--target", server.target, *args, "Hi")
        assert out.returncode == 2 and out.stderr.startswith("baton: error: "), (args, out.stderr)


def test_preempt_suspend_resume_cancel_a_cli_generation(server):
    gen = subprocess.Popen([sys.executable, "-m", "service.cli", "generate", "--target", server.target, "--raw",
                            "--request-id", "cli-preempt-1", "--max-new-tokens", "400", "--ignore-eos",
                            "Count to a thousand:"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 60
        while True:   # a priority change succeeds once the request is known
            known = baton("preempt", "--target", server.target, "cli-preempt-1", "--priority", "0")
            if known.returncode == 0 or time.monotonic() > deadline:
                break
            assert "NOT_FOUND" in known.stderr, known.stderr
            time.sleep(0.2)
        assert known.returncode == 0, known.stderr
        suspended = baton("preempt", "--target", server.target, "cli-preempt-1", "suspend")
        assert (suspended.returncode, suspended.stdout) == (0, "cli-preempt-1: SUSPENDED\n"), suspended.stderr
        resumed = baton("preempt", "--target", server.target, "cli-preempt-1", "resume", "--priority", "3")
        assert resumed.returncode == 0, resumed.stderr
        assert re.fullmatch(r"cli-preempt-1: (PREEMPTED|QUEUED|RUNNING)\n", resumed.stdout), resumed.stdout
        cancelled = baton("preempt", "--target", server.target, "cli-preempt-1", "cancel")
        assert (cancelled.returncode, cancelled.stdout) == (0, "cli-preempt-1: FINISHED\n"), cancelled.stderr
        _, err = gen.communicate(timeout=60)
    finally:
        if gen.poll() is None:
            gen.kill()
    assert gen.returncode == 0 and "[cancelled; " in err and "request_id cli-preempt-1]" in err, err


def test_preempt_errors(server):
    missing = baton("preempt", "--target", server.target, "cli-no-such-id", "cancel")
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND: "), missing.stderr
    no_action = baton("preempt", "--target", server.target, "cli-no-such-id")
    assert no_action.returncode == 2 and "--priority" in no_action.stderr
    caller = baton("preempt", "--target", server.target, "cli-no-such-id", "cancel", "--caller", "bob")
    assert caller.returncode == 1 and caller.stderr.startswith("error: INVALID_ARGUMENT: caller"), caller.stderr
