"""A test-only port type that lives in this file only: the proof that a port
type is a plug-in (tests/unit/test_port_registry.py).

Importing the module registers `type: dummy`; a vswitchd loads it when
$VSWITCH_PORT_MODULES names it.  The port has nothing behind it, not even
a C operations table: its link stays down, so the PMDs never send to it,
and it has no queues to poll.
"""

from __future__ import annotations

import re

from vswitch.native import ffi
from vswitch.ports.base import STAT_KEYS, Port
from vswitch.ports.registry import Key, KeyProblem, register

MODULE = __name__


def label(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]{1,8}", value):
        raise KeyProblem(f"{value!r} is not a label (1 to 8 lower-case letters)")
    return value


@register
class DummyPort(Port):
    type = "dummy"
    c_ops = ffi.NULL   # no operations table: the PMDs never call a port that is down and has no queues
    help = "a test-only port with nothing behind it"
    keys = (
        Key("label", str, "what the port is for, 1 to 8 lower-case letters", required=True, check=label),
        Key("burst", int, "frames per burst", default=32, low=1, high=64, metavar="N"),
        Key("verbose", bool, "say more in show", default=False),
    )

    def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.set_link(False)

    def poll_queues(self) -> list[int]:
        return []

    def stats(self) -> dict:
        return dict.fromkeys(STAT_KEYS, 0)

    def info(self) -> dict:
        info = super().info()
        info.update({"mode": "dummy", "label": self.spec["label"], "burst": self.spec["burst"]})
        return info
