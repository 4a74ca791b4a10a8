#!/usr/bin/env bash
# Quick start, part one: build the package into .venv and run the main job,
# the quick benchmark of the embedded pager over a file store in a temp dir.
# Extra arguments go to `uffd-pager bench`.
set -euo pipefail
cd "$(dirname "$0")"
native/build-deps.sh
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e .
exec .venv/bin/uffd-pager bench --quick "$@"
