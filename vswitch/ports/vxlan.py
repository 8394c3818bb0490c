"""VXLAN tunnel ports (RFC 7348): one L2 segment stretched over several hosts.

`type: vxlan`, `local_ip` (the address the tunnel's datagrams leave from and
arrive at), `remote` (one or more remote tunnel endpoints: a list, or
comma-separated on the command line), `vni`, `dst_port` (default 4789),
`underlay_mtu` (default: the route's MTU towards the remotes), `netns` (the
namespace whose IP stack carries the tunnel) and `vni_map` (per-VLAN VNIs:
`{10: 1010}` sends frames of VLAN 10, which must leave this port tagged, i.e.
a trunk, untagged in VNI 1010, and tags what arrives in VNI 1010 with VLAN 10)
and `underlay` (how the datagrams travel: `{type: socket}`, the default, the
kernel's UDP/IP stack; or `{type: af-xdp, interface: IF, mode: auto|native|generic}`,
an XDP socket on IF, which local_ip must be an address of: `socket` or
`af-xdp:IF[,mode=M]` on the command line).

The AF_XDP underlay.  af_xdp.c attaches its UDP filter program to IF
(frames to local_ip:dst_port go to the socket, all else to the kernel)
and one XDP socket on queue 0; the interface gets a record as af-xdp
ports' (af_xdp.py), so a program a killed switch left is removed by the
next start.  The outer Ethernet header needs the next hop's MAC per remote:
housekeeping asks the kernel (next_hop.py) and writes it into the C
struct (vs_vxlan_set_next_hop); until it is known, datagrams to that remote
are dropped and counted (tx_no_neighbour).

Encapsulation and decapsulation are vxlan.c's; this module is the control
side.  Each remote is a sub-destination of the port, so the MAC table says
behind which remote a MAC was learned (`fdb show`, column REMOTE).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time

from vswitch.native import ffi, lib
from vswitch.ports import af_xdp, next_hop
from vswitch.ports.base import Port
from vswitch.ports.registry import (Key, KeyProblem, call_in_network_namespace, interface_name, network_namespace,
                                    register)

log = logging.getLogger(__name__)

MAX_VNI = lib.VS_VXLAN_MAX_VNI
MAX_REMOTES = lib.VS_VXLAN_MAX_REMOTES
OVERHEAD = lib.VS_VXLAN_OVERHEAD        # outer IPv4 + UDP + VXLAN headers around the inner frame
ETHERNET_HEADER = 14
DEFAULT_UNDERLAY_MTU = 1500
UNDERLAYS = ("socket", "af-xdp")
NEXT_HOP_REFRESH = 5.0        # seconds between looks at resolved next hops (unresolved: every second)


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


def underlay_check(value) -> dict:
    """{type: socket} or {type: af-xdp, interface: IF, mode: auto|native|generic}."""
    if not isinstance(value, dict):
        raise KeyProblem(f"{value!r} must be a mapping, e.g. {{type: af-xdp, interface: eth1}}")
    kind = value.get("type", "socket")
    if kind not in UNDERLAYS:
        raise KeyProblem(f"type {kind!r} must be one of: {', '.join(UNDERLAYS)}")
    allowed = {"type"} if kind == "socket" else {"type", "interface", "mode"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise KeyProblem(f"unknown key {unknown[0]!r} for underlay type {kind} (keys: {', '.join(sorted(allowed))})")
    if kind == "socket":
        return {"type": "socket"}
    if "interface" not in value:
        raise KeyProblem("underlay type af-xdp needs interface: the interface local_ip is on")
    try:
        ifname = interface_name(value["interface"])
    except KeyProblem as exc:
        raise KeyProblem(f"interface: {exc}") from None
    mode = value.get("mode", "auto")
    if mode not in af_xdp.MODES:
        raise KeyProblem(f"mode {mode!r} must be one of: {', '.join(af_xdp.MODES)}")
    return {"type": "af-xdp", "interface": ifname, "mode": mode}


def parse_underlay(text: str) -> dict:
    """`socket`, or `af-xdp:IF[,mode=M]` from the command line."""
    head, *rest = [part.strip() for part in text.split(",")]
    kind, _, ifname = head.partition(":")
    out = {"type": kind}
    if ifname:
        out["interface"] = ifname
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep:
            raise KeyProblem(f"{item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return underlay_check(out)


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
    help = "VXLAN tunnel (RFC 7348) to one or more remote VTEPs over the kernel's IPv4 stack or an AF_XDP socket"
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
        Key("underlay", dict, "how the datagrams travel: {type: socket} (the kernel's UDP/IP stack, default) or "
            "{type: af-xdp, interface: IF, mode: auto|native|generic} (an XDP socket on IF, which holds local_ip; "
            "needs libxdp)", check=underlay_check, parse_flag=parse_underlay,
            metavar="socket|af-xdp:IF[,mode=M]", type_name="mapping"),
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
        self.underlay: dict = dict(spec.get("underlay") or {"type": "socket"})
        self.vp = ffi.new("struct vs_vxlan_port *")
        self._ready = False
        self.xp = None                       # struct vs_xsk_port of the AF_XDP underlay
        self._xsk_open = False
        self._record: af_xdp.InterfaceRecord | None = None
        self._next_hops: list[str] = [""] * len(self.remotes)   # why each remote has no MAC ("": it has)
        self._next_look = 0.0

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
        if self.underlay["type"] == "af-xdp":
            self._open_xsk()
        rc = lib.vs_vxlan_port_init(self.vp)
        self._ready = True
        if rc < 0:
            self._release()
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
        if self.xp is not None:
            self._resolve_next_hops(prod_always=True)
        self.c.priv = self.vp
        self.c.subs = len(self.remotes)
        self.set_link(True)

    # --- the AF_XDP underlay ---------------------------------------------------

    def _open_xsk(self) -> None:
        ifname = self.underlay["interface"]
        self._record = af_xdp.InterfaceRecord(self.netns, ifname)
        stale_prog_id = self._record.take()
        self.xp = ffi.new("struct vs_xsk_port *")
        lib.vs_xsk_init(self.xp)
        self.xp.udp_addr = _addr(self.local_ip)
        self.xp.udp_port = self.dst_port
        mode = af_xdp.MODES[self.underlay.get("mode", "auto")]
        rc = call_in_network_namespace(
            self.netns, lambda netns_fd: lib.vs_xsk_open(self.xp, ifname.encode(), 1, netns_fd, mode,
                                                         lib.VS_XSK_ZC_AUTO, stale_prog_id), f"open-{self.name}")
        if rc < 0:
            message = af_xdp.describe_failure(self.xp, ifname, self.netns, -rc)
            self._close_xsk()
            raise OSError(-rc, f"vxlan port '{self.name}' underlay: {message}")
        self._xsk_open = True
        if stale_prog_id:
            log.info("port '%s': removed XDP program %d that an earlier vswitchd left on %s",
                     self.name, stale_prog_id, ifname)
        self._record.write({"port": self.name, "ifindex": self.xp.ifindex, "prog_id": self.xp.prog_id})
        mac = ffi.new("uint8_t[6]")
        rc = lib.vs_xsk_interface_mac(self.xp, mac)
        if rc < 0:
            self._close_xsk()
            raise OSError(-rc, f"vxlan port '{self.name}': the MAC address of {ifname}: {os.strerror(-rc)}")
        ffi.memmove(self.vp.src_mac, mac, 6)
        self.vp.xsk = self.xp

    def _close_xsk(self) -> None:
        if self.xp is not None:
            # On a helper thread: vs_xsk_close enters the socket's namespace (af_xdp.h).
            xp = self.xp
            call_in_network_namespace(None, lambda _: lib.vs_xsk_close(xp), f"close-{self.name}")
            self._xsk_open = False
        if self._record is not None:
            self._record.drop()
            self._record = None

    def _resolve_next_hops(self, prod_always: bool = False) -> None:
        """Asks the kernel for each remote's next-hop MAC (in the port's namespace) and writes it to C."""
        ifname, ifindex = self.underlay["interface"], self.xp.ifindex
        found: list = []

        def look(netns_fd: int) -> int:
            saved = ffi.new("int *")
            rc = lib.vs_enter_netns(netns_fd, saved)
            if rc < 0:
                return rc
            try:
                for remote in self.remotes:
                    try:
                        found.append(next_hop.resolve(remote, ifindex, ifname, prod_always))
                    except OSError as exc:
                        found.append((None, f"asking the kernel: {exc.strerror}"))
            finally:
                lib.vs_leave_netns(saved[0])
            return 0

        if call_in_network_namespace(self.netns, look, f"neigh-{self.name}") < 0 or len(found) != len(self.remotes):
            return
        for i, (mac, why) in enumerate(found):
            if mac is not None:
                lib.vs_vxlan_set_next_hop(self.vp, i, mac)
            elif self.vp.remotes[i].outer_cur == lib.VS_VXLAN_NO_TEMPLATE or why.startswith(("no route", "the route")):
                # A MAC once known stays while the kernel's entry is only missing (it ages
                # out when nothing but our XDP socket uses it); a route gone or moved does not.
                lib.vs_vxlan_set_next_hop(self.vp, i, ffi.NULL)
            if why != self._next_hops[i] and why:
                log.info("port '%s': remote %s: %s", self.name, self.remotes[i], why)
            self._next_hops[i] = why if mac is None else ""

    def housekeep(self) -> None:
        if self.xp is None or not self._xsk_open:
            return
        now = time.monotonic()
        unresolved = any(r.outer_cur == lib.VS_VXLAN_NO_TEMPLATE for r in self.vp.remotes[0:len(self.remotes)])
        if now < self._next_look and not unresolved:
            return
        # A resolved remote is prodded too at each look, so the kernel keeps its entry confirmed.
        self._next_look = now + NEXT_HOP_REFRESH
        self._resolve_next_hops(prod_always=True)

    def set_mtu(self, mtu: int | None) -> None:
        """The inner MTU follows the underlay's (underlay_mtu), not a guest's."""

    def _release(self) -> None:
        if self._ready:
            lib.vs_vxlan_port_fini(self.vp)
            self._ready = False
        self._close_xsk()

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
        dropped_rx = s.rx_unknown_remote + s.rx_wrong_vni + s.rx_malformed + s.rx_fragments
        return {"rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes, "rx_dropped": dropped_rx,
                "rx_errors": s.rx_errors, "tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes,
                "tx_dropped": self.c.stats.tx_dropped_down + self.c.stats.tx_dropped_mtu + s.tx_no_neighbour +
                s.tx_ring_full,
                "tx_errors": s.tx_errors + self.c.stats.tx_dropped_offload,
                "rx_unknown_remote": s.rx_unknown_remote, "rx_wrong_vni": s.rx_wrong_vni,
                "rx_malformed": s.rx_malformed, "tx_dropped_mtu": self.c.stats.tx_dropped_mtu,
                "rx_polls": s.rx_polls, "rx_empty_polls": s.rx_empty_polls, "rx_polls_skipped": s.rx_polls_skipped,
                **({"rx_fragments": s.rx_fragments, "tx_no_neighbour": s.tx_no_neighbour,
                    "tx_ring_full": s.tx_ring_full} if self.xp is not None else {})}

    def error_counts(self) -> dict[str, int]:
        s = self.vp.stats
        out = {"unknown_remote": s.rx_unknown_remote, "wrong_vni": s.rx_wrong_vni, "malformed": s.rx_malformed}
        if self.xp is not None:
            out["fragment"] = s.rx_fragments
        return out

    def info(self) -> dict:
        info = super().info()
        remotes = [{"remote": r, "rx_packets": self.vp.remotes[i].rx_packets,
                    "tx_packets": self.vp.remotes[i].tx_packets} for i, r in enumerate(self.remotes)]
        if self.xp is not None:
            for i, row in enumerate(remotes):
                resolved = self.vp.remotes[i].outer_cur != lib.VS_VXLAN_NO_TEMPLATE
                row["next_hop_mac"] = (":".join(f"{b:02x}" for b in bytes(self.vp.remotes[i].next_hop_mac))
                                       if resolved else None)
                if not resolved:
                    row["unresolved"] = self._next_hops[i] or "not looked up yet"
        info.update({"local_ip": self.local_ip, "remotes": remotes, "vni": self.vni, "dst_port": self.dst_port,
                     "underlay_mtu": self.underlay_mtu, "netns": self.netns,
                     "vni_map": {str(k): v for k, v in sorted(self.vni_map.items())},
                     "underlay": self._underlay_info()})
        return info

    def _underlay_info(self) -> dict:
        if self.xp is None:
            return {"type": "socket"}
        xp = self.xp
        kstats = ffi.new("struct vs_xsk_kernel_stats *")
        lib.vs_xsk_kernel_stats(xp, 0, kstats)
        q = xp.queues[0].stats
        return {"type": "af-xdp", "interface": self.underlay["interface"],
                "mode": "native" if xp.mode == lib.VS_XSK_MODE_NATIVE else "generic",
                "copy": "zero-copy" if xp.zero_copy else "copy", "xdp_program": {"id": xp.prog_id},
                "stats": {**{k: getattr(q, k) for k in af_xdp.QUEUE_STATS},
                          **{f"kernel_{k}": getattr(kstats, k) for k in af_xdp.KERNEL_STATS}}}


def _addr(text: str) -> int:
    """An IPv4 address as the C side keeps it: network byte order in a host integer."""
    return struct.unpack("=I", socket.inet_aton(text))[0]
