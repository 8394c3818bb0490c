"""The compiled fast path must match its sources, or refuse to load."""

import shutil
import subprocess
import sys

import os

import _cffi_backend

from vswitch import native_sources
from vswitch.native import ffi, lib


def import_native(root):
    """Imports vswitch.native from a copy of the package under `root`.

    -S keeps site (and with it an editable install's import hook) out, so the
    copy, not the checkout, is what gets imported; cffi's backend stays reachable.
    """
    path = f"{root}{os.pathsep}{os.path.dirname(_cffi_backend.__file__)}"
    return subprocess.run([sys.executable, "-S", "-c", "import vswitch.native"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": path})


def test_loaded_build_matches_sources():
    assert ffi.string(lib.vs_source_hash()).decode() == native_sources.source_hash()


def test_stale_build_fails_loudly(tmp_path):
    # A copy of the package whose C sources changed after the build.
    pkg = tmp_path / "vswitch"
    shutil.copytree(native_sources.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "fib" / "fib.c", "a") as f:
        f.write("\n/* edited after the build */\n")
    out = import_native(tmp_path)
    assert out.returncode != 0
    assert "the C fast path is stale" in out.stderr and "pip install -e ." in out.stderr


def test_missing_build_fails_loudly(tmp_path):
    pkg = tmp_path / "vswitch"
    shutil.copytree(native_sources.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = import_native(tmp_path)
    assert out.returncode != 0
    assert "is not built" in out.stderr and "pip install -e ." in out.stderr


def test_an_unchanged_copy_imports(tmp_path):
    # The harness itself: a faithful copy loads, so the failures above are real.
    shutil.copytree(native_sources.PACKAGE_DIR, tmp_path / "vswitch", ignore=shutil.ignore_patterns("__pycache__"))
    out = import_native(tmp_path)
    assert out.returncode == 0, out.stderr
