#!/usr/bin/env bash
# Regenerates the Python protobuf and gRPC code (with .pyi stubs) from proto/.
#
#   scripts/proto_codegen.sh            regenerate into libs/ (the committed code)
#   scripts/proto_codegen.sh OUT_DIR    generate into OUT_DIR instead (OUT_DIR/sluice/...)
#   scripts/proto_codegen.sh --check    fail when the committed code differs from a fresh
#                                       generation (stale or hand-edited)
#
# The generator is pinned by pyproject.toml (grpcio-tools, mypy-protobuf); old output is
# deleted first so that a removed .proto leaves nothing behind. PYTHON selects the
# interpreter (default .venv/bin/python); the mypy plugins are taken from its bin folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-.venv/bin/python}
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
BIN=$(dirname "$PY")

generate() {
  local out=$1
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  local pkg name
  for pkg in proto/sluice/*/; do
    name=$(basename "$pkg")
    rm -rf "$out/sluice/$name/v1"
    mkdir -p "$out/sluice/$name"
  done
  local files
  mapfile -t files < <(cd proto && find sluice -name '*.proto' | sort)
  (cd proto && "$PY" -m grpc_tools.protoc -I . \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" \
    --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
    "${files[@]}") 2> >(grep -v '^Writing mypy to' >&2)
  for pkg in proto/sluice/*/; do
    name=$(basename "$pkg")
    touch "$out/sluice/$name/__init__.py" "$out/sluice/$name/v1/__init__.py"
  done
  # Generated gRPC modules for files without services are empty shells: drop them.
  local f
  for f in "$out"/sluice/*/v1/*_pb2_grpc.py; do
    grep -q 'Stub' "$f" || rm -f "$f"
  done
  for f in "$out"/sluice/*/v1/*_pb2_grpc.pyi; do
    [ -f "${f%.pyi}.py" ] || rm -f "$f"
  done
}

check() {
  local status=0 dir name
  CHECK_TMP=$(mktemp -d)
  trap 'rm -rf "$CHECK_TMP"' EXIT
  local tmp=$CHECK_TMP
  generate "$tmp"
  # Every generated package must match, and no committed v1 package may lack a .proto.
  local names
  names=$(for dir in "$tmp"/sluice/*/v1 libs/sluice/*/v1; do
    basename "$(dirname "$dir")"
  done | sort -u)
  for name in $names; do
    if ! diff -r -q -x __pycache__ "$tmp/sluice/$name/v1" "libs/sluice/$name/v1" >/dev/null 2>&1; then
      diff -r -u -x __pycache__ "$tmp/sluice/$name/v1" "libs/sluice/$name/v1" | head -40 || true
      status=1
    fi
  done
  if [ "$status" -ne 0 ]; then
    echo "generated protobuf code is stale: run 'make proto' and commit the result" >&2
  else
    echo "generated protobuf code is up to date"
  fi
  return "$status"
}

case "${1:-}" in
  --check) check ;;
  "") generate libs ;;
  *) generate "$1" ;;
esac
