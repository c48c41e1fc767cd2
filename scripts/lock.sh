#!/usr/bin/env bash
# Regenerates constraints.txt, the lock of the whole environment that the README's commands and .ci/run install
# through (`pip install -c constraints.txt ...`), from the ranges in pyproject.toml (runtime + the dev extra).
#
#   scripts/lock.sh              keep the current pins, add or drop only what pyproject.toml's changes need
#   scripts/lock.sh --upgrade    move every package to the newest version the ranges allow
#                                (run scripts/check-latest.sh first: it says whether those versions pass)
#
# The lock is resolved by uv for CPython 3.11 on this platform (Linux x86_64). torch resolves to the 2.13.0 CPU
# wheel, which uv finds only through --find-links (it does not read pip's configuration): set FEDFM_TORCH_WHEELS
# to the folder holding it if it is not /opt/wheels. A PyPI torch would pull a multi-GB CUDA build and its
# nvidia-* packages into the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${FEDFM_TORCH_WHEELS:-/opt/wheels}
ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 || { echo "no torch 2.13.0 CPU wheel in $wheels (set FEDFM_TORCH_WHEELS)" >&2; exit 2; }
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q uv==0.13.8
"$tools/venv/bin/uv" pip compile pyproject.toml --extra dev --python-version 3.11 --find-links "$wheels" \
    --custom-compile-command "scripts/lock.sh" --quiet -o constraints.txt \
    --upgrade-package torch "$@"  # torch: always the local CPU build, never a kept PyPI pin
echo "constraints.txt: $(grep -c '^[A-Za-z0-9]' constraints.txt) packages pinned"
