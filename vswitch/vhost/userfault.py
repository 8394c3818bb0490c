"""userfaultfd, as a vhost-user back-end needs it for postcopy live migration.

In postcopy the destination guest runs before all its memory has arrived.
The back-end opens a userfaultfd (POSTCOPY_ADVISE), hands a copy to the
front-end, and registers its own mappings of guest memory with it (after
the front-end acknowledged the postcopy SET_MEM_TABLE reply).  A thread of
the switch that touches a page not yet received then sleeps in the kernel
until QEMU, which reads the faults from its copy of the fd, has fetched the
page from the source and woken it (UFFDIO_WAKE).  The switch never reads
the fd itself.

Control plane only: a syscall and three ioctls, through ctypes and
fcntl.ioctl.  The ioctl numbers and struct layouts are the kernel's
(include/uapi/linux/userfaultfd.h), for x86_64 and every other 64-bit Linux
architecture with the generic ioctl encoding.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct

# The userfaultfd system call (no libc wrapper in glibc 2.36).
_SYSCALL_NUMBERS = {"x86_64": 323, "aarch64": 282}

UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12

_API = struct.Struct("=QQQ")           # struct uffdio_api: api, features, ioctls
_REGISTER = struct.Struct("=QQQQ")     # struct uffdio_register: range.start, range.len, mode, ioctls
_RANGE = struct.Struct("=QQ")          # struct uffdio_range: start, len
MSG = struct.Struct("=BBHIQQQ")        # struct uffd_msg, as a page fault: event, ..., flags, address, ptid


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | UFFD_API << 8 | nr


_IOC_WRITE, _IOC_READ = 1, 2
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, _API.size)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, _REGISTER.size)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, _RANGE.size)
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, _RANGE.size)

_libc = ctypes.CDLL(None, use_errno=True)


def open_userfaultfd() -> int:
    """A new userfaultfd (close-on-exec, non-blocking), its API handshake done.
    Raises OSError with the kernel's reason (e.g. EPERM where unprivileged
    userfaultfd is off and the switch lacks CAP_SYS_PTRACE)."""
    nr = _SYSCALL_NUMBERS.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"userfaultfd: unknown system call number on {platform.machine()}")
    fd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, UFFDIO_API, bytearray(_API.pack(UFFD_API, 0, 0)))
    except OSError:
        os.close(fd)
        raise
    return fd


def register(fd: int, start: int, length: int) -> None:
    """Faults on pages of [start, start + length) that are missing go to the fd's reader."""
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(_REGISTER.pack(start, length, UFFDIO_REGISTER_MODE_MISSING, 0)))


def unregister(fd: int, start: int, length: int) -> None:
    """Ends the registration; a thread sleeping on a missing page there is woken
    and the page is then filled as for any mapping (from the file, or zeros)."""
    fcntl.ioctl(fd, UFFDIO_UNREGISTER, _RANGE.pack(start, length))


def wake(fd: int, start: int, length: int) -> None:
    """Wakes the threads waiting on a page in the range (what the front-end does; tests use it)."""
    fcntl.ioctl(fd, UFFDIO_WAKE, _RANGE.pack(start, length))


def is_userfaultfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False
