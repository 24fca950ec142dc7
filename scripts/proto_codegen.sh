#!/usr/bin/env bash
# Regenerates the Python protobuf and gRPC code (with .pyi stubs) from proto/ into libs/.
# The generator is pinned by pyproject.toml (grpcio-tools, mypy-protobuf); old output is
# deleted first so that a removed .proto leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=libs
for pkg in proto/sluice/*/; do
  name=$(basename "$pkg")
  rm -rf "$OUT/sluice/$name/v1"
done
mapfile -t files < <(cd proto && find sluice -name '*.proto' | sort)
(cd proto && "../$PY" -m grpc_tools.protoc -I . \
  --python_out="../$OUT" --grpc_python_out="../$OUT" \
  --mypy_out="../$OUT" --mypy_grpc_out="../$OUT" \
  --plugin=protoc-gen-mypy="../.venv/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="../.venv/bin/protoc-gen-mypy_grpc" \
  "${files[@]}")
for pkg in proto/sluice/*/; do
  name=$(basename "$pkg")
  touch "$OUT/sluice/$name/__init__.py" "$OUT/sluice/$name/v1/__init__.py"
done
# Generated gRPC modules for files without services are empty shells: drop them.
for f in "$OUT"/sluice/*/v1/*_pb2_grpc.py; do
  grep -q 'Stub' "$f" || rm -f "$f"
done
for f in "$OUT"/sluice/*/v1/*_pb2_grpc.pyi; do
  [ -f "${f%.pyi}.py" ] || rm -f "$f"
done
