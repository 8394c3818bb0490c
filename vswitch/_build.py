"""cffi build script for vswitch._native, the C fast path.

Run by `pip install` through setup.py's cffi_modules; `python vswitch/_build.py`
builds in place for a quick edit-compile loop.
"""

import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import native_sources  # noqa: E402  (a sibling module, not yet importable as vswitch.*)

# VSWITCH_SANITIZE=1 builds the fast path with AddressSanitizer and
# UndefinedBehaviorSanitizer, for the fuzzers and for hunting memory bugs.
# Such a build only loads into a Python started with libasan preloaded; see
# native_sources.SANITIZED_RUN_HINT and fuzz/README.md.
SANITIZE = native_sources.sanitize_requested()
if SANITIZE:
    # UB aborts instead of printing and going on; no LTO, which only slows the
    # instrumented build; -O1 -g keeps reports readable.
    _compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                     "-fno-sanitize-recover=all"]
    _link_args = ["-fsanitize=address,undefined"]
else:
    # -flto lets the PMD loop inline the ring engine's and the MAC table's calls;
    # -fno-semantic-interposition lets it do so for functions the module also
    # exports (to cffi), which -fPIC would otherwise call through the PLT.
    _compile_args = ["-O3", "-flto", "-fno-semantic-interposition"]
    _link_args = ["-O3", "-flto", "-fno-semantic-interposition"]

ffibuilder = FFI()
ffibuilder.cdef(native_sources.cdef_text(HERE))
# setuptools wants source paths relative to setup.py; an in-place build
# (below) compiles in a temporary directory and needs them absolute.
_base = HERE if __name__ == "__main__" else pathlib.Path("vswitch")
ffibuilder.set_source(
    "vswitch._native",
    '#include "vswitch.h"\n'
    f'const char *vs_source_hash(void) {{ return "{native_sources.source_hash(HERE)}"; }}\n'
    f'const char *vs_build_flavor(void) {{ return "{native_sources.flavor(SANITIZE)}"; }}\n',
    sources=[str(_base / s) for s in native_sources.SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-march=x86-64-v2", "-std=gnu11", "-Wall", "-Wextra",
                        "-Wno-unused-parameter", "-Werror", "-fno-strict-aliasing"] + _compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    import shutil
    import tempfile

    # The same file name pip's build gives it, so the two never shadow each other.
    # Renamed into place, never rewritten: a running vswitchd keeps the old file's code.
    with tempfile.TemporaryDirectory() as tmp:
        built = pathlib.Path(ffibuilder.compile(tmpdir=tmp, target="_native.abi3.so", verbose=False))
        staged = HERE / ".native.so.new"
        shutil.copy2(built, staged)
        staged.replace(HERE / "_native.abi3.so")
    for stale in HERE.glob("_native.*.so"):
        if stale.name != "_native.abi3.so":
            stale.unlink()
    print(f"built {HERE / '_native.abi3.so'}" + (" (sanitized: ASan + UBSan)" if SANITIZE else ""))
