#!/usr/bin/env bash
# The proto contracts' breaking-change guard (`make lint`): `buf breaking` of proto/
# against the last v* release tag reachable from HEAD, with the WIRE_JSON rules of
# proto/buf.yaml (a field removed, renumbered, renamed in JSON or retyped fails).
#
#   scripts/buf_breaking.sh [REPO]      REPO: the git checkout to check (default: this one)
#
# BUF selects the buf binary (default .venv/bin/buf of this checkout). A clone without
# the tag (tags do not always travel with a clone) checks against the release commit
# that proto/RELEASED names. With neither it says so and succeeds: there is no released
# contract to break.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BUF=${BUF:-$HERE/.venv/bin/buf}
case "$BUF" in /*) ;; *) BUF="$PWD/$BUF" ;; esac
cd "${1:-$HERE}"
tag=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || true)
if [ -n "$tag" ]; then
  echo "buf breaking against $tag"
  exec "$BUF" breaking proto --against ".git#tag=$tag,subdir=proto"
fi
released=""
if [ -f proto/RELEASED ]; then
  released=$(awk '!/^#/ && NF == 2 { line = $0 } END { print line }' proto/RELEASED)
fi
if [ -n "$released" ]; then
  name=${released%% *}
  commit=${released##* }
  if git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "buf breaking against $name (commit $commit, proto/RELEASED)"
    exec "$BUF" breaking proto --against ".git#ref=$commit,subdir=proto"
  fi
  echo "buf breaking: $name's commit $commit is not in this clone (a shallow clone?)" >&2
  exit 1
fi
echo "buf breaking: skipped, no release yet"
