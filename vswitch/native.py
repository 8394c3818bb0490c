"""The compiled fast path, checked against the C sources it was built from.

Import `ffi` and `lib` from here, never from vswitch._native directly: a
missing or stale build then fails at once with the command that fixes it.
"""

from vswitch import native_sources

_REBUILD = "rebuild it with: pip install -e .  (or: python vswitch/_build.py for an in-place build)"

try:
    from vswitch._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"vswitch: the C fast path (vswitch._native) is not built: {exc}; {_REBUILD}") from exc

_built = ffi.string(lib.vs_source_hash()).decode()
_current = native_sources.source_hash()
if _built != _current:
    raise ImportError(
        f"vswitch: the C fast path is stale (built from sources {_built}, the sources are now {_current}); {_REBUILD}")

__all__ = ["ffi", "lib"]
