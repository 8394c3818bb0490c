"""The next hop's MAC address towards an IPv4 address, from the kernel.

A VXLAN port on the AF_XDP underlay writes the outer Ethernet header
itself, so it must know, per remote VTEP, the MAC address of the next hop:
the route to the remote (rtnetlink RTM_GETROUTE, what `ip route get` asks)
gives the gateway, or the remote itself if on-link, and the output
interface; the kernel's neighbour table (/proc/thread-self/net/arp) gives
the gateway's MAC.  The kernel keeps owning the address and resolving
neighbours (the XDP program passes ARP on): a missing entry is prodded by
a datagram through an ordinary UDP socket, which makes the kernel send an
ARP request, and found at the next look.

Everything here runs on the thread that asks, in that thread's network
namespace (vxlan.py enters the port's first).
"""

from __future__ import annotations

import dataclasses
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
ATF_COM = 0x2                 # a complete entry (linux/if_arp.h)
PROD_PORT = 9                 # discard: what a prod is sent to (it only has to make the kernel resolve)


@dataclasses.dataclass
class Route:
    next_hop: str             # the gateway, or the destination itself when on-link
    oif: int                  # the output interface's index


def route_get(dst: str) -> Route | None:
    """The kernel's route to dst (RTM_GETROUTE), or None if it has none."""
    rtmsg = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0)
    attr = struct.pack("=HH4s", 8, RTA_DST, socket.inet_aton(dst))
    body = rtmsg + attr
    msg = struct.pack("=IHHII", 16 + len(body), RTM_GETROUTE, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as s:
        s.settimeout(1.0)
        s.send(msg)
        data = s.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind != RTM_NEWROUTE:
        return None                   # NLMSG_ERROR: no route (ENETUNREACH)
    gateway, oif = None, 0
    off = 16 + 12
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        value = data[off + 4:off + alen]
        if atype == RTA_GATEWAY and len(value) == 4:
            gateway = socket.inet_ntoa(value)
        elif atype == RTA_OIF and len(value) == 4:
            oif = struct.unpack("=I", value)[0]
        off += (alen + 3) & ~3
    return Route(next_hop=gateway or dst, oif=oif)


def neighbour_mac(addr: str, ifname: str) -> bytes | None:
    """The complete neighbour entry for addr on ifname, as 6 bytes, or None."""
    with open("/proc/thread-self/net/arp") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[0] == addr and fields[5] == ifname and int(fields[2], 16) & ATF_COM:
                mac = bytes.fromhex(fields[3].replace(":", ""))
                if len(mac) == 6 and mac != bytes(6):
                    return mac
    return None


def prod(dst: str) -> None:
    """Makes the kernel resolve the next hop towards dst: one empty datagram to dst's discard port."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto(b"", (dst, PROD_PORT))
    except OSError:
        pass                          # no route, or the queue is full: the next look tries again


def resolve(remote: str, ifindex: int, ifname: str, prod_always: bool = False) -> tuple[bytes | None, str]:
    """(MAC of the next hop towards remote, why not if None).  Prods the kernel when it does not know
    the next hop's MAC, or when prod_always (to keep a known entry confirmed)."""
    route = route_get(remote)
    if route is None:
        return None, "no route"
    if route.oif != ifindex:
        return None, f"the route leaves through interface index {route.oif}, not {ifname}"
    mac = neighbour_mac(route.next_hop, ifname)
    if mac is None or prod_always:
        prod(remote)
    if mac is None:
        return None, f"next hop {route.next_hop} not resolved yet"
    return mac, ""
