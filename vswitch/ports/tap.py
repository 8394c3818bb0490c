"""TAP ports: a TAP interface the switch creates for the host stack (or a
container's network namespace) to sit on the switch's L2 segment.

`type: tap`, `ifname` (default: the port name), `netns` (an `ip netns`
namespace to create it in), `queues` (IFF_MULTI_QUEUE when more than one),
`mtu` (the interface's MTU at creation, default 1500; the port then follows
the interface's, kernel.py).
The interface is created up; removing the port deletes it (the switch holds
the only fds and the interface is not persistent).  The link follows the
interface: down and up again, even after it moved into another namespace
(a container's), where the fd keeps working; only a deleted TAP is gone.  Frames carry a
virtio-net header, with checksum and TSO offloads enabled (TUNSETOFFLOAD),
so a guest's TSO frames reach the host stack as they are.
"""

from __future__ import annotations

import errno
import os

from vswitch.native import lib
from vswitch.ports.kernel import KernelPort
from vswitch.ports.registry import NETNS_KEY, Key, interface_name, mtu_key, queues_key, register


@register
class TapPort(KernelPort):
    type = "tap"
    c_ops = lib.vs_tap_port_ops()

    help = "a TAP interface the switch creates, for the host stack or a container"
    keys = (
        Key("ifname", str, "the interface to create (default: the port name)", check=interface_name,
            default=lambda spec: spec["name"], metavar="IF"),
        NETNS_KEY,
        queues_key(),
        mtu_key("the interface's MTU, set when it is created; the port then follows it"),
    )

    def start(self) -> None:
        def describe(err: int) -> str:
            if err == errno.EBUSY:
                return f"interface {self.ifname} exists and is in use"
            if err == errno.EINVAL:
                return f"interface {self.ifname} exists and is not a TAP interface"
            return f"cannot create TAP interface {self.ifname}: {os.strerror(err)}"

        self._open(lambda netns_fd: lib.vs_kport_open_tap(self.kp, self.ifname.encode(), self.queues,
                                                          netns_fd, 1), describe)
        self._follow_link()
        self.housekeep()

    def gone_reason(self, err: int) -> str:
        # The tun driver detaches the fds of a deleted TAP (EBADFD); a move leaves them attached.
        return "deleted" if err in (errno.EBADFD, errno.EBADF) else super().gone_reason(err)

    def info(self) -> dict:
        info = super().info()
        info["mode"] = "tap"
        return info
