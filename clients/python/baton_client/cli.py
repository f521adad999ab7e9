"""The client commands of `baton`: `generate` and `chat` stream completions from a running server to
the terminal; `info`, `tokenize` and `preempt` make one call each. A gRPC error is printed as
`error: CODE: message` on stderr with exit status 1; bad arguments exit 2."""
from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from baton.v1 import baton_pb2 as pb
from baton_client.client import BatonClient, Completion, GenerationOptions


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--include-stop-sequence", action="store_true", help="keep the matched stop sequence in the output")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], dest="stop_token_ids",
                   help="token id that ends the completion (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS and stop ids cannot end it before this")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="in [0, 1]; 0 = off")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    p.add_argument("--truncate-prompt-tokens", type=int, default=0,
                   help="keep only the last N prompt tokens (after the chat template); 0 = off")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """Flags of `baton generate` only (their output does not fit an interactive chat)."""
    p.add_argument("--request-id", default="",
                   help="the request's id, for `baton preempt ID ...` from another terminal (default: the server's)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="after the text, print each token's log-probability and its N most likely "
                        "alternatives (0..20; 0 = the chosen token's only)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the output to this JSON Schema (sent as response_format.json_schema)")


def _usage_error(message: str) -> None:
    print(f"baton: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token_id, sep, value = item.partition("=")
        try:
            bias[int(token_id)] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            _usage_error(f"--logit-bias wants ID=BIAS, got {item!r}")
    return bias


def _response_format(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            schema = fh.read()
        json.loads(schema)
    except (OSError, ValueError) as exc:
        _usage_error(f"--json-schema {path}: {exc}")
    return {"json_schema": schema}


def _options(args: argparse.Namespace) -> GenerationOptions:
    logprobs = getattr(args, "logprobs", None)
    return GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        include_stop_sequence=args.include_stop_sequence, stop_token_ids=tuple(args.stop_token_ids),
        min_new_tokens=args.min_new_tokens, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, min_p=args.min_p, logit_bias=_logit_bias(args.logit_bias),
        truncate_prompt_tokens=args.truncate_prompt_tokens, logprobs=logprobs is not None,
        top_logprobs=logprobs or 0, response_format=_response_format(getattr(args, "json_schema", None)))


def _stream(client: BatonClient, args: argparse.Namespace, options: GenerationOptions,
            messages_out: list | None = None, **kwargs) -> Completion:
    completion = Completion()
    call = client.generate(options=options, priority=args.priority, timeout=args.timeout, **kwargs)
    try:
        for msg in call:
            completion.add(msg)
            if messages_out is not None:
                messages_out.append(msg)
            if msg.text:
                sys.stdout.write(msg.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        call.cancel()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    return completion


def _error(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _print_logprobs(messages: list[pb.GenerateResponse]) -> None:
    """One line per generated token: the text that came with its message (on the message's first
    token), its id and log-probability, then the top alternatives as id:logprob."""
    print("[log-probabilities: text, token id, logprob, top alternatives id:logprob]")
    for msg in messages:
        for i, lp in enumerate(msg.logprobs):
            text = json.dumps(msg.text, ensure_ascii=False) if i == 0 else ""
            top = "  ".join(f"{t.token_id}:{t.logprob:.4f}" for t in lp.top)
            print(f"{text:>16} {lp.token_id:>7} {lp.logprob:>9.4f}  {top}".rstrip())


def generate(args: argparse.Namespace) -> int:
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        _usage_error(f"--logprobs must be in [0, 20], got {args.logprobs}")
    options = _options(args)
    messages_out: list[pb.GenerateResponse] = []
    with BatonClient(args.target) as client:
        try:
            # An instruct model answers a user message; fed the bare question as raw text it may
            # just end the turn. So: chat when the model has a chat template, unless --raw.
            as_chat = args.chat or (not args.raw and client.model_info().has_chat_template)
            messages = [("user", args.prompt)] if as_chat else None
            done = _stream(client, args, options, messages_out, prompt=None if as_chat else args.prompt,
                           messages=messages, request_id=args.request_id)
        except grpc.RpcError as exc:
            return _error(exc)
    if args.logprobs is not None:
        _print_logprobs(messages_out)
    truncated = f"; {done.truncated_prompt_tokens} prompt tokens cut" if done.truncated_prompt_tokens else ""
    print(f"[{done.finish_reason.lower()}; {done.prompt_tokens} prompt + {done.completion_tokens} "
          f"completion tokens{truncated}; request_id {done.request_id}]", file=sys.stderr)
    return 0


def info(args: argparse.Namespace) -> int:
    with BatonClient(args.target) as client:
        try:
            model = client.model_info()
        except grpc.RpcError as exc:
            return _error(exc)
    fields = json_format.MessageToDict(model, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    if args.json:
        print(json.dumps(fields, indent=2))
    else:
        for name, value in fields.items():
            print(f"{name}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return 0


def tokenize(args: argparse.Namespace) -> int:
    with BatonClient(args.target) as client:
        try:
            as_chat = args.chat
            pieces = client.tokenize_pieces(None if as_chat else args.prompt,
                                            [("user", args.prompt)] if as_chat else None)
        except grpc.RpcError as exc:
            return _error(exc)
    if args.json:
        print(json.dumps({"token_ids": [i for i, _ in pieces], "tokens": [t for _, t in pieces]}))
    else:
        for token_id, piece in pieces:
            print(f"{token_id}\t{json.dumps(piece, ensure_ascii=False)}")
    print(f"[{len(pieces)} tokens]", file=sys.stderr)
    return 0


def preempt(args: argparse.Namespace) -> int:
    if args.action is None and args.priority is None:
        _usage_error("preempt: give an action (suspend, resume, cancel), --priority N, or both")
    with BatonClient(args.target) as client:
        try:
            state = client.preempt(args.request_id, args.action or "priority", args.priority, args.caller)
        except grpc.RpcError as exc:
            return _error(exc)
    print(f"{args.request_id}: {state}")
    return 0


def add_command_parsers(sub) -> None:
    """`info`, `tokenize` and `preempt` (their flags; `generate` and `chat` are built by the caller)."""
    i = sub.add_parser("info", help="describe the served model (GetModelInfo)")
    i.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    i.add_argument("--json", action="store_true", help="print the ModelInfo message as JSON")
    t = sub.add_parser("tokenize", help="token ids and pieces of a prompt with the served model's tokenizer")
    t.add_argument("prompt")
    t.add_argument("--chat", action="store_true",
                   help="tokenize the prompt as a user chat message (with the chat template and generation prompt)")
    t.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    t.add_argument("--json", action="store_true", help='print {"token_ids": [...], "tokens": [...]}')
    p = sub.add_parser("preempt", help="suspend, resume, cancel or re-prioritise a request by id")
    p.add_argument("request_id")
    p.add_argument("action", nargs="?", choices=("suspend", "resume", "cancel"),
                   help="absent: change the priority only (needs --priority)")
    p.add_argument("--priority", type=int, default=None, help="the request's new priority")
    p.add_argument("--caller", default="", help="with auth on, admins only: whose request id it is")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")



def chat(args: argparse.Namespace) -> int:
    options = _options(args)
    history: list[tuple[str, str]] = []
    if args.system:
        history.append(("system", args.system))
    with BatonClient(args.target) as client:
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line.strip():
                continue
            history.append(("user", line))
            sys.stdout.write("baton> ")
            try:
                done = _stream(client, args, options, messages=history)
            except grpc.RpcError as exc:
                print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
                history.pop()
                continue
            except KeyboardInterrupt:
                print()
                history.pop()
                continue
            history.append(("assistant", done.text))


COMMANDS = {"generate": generate, "chat": chat, "info": info, "tokenize": tokenize, "preempt": preempt}
