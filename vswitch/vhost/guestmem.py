"""Guest mappings and their faults, seen from Python (the C side is guestmem.c).

Every mapping of guest memory is registered right after mmap and
unregistered right before munmap.  A SIGBUS inside one, from any thread, is
recovered in C: the mapping is replaced by zero memory, the owning device
gets VS_DEV_FAULT_MEMORY, and an eventfd is written.  `watch` hands that
wake-up to the control plane: each callback (one per vhost-user back-end)
then checks its own device's fault bits.

The handler is installed on the first registration (or `install`).  A
SIGBUS handler installed after it (e.g. faulthandler.enable()) would see
guest faults first; vswitchd installs none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from vswitch.native import ffi, lib

log = logging.getLogger(__name__)


def install() -> None:
    rc = lib.vs_guestmem_init()
    if rc != 0:
        raise OSError(-rc, f"cannot install the guest memory fault handler: {os.strerror(-rc)}")


def register(buffer, length: int, dev, region: int) -> int:
    """Registers a mapping of `length` bytes at `buffer` as region `region` of `dev`; returns its slot."""
    slot = lib.vs_guestmem_register(ffi.cast("void *", buffer), length, dev, region)
    if slot < 0:
        raise OSError(-slot, os.strerror(-slot))
    return slot


def unregister(slot: int) -> None:
    lib.vs_guestmem_unregister(slot)


def fault_addr(slot: int) -> int:
    return int(lib.vs_guestmem_fault_addr(slot))


class _Watch:
    """The eventfd reader of one event loop and the callbacks it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.fd = lib.vs_guestmem_eventfd()
        self.callbacks: list[Callable[[], None]] = []
        loop.add_reader(self.fd, self._on_wake)

    def _on_wake(self) -> None:
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        for callback in list(self.callbacks):
            try:
                callback()
            except Exception:  # one broken callback must not starve the others
                log.exception("guest memory fault callback failed")

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


_watches: dict[asyncio.AbstractEventLoop, _Watch] = {}


def watch(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Callable[[], None]:
    """Runs `callback` on `loop` whenever a fault was raised; returns the function that stops it."""
    install()
    w = _watches.get(loop)
    if w is None:
        w = _watches[loop] = _Watch(loop)
    w.callbacks.append(callback)

    def unwatch() -> None:
        if callback in w.callbacks:
            w.callbacks.remove(callback)
        if not w.callbacks and _watches.get(loop) is w:
            del _watches[loop]
            if not loop.is_closed():
                w.close()
    return unwatch
