"""The compiled fast path must match its sources, or refuse to load."""

import shutil
import subprocess
import sys

from vswitch import native_sources
from vswitch.native import ffi, lib


def test_loaded_build_matches_sources():
    assert ffi.string(lib.vs_source_hash()).decode() == native_sources.source_hash()


def test_stale_build_fails_loudly(tmp_path):
    # A copy of the package whose C sources changed after the build.
    pkg = tmp_path / "vswitch"
    shutil.copytree(native_sources.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "fib" / "fib.c", "a") as f:
        f.write("\n/* edited after the build */\n")
    out = subprocess.run([sys.executable, "-c", "import vswitch.native"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    assert "the C fast path is stale" in out.stderr and "pip install -e ." in out.stderr


def test_missing_build_fails_loudly(tmp_path):
    pkg = tmp_path / "vswitch"
    shutil.copytree(native_sources.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = subprocess.run([sys.executable, "-c", "import vswitch.native"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    assert "is not built" in out.stderr and "pip install -e ." in out.stderr
