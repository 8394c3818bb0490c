"""AF_XDP ports: attach the switch to an existing interface (a NIC, a veth
end) with one XDP socket per queue (af_xdp.c does the packet path).

`type: af-xdp`, `ifname` (required), `queues` (the interface's channels
used, 0 to N-1; default 1), `netns`, `mode: auto|native|generic` (auto
tries the driver's own XDP, then the generic one), `zero_copy:
auto|on|off`.  libxdp is loaded when the first AF_XDP port opens (af_xdp.c
says why), so a switch without libxdp installed runs, and only adding such
a port fails, with one line.

The link follows the interface like the other kernel ports (a subclass of
KernelPort): down and up again are events; deleted or moved away is gone.

A program left behind.  libxdp detaches its XSK program when the last
socket on the interface closes, but a vswitchd killed with -9 closes
nothing, and the program stays on the interface.  So each attached
interface has a record, /run/vswitch/af-xdp/NETNS-IFNAME.lock (NETNS: the
namespace's inode), which the port holds with flock() for as long as it is
open and deletes when it closes.  The kernel drops the flock of a dead
process, so a record nobody holds names a program left behind by a switch
that died: the next port on that interface detaches exactly that program
(by its id, if it is still there) before attaching.  Programs not in a
record (another application's AF_XDP sockets, xdp-loader's) are never
touched; a record someone holds means another switch (or port) uses the
interface, and the port is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct

from vswitch.native import ffi, lib
from vswitch.ports.kernel import KernelPort
from vswitch.ports.registry import (NETNS_DIR, NETNS_KEY, Key, call_in_network_namespace, interface_name,
                                    queues_key, register)

log = logging.getLogger(__name__)

RECORD_DIR_ENV = "VSWITCH_AF_XDP_DIR"
RECORD_DIR = "/run/vswitch/af-xdp"
MODES = {"auto": lib.VS_XSK_MODE_AUTO, "native": lib.VS_XSK_MODE_NATIVE, "generic": lib.VS_XSK_MODE_GENERIC}
ZERO_COPY = {"auto": lib.VS_XSK_ZC_AUTO, "on": lib.VS_XSK_ZC_ON, "off": lib.VS_XSK_ZC_OFF}
QUEUE_STATS = ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_ring_full", "tx_errors",
               "tx_kicks", "fill_wakeups")
KERNEL_STATS = ("rx_fill_ring_empty_descs", "rx_ring_full", "rx_dropped", "rx_invalid_descs",
                "tx_invalid_descs", "tx_ring_empty_descs")
SIOCGIFMTU = 0x8921       # linux/sockios.h
BPFFS = "/sys/fs/bpf"
KERNEL_BTF = "/sys/kernel/btf/vmlinux"


def record_dir() -> str:
    return os.environ.get(RECORD_DIR_ENV) or RECORD_DIR


@register
class AfXdpPort(KernelPort):
    type = "af-xdp"
    c_ops = lib.vs_af_xdp_port_ops()

    help = "an existing interface (a NIC, a veth end), attached with AF_XDP sockets (needs libxdp)"
    keys = (
        Key("ifname", str, "the interface to attach to (e.g. veth0)", required=True, check=interface_name,
            metavar="IF"),
        NETNS_KEY,
        queues_key("the interface's channels used, from 0 (combined or rx channels)"),
        Key("mode", str, "auto: native XDP if the driver has it, else generic", default="auto",
            choices=tuple(MODES)),
        Key("zero_copy", str, "auto: zero-copy if the driver offers it, else copy", default="auto",
            choices=tuple(ZERO_COPY)),
    )

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.mode: str = spec.get("mode", "auto")
        self.zero_copy: str = spec.get("zero_copy", "auto")
        self._record: InterfaceRecord | None = None

    # --- KernelPort's hooks -------------------------------------------------

    def _make_native(self):
        xp = ffi.new("struct vs_xsk_port *")
        lib.vs_xsk_init(xp)
        return xp

    def _link_fd(self) -> int:
        return self.kp.link_fd

    def _interface_mtu(self) -> int:
        # An XDP socket takes no interface ioctls: ask through the socket kept for them (af_xdp.h).
        if self.kp.ioctl_fd < 0:
            return -errno.EBADF
        try:
            reply = fcntl.ioctl(self.kp.ioctl_fd, SIOCGIFMTU, struct.pack("16si", self.ifname.encode(), 0))
        except OSError as exc:
            return -exc.errno
        return struct.unpack("16si", reply)[1]

    def _link_events(self) -> int:
        return lib.vs_link_watch_drain(self.kp.link_fd)

    def _close_native(self) -> None:
        # On a helper thread: vs_xsk_close enters the sockets' namespace (af_xdp.h).
        call_in_network_namespace(None, lambda _: lib.vs_xsk_close(self.kp), f"close-{self.name}")

    def _offloads(self) -> bool:
        return False   # offload_caps 0: the PMD completes checksums and segments TSO first

    def _fd_to_watch_while_down(self):
        return None   # an XDP socket hears nothing of its link going down: the notifications do

    # --- opening and closing ---------------------------------------------------

    def start(self) -> None:
        stale_prog_id = self._take_record()
        try:
            self._open(lambda netns_fd: lib.vs_xsk_open(self.kp, self.ifname.encode(), self.queues, netns_fd,
                                                        MODES[self.mode], ZERO_COPY[self.zero_copy],
                                                        stale_prog_id), self._describe_failure)
        except BaseException:
            self._drop_record()
            raise
        if stale_prog_id:
            log.info("port '%s': removed XDP program %d that an earlier vswitchd left on %s",
                     self.name, stale_prog_id, self.ifname)
        self._write_record()
        if not self.kp.dispatcher:
            log.info("port '%s': the XDP program on %s runs without libxdp's dispatcher (%s): "
                     "no other XDP program can run on this interface meanwhile",
                     self.name, self.ifname, dispatcher_missing_reason())
        self._follow_link()
        self.housekeep()

    async def stop(self) -> None:
        await super().stop()
        self._drop_record()

    def _describe_failure(self, err: int) -> str:
        return describe_failure(self.kp, self.ifname, self.netns, err)

    # --- the record of an attached interface (module docstring) ----------------

    def _take_record(self) -> int:
        """Takes the interface's record; the id of a program a dead switch left, or 0."""
        self._record = InterfaceRecord(self.netns, self.ifname)
        return self._record.take()

    def _write_record(self) -> None:
        self._record.write({"port": self.name, "ifindex": self.kp.ifindex, "prog_id": self.kp.prog_id})

    def _drop_record(self) -> None:
        if self._record is not None:
            self._record.drop()
            self._record = None

    # --- what show prints --------------------------------------------------------

    def queue_stats(self) -> list[dict]:
        out = []
        kstats = ffi.new("struct vs_xsk_kernel_stats *")
        for q in range(self.kp.nqueues):
            s = self.kp.queues[q].stats
            row = {"queue": q, **{k: getattr(s, k) for k in QUEUE_STATS}}
            lib.vs_xsk_kernel_stats(self.kp, q, kstats)
            row.update({f"kernel_{k}": getattr(kstats, k) for k in KERNEL_STATS})
            out.append(row)
        return out

    def stats(self) -> dict:
        total = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
                               "tx_packets", "tx_bytes", "tx_dropped", "tx_errors"), 0)
        for row in self.queue_stats():
            total["rx_packets"] += row["rx_packets"]
            total["rx_bytes"] += row["rx_bytes"]
            total["rx_dropped"] += row["rx_dropped"] + row["kernel_rx_fill_ring_empty_descs"] + \
                row["kernel_rx_ring_full"] + row["kernel_rx_dropped"]
            total["rx_errors"] += row["kernel_rx_invalid_descs"]
            total["tx_packets"] += row["tx_packets"]
            total["tx_bytes"] += row["tx_bytes"]
            total["tx_dropped"] += row["tx_ring_full"]
            total["tx_errors"] += row["tx_errors"] + row["kernel_tx_invalid_descs"]
        total["tx_dropped"] += self.c.stats.tx_dropped_down
        total["tx_errors"] += self.c.stats.tx_dropped_offload
        return total

    def info(self) -> dict:
        info = super().info()
        opened = self.kp.nqueues > 0 and self.kp.queues[0].fd >= 0
        info.update({
            "queues": self.kp.nqueues or self.queues,
            "mode": ("native" if self.kp.mode == lib.VS_XSK_MODE_NATIVE else "generic") if opened else self.mode,
            "copy": ("zero-copy" if self.kp.zero_copy else "copy") if opened else self.zero_copy,
            "xdp_program": {"id": self.kp.prog_id, "dispatcher": bool(self.kp.dispatcher)},
            "queue_stats": self.queue_stats(),
        })
        return info


