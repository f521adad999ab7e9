"""Compatibility guard: the current baton.v1 descriptor against the released one.

`protos/baton/v1/released.json` is a summary of the v1 descriptor as released (every message's
fields with number, type, label and message/enum type; every enum's values; every RPC with its
types and streaming). A client built from it must keep working, so relative to it nothing may be
removed, renumbered or retyped; additions are fine. The snapshot was written from the generated
code before the "v1 additions for chat backends" and is never regenerated to make this pass:
`python tests/test_proto_compat.py --write` is for a deliberate new release only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

SNAPSHOT = Path(__file__).resolve().parent.parent / "protos" / "baton" / "v1" / "released.json"
_TYPE = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
_LABEL = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}


def _messages(prefix: str, messages, out_messages: dict, out_enums: dict) -> None:
    for msg in messages:
        name = f"{prefix}.{msg.name}"
        out_messages[name] = {
            f.name: {"number": f.number, "type": _TYPE[f.type], "label": _LABEL[f.label],
                     "type_name": f.type_name, "proto3_optional": f.proto3_optional,
                     "oneof": msg.oneof_decl[f.oneof_index].name
                     if f.HasField("oneof_index") and not f.proto3_optional else ""}
            for f in msg.field}
        _enums(name, msg.enum_type, out_enums)
        _messages(name, msg.nested_type, out_messages, out_enums)


def _enums(prefix: str, enums, out: dict) -> None:
    for enum in enums:
        out[f"{prefix}.{enum.name}"] = {v.name: v.number for v in enum.value}


def summary(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """Messages (fields), enums (values) and services (methods) of one proto file, as plain JSON."""
    prefix = "." + file.package
    messages: dict = {}
    enums: dict = {}
    _messages(prefix, file.message_type, messages, enums)
    _enums(prefix, file.enum_type, enums)
    services = {f"{prefix}.{s.name}": {m.name: {"input": m.input_type, "output": m.output_type,
                                                 "client_streaming": m.client_streaming,
                                                 "server_streaming": m.server_streaming}
                                        for m in s.method}
                for s in file.service}
    return {"package": file.package, "messages": messages, "enums": enums, "services": services}


def current_file() -> descriptor_pb2.FileDescriptorProto:
    from baton.v1 import baton_pb2
    file = descriptor_pb2.FileDescriptorProto()
    baton_pb2.DESCRIPTOR.CopyToProto(file)
    return file


def breaking_changes(old: dict, new: dict) -> list[str]:
    """What a client of `old` would be broken by in `new`: removed, renumbered or retyped fields,
    enum values and RPCs (and reused field numbers). Added ones are not listed."""
    problems = []
    if old["package"] != new["package"]:
        problems.append(f"package {old['package']} renamed to {new['package']}")
    for name, fields in old["messages"].items():
        if name not in new["messages"]:
            problems.append(f"message {name} removed")
            continue
        now = new["messages"][name]
        for fname, field in fields.items():
            if fname not in now:
                problems.append(f"field {name}.{fname} removed")
                continue
            for key, value in field.items():
                if now[fname][key] != value:
                    problems.append(f"field {name}.{fname}: {key} changed from {value!r} to {now[fname][key]!r}")
        old_numbers = {f["number"]: fname for fname, f in fields.items()}
        for fname, field in now.items():
            if fname not in fields and field["number"] in old_numbers:
                problems.append(f"field {name}.{fname} reuses number {field['number']} "
                                f"of {old_numbers[field['number']]}")
    for name, values in old["enums"].items():
        if name not in new["enums"]:
            problems.append(f"enum {name} removed")
            continue
        for vname, number in values.items():
            if vname not in new["enums"][name]:
                problems.append(f"enum value {name}.{vname} removed")
            elif new["enums"][name][vname] != number:
                problems.append(f"enum value {name}.{vname} renumbered from {number} to {new['enums'][name][vname]}")
    for name, methods in old["services"].items():
        if name not in new["services"]:
            problems.append(f"service {name} removed")
            continue
        for mname, method in methods.items():
            if mname not in new["services"][name]:
                problems.append(f"rpc {name}.{mname} removed")
            elif new["services"][name][mname] != method:
                problems.append(f"rpc {name}.{mname} changed from {method} to {new['services'][name][mname]}")
    return problems


# ---- tests -------------------------------------------------------------------------------------
def _released() -> dict:
    return json.loads(SNAPSHOT.read_text())


def test_current_proto_keeps_the_released_v1():
    released = _released()
    assert released["messages"][".baton.v1.GenerateRequest"]["params"]["number"] == 5   # a real snapshot
    assert breaking_changes(released, summary(current_file())) == []


def _mutated(edit) -> list[str]:
    file = current_file()
    edit(file)
    return breaking_changes(_released(), summary(file))


def _message(file, name):
    return next(m for m in file.message_type if m.name == name)


def _field(file, message, name):
    return next(f for f in _message(file, message).field if f.name == name)


def test_guard_fails_on_breaking_edits():
    """The guard is not vacuous: each kind of breaking edit to the current descriptor is reported."""
    T = descriptor_pb2.FieldDescriptorProto

    def renumber(file):
        _field(file, "GenerationParams", "top_k").number = 99
    assert _mutated(renumber) == ["field .baton.v1.GenerationParams.top_k: number changed from 4 to 99"]

    def retype(file):
        _field(file, "GenerationParams", "temperature").type = T.TYPE_DOUBLE
    assert _mutated(retype) == ["field .baton.v1.GenerationParams.temperature: type changed from "
                                "'TYPE_FLOAT' to 'TYPE_DOUBLE'"]

    def make_repeated(file):
        _field(file, "GenerateRequest", "prompt").label = T.LABEL_REPEATED
    assert "field .baton.v1.GenerateRequest.prompt: label" in _mutated(make_repeated)[0]

    def drop_optional(file):
        _field(file, "GenerationParams", "seed").proto3_optional = False
    assert any("GenerationParams.seed: proto3_optional" in p for p in _mutated(drop_optional))

    def remove_field(file):
        fields = _message(file, "ChatMessage").field
        del fields[[f.name for f in fields].index("content")]
    assert _mutated(remove_field) == ["field .baton.v1.ChatMessage.content removed"]

    def reuse_number(file):
        fields = _message(file, "Usage").field
        fields[[f.name for f in fields].index("completion_tokens")].name = "completion_tokenz"
    assert sorted(_mutated(reuse_number)) == [
        "field .baton.v1.Usage.completion_tokens removed",
        "field .baton.v1.Usage.completion_tokenz reuses number 2 of completion_tokens"]

    def renumber_enum(file):
        enum = next(e for e in file.enum_type if e.name == "FinishReason")
        next(v for v in enum.value if v.name == "EOS").number = 7
    assert _mutated(renumber_enum) == ["enum value .baton.v1.FinishReason.EOS renumbered from 2 to 7"]

    def remove_enum_value(file):
        enum = next(e for e in file.enum_type if e.name == "RequestState")
        del enum.value[[v.name for v in enum.value].index("SUSPENDED")]
    assert _mutated(remove_enum_value) == ["enum value .baton.v1.RequestState.SUSPENDED removed"]

    def nested_enum(file):
        enum = _message(file, "PreemptRequest").enum_type[0]
        next(v for v in enum.value if v.name == "CANCEL").number = 9
    assert _mutated(nested_enum) == ["enum value .baton.v1.PreemptRequest.Action.CANCEL renumbered from 3 to 9"]

    def unstream(file):
        next(m for m in file.service[0].method if m.name == "Generate").server_streaming = False
    assert _mutated(unstream)[0].startswith("rpc .baton.v1.GenerationService.Generate changed")

    def remove_rpc(file):
        methods = file.service[0].method
        del methods[[m.name for m in methods].index("Tokenize")]
    assert _mutated(remove_rpc) == ["rpc .baton.v1.GenerationService.Tokenize removed"]

    def add_field(file):    # additions are fine
        _message(file, "Usage").field.add(name="brand_new", number=1000, type=T.TYPE_UINT32,
                                          label=T.LABEL_OPTIONAL)
    assert _mutated(add_field) == []


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    SNAPSHOT.write_text(json.dumps(summary(current_file()), indent=1, sort_keys=True) + "\n")
