"""Forwarding benchmark: vswitchd against DPDK testpmd and OVS-DPDK, same generator, same run.

Run from the repository root, as root, with hugepages reserved:

    python -m tools.bench                      # 64/512/1518-byte frames, 3 repetitions, all systems
    python -m tools.bench --smoke --systems vswitchd,testpmd-io
    python -m tools.bench --latency --help     # the latency mode: tools/latency.py
    python -m tools.bench --macs 2,1000,65536,1000000   # scale modes: tools/scale.py
    python -m tools.bench --ports 2,8,32,64
    python -m tools.bench --systems vswitchd,testpmd-io --sizes 64 --paths split,packed
    python -m tools.bench --systems vswitchd-vxlan,ovs-dpdk-vxlan --sizes 64,1518

Method
------
Every system under test (SUT) is a two-port middle box between the two ports
of one traffic generator, in one of three topologies:

    vhost-vhost (VM to VM):
    generator port 0 (virtio-user) <-> SUT port A ... SUT port B <-> generator port 1 (virtio-user)

    vhost-veth (VM to NIC; a veth pair in a namespace of the benchmark's own stands in for the wire):
    generator port 0 (virtio-user) <-> SUT port A ... SUT port B on veth end 0
                                       veth end 1 <-> generator port 1 (DPDK net_af_xdp)

    vxlan (VM to VM on two hosts; each host a network namespace of the benchmark's own,
    a veth pair between them the underlay, MTU 1600 for 1518-byte frames + 50 bytes of VXLAN):
    generator port 0 <-> switch A: vhost-user port, vxlan port (10.99.0.1, namespace host A)
                                   ~ veth ~
    generator port 1 <-> switch B: vhost-user port, vxlan port (10.99.0.2, namespace host B)

* The generator is one `dpdk-testpmd` with two `net_virtio_user` ports in
  `mac` forwarding mode with `--eth-peer` set, so every frame it sends out of
  port 0 carries port 0's MAC as source and port 1's MAC as destination (and
  the other way round): real, learnable addresses. It is seeded with the
  interactive `start tx_first 32` (32 bursts of 32 frames per port); from
  then on a fixed population of frames loops generator -> SUT -> generator.
  The sum of the generator's Rx over both ports is the SUT's forwarding rate.
  Its per-core mbuf cache is 512 (`--mbcache`, DPDK's maximum; testpmd's
  default 250 spills into the pool's shared ring when the SUT keeps up, see
  GEN_MBCACHE); `--generator-args` adds testpmd options after these.
* The systems, each started fresh for every measurement:
  - `vswitchd`: this project, two vhost-user ports in server mode, MAC
    learning on (the default, as users run it), `pmd: {cpus: [SUT core]}`.
  - `testpmd-io`: `dpdk-testpmd` with two `net_vhost` ports, `io` forwarding
    (port 0 <-> port 1, no header touched): DPDK's own vhost at its fastest.
  - `testpmd-mac`: the same with `mac` forwarding (rewrites both MACs of
    every frame, a per-packet header write like a switch's).
  - `ovs-dpdk`: Open vSwitch's DPDK build (`ovs-vswitchd-dpdk`) with a
    private ovsdb-server and run directory, under `unshare --net`, a
    `datapath_type=netdev` bridge with its default NORMAL (learning) flow,
    and two `dpdkvhostuserclient` ports (OVS is the vhost-user client, the
    generator's virtio-user ports are servers: `server=1`).
  vhost-veth (its ratios are to `testpmd-af-xdp`):
  - `vswitchd-af-xdp`: vswitchd, a vhost-user port and an `af-xdp` port on veth end 0.
  - `vswitchd-af-packet`: the same with an `af-packet` port.
  - `testpmd-af-xdp`: `dpdk-testpmd` with `net_vhost` and `net_af_xdp` on veth end 0,
    `io` forwarding: DPDK's own path between a guest and a NIC.
  vxlan (its ratios are to `ovs-dpdk-vxlan`; two switch instances per system,
  both PMDs on the SUT core, each instance's control threads on the generator core):
  - `vswitchd-vxlan`: two vswitchd, each a vhost-user port (server mode) and
    a `vxlan` port whose sockets live in its host's namespace, where the
    veth end holds the VTEP address (the kernel's UDP/IP stack carries the
    datagrams; with --vswitchd-vxlan-underlay af-xdp an XDP socket on the
    veth end does, the kernel keeping the address).
  - `ovs-dpdk-vxlan`: two ovs-vswitchd-dpdk, each with its own ovsdb-server,
    run directory and DPDK file prefix, run inside its host's namespace, set
    up as OVS documents userspace tunnelling: a `br-int` (netdev) with a
    `dpdkvhostuserclient` port and a `vxlan` port, a `br-phy` (netdev) that
    holds the VTEP address on its internal port and the veth end as its
    uplink (`--ovs-underlay`, default `afxdp`: OVS's own AF_XDP netdev;
    mtu_request 1600), `ovs/route/add` unless OVS has the route already,
    and a static `tnl/arp/set` for the remote VTEP (vswitchd's hosts get
    static neighbour entries likewise).
  SUT cycles/packet here is both instances' busy cycles over the frames
  that crossed the tunnel (both instances' received packets, summed, halved):
  the cost of one frame through encapsulation and decapsulation. The two
  PMDs share one core (this host has two), and the kernel's veth, IP and UDP
  work runs in the sending PMD's system calls and softirqs on that core.
  The kernel's share of veth and AF_XDP work is done in the sending
  process's system calls and softirqs, so here cycles/packet from the
  packet threads undercount the whole cost; Mpps and the CPU columns are
  the figures to compare.
* Cores: the generator forwards on `--gen-core` (default 0), the SUT's
  packet thread (PMD / forwarding lcore) runs on `--sut-core` (default 1).
  Everything else (the SUT's control threads, testpmd main lcores) is idle
  during a measurement; the SUT's process is pinned to the generator core
  with taskset so only its packet thread uses the SUT core (its threads pin
  themselves to the SUT core).
* Frame size: sizes are Ethernet frame sizes including the 4-byte FCS, as
  RFC 2544 counts them. virtio carries no FCS, so the generator is told
  `set txpkts <size - 4>` (testpmd's txpkts is the length of the frame it
  builds in the mbuf: Ethernet header to end of payload, no CRC). Gbit/s
  counts the line rate those frames would need on a wire: (size + 20 bytes
  of preamble, start delimiter and inter-frame gap) x 8 x frames/s.
* A measurement: start the SUT, start the generator, set the frame size,
  `start tx_first 32`, wait `--warmup` seconds, read the generator's port
  counters (`show port stats all`), wait `--window` seconds, read them again.
  Mpps = (RX-packets delta, both ports) / the time between the two reads.
  Cycles per packet, where the system reports them: the generator's from
  testpmd `--record-core-cycles` (`show fwd stats all`: busy cycles /
  received packets over the window), testpmd SUT's the same way, vswitchd's
  from `pmd/stats` (busy_cycles / packets), OVS's from
  `dpif-netdev/pmd-stats-show` (processing cycles / packets received).
* The host this was written on has slow spells (both processes 1.5-2.3x
  slower for tens of seconds), so every repetition measures every system at
  every size, interleaved (the system order rotates each repetition), and
  the table reports the median with min and max. Cycles per packet show
  whether a slow sample was a slow spell (the generator's cycles go up too).
* What the slow spells are: the hypervisor places this VM's two vCPUs on
  physical cores that share a cache or on cores that do not, and keeps a
  placement for tens of seconds while both are busy. A cache line then takes
  about 110 or about 480 ns (sometimes 880) to go from one core to the other
  and back (`python -m tools.core_rtt --busy`), and every line the generator
  and the SUT hand each other costs that much more. So just before each
  window opens and just after it closes, with both busy, a probe
  (vswitch/pmd/core_probe.c, two SCHED_FIFO threads on the two cores handing
  one line back and forth, 1-9 ms) measures the round trip. A probe above
  --regime-split-ns (default 250) is far, else near; a sample is near or far
  when both its probes agree, mixed otherwise. The `near` and `far` columns
  compare two systems within one regime: median Mpps of the row's near (far)
  samples over the baseline's. With --regime near (far) a sample that did
  not run near (far) is measured again, up to --regime-tries times, so that
  every system is compared in one placement; the discarded samples are in
  the JSON.
* A system that cannot be started is reported as unavailable with the
  reason, in the table and the JSON; it is never silently dropped.

Every process is started by this tool and stopped by its PID (quit, then
SIGTERM, then SIGKILL), on failure and on Ctrl-C too; DPDK runs with
`--in-memory` (no hugepage files), OVS in its own network namespace that dies
with it, sockets in a temporary directory that is removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # `python tools/bench.py` works as well as `python -m tools.bench`.
    sys.path.insert(0, str(REPO))

from tools.core_rtt import probe as core_probe, regime_of  # noqa: E402
from tests.support.testpmd import (TESTPMD, TestPmd, af_xdp_vdev, hugepages_free,  # noqa: E402
                                   vhost_vdev, virtio_user_vdev)

# Core-to-core round trips above this are the far placement (tools/core_rtt.py, --regime-split-ns).
DEFAULT_REGIME_SPLIT_NS = 250.0
SYSTEMS = ("vswitchd", "testpmd-io", "testpmd-mac", "ovs-dpdk",
           "vswitchd-af-xdp", "vswitchd-af-packet", "testpmd-af-xdp",
           "vswitchd-vxlan", "ovs-dpdk-vxlan")
# The two topologies (see Method) and the system each one's ratios are to.
VHOST_VHOST = "vhost-vhost"
VHOST_VETH = "vhost-veth"
VXLAN = "vxlan"
BASELINES = {VHOST_VHOST: "testpmd-io", VHOST_VETH: "testpmd-af-xdp", VXLAN: "ovs-dpdk-vxlan"}
DEFAULT_SIZES = (64, 512, 1518)
FCS_BYTES = 4
# Preamble (7) + start frame delimiter (1) + minimum inter-frame gap (12).
WIRE_OVERHEAD_BYTES = 20
# `start tx_first N`: bursts per port that seed the loop. One burst is
# latency-bound (~12 vs ~24 Mpps on the reference machine, PEERS.md); 32
# bursts keep every ring in the loop busy.
TX_FIRST_BURSTS = 32
GEN_MAC = ("02:00:00:00:00:01", "02:00:00:00:00:02")
# The generator's virtqueue paths (--paths), as virtio-user devargs: the ring
# layout, and the features whose absence makes virtio-user run other receive
# and transmit functions (the interop matrix's main paths).
PATHS = {
    "split": {},
    "packed": {"packed_vq": True},
    "split-no-in-order": {"in_order": False},
    "packed-no-in-order": {"packed_vq": True, "in_order": False},
    "split-no-mrg": {"mrg_rxbuf": False},
    "packed-no-mrg": {"packed_vq": True, "mrg_rxbuf": False},
}
# Enough mbufs for 2 x 32 x 32 frames in flight plus both ports' rings.
GEN_MBUFS = 32768
# The generator's per-core mbuf cache: DPDK's maximum, not testpmd's 250. With
# 250 the cache spills into the pool's shared ring (a FIFO through all 32768
# mbufs, so every mbuf comes back cold) whenever the generator frees and
# allocates in large swings, which it does when the middle box keeps up with
# it: its cost per frame then measured its own allocator, not the middle box
# (README "Performance", "The generator's mbuf cache"). Set for every system
# alike; --generator-args=--mbcache=250 measures with testpmd's default.
GEN_MBCACHE = 512
# The generator's tuning options, the same for every system: its argv and the
# JSON's method.generator_args both come from this list, so they cannot differ.
GEN_TUNING_ARGS = (f"--mbcache={GEN_MBCACHE}",)

# Repetitions of one system and size further apart than this are flagged under the table.
NOISY_SPREAD = 1.25
# sockaddr_un.sun_path is 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107

OVS_DPDK_BINARY = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
OVS_PACKAGE = "openvswitch-switch-dpdk"

# The vxlan topology: both hosts' VTEP addresses, the VNI, and the underlay
# MTU (a 1518-byte frame is 1514 bytes without FCS; in VXLAN it needs an IP
# MTU of 1514 + 36 = 1550).
VTEP_IPS = ("10.99.0.1", "10.99.0.2")
VXLAN_VNI = 5001
UNDERLAY_MTU = 1600
# OVS's br-phy MACs and the veth ends' MACs, fixed so that each host can be
# told the other's: static neighbour entries for both systems, since the
# first frames of a closed loop lost while ARP resolves never come back.
OVS_PHY_MACS = ("02:00:00:00:10:01", "02:00:00:00:10:02")
VETH_MACS = ("02:00:00:00:20:01", "02:00:00:00:20:02")
# How an OVS-DPDK instance attaches to its veth end (--ovs-underlay); the
# default first. OVS's own AF_XDP netdev was the fastest that works here (one
# trial each at 64 B, 2026-11-29, Debian 12's OVS 3.1 / DPDK 22.11): DPDK's
# net_af_packet refuses the MTU of 1600 (its largest frame is 1518 bytes, so
# 1518-byte frames in VXLAN cannot pass), net_af_xdp and the AF_PACKET socket
# were slower.
OVS_UNDERLAYS = ("afxdp", "af_xdp", "system", "af_packet")


class Unavailable(Exception):
    """A system cannot be run on this machine; the message says why and how to fix it."""


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(argv: list[str], env: dict | None = None, timeout: float = 30.0) -> str:
    """Run a short command; returns its stdout, raises RuntimeError with its output on failure."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def stop_process(proc: subprocess.Popen | None, name: str, grace: float = 10.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit within `grace` seconds; reap it."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            log(f"bench: {name} (pid {proc.pid}) ignored signal {sig.name}")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log_path: Path | None = None) -> None:
    """Poll `predicate` until true; fail early if `proc` exits, with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}{log_tail(log_path)}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not done within {timeout:.0f} s{log_tail(log_path)}")


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {path} ---\n" + "\n".join(text)


def package_version(package: str) -> str | None:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def parse_fwd_cycles(text: str) -> tuple[int, int] | None:
    """(busy cycles, packets) from testpmd's `show fwd stats all` with --record-core-cycles.

    DPDK 22.11 prints "total cycles=", later releases "busy cycles="; both
    count only polls that received packets.
    """
    found = re.search(r"CPU cycles/packet=[\d.]+ \((?:busy|total) cycles=(\d+) / total \w+ packets=(\d+)\)",
                      text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def parse_generator_bursts(text: str) -> tuple[int, int, int] | None:
    """(RX packets, RX bursts, TX-dropped) over both ports from `show fwd stats all` with --record-burst-stats.

    A burst is one rx_burst call that returned frames or not (testpmd counts
    empty polls too), so packets / bursts is how full the generator found its
    receive rings: a loop where every poll finds a few frames costs more per
    frame than one where polls find full bursts.
    """
    rx = [int(v) for v in re.findall(r"RX-packets: (\d+)\s+RX-dropped", text)]
    bursts = [int(v) for v in re.findall(r"RX-bursts : (\d+)", text)]
    dropped = [int(v) for v in re.findall(r"TX-dropped: (\d+)", text)]
    if len(rx) < 2 or len(bursts) < 2:
        return None
    return sum(rx[:2]), sum(bursts[:2]), sum(dropped[:2])


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (all its threads) so far, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name is in parentheses and may hold spaces: split after it.
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float | None:
    """CPU seconds of all the processes (both instances of a vxlan system)."""
    times = [cpu_seconds(pid) for pid in pids]
    return None if not times or None in times else sum(times)


def cpu_share(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None:
        return None
    return round((after - before) / seconds, 3)


def per_packet(delta: tuple[int, int] | None) -> float | None:
    if delta is None or delta[1] <= 0:
        return None
    return delta[0] / delta[1]


def delta(before: tuple[int, int] | None, after: tuple[int, int] | None) -> tuple[int, int] | None:
    if before is None or after is None:
        return None
    return after[0] - before[0], after[1] - before[1]


# --------------------------------------------------------------------------
# Systems under test
# --------------------------------------------------------------------------

class System:
    """One system under test, started fresh for one measurement in its own directory.

    `socket_paths` are the two vhost-user sockets; `generator_is_server` says
    whether the generator's virtio-user ports must listen (server=1) because
    the SUT connects to them.
    """

    name = ""
    topology = VHOST_VHOST
    generator_is_server = False

    def __init__(self, workdir: Path, gen_core: int, sut_core: int, veth: "VethPair | VxlanHosts | None" = None):
        self.dir = workdir
        self.gen_core = gen_core
        self.sut_core = sut_core
        # vhost-veth: one socket, and the veth pair whose first end is the SUT's.
        # vxlan: two sockets, and the two host namespaces.
        self.veth = veth
        count = 1 if self.topology == VHOST_VETH else 2
        self.socket_paths = [workdir / name for name in ("a.sock", "b.sock")[:count]]

    @classmethod
    def check(cls, install: bool) -> None:
        """Raise Unavailable with the reason if this system cannot run here."""

    @classmethod
    def version(cls) -> str | None:
        return None

    def start(self) -> None:
        raise NotImplementedError

    def cycles(self) -> tuple[int, int] | None:
        """Cumulative (busy cycles, packets) of the SUT's packet thread, if it reports them."""
        return None

    @property
    def pid(self) -> int | None:
        """The process whose CPU time is the SUT's (its packet thread's and the rest)."""
        return None

    @property
    def pids(self) -> list[int]:
        """Every process of the SUT (two switch instances in the vxlan topology)."""
        return [self.pid] if self.pid is not None else []

    def start_window(self) -> tuple[int, int] | None:
        """Called as the window opens; returns the counters that `cycles()` at its end is compared with."""
        return self.cycles()

    def window_edge(self, start: bool) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """The SUT's counters at the window's start or end: (busy cycles, packets) as start_window()
        or cycles() return them, and cumulative (packets, non-empty receive bursts) if it reports them."""
        return (self.start_window() if start else self.cycles()), None

    def stop(self) -> None:
        raise NotImplementedError


