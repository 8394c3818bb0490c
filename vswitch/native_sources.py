"""The C sources of the fast path, in the order the compiler and cffi read them.

Shared by the cffi build script and the import-time staleness check, so the
two can never disagree about what "the sources" are.
"""

import hashlib
import os
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent

# Headers in dependency order; each is free of #include so ffi.cdef() can read it.
HEADERS = [
    "pmd/packet.h",
    "vhost/virtio.h",
    "vhost/packed_ring.h",
    "vhost/dirty_log.h",
    "ports/port.h",
    "pmd/capture.h",
    "vhost/virtqueue.h",
    "vhost/iotlb.h",
    "vhost/guestmem.h",
    "vhost/port_ops.h",
    "pmd/offload.h",
    "ports/kernel.h",
    "ports/null.h",
    "ports/af_xdp.h",
    "ports/vxlan.h",
    "fib/fib.h",
    "pmd/pmd.h",
    "pmd/copy_bench.h",
    "pmd/core_probe.h",
]
SOURCES = [
    "vhost/virtqueue.c",
    "vhost/packed_ring.c",
    "vhost/dirty_log.c",
    "vhost/iotlb.c",
    "vhost/guestmem.c",
    "vhost/port_ops.c",
    "fib/fib.c",
    "pmd/pmd.c",
    "ports/kernel.c",
    "ports/null.c",
    "ports/af_xdp.c",
    "ports/vxlan.c",
    "pmd/offload.c",
    "pmd/capture.c",
    "pmd/copy_bench.c",
    "pmd/core_probe.c",
]
# Included by the .c files only (inline helpers, system headers).
PRIVATE_HEADERS = ["vswitch.h", "vhost/ring_internal.h"]


def source_hash(base: pathlib.Path = PACKAGE_DIR) -> str:
    """Hash of every C file, embedded in the build and checked at import."""
    digest = hashlib.sha256()
    for name in HEADERS + SOURCES + PRIVATE_HEADERS:
        digest.update(name.encode())
        digest.update((base / name).read_bytes())
    return digest.hexdigest()[:16]


def cdef_text(base: pathlib.Path = PACKAGE_DIR) -> str:
    return "\n".join((base / name).read_text() for name in HEADERS) + \
        "\nconst char *vs_source_hash(void);\nconst char *vs_build_flavor(void);\n"


# --- sanitized builds (VSWITCH_SANITIZE=1) ------------------------------------
# A build with ASan + UBSan is a different flavor of the same sources: its
# flavor string is embedded like the source hash, and vswitch.native refuses a
# flavor other than the one asked for, so neither is ever taken for the other.

SANITIZE_ENV = "VSWITCH_SANITIZE"
FLAVOR_NORMAL = "normal"
FLAVOR_SANITIZE = "asan+ubsan"

# How to run Python with a sanitized build: libasan must be the first library
# loaded, and Python's own allocations are not leaks worth reporting.
SANITIZED_RUN_HINT = (
    'LD_PRELOAD="$(gcc -print-file-name=libasan.so)" '
    "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 "
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 python3 ...")


def sanitize_requested(environ=os.environ) -> bool:
    """True if the environment asks for (or expects) the sanitized build."""
    return environ.get(SANITIZE_ENV, "").strip().lower() not in ("", "0", "no", "false", "off")


def flavor(sanitize: bool) -> str:
    return FLAVOR_SANITIZE if sanitize else FLAVOR_NORMAL


def file_is_sanitized(path) -> bool:
    """Whether a built extension links the ASan runtime, read from the file
    itself: importing a sanitized build without libasan preloaded aborts the
    whole process, so this must be known before the import."""
    return b"libasan.so" in pathlib.Path(path).read_bytes()


def asan_loaded() -> bool:
    """Whether the ASan runtime is mapped into this process (LD_PRELOAD)."""
    try:
        return "libasan" in pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return False
