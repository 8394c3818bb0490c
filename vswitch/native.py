"""The compiled fast path, checked against the C sources it was built from.

Import `ffi` and `lib` from here, never from vswitch._native directly: a
missing or stale build then fails at once with the command that fixes it.
"""

from vswitch import native_sources

_REBUILD = "rebuild it with: pip install -e .  (or: python vswitch/_build.py for an in-place build)"

_REBUILD_SANITIZED = ("rebuild it with: VSWITCH_SANITIZE=1 pip install -e .  "
                      "(or: VSWITCH_SANITIZE=1 python vswitch/_build.py)")


def _check_flavor_before_import() -> None:
    """A sanitized build loaded without libasan preloaded kills the process
    at once (ASan insists on being the first library), so look first."""
    import importlib.util

    spec = importlib.util.find_spec("vswitch._native")
    if spec is None or not spec.origin:
        return
    if native_sources.file_is_sanitized(spec.origin) and not native_sources.asan_loaded():
        if native_sources.sanitize_requested():
            raise ImportError(f"vswitch: the C fast path {spec.origin} is a sanitized build (ASan + UBSan), "
                              f"which loads only with libasan preloaded: {native_sources.SANITIZED_RUN_HINT}")
        raise ImportError(f"vswitch: the C fast path {spec.origin} is a sanitized build (ASan + UBSan) and "
                          f"{native_sources.SANITIZE_ENV} is not set; {_REBUILD} for the normal one, or run "
                          f"with {native_sources.SANITIZE_ENV}=1 {native_sources.SANITIZED_RUN_HINT}")


_check_flavor_before_import()

try:
    from vswitch._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"vswitch: the C fast path (vswitch._native) is not built: {exc}; {_REBUILD}") from exc

_built = ffi.string(lib.vs_source_hash()).decode()
_current = native_sources.source_hash()
if _built != _current:
    raise ImportError(
        f"vswitch: the C fast path is stale (built from sources {_built}, the sources are now {_current}); {_REBUILD}")

# The flavor asked for (VSWITCH_SANITIZE) is the flavor loaded, so a run meant
# to be under sanitizers never silently uses the normal build, nor the reverse.
_built_flavor = ffi.string(lib.vs_build_flavor()).decode()
_wanted_flavor = native_sources.flavor(native_sources.sanitize_requested())
if _built_flavor != _wanted_flavor:
    raise ImportError(
        f"vswitch: the C fast path is the {_built_flavor} build, but {native_sources.SANITIZE_ENV} asks for "
        f"the {_wanted_flavor} one; "
        + (_REBUILD_SANITIZED if _wanted_flavor == native_sources.FLAVOR_SANITIZE else _REBUILD))

__all__ = ["ffi", "lib"]
