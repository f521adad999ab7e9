#!/usr/bin/env bash
# Regenerates the Python code for protos/ into clients/python (never edit the output by hand).
# With --check, generates into a temporary folder and fails if the committed code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=clients/python
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); fi
mkdir -p "$out/baton/v1"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/baton/v1/baton.proto
touch "$out/baton/__init__.py" "$out/baton/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  for f in baton_pb2.py baton_pb2.pyi baton_pb2_grpc.py; do
    if ! diff -q "$out/baton/v1/$f" "clients/python/baton/v1/$f" >/dev/null; then
      echo "generated code is stale: clients/python/baton/v1/$f (run scripts/gen_protos.sh)" >&2
      exit 1
    fi
  done
  echo "generated code is up to date"
fi
