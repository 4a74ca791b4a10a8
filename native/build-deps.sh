#!/usr/bin/env bash
# Installs, from Debian's packages, what building native/ needs and this
# machine lacks: a C compiler and the system's libcrypto (OpenSSL 3, for
# native/aead.c). Extra package names given as arguments are installed too
# when their command is missing: "setpriv:util-linux".
set -euo pipefail
wanted=()
command -v gcc >/dev/null || wanted+=(gcc)
ldconfig -p 2>/dev/null | grep -q 'libcrypto\.so\.3 ' || wanted+=(libssl3)
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || wanted+=("${pair#*:}")
done
[ ${#wanted[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${wanted[*]}; install them (as root: apt-get install ${wanted[*]})" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${wanted[@]}"