def describe_failure(kp, ifname: str, netns: str | None, err: int) -> str:
    """One line for a failed vs_xsk_open of kp on ifname."""
    where = f" in network namespace {netns}" if netns else ""
    failure = kp.failure
    if failure == lib.VS_XSK_FAIL_LIBXDP and err == errno.ENOTSUP:
        return f"af-xdp ports are not available: {ffi.string(lib.vs_xsk_libxdp_error()).decode()}"
    if failure == lib.VS_XSK_FAIL_LIBXDP:
        return (f"af-xdp ports need libxdp, which cannot be loaded ({ffi.string(lib.vs_xsk_libxdp_error()).decode()}); "
                f"install it with: apt-get install libxdp1")
    if failure == lib.VS_XSK_FAIL_NO_INTERFACE:
        return f"interface {ifname} does not exist{where}"
    if failure == lib.VS_XSK_FAIL_CHANNELS:
        return (f"interface {ifname} has {kp.channels} channel(s), fewer than queues: {kp.nqueues} "
                f"(ethtool -L {ifname} combined {kp.nqueues}, or fewer queues)")
    if failure == lib.VS_XSK_FAIL_NATIVE:
        return (f"interface {ifname} has no native XDP support ({os.strerror(err)}); "
                f"use mode: generic or auto")
    if failure == lib.VS_XSK_FAIL_ZERO_COPY:
        return (f"interface {ifname} does not offer AF_XDP zero-copy ({os.strerror(err)}); "
                f"use zero_copy: auto or off")
    if failure == lib.VS_XSK_FAIL_PROGRAM_BUSY:
        prog = ffi.string(kp.busy_prog).decode() or "another XDP program"
        return (f"interface {ifname} already runs XDP program '{prog}' outside libxdp's dispatcher "
                f"({dispatcher_missing_reason()}); unload it (xdp-loader unload {ifname} --all) "
                f"or load it through libxdp")
    if failure == lib.VS_XSK_FAIL_FILTER:
        return f"cannot load the UDP filter XDP program for interface {ifname}{where}: {os.strerror(err)}"
    return f"cannot attach AF_XDP sockets to interface {ifname}{where}: {os.strerror(err)}"


