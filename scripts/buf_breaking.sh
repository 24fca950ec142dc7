#!/usr/bin/env bash
# The proto contracts' breaking-change guard (`make lint`): `buf breaking` of proto/
# against the last v* release tag reachable from HEAD, with the WIRE_JSON rules of
# proto/buf.yaml (a field removed, renumbered, renamed in JSON or retyped fails).
#
#   scripts/buf_breaking.sh [REPO]      REPO: the git checkout to check (default: this one)
#
# BUF selects the buf binary (default .venv/bin/buf of this checkout). With no v* tag
# yet it says so and succeeds: there is no released contract to break.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BUF=${BUF:-$HERE/.venv/bin/buf}
case "$BUF" in /*) ;; *) BUF="$PWD/$BUF" ;; esac
cd "${1:-$HERE}"
tag=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || true)
if [ -z "$tag" ]; then
  echo "buf breaking: skipped, no v* release tag yet"
  exit 0
fi
echo "buf breaking against $tag"
"$BUF" breaking proto --against ".git#tag=$tag,subdir=proto"
