"""The C sources of the fast path, in the order the compiler and cffi read them.

Shared by the cffi build script and the import-time staleness check, so the
two can never disagree about what "the sources" are.
"""

import hashlib
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent

# Headers in dependency order; each is free of #include so ffi.cdef() can read it.
HEADERS = [
    "pmd/packet.h",
    "vhost/virtqueue.h",
    "vhost/guestmem.h",
    "pmd/offload.h",
    "ports/kernel.h",
    "ports/port.h",
    "fib/fib.h",
    "pmd/pmd.h",
]
SOURCES = [
    "vhost/virtqueue.c",
    "vhost/guestmem.c",
    "fib/fib.c",
    "pmd/pmd.c",
    "ports/kernel.c",
    "pmd/offload.c",
]
# Included by the .c files only (inline helpers, system headers).
PRIVATE_HEADERS = ["vswitch.h"]


def source_hash(base: pathlib.Path = PACKAGE_DIR) -> str:
    """Hash of every C file, embedded in the build and checked at import."""
    digest = hashlib.sha256()
    for name in HEADERS + SOURCES + PRIVATE_HEADERS:
        digest.update(name.encode())
        digest.update((base / name).read_bytes())
    return digest.hexdigest()[:16]


def cdef_text(base: pathlib.Path = PACKAGE_DIR) -> str:
    return "\n".join((base / name).read_text() for name in HEADERS) + \
        "\nconst char *vs_source_hash(void);\n"
