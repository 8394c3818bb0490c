"""Running under systemd: readiness, watchdog and reload notifications, journal-friendly logs.

With `Type=notify` (deploy/vswitchd.service) systemd waits for READY=1, which
vswitchd sends once its ports are up and its control socket answers; a
reload is framed by RELOADING=1 and READY=1; STOPPING=1 starts the shutdown;
with `WatchdogSec=`, WATCHDOG=1 goes out at half the interval from the
event loop, so a stuck control plane gets the service restarted.

The notification protocol is one datagram to $NOTIFY_SOCKET (sd_notify(3));
writing it here costs a dozen lines, where the `systemd` Python bindings
would add libsystemd and a C build to the dependencies.  Outside systemd
every function here does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Sends "KEY=VALUE" lines to the service manager; False when there is none to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]   # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
        return True
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, if the watchdog is for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def keep_watchdog_fed(interval: float) -> None:
    """Pings from the event loop itself: if the loop stalls, the pings stop and systemd acts."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def log_format() -> str:
    """The journal stamps each line with its time and priority; a terminal or a file needs them."""
    if os.environ.get("JOURNAL_STREAM"):
        return "%(levelname)s %(name)s: %(message)s"
    return "%(asctime)s %(levelname)s %(name)s: %(message)s"
