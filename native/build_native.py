"""Builds uffd_pager._native with cffi's out-of-line API mode.

setup.py names this file in ``cffi_modules``, so the C compiles during
``pip install .`` and ``pip install -e .``. The cdef is the plain-C header
``uffd_pager.h`` plus the constants in ``constants.cdef``; the C sources are
every ``.c`` file beside this script.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _cdef_text() -> str:
    # cffi's parser takes no preprocessor lines except "#define NAME ...".
    header = "\n".join(
        line for line in (HERE / "uffd_pager.h").read_text().splitlines() if not line.startswith("#")
    )
    return (HERE / "constants.cdef").read_text() + header


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "uffd_pager._native",
    '#include "uffd_native.h"',
    sources=sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-std=gnu11"],
    libraries=["pthread"],
    # libcrypto by its runtime name: no OpenSSL headers or dev symlink needed (see aead.c).
    extra_link_args=["-l:libcrypto.so.3"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