class InterfaceRecord:
    """The record of an attached interface (module docstring), held with flock() while attached."""

    def __init__(self, netns: str | None, ifname: str):
        self.netns, self.ifname = netns, ifname
        self.fd, self.path = -1, None

    def _netns_inode(self) -> int:
        path = os.path.join(NETNS_DIR, self.netns) if self.netns else "/proc/self/ns/net"
        return os.stat(path).st_ino

    def take(self) -> int:
        """Takes the record; the id of a program a dead switch left, or 0."""
        directory = record_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, f"{self._netns_inode()}-{self.ifname}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise OSError(errno.EBUSY, f"interface {self.ifname} is already attached by an af-xdp port "
                                       f"(vswitchd pid {record.get('pid', '?')})") from None
        self.fd, self.path = fd, path
        return int(_read_record(fd).get("prog_id", 0) or 0)

    def write(self, fields: dict) -> None:
        record = {"pid": os.getpid(), "ifname": self.ifname, "netns": self.netns, **fields}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)

    def drop(self) -> None:
        if self.fd < 0:
            return
        # Emptied first: one who opened the file before the unlink finds nothing to remove.
        os.ftruncate(self.fd, 0)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd, self.path = -1, None


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def dispatcher_missing_reason() -> str:
    """Why libxdp cannot chain programs here: its dispatcher needs a BPF filesystem and kernel BTF."""
    reasons = []
    if not os.path.ismount(BPFFS):
        reasons.append(f"no BPF filesystem at {BPFFS}: mount -t bpf bpf {BPFFS}")
    if not os.path.exists(KERNEL_BTF):
        reasons.append(f"the kernel has no BTF ({KERNEL_BTF}), which libxdp's dispatcher needs")
    # Both there and still no dispatcher: the kernel refused to load it
    # (on the machine this was written on, loading its freplace program
    # fails with EPERM although BTF and a BPF filesystem are present).
    return "; ".join(reasons) or "libxdp could not load its dispatcher on this kernel (its log lines say why)"
