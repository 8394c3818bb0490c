"""AF_PACKET ports: attach the switch to an existing interface (a veth end,
a NIC) with a packet socket and its mmap'd rings.

`type: af-packet`, `ifname` (required), `netns` (the namespace the
interface lives in), `mtu` (given to the interface when the port attaches;
by default the port follows the interface's MTU, kernel.py).  The interface is promiscuous while attached; the
kernel drops that when the socket closes, so a crashed switch leaves no
trace.  Received frames carry a virtio-net header (PACKET_VNET_HDR), so TSO
frames and partial checksums from the host stack pass through to guests.

The link follows the interface down and up again.  The socket is bound to
the interface in its namespace: when the interface is deleted or moves to
another namespace the kernel unbinds the socket for good, so the port
reports it gone either way; remove and add it again (with the new `netns`)
to follow a moved interface.
"""

from __future__ import annotations

import errno
import os

from vswitch.native import lib
from vswitch.ports.kernel import KernelPort
from vswitch.ports.registry import NETNS_KEY, Key, interface_name, mtu_key, register


@register
class AfPacketPort(KernelPort):
    type = "af-packet"
    c_ops = lib.vs_af_packet_port_ops()

    help = "an existing interface (a veth end, a NIC), attached with a packet socket"
    keys = (
        Key("ifname", str, "the interface to attach to (e.g. veth0)", required=True, check=interface_name,
            metavar="IF"),
        NETNS_KEY,
        mtu_key("set the interface's MTU when attaching (default: keep it); the port follows it",
                default=None),
    )

    def start(self) -> None:
        def describe(err: int) -> str:
            where = f" in network namespace {self.netns}" if self.netns else ""
            if err == errno.ENODEV:
                return f"interface {self.ifname} does not exist{where}"
            return f"cannot attach to interface {self.ifname}{where}: {os.strerror(err)}"

        self._open(lambda netns_fd: lib.vs_kport_open_af_packet(self.kp, self.ifname.encode(), netns_fd, 1),
                   describe)
        self._follow_link()
        self.housekeep()

    def gone_reason(self, err: int) -> str:
        # The kernel unbinds the socket either way and the socket cannot tell which.
        if err in (errno.ENODEV, errno.ENXIO):
            return "deleted or moved to another network namespace"
        return super().gone_reason(err)

    def info(self) -> dict:
        info = super().info()
        info["mode"] = "tpacket-v2"
        return info
