#!/usr/bin/env bash
# Quick start, part two: build the package with its test dependencies into
# .venv, install the Debian packages the tests need when missing, run pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

debian_packages=()
command -v setpriv >/dev/null || debian_packages+=(util-linux)
command -v gcc >/dev/null || debian_packages+=(gcc)
if [ ${#debian_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: missing ${debian_packages[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}"
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