class Vswitchd(System):
    name = "vswitchd"

    @classmethod
    def check(cls, install: bool) -> None:
        # In a child process: the benchmark itself never maps the fast path's
        # shared object, which a rebuild in the same tree would pull from under it.
        done = subprocess.run([sys.executable, "-c", "import vswitch.native, yaml"], cwd=REPO,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"vswitch does not import ({last}); run tools/install.sh or "
                              "pip install -e . in the repository")

    @classmethod
    def version(cls) -> str | None:
        from vswitch import __version__
        return f"{__version__} ({git_revision()})"

    def start(self) -> None:
        import yaml
        # Short: the path must fit sockaddr_un like the vhost-user sockets.
        self.control_socket = str(self.dir / "ctl")
        self.log_path = self.dir / "vswitchd.log"
        config = self.config()
        config_path = self.dir / "vswitchd.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._log = open(self.log_path, "ab")
        # The control plane lives on the generator core; the PMD thread pins
        # itself to the SUT core (pmd.cpus).
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(self.gen_core), sys.executable, "-m", "vswitch.daemon",
             "--config", str(config_path), "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_for(lambda: all(p.exists() for p in self.socket_paths) and self._answers(), 30,
                 "vswitchd start-up", self.proc, self.log_path)

    def config(self) -> dict:
        pmd = {"cpus": [self.sut_core]}
        if getattr(self, "pmd_yield", False):
            pmd["yield"] = True
        return {"control_socket": self.control_socket, "pmd": pmd, "ports": self.ports()}

    def ports(self) -> list[dict]:
        return [{"name": f"vm{i}", "type": "vhost-user", "path": str(path), "mode": "server"}
                for i, path in enumerate(self.socket_paths)]

    @property
    def pid(self) -> int | None:
        # taskset execs the daemon: same PID.
        return self.proc.pid if getattr(self, "proc", None) else None

    def _answers(self) -> bool:
        try:
            self._call("version")
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def _call(self, command: str):
        from vswitch.control.cli import call
        return call(self.control_socket, command, timeout=5)

    def _pmd_counters(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(busy cycles, packets) and (packets, non-empty bursts) over the PMDs, from one pmd/stats read."""
        pmds = self._call("pmd/stats")["pmds"]
        packets = sum(p["packets"] for p in pmds)
        return (sum(p["busy_cycles"] for p in pmds), packets), (packets, sum(p["bursts"] for p in pmds))

    def cycles(self) -> tuple[int, int] | None:
        return self._pmd_counters()[0]

    def window_edge(self, start: bool) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        # start_window() is cycles() here: one read gives both, and they count the same frames.
        return self._pmd_counters()

    def stop(self) -> None:
        stop_process(getattr(self, "proc", None), "vswitchd")
        if getattr(self, "_log", None):
            self._log.close()


class TestPmdVhost(System):
    """DPDK testpmd with two net_vhost ports: DPDK's own vhost-user backend as the middle box."""

    __test__ = False
    forward_mode = "io"

    @classmethod
    def check(cls, install: bool) -> None:
        if shutil.which(TESTPMD) is None:
            raise Unavailable(f"{TESTPMD} not found: apt-get install dpdk-dev (tools/setup-test-env.sh)")

    @classmethod
    def version(cls) -> str | None:
        return package_version("dpdk")

    def start(self) -> None:
        # Forwarding lcore on the SUT core, main lcore (the idle prompt) on the generator core.
        self.pmd = TestPmd(
            self.vdevs(),
            [f"--forward-mode={self.forward_mode}", "--nb-cores=1", "--record-core-cycles",
             "--disable-link-check"],
            log_path=self.dir / "sut-testpmd.log", lcores=f"{self.gen_core},{self.sut_core}",
            main_lcore=self.gen_core, netns=self.veth.netns if self.veth else None)
        self.pmd.spawn().wait_ready()
        self.pmd.start()
        wait_for(lambda: all(p.exists() for p in self.socket_paths), 10, "testpmd vhost sockets")

    def vdevs(self) -> list[str]:
        return [vhost_vdev(i, path) for i, path in enumerate(self.socket_paths)]

    @property
    def pid(self) -> int | None:
        return self.pmd.pid if getattr(self, "pmd", None) else None

    def cycles(self) -> tuple[int, int] | None:
        return parse_fwd_cycles(self.pmd.cmd("show fwd stats all"))

    def stop(self) -> None:
        if getattr(self, "pmd", None):
            self.pmd.close()


class TestPmdIo(TestPmdVhost):
    name = "testpmd-io"
    forward_mode = "io"


class TestPmdMac(TestPmdVhost):
    name = "testpmd-mac"
    forward_mode = "mac"


class OvsDpdk(System):
    """Open vSwitch with the DPDK datapath, private database and run directory, own network namespace."""

    name = "ovs-dpdk"
    generator_is_server = True

    @classmethod
    def check(cls, install: bool) -> None:
        if not os.access(OVS_DPDK_BINARY, os.X_OK) and install:
            log(f"bench: installing {OVS_PACKAGE} (apt-get)")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", OVS_PACKAGE]
            if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                done = subprocess.run(argv, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise Unavailable(f"apt-get install {OVS_PACKAGE} failed: {done.stderr.strip()[-300:]}")
        if not os.access(OVS_DPDK_BINARY, os.X_OK):
            raise Unavailable(f"{OVS_DPDK_BINARY} not found: apt-get install {OVS_PACKAGE} "
                              "(or run the benchmark with --install)")
        for tool in ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-appctl", "unshare", "taskset"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} not found (apt-get install {OVS_PACKAGE})")
        if not Path(OVS_SCHEMA).exists():
            raise Unavailable(f"{OVS_SCHEMA} not found (apt-get install {OVS_PACKAGE})")

    @classmethod
    def version(cls) -> str | None:
        try:
            first = run([OVS_DPDK_BINARY, "--version"]).splitlines()
        except Exception:  # noqa: BLE001
            return package_version(OVS_PACKAGE)
        return "; ".join(line.strip() for line in first if line.strip())

    def start(self) -> None:
        self.start_ovsdb(self.dir / "ovs", f"vswitch-bench-ovs-{os.getpid()}")
        # The bridge's default flow is NORMAL: MAC learning, like vswitchd.
        self.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        for i, path in enumerate(self.socket_paths):
            self.add_vhost_port("br0", f"vhu{i}", path)
        # unshare --net: the bridge's internal tap device is made in a
        # namespace that disappears with the process.
        self.start_vswitchd(["unshare", "--net"])
        wait_for(self._ports_ready, 60, "ovs-vswitchd-dpdk start-up", self.vswitchd, self.log_path)

    def start_ovsdb(self, run_dir: Path, prefix: str) -> None:
        """A private ovsdb-server in run_dir, initialised with the DPDK settings (file prefix `prefix`)."""
        run_dir.mkdir()
        self.run_dir = run_dir
        # Every path OVS derives from these lives in run_dir: nothing touches
        # /var/run/openvswitch or /etc/openvswitch of a system OVS.
        self.env = dict(os.environ, OVS_RUNDIR=str(run_dir), OVS_DBDIR=str(run_dir),
                        OVS_LOGDIR=str(run_dir), OVS_SYSCONFDIR=str(run_dir),
                        OVS_PKGDATADIR=str(Path(OVS_SCHEMA).parent))
        db = run_dir / "conf.db"
        self.db_socket = run_dir / "db.sock"
        self.ctl_socket = run_dir / "ovs-vswitchd.ctl"
        run(["ovsdb-tool", "create", str(db), OVS_SCHEMA], self.env)
        self.ovsdb = subprocess.Popen(
            ["taskset", "-c", str(self.gen_core), "ovsdb-server", str(db),
             f"--remote=punix:{self.db_socket}", f"--unixctl={run_dir / 'ovsdb-server.ctl'}",
             f"--pidfile={run_dir / 'ovsdb-server.pid'}", f"--log-file={run_dir / 'ovsdb-server.log'}",
             "-vconsole:off"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.db_socket.exists, 10, "ovsdb-server start-up", self.ovsdb, run_dir / "ovsdb-server.log")
        self.vsctl("init")
        self.vsctl("set", "Open_vSwitch", ".",
                   "other_config:dpdk-init=true",
                   f'other_config:dpdk-extra="--no-pci --in-memory --file-prefix={prefix}"',
                   f"other_config:dpdk-lcore-mask={1 << self.gen_core:#x}",
                   f"other_config:pmd-cpu-mask={1 << self.sut_core:#x}",
                   # Pools sized for these two ports instead of one shared
                   # 256k-mbuf pool: hugepages are shared with the generator.
                   "other_config:per-port-memory=true")

    def add_vhost_port(self, bridge: str, name: str, path: Path) -> None:
        self.vsctl("add-port", bridge, name, "--", "set", "Interface", name,
                   "type=dpdkvhostuserclient", f"options:vhost-server-path={path}")

    def start_vswitchd(self, wrapper: list[str]) -> None:
        """ovs-vswitchd-dpdk on the database, under `wrapper` (the command that gives it its namespace)."""
        self.log_path = self.run_dir / "ovs-vswitchd.log"
        # taskset puts OVS's non-PMD threads on the generator core; the PMD pins itself.
        self.vswitchd = subprocess.Popen(
            ["taskset", "-c", str(self.gen_core), *wrapper, OVS_DPDK_BINARY,
             f"unix:{self.db_socket}", "--disable-system", f"--unixctl={self.ctl_socket}",
             f"--pidfile={self.run_dir / 'ovs-vswitchd.pid'}", f"--log-file={self.log_path}", "-vconsole:off"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int | None:
        # taskset, unshare and `ip netns exec` exec ovs-vswitchd: same PID.
        return self.vswitchd.pid if getattr(self, "vswitchd", None) else None

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db=unix:{self.db_socket}", "--no-wait", "--timeout=20", *args], self.env)

    def appctl(self, *args: str) -> str:
        return run(["ovs-appctl", "-t", str(self.ctl_socket), *args], self.env)

    def _ports_ready(self) -> bool:
        if not self.ctl_socket.exists():
            return False
        try:
            ofports = [self.vsctl("get", "Interface", f"vhu{i}", "ofport").strip()
                       for i in range(len(self.socket_paths))]
        except RuntimeError:
            return False
        return all(p.isdigit() and int(p) > 0 for p in ofports)

    def start_window(self) -> tuple[int, int] | None:
        # Two reads of pmd-stats-show are not always monotonic (a delta came
        # out negative), so count from a clear instead. The PMD applies the
        # clear on its next iteration, microseconds later.
        self.appctl("dpif-netdev/pmd-stats-clear")
        return (0, 0)

    def cycles(self) -> tuple[int, int] | None:
        text = self.appctl("dpif-netdev/pmd-stats-show")
        busy = re.search(r"processing cycles:\s*(\d+)", text)
        packets = re.search(r"packets received:\s*(\d+)", text)
        return (int(busy.group(1)), int(packets.group(1))) if busy and packets else None

    def stop(self) -> None:
        vswitchd = getattr(self, "vswitchd", None)
        if vswitchd is not None and vswitchd.poll() is None:
            try:
                # A clean exit releases the DPDK ports; signals are the fallback.
                run(["ovs-appctl", "-t", str(self.ctl_socket), "exit", "--cleanup"], self.env, timeout=15)
                vswitchd.wait(10)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        stop_process(vswitchd, "ovs-vswitchd")
        stop_process(getattr(self, "ovsdb", None), "ovsdb-server")


class VswitchdKernelUplink(Vswitchd):
    """vswitchd between a vhost-user port and a kernel port on the SUT's end of the veth pair."""

    topology = VHOST_VETH
    port_type = ""

    def ports(self) -> list[dict]:
        return super().ports() + [{"name": "uplink", "type": self.port_type, "ifname": self.veth.sut_if,
                                   "netns": self.veth.netns}]


class VswitchdAfXdp(VswitchdKernelUplink):
    name = "vswitchd-af-xdp"
    port_type = "af-xdp"


class VswitchdAfPacket(VswitchdKernelUplink):
    name = "vswitchd-af-packet"
    port_type = "af-packet"


class TestPmdAfXdp(TestPmdVhost):
    """DPDK testpmd between net_vhost and net_af_xdp, io forwarding: DPDK's own path for this topology."""

    name = "testpmd-af-xdp"
    topology = VHOST_VETH
    forward_mode = "io"

    def vdevs(self) -> list[str]:
        return super().vdevs() + [af_xdp_vdev(1, self.veth.sut_if)]


class VxlanSystem(System):
    """Two switch instances, one per host namespace, each a vhost-user port to one generator port
    and a VXLAN tunnel to the other (the vxlan topology)."""

    topology = VXLAN
    # Whether the VTEP address goes on the veth end itself (a switch that uses
    # the kernel's IP stack) or on a bridge of the switch's own (OVS's br-phy).
    address_on_veth = True

    def start(self) -> None:
        self.instances = []
        for i in (0, 1):
            self.instances.append(self.make_instance(i))
            self.instances[-1].start()

    def make_instance(self, i: int) -> System:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.pids[0] if self.pids else None

    @property
    def pids(self) -> list[int]:
        return [p for inst in getattr(self, "instances", []) for p in inst.pids]

    def start_window(self) -> tuple[int, int] | None:
        return self._frames([inst.start_window() for inst in self.instances])

    def cycles(self) -> tuple[int, int] | None:
        return self._frames([inst.cycles() for inst in self.instances])

    @staticmethod
    def _frames(counters: list) -> tuple[int, int] | None:
        # Each frame is received twice, once by each instance (from its guest
        # or from the tunnel): busy cycles of both per frame end to end.
        if any(c is None for c in counters):
            return None
        return sum(c[0] for c in counters), sum(c[1] for c in counters) // 2

    def stop(self) -> None:
        for inst in reversed(getattr(self, "instances", [])):
            inst.stop()


class VswitchdVxlan(VxlanSystem):
    name = "vswitchd-vxlan"
    check = Vswitchd.check
    version = Vswitchd.version

    def make_instance(self, i: int) -> System:
        hosts = self.veth
        workdir = self.dir / f"h{i}"
        workdir.mkdir()
        inst = Vswitchd(workdir, self.gen_core, self.sut_core)
        inst.socket_paths = [self.socket_paths[i]]
        inst.pmd_yield = getattr(self, "pmd_yield", False)
        vxlan = {"name": "vx", "type": "vxlan", "local_ip": VTEP_IPS[i], "remote": [VTEP_IPS[1 - i]],
                 "vni": VXLAN_VNI, "netns": hosts.netns[i]}
        if getattr(self, "vxlan_underlay", "socket") == "af-xdp":
            # The datagrams through an XDP socket on the host's veth end (README "Several hosts").
            vxlan["underlay"] = {"type": "af-xdp", "interface": hosts.ifnames[i]}
        inst.ports = lambda: [{"name": "vm", "type": "vhost-user", "path": str(self.socket_paths[i]),
                               "mode": "server"}, vxlan]
        return inst


class OvsDpdkVxlanInstance(OvsDpdk):
    """One host's OVS-DPDK, set up for userspace tunnelling as OVS's documentation does
    (Documentation/howto/userspace-tunneling.rst): br-int with the guest's port and the
    vxlan port, br-phy with the underlay port and the VTEP address."""

    def __init__(self, workdir: Path, gen_core: int, sut_core: int, hosts: "VxlanHosts", index: int,
                 socket_path: Path, underlay: str):
        super().__init__(workdir, gen_core, sut_core, hosts)
        self.index, self.underlay = index, underlay
        self.socket_paths = [socket_path]

    def start(self) -> None:
        i, hosts = self.index, self.veth
        self.start_ovsdb(self.dir / "ovs", f"vswitch-bench-ovs-{os.getpid()}-{i}")
        if getattr(self, "pmd_maxsleep", 0):
            # OVS's load-based PMD sleep (0, never, by default), like vswitchd's idle sleep.
            self.vsctl("set", "Open_vSwitch", ".", f"other_config:pmd-maxsleep={self.pmd_maxsleep}")
        self.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        self.add_vhost_port("br-int", "vhu", self.socket_paths[0])
        self.vsctl("add-port", "br-int", "vx", "--", "set", "Interface", "vx", "type=vxlan",
                   f"options:local_ip={VTEP_IPS[i]}", f"options:remote_ip={VTEP_IPS[1 - i]}",
                   f"options:key={VXLAN_VNI}")
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                   f"other_config:hwaddr={OVS_PHY_MACS[i]}", "--", "set", "Interface", "br-phy",
                   f"mtu_request={UNDERLAY_MTU}")
        # The uplink: the veth end, as a DPDK port on a vdev, or as OVS's own
        # AF_XDP or AF_PACKET netdev (named as the interface, as those must be).
        ifname = hosts.ifnames[i]
        if self.underlay == "system":
            port_name, options = ifname, []
        elif self.underlay == "afxdp":
            port_name, options = ifname, ["type=afxdp"]
        else:
            vdev = {"af_packet": "net_af_packet0", "af_xdp": "net_af_xdp0"}[self.underlay]
            port_name, options = "phy", ["type=dpdk", f"options:dpdk-devargs={vdev},iface={ifname}"]
        self.vsctl("add-port", "br-phy", port_name, "--", "set", "Interface", port_name,
                   f"mtu_request={UNDERLAY_MTU}", *options)
        self.phy_port = port_name
        # In the host's namespace: br-int's and br-phy's internal ports (taps) are made there.
        self.start_vswitchd(["ip", "netns", "exec", hosts.netns[i]])
        wait_for(self._ports_ready, 60, "ovs-vswitchd-dpdk start-up", self.vswitchd, self.log_path)
        ip = ["ip", "-n", hosts.netns[i]]
        run([*ip, "addr", "add", f"{VTEP_IPS[i]}/24", "dev", "br-phy"])
        run([*ip, "link", "set", "br-phy", "up"])
        # As OVS's howto says: add the tunnel route unless OVS has cached it
        # from the kernel's table (it does, once it has seen br-phy's address).
        subnet = VTEP_IPS[0].rsplit(".", 1)[0] + ".0/24"
        try:
            wait_for(lambda: f"{subnet} dev br-phy" in self.appctl("ovs/route/show"), 5, "OVS's cached route")
        except RuntimeError:
            self.appctl("ovs/route/add", f"{VTEP_IPS[1 - i]}/24", "br-phy")
        # Static: neither instance depends on ARP snooping having seen the other's reply.
        self.appctl("tnl/arp/set", "br-phy", VTEP_IPS[1 - i], OVS_PHY_MACS[1 - i])

    def _ports_ready(self) -> bool:
        if not self.ctl_socket.exists():
            return False
        try:
            ofports = [self.vsctl("get", "Interface", name, "ofport").strip()
                       for name in ("vhu", "vx", self.phy_port)]
        except RuntimeError:
            return False
        return all(p.isdigit() and int(p) > 0 for p in ofports)


class OvsDpdkVxlan(VxlanSystem):
    name = "ovs-dpdk-vxlan"
    generator_is_server = True
    address_on_veth = False
    check = OvsDpdk.check
    version = OvsDpdk.version
    underlay = OVS_UNDERLAYS[0]
    pmd_maxsleep = 0

    def make_instance(self, i: int) -> System:
        workdir = self.dir / f"h{i}"
        workdir.mkdir()
        inst = OvsDpdkVxlanInstance(workdir, self.gen_core, self.sut_core, self.veth, i, self.socket_paths[i],
                                    self.underlay)
        inst.pmd_maxsleep = self.pmd_maxsleep
        return inst


SYSTEM_CLASSES: dict[str, type[System]] = {cls.name: cls for cls in (
    Vswitchd, TestPmdIo, TestPmdMac, OvsDpdk, VswitchdAfXdp, VswitchdAfPacket, TestPmdAfXdp,
    VswitchdVxlan, OvsDpdkVxlan)}


class VethPair:
    """A network namespace of the benchmark's own with a veth pair in it, both ends up.

    The SUT attaches to `sut_if`; the generator's second port is DPDK's
    net_af_xdp on `gen_if`, whose MAC is set to the generator's second MAC.
    Removing the namespace removes the pair.
    """

    sut_if, gen_if = "vsb0", "vsb1"
    _count = 0

    def __init__(self):
        VethPair._count += 1
        self.netns = f"vsb-{os.getpid()}-{VethPair._count}"

    def create(self) -> "VethPair":
        run(["ip", "netns", "add", self.netns])
        try:
            # No IPv6 (hence no neighbour discovery or MLD) and no address: the
            # kernel must send nothing of its own on the pair, since every frame
            # that enters the closed loop would circle in it for the whole run.
            for scope in ("all", "default"):
                run(["ip", "netns", "exec", self.netns, "sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.disable_ipv6=1"])
            ip = ["ip", "-n", self.netns, "link"]
            run([*ip, "add", self.sut_if, "type", "veth", "peer", "name", self.gen_if])
            run([*ip, "set", self.gen_if, "address", GEN_MAC[1]])
            for ifname in (self.sut_if, self.gen_if):
                run([*ip, "set", ifname, "up"])
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class VxlanHosts:
    """Two network namespaces of the benchmark's own ("hosts"), a veth pair between them (the underlay).

    Both ends get UNDERLAY_MTU, and the VTEP addresses go on them when the
    switch uses the kernel's IP stack (address_on_veth); OVS's userspace
    tunnels want the address on their br-phy instead. Removing the
    namespaces removes the pair.
    """

    ifnames = ("vsx0", "vsx1")
    _count = 0

    def __init__(self, address_on_veth: bool):
        VxlanHosts._count += 1
        self.address_on_veth = address_on_veth
        self.netns = tuple(f"vsb-{os.getpid()}-x{VxlanHosts._count}{side}" for side in "ab")

    def create(self) -> "VxlanHosts":
        try:
            for ns in self.netns:
                run(["ip", "netns", "add", ns])
                # No IPv6: the kernel sends nothing of its own (neighbour discovery, MLD) over the underlay.
                for scope in ("all", "default"):
                    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.disable_ipv6=1"])
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", self.netns[0], "link", "add", self.ifnames[0], "type", "veth", "peer", "name",
                 self.ifnames[1], "netns", self.netns[1]])
            for i, (ns, ifname) in enumerate(zip(self.netns, self.ifnames)):
                run(["ip", "-n", ns, "link", "set", ifname, "address", VETH_MACS[i], "mtu", str(UNDERLAY_MTU),
                     "up"])
                if self.address_on_veth:
                    run(["ip", "-n", ns, "addr", "add", f"{VTEP_IPS[i]}/24", "dev", ifname])
                    run(["ip", "-n", ns, "neigh", "replace", VTEP_IPS[1 - i], "lladdr", VETH_MACS[1 - i],
                         "dev", ifname, "nud", "permanent"])
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------

@dataclass
class Sample:
    system: str
    size: int
    rep: int
    mpps: float | None = None
    rx_packets: int | None = None          # both generator ports, over the window
    window_seconds: float | None = None
    testpmd_rx_pps: int | None = None      # testpmd's own Rx-pps (sum), for cross-checking
    generator_cycles_per_packet: float | None = None
    sut_cycles_per_packet: float | None = None
    generator_rx_missed: int | None = None
    mean_rx_frame_bytes: float | None = None  # frame size less FCS, checked
    # CPU time of each process over the window / window length: a busy-polling
    # thread that had its core to itself is at 1.0; less means the host took it.
    sut_cpu_share: float | None = None
    generator_cpu_share: float | None = None
    # How full the bursts were over the window: the SUT's frames per non-empty
    # receive burst (vswitchd only), the generator's frames per rx_burst call
    # (empty polls included), and frames the generator could not send (its
    # TX ring full): together they say which side was waiting for the other.
    sut_frames_per_burst: float | None = None
    generator_frames_per_poll: float | None = None
    generator_tx_dropped: int | None = None
    started_at: str = ""
    # Nanoseconds a cache line took from the generator's core to the SUT's
    # and back, probed just before the window opened and just after it
    # closed (tools/core_rtt.py): which placement of the two vCPUs the
    # host had the sample run in.
    core_rtt_ns_before: float | None = None
    core_rtt_ns_after: float | None = None
    error: str | None = None
    # --profile: where the system's and the generator's time went over the window,
    # [(percent, symbol)], hottest first.
    profile: list | None = None
    generator_profile: list | None = None


class Generator(TestPmd):
    """The traffic generator: testpmd, two ports, mac forwarding towards each other.

    Both ports are virtio-user (vhost-vhost), or the second is net_af_xdp on
    the generator's end of the veth pair (vhost-veth), run in its namespace.
    """

    __test__ = False

    def __init__(self, sockets: list[Path], server: bool, workdir: Path, gen_core: int, sut_core: int,
                 veth: VethPair | None = None, path: str = "split", extra_args: Sequence[str] = ()):
        vdevs = [virtio_user_vdev(i, sock, mac=GEN_MAC[i], server=server or None, **PATHS[path])
                 for i, sock in enumerate(sockets)]
        if veth is not None:
            vdevs.append(af_xdp_vdev(len(vdevs), veth.gen_if))
        args = ["--forward-mode=mac", f"--eth-peer=0,{GEN_MAC[1]}", f"--eth-peer=1,{GEN_MAC[0]}",
                "--nb-cores=1", "--record-core-cycles", "--record-burst-stats",
                *GEN_TUNING_ARGS, *extra_args]
        # Forwarding lcore on the generator core; the main lcore (the prompt,
        # busy only while answering a command) on the SUT core.
        super().__init__(vdevs, args, log_path=workdir / "generator.log", lcores=f"{gen_core},{sut_core}",
                         main_lcore=sut_core, total_num_mbufs=GEN_MBUFS, start_timeout=60,
                         netns=veth.netns if veth else None)


def profile_window(groups: list[list[int]], seconds: float, workdir: Path, top: int = 15) -> list[list]:
    """Samples each group of processes (a system's, the generator's) with `perf record` over the same
    window; returns each group's hottest symbols.

    perf's cpu-clock sampling works where hardware counters do not (as in this VM).
    """
    perfs = [subprocess.Popen(["perf", "record", "-q", "-o", str(workdir / f"perf-{i}.data"),
                               "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, pids in enumerate(groups)]
    for perf in perfs:
        _, err = perf.communicate(timeout=seconds + 30)
        if perf.returncode != 0:
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace').strip()}")
    return [hottest_symbols(workdir / f"perf-{i}.data", top) for i in range(len(groups))]


def hottest_symbols(data: Path, top: int) -> list:
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,symbol",
                             "-g", "none"], capture_output=True, text=True, check=True, timeout=120).stdout
    return by_function(parse_perf_report(report), dso_paths(data))[:top]


def parse_perf_report(report: str) -> list:
    """`perf report --sort dso,symbol` rows as (percent, dso, symbol), every row."""
    rows = []
    for line in report.splitlines():
        # "  12.5%  librte_net_virtio.so.23.0  [.] virtio_recv_pkts_packed"
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and parts[2] in ("[.]", "[k]"):
            rows.append((float(parts[0].rstrip("%")), parts[1], parts[3]))
    return rows


def dso_paths(data: Path) -> dict:
    """The sampled DSOs' full paths by base name (perf report names them by base name)."""
    out = subprocess.run(["perf", "buildid-list", "-i", str(data), "--with-hits"], capture_output=True, text=True,
                         timeout=60).stdout
    paths = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1].startswith("/"):
            paths.setdefault(Path(parts[1]).name, Path(parts[1]))
    return paths


def by_function(rows: list, paths: dict) -> list:
    """Adds up a stripped DSO's unresolved addresses by the function that holds them, hottest first.

    Debian strips DPDK, so perf names only addresses there; the DSO's .eh_frame still bounds every
    function (function_table), and a sibling static archive, when installed, names them.
    """
    tables = {}
    totals: dict[str, float] = {}
    for percent, dso, symbol in rows:
        if symbol.startswith("0x"):
            if dso not in tables:
                tables[dso] = function_table(paths[dso]) if dso in paths else []
            symbol = function_at(tables[dso], int(symbol, 16)) or symbol
            symbol = f"{symbol} ({dso})"
        totals[symbol] = totals.get(symbol, 0.0) + percent
    return sorted(((round(pct, 2), sym) for sym, pct in totals.items()), key=lambda r: -r[0])


def function_at(table: list, address: int) -> str | None:
    for start, end, name in table:
        if start <= address < end:
            return name
    return None


def function_table(dso: Path) -> list:
    """[(start, end, name)] of a (stripped) ELF file's functions, from its call-frame records.

    A function is named by the symbol of the same size in the static archive built from the same
    objects (DPDK builds its .so from its .a's objects); several of one size are told apart by
    their object file, the one of the nearest functions named without doubt; no archive, or no
    symbol of that size: `fn@<start>`.
    """
    frames = subprocess.run(["readelf", "--debug-dump=frames", str(dso)], capture_output=True, text=True,
                            timeout=60).stdout
    ranges = sorted({(int(a, 16), int(b, 16))
                     for a, b in re.findall(r"FDE cie=\S+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", frames)})
    by_size: dict[int, list] = {}
    archive = static_archive(dso)
    if archive is not None:
        member = ""
        listing = subprocess.run(["nm", "-S", "--defined-only", str(archive)], capture_output=True, text=True,
                                 timeout=60).stdout
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 1 and parts[0].endswith(":"):
                member = parts[0][:-1]
            elif len(parts) == 4 and parts[2] in ("t", "T", "W"):
                by_size.setdefault(int(parts[1], 16), []).append((parts[3], member))
    candidates = [by_size.get(end - start, []) for start, end in ranges]
    sure = [c[0][1] if len({name for name, _ in c}) == 1 else None for c in candidates]
    table = []
    for i, ((start, end), cands) in enumerate(zip(ranges, candidates)):
        names = sorted({name for name, _ in cands})
        if len(names) > 1:
            near = [sure[j] for j in sorted(range(len(sure)), key=lambda j: abs(j - i)) if sure[j]][:2]
            chosen = sorted({name for name, obj in cands if obj in near})
            names = chosen if len(chosen) == 1 else names
        table.append((start, end, "|".join(names) if names else f"fn@{start:#x}"))
    return table


def static_archive(dso: Path) -> Path | None:
    """libfoo.a next to libfoo.so (Debian installs DPDK's drivers' archives under the multiarch dir)."""
    stem = dso.resolve().name.split(".so")[0]
    for folder in (dso.resolve().parent, dso.resolve().parent.parent.parent, Path("/usr/lib/x86_64-linux-gnu")):
        candidate = folder / f"{stem}.a"
        if candidate.exists():
            return candidate
    return None


def core_rtt(args) -> float | None:
    """The generator core <-> SUT core cache-line round trip now, or None (said once) if it cannot be probed."""
    if getattr(args, "core_probe_error", None):
        return None
    try:
        return core_probe(args.gen_core, args.sut_core)
    except OSError as exc:
        args.core_probe_error = str(exc)
        log(f"bench: no core-to-core probe ({exc}); samples are not sorted by placement")
        return None


def measure_in_regime(system_cls: type[System], size: int, rep: int, args, scratch: Path, path: str,
                      discarded: list[Sample]) -> Sample:
    """measure(); with --regime near|far, again (up to --regime-tries times) while the sample ran in
    another placement of the vCPUs. The last try is kept whatever its regime."""
    for attempt in range(1, args.regime_tries + 1):
        sample = measure(system_cls, size, rep, args, scratch, path)
        got = sample_regime(sample, args.regime_split_ns)
        if args.regime == "any" or sample.error or got is None or got == args.regime or attempt == args.regime_tries:
            return sample
        discarded.append(sample)
        log(f"bench:   ran {got} ({fmt(sample.core_rtt_ns_before, 0)} / {fmt(sample.core_rtt_ns_after, 0)} ns), "
            f"not {args.regime}: measuring again ({attempt + 1}/{args.regime_tries})")
    raise AssertionError("unreachable")


def label(system: str, path: str) -> str:
    """A system on a virtqueue path, as rows name it: `vswitchd`, `vswitchd/packed`."""
    return system if path == "split" else f"{system}/{path}"


def measure(system_cls: type[System], size: int, rep: int, args, scratch: Path, path: str = "split") -> Sample:
    """Start the system and a generator, loop frames of `size` bytes through it, read the rate.
    path: the generator's virtqueue layout (`split`, or `packed`: virtio-user packed_vq=1)."""
    sample = Sample(label(system_cls.name, path), size, rep,
                    started_at=datetime.datetime.now().isoformat(timespec="seconds"))
    # Short names: a vhost-user socket path must fit sockaddr_un (107 bytes),
    # and DPDK silently truncates a longer one.
    # Numbered rather than named (s<system>p<path>-<size>-r<rep>): the sockets inside must stay short.
    workdir = scratch / f"s{SYSTEMS.index(system_cls.name)}p{list(PATHS).index(path)}-{size}-r{rep + 1}"
    workdir.mkdir()
    if system_cls.topology == VHOST_VETH:
        veth = VethPair()
    elif system_cls.topology == VXLAN:
        veth = VxlanHosts(system_cls.address_on_veth)
    else:
        veth = None
    system = system_cls(workdir, args.gen_core, args.sut_core, veth)
    system.pmd_yield = args.vswitchd_pmd_yield
    system.vxlan_underlay = args.vswitchd_vxlan_underlay
    if system_cls.topology == VXLAN and hasattr(system_cls, "underlay"):
        system.underlay = args.ovs_underlay
        system.pmd_maxsleep = args.ovs_pmd_maxsleep
    too_long = [str(p) for p in system.socket_paths if len(os.fsencode(p)) > MAX_SOCKET_PATH]
    if too_long:
        sample.error = f"socket path longer than {MAX_SOCKET_PATH} bytes: {too_long[0]} (set TMPDIR shorter)"
        return sample
    generator = Generator(system.socket_paths, system.generator_is_server, workdir, args.gen_core, args.sut_core,
                          veth if system_cls.topology == VHOST_VETH else None, path, args.generator_args)
    try:
        if veth is not None:
            veth.create()
        if system.generator_is_server:
            # The SUT connects to the generator's listening sockets.
            generator.spawn()
            system.start()
            generator.wait_ready()
        else:
            system.start()
            generator.spawn().wait_ready()
        reply = generator.cmd(f"set txpkts {size - FCS_BYTES}")
        if reply.strip():
            raise RuntimeError(f"testpmd rejected 'set txpkts {size - FCS_BYTES}': {reply.strip()}")
        generator.start(tx_first=args.tx_first)
        time.sleep(args.warmup)

        sample.core_rtt_ns_before = core_rtt(args)
        # Cycle counters are cumulative: read them around the window too.
        sut_before, bursts_before = system.window_edge(start=True)
        fwd_before = generator.cmd("show fwd stats all")
        gen_before = parse_fwd_cycles(fwd_before)
        cpu_before = cpu_of(system.pids), cpu_seconds(generator.pid)
        t0 = time.monotonic()
        before = generator.port_stats()
        if args.profile:
            sample.profile, sample.generator_profile = profile_window([system.pids, [generator.pid]], args.window,
                                                                      workdir)
        else:
            time.sleep(args.window)
        t1 = time.monotonic()
        after = generator.port_stats()
        cpu_after = cpu_of(system.pids), cpu_seconds(generator.pid)
        fwd_after = generator.cmd("show fwd stats all")
        gen_after = parse_fwd_cycles(fwd_after)
        sut_after, bursts_after = system.window_edge(start=False)
        sample.core_rtt_ns_after = core_rtt(args)
        if bursts_before and bursts_after and bursts_after[1] > bursts_before[1]:
            sample.sut_frames_per_burst = round((bursts_after[0] - bursts_before[0]) /
                                                (bursts_after[1] - bursts_before[1]), 2)
        gen_bursts = parse_generator_bursts(fwd_before), parse_generator_bursts(fwd_after)
        if None not in gen_bursts and gen_bursts[1][1] > gen_bursts[0][1]:
            sample.generator_frames_per_poll = round((gen_bursts[1][0] - gen_bursts[0][0]) /
                                                     (gen_bursts[1][1] - gen_bursts[0][1]), 4)
            sample.generator_tx_dropped = gen_bursts[1][2] - gen_bursts[0][2]

        if set(after) != {0, 1}:
            raise RuntimeError(f"generator reported ports {sorted(after)}, expected 0 and 1")
        sample.rx_packets = sum(after[p]["rx_packets"] - before[p]["rx_packets"] for p in (0, 1))
        rx_bytes = sum(after[p]["rx_bytes"] - before[p]["rx_bytes"] for p in (0, 1))
        sample.window_seconds = round(t1 - t0, 4)
        sample.mpps = sample.rx_packets / (t1 - t0) / 1e6
        sample.testpmd_rx_pps = sum(after[p].get("rx_pps", 0) for p in (0, 1))
        sample.generator_rx_missed = sum(after[p].get("rx_missed", 0) for p in (0, 1))
        sample.generator_cycles_per_packet = per_packet(delta(gen_before, gen_after))
        sample.sut_cycles_per_packet = per_packet(delta(sut_before, sut_after))
        sample.sut_cpu_share = cpu_share(cpu_before[0], cpu_after[0], t1 - t0)
        sample.generator_cpu_share = cpu_share(cpu_before[1], cpu_after[1], t1 - t0)
        if sample.rx_packets <= 0:
            raise RuntimeError("no frame came back through the system during the window")
        # virtio-user counts frame bytes without the virtio-net header and
        # without FCS: every frame must come back exactly as long as sent.
        sample.mean_rx_frame_bytes = round(rx_bytes / sample.rx_packets, 2)
        if abs(sample.mean_rx_frame_bytes - (size - FCS_BYTES)) > 0.5:
            raise RuntimeError(f"frames came back with {sample.mean_rx_frame_bytes} bytes on average, "
                               f"expected {size - FCS_BYTES} (the frame size less the FCS)")
    except Exception as exc:  # noqa: BLE001 - one failed sample must not end the benchmark
        sample.error = f"{type(exc).__name__}: {exc}"
        log(f"bench: {system_cls.name} {size} B rep {rep + 1} failed: {sample.error}")
        if args.keep_logs:
            log(f"bench: logs kept in {workdir}")
    finally:
        generator.close()
        system.stop()
        if veth is not None:
            veth.remove()
    if sample.error is None and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return sample


# --------------------------------------------------------------------------
# Summary, table, JSON, plot
# --------------------------------------------------------------------------

def gbits(mpps: float, size: int) -> float:
    return mpps * 1e6 * (size + WIRE_OVERHEAD_BYTES) * 8 / 1e9


def median_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(systems: list[str], sizes: list[int], samples: list[Sample],
              unavailable: dict[str, str], split: float = DEFAULT_REGIME_SPLIT_NS) -> list[dict]:
    """One row per (system, size): medians, min/max, Gbit/s, ratio to the baseline."""
    rows = []
    medians: dict[tuple[str, int], float] = {}
    for system in systems:
        for size in sizes:
            mine = [s for s in samples if s.system == system and s.size == size]
            good = [s.mpps for s in mine if s.mpps is not None]
            row = {"system": system, "size": size, "samples": len(good), "failed": len(mine) - len(good)}
            if system.split("/")[0] in unavailable:
                row["status"] = f"unavailable: {unavailable[system.split('/')[0]]}"
            elif not good:
                errors = [s.error for s in mine if s.error]
                row["status"] = f"failed: {errors[0] if errors else 'no sample'}"
            else:
                row["status"] = "ok" if not row["failed"] else f"ok ({row['failed']} failed sample(s))"
                row["mpps_median"] = statistics.median(good)
                row["mpps_min"] = min(good)
                row["mpps_max"] = max(good)
                row["gbit_s_median"] = gbits(row["mpps_median"], size)
                row["generator_cycles_per_packet"] = median_or_none([s.generator_cycles_per_packet for s in mine])
                row["sut_cycles_per_packet"] = median_or_none([s.sut_cycles_per_packet for s in mine])
                row["sut_cpu_share"] = median_or_none([s.sut_cpu_share for s in mine])
                row["generator_cpu_share"] = median_or_none([s.generator_cpu_share for s in mine])
                medians[(system, size)] = row["mpps_median"]
                by_regime = [(s, sample_regime(s, split)) for s in mine if s.mpps is not None]
                regimes = [g for _, g in by_regime]
                row["regimes"] = {r: regimes.count(r) for r in ("near", "far", "mixed") if r in regimes}
                for r in ("near", "far"):
                    row[f"mpps_median_{r}"] = median_or_none([s.mpps for s, g in by_regime if g == r])
                    row[f"generator_cycles_per_packet_{r}"] = median_or_none(
                        [s.generator_cycles_per_packet for s, g in by_regime if g == r])
            rows.append(row)
    best = {(r["system"], r["size"]): r["mpps_max"] for r in rows if "mpps_max" in r}
    by_rep = {(s.system, s.size, s.rep): s.mpps for s in samples if s.mpps is not None}
    for row in rows:
        # Each path against the baseline of its topology on the same path.
        system, _, path = row["system"].partition("/")
        row["baseline"] = label(BASELINES[SYSTEM_CLASSES[system].topology], path or "split")
        base = medians.get((row["baseline"], row["size"]))
        mpps = row.get("mpps_median")
        row["ratio_to_baseline"] = (mpps / base) if (mpps is not None and base) else None
        # A slow spell of the host only ever slows a sample down, so each
        # system's best sample is its least disturbed one; and a spell spans
        # neighbouring samples, so the two systems' samples of one repetition
        # are compared with each other before taking the median.
        base_best = best.get((row["baseline"], row["size"]))
        row["ratio_best"] = row["mpps_max"] / base_best if ("mpps_max" in row and base_best) else None
        paired = [by_rep[(row["system"], row["size"], rep)] / by_rep[(row["baseline"], row["size"], rep)]
                  for rep in sorted({rep for (_, _, rep) in by_rep})
                  if (row["system"], row["size"], rep) in by_rep and (row["baseline"], row["size"], rep) in by_rep]
        row["ratio_paired_median"] = statistics.median(paired) if paired else None
        row["ratio_paired_min"] = min(paired) if paired else None
        # The two systems' samples taken in the same placement of the vCPUs.
        base_row = next((r for r in rows if r["system"] == row["baseline"] and r["size"] == row["size"]), {})
        for r in ("near", "far"):
            ours, theirs = row.get(f"mpps_median_{r}"), base_row.get(f"mpps_median_{r}")
            row[f"ratio_{r}"] = ours / theirs if (ours is not None and theirs) else None
    return rows


def sample_regime(sample: Sample, split: float | None) -> str | None:
    """near / far when both probes of the sample agree, mixed when the placement changed, None unprobed."""
    ends = {regime_of(sample.core_rtt_ns_before, split), regime_of(sample.core_rtt_ns_after, split)}
    if None in ends:
        return None
    return ends.pop() if len(ends) == 1 else "mixed"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(rows: list[dict]) -> str:
    headers = ["system", "frame B", "Mpps", "min-max Mpps", "Gbit/s*", "x baseline", "best", "paired",
               "near", "far", "samples n/f/m", "SUT cyc/pkt", "gen cyc/pkt", "SUT CPU", "gen CPU", "status"]
    cells = [headers]
    for r in rows:
        cells.append([r["system"], str(r["size"]), fmt(r.get("mpps_median")),
                      "-" if "mpps_min" not in r else f"{r['mpps_min']:.2f}-{r['mpps_max']:.2f}",
                      fmt(r.get("gbit_s_median")), fmt(r.get("ratio_to_baseline")), fmt(r.get("ratio_best")),
                      fmt(r.get("ratio_paired_median")), fmt(r.get("ratio_near")), fmt(r.get("ratio_far")),
                      "/".join(str(r.get("regimes", {}).get(g, 0)) for g in ("near", "far", "mixed")),
                      fmt(r.get("sut_cycles_per_packet"), 0), fmt(r.get("generator_cycles_per_packet"), 0),
                      fmt(r.get("sut_cpu_share")), fmt(r.get("generator_cpu_share")), r["status"]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if 0 < i < len(headers) - 1 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    noisy = [f"{r['system']} {r['size']} B ({r['mpps_max'] / r['mpps_min']:.1f}x)" for r in rows
             if r.get("mpps_min") and r["mpps_max"] / r["mpps_min"] > NOISY_SPREAD]
    if noisy:
        lines.append(f"! max/min over repetitions above {NOISY_SPREAD}x for: {', '.join(noisy)}. "
                     "The host was probably in a slow spell or busy: compare cycles/packet, "
                     "rerun on a quiet machine or with more --reps.")
    lines.append("  x baseline: median Mpps over the baseline's median, to "
                 + ", ".join(f"{b} for {t}" for t, b in BASELINES.items()) + " (same path); "
                 "best: best sample over the baseline's best; "
                 "paired: median over repetitions of the ratio of the two systems' samples of that repetition; "
                 "near, far: median Mpps over the baseline's median among the samples both of whose core-to-core "
                 "probes (before and after the window) found the vCPUs near (sharing a cache) or far; samples n/f/m: "
                 "how many were near, far, or mixed (the placement changed during the sample).")
    lines.append("  CPU: CPU time of the process over the window / window (1.00 = one core all the time; "
                 "a busy poller below that lost its core to other work on the host).")
    lines.append(f"* Gbit/s counts {WIRE_OVERHEAD_BYTES} bytes of preamble + inter-frame gap per frame; "
                 f"frame sizes include the {FCS_BYTES}-byte FCS (testpmd txpkts = size - {FCS_BYTES}).")
    return "\n".join(lines)


def plot(rows: list[dict], systems: list[str], sizes: list[int], path: Path, title: str) -> str | None:
    """Grouped bars of median Mpps per frame size per system; returns an error text instead of raising."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return ("matplotlib is not installed, so no plot was drawn: pip install matplotlib "
                "(a benchmark-only dependency)")
    by_key = {(r["system"], r["size"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(systems))
    colors = plt.get_cmap("tab10").colors
    # Legend entries are drawn by hand: an empty bar group has no colour of its own.
    legend = []
    for i, system in enumerate(systems):
        xs, heights, low, high, missing = [], [], [], [], []
        for j, size in enumerate(sizes):
            x = j + (i - (len(systems) - 1) / 2) * width
            r = by_key[(system, size)]
            if r.get("mpps_median") is None:
                missing.append(x)
                continue
            xs.append(x)
            heights.append(r["mpps_median"])
            low.append(r["mpps_median"] - r["mpps_min"])
            high.append(r["mpps_max"] - r["mpps_median"])
        # A system without a number keeps its slot, marked n/a, and a legend entry that says why.
        status = by_key[(system, sizes[0])]["status"].split(":")[0]
        label = system if xs else f"{system} ({status}, see the table)"
        color = colors[i % len(colors)] if xs else "lightgrey"
        legend.append(Patch(facecolor=color, hatch=None if xs else "//", label=label))
        bars = ax.bar(xs, heights, width, yerr=[low, high] if xs else None, capsize=3, color=color)
        # The value goes above the error bar's top so neither hides the other.
        for bar, value, above in zip(bars, heights, high):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value + above),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        for x in missing:
            ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_xticks(range(len(sizes)), [f"{s} B" for s in sizes])
    ax.set_xlabel("frame size (including FCS)")
    ax.set_ylabel("Mpps (median; bars: min-max)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    # Outside the axes, so it never covers a bar or its label.
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0],
                                epilog="Run from the repository root, as root, with hugepages "
                                       "(echo 1024 > /proc/sys/vm/nr_hugepages).")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated systems to measure (default all: {','.join(SYSTEMS)})")
    p.add_argument("--sizes", default=None,
                   help="comma-separated frame sizes in bytes, FCS included (default 64,512,1518)")
    p.add_argument("--paths", default="split",
                   help="comma-separated virtqueue paths of the generator's virtio-user ports: "
                        f"{', '.join(PATHS)}; every system is measured on each (default split)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window (default 2)")
    p.add_argument("--window", type=float, default=5.0, help="measurement window in seconds (default 5)")
    p.add_argument("--gen-core", type=int, default=0, help="generator forwarding core (default 0)")
    p.add_argument("--sut-core", type=int, default=1, help="system-under-test PMD core (default 1)")
    p.add_argument("--tx-first", type=int, default=TX_FIRST_BURSTS,
                   help=f"bursts per port that seed the loop (default {TX_FIRST_BURSTS})")
    p.add_argument("--generator-args", default="", metavar="ARGS",
                   help="extra testpmd options for the generator, one string, the same for every system, "
                        f"after the benchmark's own (so --mbcache=250 overrides its --mbcache={GEN_MBCACHE}); "
                        "stored in the JSON")
    p.add_argument("--json-out", default="results/bench.json", help="JSON results (default results/bench.json)")
    p.add_argument("--plot-out", default="results/bench.png", help="PNG plot (default results/bench.png)")
    p.add_argument("--install", action="store_true",
                   help=f"apt-get install {OVS_PACKAGE} if it is missing (otherwise OVS-DPDK is "
                        "reported as unavailable)")
    p.add_argument("--keep-logs", action="store_true", help="keep every measurement's logs and print where")
    p.add_argument("--profile", action="store_true",
                   help="sample each system under test and the generator with perf (Debian package "
                        "linux-perf) over the window; the hottest functions are printed (with their share "
                        "of the loop's cycles per frame) and stored in the JSON; a stripped DPDK library's "
                        "addresses are added up by function and named from its static archive")
    p.add_argument("--ovs-underlay", choices=OVS_UNDERLAYS, default=OVS_UNDERLAYS[0],
                   help="ovs-dpdk-vxlan: how each OVS attaches to its veth end: afxdp (OVS's own AF_XDP "
                        "netdev, the default), af_xdp (DPDK net_af_xdp), system (OVS's own AF_PACKET "
                        "socket) or af_packet (DPDK net_af_packet: at most 1518-byte frames on the "
                        "underlay in DPDK 22.11, so it fails here)")
    p.add_argument("--ovs-pmd-maxsleep", type=int, default=0, metavar="US",
                   help="ovs-dpdk-vxlan: OVS's other_config:pmd-maxsleep in microseconds (default 0: "
                        "OVS's default, its PMDs never sleep)")
    p.add_argument("--vswitchd-pmd-yield", action="store_true",
                   help="vswitchd systems: pmd.yield true (a PMD yields its CPU after a pass that moved under "
                        "half a burst; off by default, like OVS's pmd-maxsleep)")
    p.add_argument("--vswitchd-vxlan-underlay", choices=("socket", "af-xdp"), default="socket",
                   help="vswitchd-vxlan: the vxlan ports' underlay: socket (the kernel's UDP/IP stack, the "
                        "default) or af-xdp (an XDP socket on each host's veth end)")
    p.add_argument("--regime", choices=("any", "near", "far"), default="any",
                   help="keep only samples run in this placement of the two vCPUs (both core-to-core probes "
                        "on its side of --regime-split-ns), measuring a sample again otherwise (default any)")
    p.add_argument("--regime-tries", type=int, default=6,
                   help="--regime: tries per sample; the last is kept whatever its regime (default 6)")
    p.add_argument("--regime-split-ns", type=float, default=DEFAULT_REGIME_SPLIT_NS,
                   help="core-to-core round trip (ns) above which a placement is far (default "
                        f"{DEFAULT_REGIME_SPLIT_NS:g}: this host's near placements take 95-135 ns, far 430-910; "
                        "python -m tools.core_rtt --busy shows yours)")
    p.add_argument("--smoke", action="store_true",
                   help="short run for the test suite: 64-byte frames (unless --sizes says otherwise), "
                        "1 rep, 1 s warm-up, 1 s window")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.reps, args.warmup, args.window = args.sizes or "64", 1, 1.0, 1.0
    args.sizes = args.sizes or ",".join(map(str, DEFAULT_SIZES))
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        p.error(f"unknown system(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    if not args.paths or any(path not in PATHS for path in args.paths):
        p.error(f"--paths: choose from {', '.join(PATHS)}; got {','.join(args.paths) or '(none)'}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    # testpmd's txonly frame needs Ethernet + IPv4 + UDP headers (42 bytes) and fits one 2 KB mbuf.
    if not args.sizes or any(not 64 <= s <= 1518 for s in args.sizes):
        p.error("--sizes must be between 64 and 1518 bytes")
    ncpu = os.cpu_count() or 1
    if args.gen_core == args.sut_core or not (0 <= args.gen_core < ncpu and 0 <= args.sut_core < ncpu):
        p.error(f"--gen-core and --sut-core must be two different CPUs below {ncpu}")
    if args.reps < 1 or args.warmup < 0 or args.window <= 0:
        p.error("--reps must be >= 1, --warmup >= 0 and --window > 0")
    try:
        args.generator_args = shlex.split(args.generator_args)
    except ValueError as exc:
        p.error(f"--generator-args: {exc}")
    if args.regime_tries < 1 or args.regime_split_ns <= 0:
        p.error("--regime-tries must be >= 1 and --regime-split-ns > 0")
    return args


def machine_info(args) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "generator_core": args.gen_core,
        "sut_core": args.sut_core,
        "hugepages_free_at_start": hugepages_free(),
        # Other work on the host skews every figure; the load average tells a reader it was there.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "dpdk": package_version("dpdk"),
    }


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if "--latency" in (sys.argv[1:] if argv is None else argv):
        # The latency mode is a tool of its own (tools/latency.py), with its own options.
        from tools import latency
        return latency.main([a for a in (sys.argv[1:] if argv is None else argv) if a != "--latency"])
    given = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in ("--macs", "--ports") for a in given):
        # The scale modes are a tool of their own too (tools/scale.py): the PMD over generator null ports.
        from tools import scale
        return scale.main(given)
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("bench: must run as root (hugepages, vhost-user sockets, network namespace for OVS)")
        return 2
    for tool in (TESTPMD, "stdbuf", "taskset"):
        if shutil.which(tool) is None:
            log(f"bench: {tool} not found; the generator needs it (apt-get install dpdk-dev coreutils "
                "util-linux, or tools/setup-test-env.sh)")
            return 2
    if hugepages_free() < 256:
        log(f"bench: only {hugepages_free()} free hugepages; echo 1024 > /proc/sys/vm/nr_hugepages")
        return 2

    # SIGTERM (a test's timeout, a CI runner) unwinds like Ctrl-C, so every
    # measurement's finally block still stops its processes by PID.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    unavailable: dict[str, str] = {}
    versions: dict[str, str | None] = {}
    for name in args.systems:
        try:
            SYSTEM_CLASSES[name].check(args.install)
            versions[name] = SYSTEM_CLASSES[name].version()
        except Unavailable as exc:
            unavailable[name] = str(exc)
            log(f"bench: {name} is unavailable: {exc}")
    runnable = [s for s in args.systems if s not in unavailable]

    machine = machine_info(args)
    scratch = Path(tempfile.mkdtemp(prefix="vsb-"))
    samples: list[Sample] = []
    discarded: list[Sample] = []   # --regime: samples measured again because they ran in the other regime
    started = datetime.datetime.now().astimezone()
    try:
        for rep in range(args.reps):
            # Rotate the order each repetition so no system always runs first
            # (or always right after a particular other one).
            runs = [(name, path) for path in args.paths for name in runnable]
            order = runs[rep % len(runs):] + runs[:rep % len(runs)] if runs else []
            for size in args.sizes:
                for name, path in order:
                    log(f"bench: rep {rep + 1}/{args.reps}, {size} B, {label(name, path)} ...")
                    sample = measure_in_regime(SYSTEM_CLASSES[name], size, rep, args, scratch, path, discarded)
                    samples.append(sample)
                    if sample.mpps is not None:
                        log(f"bench:   {sample.mpps:.2f} Mpps (SUT {fmt(sample.sut_cycles_per_packet, 0)}, "
                            f"generator {fmt(sample.generator_cycles_per_packet, 0)} cycles/packet; "
                            f"frames per burst: SUT {fmt(sample.sut_frames_per_burst, 1)}, "
                            f"generator {fmt(sample.generator_frames_per_poll, 1)}; "
                            f"generator TX dropped {sample.generator_tx_dropped})")
                    for who, profile, cycles in (("SUT", sample.profile, sample.sut_cycles_per_packet),
                                                 ("generator", sample.generator_profile,
                                                  sample.generator_cycles_per_packet)):
                        if profile:
                            log(f"bench:   {who} profile (share of samples, cycles per frame):")
                        for percent, symbol in profile or []:
                            log(f"bench:     {percent:5.1f}%  {fmt(cycles and percent / 100 * cycles, 0):>5}  {symbol}")
    except KeyboardInterrupt:
        log("bench: interrupted; reporting the samples taken so far")
    finally:
        if not args.keep_logs:
            shutil.rmtree(scratch, ignore_errors=True)
            if any(s.error for s in samples):
                log("bench: failed measurements' logs were removed; rerun with --keep-logs to keep them")
        else:
            log(f"bench: logs are in {scratch}")

    labels = [label(name, path) for path in args.paths for name in args.systems]
    rows = summarise(labels, args.sizes, samples, unavailable, args.regime_split_ns)
    print(render_table(rows))

    title = (f"{cpu_model()}, generator core {args.gen_core}, SUT core {args.sut_core}, "
             f"{args.reps} rep(s) x {args.window:g} s, {started:%Y-%m-%d}")
    plot_path = Path(args.plot_out)
    plot_error = plot(rows, labels, args.sizes, plot_path, title)
    if plot_error:
        log(f"bench: {plot_error}")
    else:
        print(f"plot: {plot_path}")

    result = {
        "tool": "tools/bench.py",
        "command": " ".join([Path(sys.executable).name, "-m", "tools.bench", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "method": {
            "summary": __doc__.split("Method\n------\n", 1)[1].split("\nEvery process")[0].strip(),
            "generator": "dpdk-testpmd, 2 x net_virtio_user (vhost-vhost, vxlan) or net_virtio_user + "
                         "net_af_xdp on a veth (vhost-veth), --forward-mode=mac with --eth-peer, "
                         f"interactive 'start tx_first {args.tx_first}'",
            "generator_args": [*GEN_TUNING_ARGS, *args.generator_args],
            "frame_size": f"Ethernet frame incl. {FCS_BYTES}-byte FCS; testpmd 'set txpkts <size - {FCS_BYTES}>'",
            "gbit_s": f"Mpps x (frame size + {WIRE_OVERHEAD_BYTES} bytes preamble/SFD/IFG) x 8",
            "mpps": "sum over both generator ports of RX-packets delta / window",
            "ratio": "median Mpps / median Mpps of the row's baseline (DPDK testpmd on the same "
                     f"topology: {BASELINES}) at the same frame size",
            "cpu_share": "process CPU time (utime+stime, /proc/PID/stat) over the window / window length",
            "regimes": "core_rtt_ns_before/after: the generator core <-> SUT core cache-line round trip just "
                       "before and after the window (tools/core_rtt.py); a probe above regime_split_ns is far, "
                       "else near; ratio_near/ratio_far: median Mpps of the samples both of whose probes fell in "
                       "that regime over the baseline's; with --regime, a sample in another regime was measured "
                       "again (discarded_samples), at most regime_tries times, the last one kept",
            "regime_split_ns": args.regime_split_ns,
            "regime": args.regime,
            "regime_tries": args.regime_tries,
            "warmup_seconds": args.warmup,
            "window_seconds": args.window,
            "repetitions": args.reps,
            "interleaved": True,
            "smoke": args.smoke,
            "ovs_underlay": args.ovs_underlay,
            "ovs_pmd_maxsleep_us": args.ovs_pmd_maxsleep,
            "vswitchd_pmd_yield": args.vswitchd_pmd_yield,
            "vswitchd_vxlan_underlay": args.vswitchd_vxlan_underlay,
        },
        "machine": machine,
        "versions": versions,
        "systems": args.systems,
        "paths": args.paths,
        "sizes": args.sizes,
        "unavailable": unavailable,
        "results": rows,
        "samples": [asdict(s) for s in samples],
        "discarded_samples": [asdict(s) for s in discarded],
        "plot": None if plot_error else str(plot_path),
        "plot_error": plot_error,
    }
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = Path(args.json_out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"json: {json_path}")

    complete = all(r.get("mpps_median") is not None for r in rows)
    return 0 if complete and plot_error is None else 1


if __name__ == "__main__":
    sys.exit(main())
