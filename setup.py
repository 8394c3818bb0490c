# cffi cannot yet be declared in pyproject.toml; everything else lives there.
from setuptools import setup

setup(cffi_modules=["vswitch/_build.py:ffibuilder"])
