"""VXLAN tunnel ports (RFC 7348): one L2 segment stretched over several hosts.

`type: vxlan`, `local_ip` (the address the tunnel's datagrams leave from and
arrive at), `remote` (one or more remote tunnel endpoints: a list, or
comma-separated on the command line), `vni`, `dst_port` (default 4789),
`underlay_mtu` (default: the route's MTU towards the remotes), `netns` (the
namespace whose IP stack carries the tunnel) and `vni_map` (per-VLAN VNIs:
`{10: 1010}` sends frames of VLAN 10, which must leave this port tagged, i.e.
a trunk, untagged in VNI 1010, and tags what arrives in VNI 1010 with VLAN 10).

Encapsulation and decapsulation are vxlan.c's; this module is the control
side.  Each remote is a sub-destination of the port, so the MAC table says
behind which remote a MAC was learned (`fdb show`, column REMOTE).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from vswitch.native import ffi, lib
from vswitch.ports.base import Port
from vswitch.ports.registry import Key, KeyProblem, call_in_network_namespace, network_namespace, register

MAX_VNI = lib.VS_VXLAN_MAX_VNI
MAX_REMOTES = lib.VS_VXLAN_MAX_REMOTES
OVERHEAD = lib.VS_VXLAN_OVERHEAD        # outer IPv4 + UDP + VXLAN headers around the inner frame
ETHERNET_HEADER = 14
DEFAULT_UNDERLAY_MTU = 1500


def ipv4_address(value) -> str:
    """A unicast IPv4 address as text (the tunnel's underlay is IPv4)."""
    try:
        addr = ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise KeyProblem(f"{value!r} is not a unicast IPv4 address")
    return str(addr)


def remote_list(value) -> list[str]:
    """One or more remote VTEP addresses: a list, or a comma-separated string."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise KeyProblem(f"{value!r} must be one or more IPv4 addresses")
    out = [ipv4_address(v) for v in items]
    if len(set(out)) != len(out):
        raise KeyProblem(f"{value!r} names a remote twice")
    if len(out) > MAX_REMOTES:
        raise KeyProblem(f"{len(out)} remotes: at most {MAX_REMOTES}")
    return out


def _whole(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def vni_map_check(value) -> dict[int, int]:
    """{VLAN: VNI, ...}; keys may be strings of digits (JSON has no integer keys)."""
    if not isinstance(value, dict):
        raise KeyProblem(f"{value!r} must be a mapping of VLAN ids to VNIs, e.g. {{10: 1010}}")
    out: dict[int, int] = {}
    for vlan, vni in value.items():
        vid, v = _whole(vlan), _whole(vni)
        if vid is None or not 1 <= vid <= 4094:
            raise KeyProblem(f"VLAN {vlan!r} must be a whole number from 1 to 4094")
        if v is None or not 0 <= v <= MAX_VNI:
            raise KeyProblem(f"VLAN {vid}: VNI {vni!r} must be a whole number from 0 to {MAX_VNI}")
        out[vid] = v
    if len(set(out.values())) != len(out):
        raise KeyProblem("two VLANs map to the same VNI")
    if len(out) > lib.VS_VXLAN_MAX_VNI_MAP:
        raise KeyProblem(f"{len(out)} VLANs: at most {lib.VS_VXLAN_MAX_VNI_MAP}")
    return out


def parse_vni_map(text: str) -> dict[int, int]:
    """`10=1010,20=1020` from the command line."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        vlan, sep, vni = item.partition("=")
        if not sep:
            raise KeyProblem(f"{item!r} is not VLAN=VNI")
        out[vlan.strip()] = vni.strip()
    return vni_map_check(out)


@register
class VxlanPort(Port):
    type = "vxlan"
    c_ops = lib.vs_vxlan_port_ops()
    help = "VXLAN tunnel (RFC 7348) to one or more remote VTEPs over the kernel's IPv4 stack"
    keys = (
        Key("local_ip", str, "IPv4 address the tunnel's datagrams leave from and arrive at", required=True,
            check=ipv4_address, metavar="ADDR"),
        Key("remote", list, "remote VTEP addresses (comma-separated on the command line)", required=True,
            check=remote_list, parse_flag=remote_list, metavar="ADDR[,ADDR...]", type_name="list"),
        Key("vni", int, "VXLAN network identifier of the port's frames", required=True, low=0, high=MAX_VNI,
            metavar="N"),
        Key("dst_port", int, "UDP port of the tunnel (both ends)", default=4789, low=1, high=65535, metavar="PORT"),
        Key("underlay_mtu", int, "MTU of the network between the VTEPs (default: the route's); inner frames "
            f"longer than it minus {OVERHEAD} bytes are dropped", low=68 + OVERHEAD + ETHERNET_HEADER,
            high=65535, metavar="BYTES"),
        Key("netns", str, "the network namespace whose IP stack carries the tunnel (ip netns)",
            check=network_namespace, metavar="NS"),
        Key("vni_map", dict, "per-VLAN VNIs, e.g. {10: 1010} (VLAN=VNI,... on the command line); "
            "the port must carry those VLANs tagged (a trunk)", check=vni_map_check, parse_flag=parse_vni_map,
            metavar="VLAN=VNI,...", type_name="mapping"),
    )

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.local_ip: str = spec["local_ip"]
        self.remotes: list[str] = list(spec["remote"])
        self.vni: int = spec["vni"]
        self.dst_port: int = spec.get("dst_port", 4789)
        self.netns: str | None = spec.get("netns")
        self.vni_map: dict[int, int] = dict(spec.get("vni_map") or {})
        self.underlay_mtu: int | None = spec.get("underlay_mtu")
        self.vp = ffi.new("struct vs_vxlan_port *")
        self._ready = False

    @classmethod
    def check_spec(cls, spec: dict) -> list[str]:
        problems = []
        if spec["local_ip"] in spec["remote"]:
            problems.append(f"remote: {spec['local_ip']} is local_ip, not a remote")
        if spec["vni"] in (spec.get("vni_map") or {}).values():
            problems.append(f"vni_map: VNI {spec['vni']} is the port's vni already")
        return problems

    def _fill(self) -> None:
        vp = self.vp
        vp.local_addr = _addr(self.local_ip)
        vp.dst_port = self.dst_port
        vp.vni = self.vni
        vp.n_remotes = len(self.remotes)
        for i, remote in enumerate(self.remotes):
            vp.remotes[i].addr = _addr(remote)
        vp.n_map = len(self.vni_map)
        for i, (vlan, vni) in enumerate(sorted(self.vni_map.items())):
            vp.map_vlan[i] = vlan
            vp.map_vni[i] = vni

    def start(self) -> None:
        self._fill()
        rc = lib.vs_vxlan_port_init(self.vp)
        self._ready = True
        if rc < 0:
            raise OSError(-rc, f"vxlan port '{self.name}': {os.strerror(-rc)}")
        rc = call_in_network_namespace(self.netns, lambda netns_fd: lib.vs_vxlan_port_open(self.vp, netns_fd),
                                       f"open-{self.name}")
        if rc < 0:
            what = ffi.string(self.vp.error).decode(errors="replace")
            self._release()
            raise OSError(-rc, f"vxlan port '{self.name}' on {self.local_ip}:{self.dst_port}: {what}: "
                               f"{os.strerror(-rc)}")
        if self.underlay_mtu is None:
            self.underlay_mtu = self.vp.route_mtu or DEFAULT_UNDERLAY_MTU
        self.c.max_frame = self.underlay_mtu - OVERHEAD
        self.mtu = self.underlay_mtu - OVERHEAD - ETHERNET_HEADER
        self.c.priv = self.vp
        self.c.subs = len(self.remotes)
        self.set_link(True)

    def set_mtu(self, mtu: int | None) -> None:
        """The inner MTU follows the underlay's (underlay_mtu), not a guest's."""

    def _release(self) -> None:
        if self._ready:
            lib.vs_vxlan_port_fini(self.vp)
            self._ready = False

    async def stop(self) -> None:
        # The switch has unpublished the port and the PMDs have passed a quiescent point.
        self.set_link(False)
        self._release()

    def poll_queues(self) -> list[int]:
        return [0]

    def sub_name(self, sub: int) -> str | None:
        """The remote VTEP behind sub-destination sub (1 to the number of remotes)."""
        return self.remotes[sub - 1] if 1 <= sub <= len(self.remotes) else None

    def stats(self) -> dict:
        s = self.vp.stats
        dropped_rx = s.rx_unknown_remote + s.rx_wrong_vni + s.rx_malformed
        return {"rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes, "rx_dropped": dropped_rx,
                "rx_errors": s.rx_errors, "tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes,
                "tx_dropped": self.c.stats.tx_dropped_down + self.c.stats.tx_dropped_mtu,
                "tx_errors": s.tx_errors + self.c.stats.tx_dropped_offload,
                "rx_unknown_remote": s.rx_unknown_remote, "rx_wrong_vni": s.rx_wrong_vni,
                "rx_malformed": s.rx_malformed, "tx_dropped_mtu": self.c.stats.tx_dropped_mtu,
                "rx_polls": s.rx_polls, "rx_empty_polls": s.rx_empty_polls, "rx_polls_skipped": s.rx_polls_skipped}

    def error_counts(self) -> dict[str, int]:
        s = self.vp.stats
        return {"unknown_remote": s.rx_unknown_remote, "wrong_vni": s.rx_wrong_vni, "malformed": s.rx_malformed}

    def info(self) -> dict:
        info = super().info()
        remotes = [{"remote": r, "rx_packets": self.vp.remotes[i].rx_packets,
                    "tx_packets": self.vp.remotes[i].tx_packets} for i, r in enumerate(self.remotes)]
        info.update({"local_ip": self.local_ip, "remotes": remotes, "vni": self.vni, "dst_port": self.dst_port,
                     "underlay_mtu": self.underlay_mtu, "netns": self.netns,
                     "vni_map": {str(k): v for k, v in sorted(self.vni_map.items())}})
        return info


def _addr(text: str) -> int:
    """An IPv4 address as the C side keeps it: network byte order in a host integer."""
    return struct.unpack("=I", socket.inet_aton(text))[0]
