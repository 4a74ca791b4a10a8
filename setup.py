# cffi hooks into setuptools through this keyword only; all other metadata is in pyproject.toml.
from setuptools import setup

# The extension is built against the limited API (cffi's default: _native.abi3.so), so the wheel
# is tagged abi3 too: one wheel for CPython 3.11 and every later version.
setup(cffi_modules=["native/build_native.py:ffibuilder"], options={"bdist_wheel": {"py_limited_api": "cp311"}})
