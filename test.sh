#!/usr/bin/env bash
# Quick start, part two: build the package with its test dependencies into
# .venv, install the Debian packages the build and the tests need when
# missing, run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
native/build-deps.sh setpriv:util-linux redis-server:redis-server redis-cli:redis-tools
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e '.[test]'
exec .venv/bin/python -m pytest "$@"
