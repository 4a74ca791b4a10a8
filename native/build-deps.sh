#!/usr/bin/env bash
# Installs, from Debian's packages, what building native/ needs and this
# machine lacks: a C compiler, the system's libcrypto (OpenSSL 3, for
# native/aead.c), and of python3 what a fresh Debian leaves out: `venv`'s
# ensurepip (python3-venv) and the headers cffi compiles against
# (python3-dev). Extra package names given as arguments are installed too
# when their command is missing: "setpriv:util-linux". Nothing present is
# installed again or upgraded, and nothing needs root when nothing is missing.
set -euo pipefail
wanted=()
command -v gcc >/dev/null || wanted+=(gcc)
# ldconfig's whole output first: piped into `grep -q`, which quits at the first
# match, ldconfig dies of SIGPIPE and pipefail reports the library missing.
# ldconfig lives in sbin, which a user's PATH on Debian lacks.
libraries=$(PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null) || libraries=
[[ $libraries == *'libcrypto.so.3 '* ]] || wanted+=(libssl3)
if command -v python3 >/dev/null; then
    # Debian splits both off python3; one interpreter start checks both.
    # shellcheck disable=SC2207 # the names are single words
    wanted+=($(python3 -c 'import importlib.util, os, sysconfig
if importlib.util.find_spec("ensurepip") is None: print("python3-venv")
if not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")): print("python3-dev")'))
else
    wanted+=(python3 python3-venv python3-dev)
fi
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || wanted+=("${pair#*:}")
done
[ ${#wanted[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${wanted[*]}; install them (as root: apt-get install ${wanted[*]})" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade "${wanted[@]}"
