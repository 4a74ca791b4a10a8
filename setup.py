# cffi hooks into setuptools through this keyword only; all other metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
