"""`baton generate` and `baton chat`: stream completions from a running server to the terminal."""
from __future__ import annotations

import argparse
import sys

import grpc

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
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _options(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                             seed=args.seed, stop=tuple(args.stop))


def _stream(client: BatonClient, args: argparse.Namespace, **kwargs) -> Completion:
    completion = Completion()
    call = client.generate(options=_options(args), priority=args.priority, timeout=args.timeout, **kwargs)
    try:
        for msg in call:
            completion.add(msg)
            if msg.text:
                sys.stdout.write(msg.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        call.cancel()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    return completion


def generate(args: argparse.Namespace) -> int:
    with BatonClient(args.target) as client:
        try:
            # An instruct model answers a user message; fed the bare question as raw text it may
            # just end the turn. So: chat when the model has a chat template, unless --raw.
            as_chat = args.chat or (not args.raw and client.model_info().has_chat_template)
            messages = [("user", args.prompt)] if as_chat else None
            done = _stream(client, args, prompt=None if as_chat else args.prompt, messages=messages)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"[{done.finish_reason.lower()}; {done.prompt_tokens} prompt + {done.completion_tokens} "
          f"completion tokens]", file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
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
                done = _stream(client, args, messages=history)
            except grpc.RpcError as exc:
                print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
                history.pop()
                continue
            except KeyboardInterrupt:
                print()
                history.pop()
                continue
            history.append(("assistant", done.text))
