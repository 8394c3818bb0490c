"""Latency benchmark: the round-trip time of single frames through a switch, one frame in flight.

Run from the repository root, as root (also as `python -m tools.bench --latency ...`):

    python -m tools.latency                                  # every case and system, 10 and 500 frames/s
    python -m tools.latency --cases vhost --systems vswitchd,testpmd-io --rates 10 --seconds 30
    python -m tools.latency --report run1.json run2.json      # one table of saved runs, side by side
    python -m tools.latency --replot run1.json run1.png       # the plot of a saved run again

Method
------
* `vhost` case (VM to VM): two vhost-user front-ends in this process
  (tests/support/frontend.py: the guest's side of vhost-user and split
  virtqueues in Python, as a DPDK virtio-user guest lays them out) on the
  two ports of the system under test.  Guest A sends one 64-byte frame
  (60 without FCS) addressed to guest B and kicks; B busy-polls its RX ring
  and sends the frame straight back, MACs swapped; A busy-polls its RX
  ring.  The round trip, A's send to A's receive, crosses the system twice.
  The transit is the same round trip without the harness's Python at
  either end: from each frame's publication in the sender's ring (after
  it was written, just before the kick) to the moment the receiver's ring
  shows it, the two legs added, as a TWAMP sender subtracts the
  reflector's turnaround.  About 200 us of every round trip is that
  Python, and its jitter, not the system's, is most of the round trip's
  spread; the transit leaves it out.
  The next frame leaves at the next tick of the rate: at 10 frames/s a
  system that sleeps when idle sleeps between frames and must wake on the
  guest's kick.  The harness (Python) adds its own fixed cost to every
  system alike; compare systems within one run.
  Systems: `vswitchd` (its PMD sleeps when idle, woken by kicks),
  `vswitchd-cpu-qos` (the same with `pmd: {cpu_resume_latency_us: 0}`:
  the PMD still sleeps, but its idle CPU polls instead of halting, so the
  wake-up leaves out the CPU's or the hypervisor's own; see
  vswitch/pmd/cpu_wake.py), `vswitchd-poll` (the same with
  `pmd: {sleep: false}`: always polling,
  the case a sleeping PMD is measured against), `testpmd-io` (DPDK's vhost
  PMD, always polling), `ovs-dpdk` (OVS-DPDK, always polling) and
  `ovs-dpdk-sleep` (OVS-DPDK with other_config:pmd-maxsleep, its PMD
  sleeps when idle).  Started as the throughput benchmark starts them
  (tools/bench.py), with the SUT's packet thread on --sut-core and this
  process on --gen-core.
* `tap` case (host to host stack): two network namespaces of the tool's
  own, each behind a port of the system, `ping -i 1/rate` from one to the
  other (iputils ping, per-reply times in microseconds).  Systems:
  `vswitchd` (two TAP ports, each created inside its namespace),
  `vswitchd-cpu-qos` and `vswitchd-poll` (the same, as above) and `linux-bridge` (a
  bridge in a namespace of its own, a veth pair to each).
* Load (--loads): `idle`, the switch carries nothing else; `busy`, a
  background flow between two more ports of the same switch runs
  meanwhile.  vhost: two more front-ends, C and D; between round trips
  (never during one: the harness is one thread) C sends bursts of
  LOAD_BURST 60-byte frames to D every LOAD_PERIOD_US, at most 32,000
  frames/s (the harness's Python may manage fewer: `load_frames` in the
  JSON counts what arrived), and D's ring is drained; the switch is therefore never idle
  for long when a round trip starts (a PMD that sleeps when idle stays
  awake), and frames of the flow may share its passes.  tap: two more
  namespaces, C and D, and `ping -i 0.0002 -s 1000` from C to D (frames
  of 1,042 bytes; ping may keep a faster pace than -i when replies come
  back quickly: `load_frames` counts them) for the whole measurement,
  pinned to --gen-core like the measuring ping.
* A frame with no answer within 1 s counts as lost.  Reported: p50, p99,
  p99.9 and max of the round-trip times in microseconds, per case, system
  and rate, and in the vhost case p10, p50 and p99 of the transit.  p99.9
  needs 1000 samples to mean anything: choose --seconds so that rate x
  seconds is at least that.

Every process is started by this tool and stopped by its PID, namespaces
are removed, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import bench  # noqa: E402

CASES = ("vhost", "tap")
VHOST_SYSTEMS = ("vswitchd", "vswitchd-cpu-qos", "vswitchd-poll", "testpmd-io", "ovs-dpdk", "ovs-dpdk-sleep")
TAP_SYSTEMS = ("vswitchd", "vswitchd-cpu-qos", "vswitchd-poll", "linux-bridge")
DEFAULT_RATES = (10, 500)
LOADS = ("idle", "busy")
# The vhost case's background flow: a burst this big this often (at most 32,000 frames/s).
LOAD_BURST = 8
LOAD_PERIOD_US = 250
MAC_C, MAC_D = "02:00:00:00:0a:03", "02:00:00:00:0a:04"
LOST_AFTER_S = 1.0
# OVS's idle PMD sleeps up to this long (other_config:pmd-maxsleep, microseconds).
OVS_MAX_SLEEP_US = 1000
MAC_A, MAC_B = "02:00:00:00:0a:01", "02:00:00:00:0a:02"
ETHERTYPE_EXPERIMENTAL = 0x88B5
FRAME_BYTES = 60
TAP_ADDRESSES = ("10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    case: str
    system: str
    rate: int
    load: str = "idle"
    sent: int = 0
    lost: int = 0
    load_frames: int | None = None     # frames of the background flow that arrived
    rtt_us: list = field(default_factory=list, repr=False)
    transit_us: list = field(default_factory=list, repr=False)   # vhost only: ping_pong
    error: str | None = None

    def summary(self) -> dict:
        out = {"case": self.case, "system": self.system, "rate": self.rate, "load": self.load, "sent": self.sent,
               "lost": self.lost, "load_frames": self.load_frames, "error": self.error}
        if self.rtt_us:
            ordered = sorted(self.rtt_us)
            out.update({f"p{name}_us": round(percentile(ordered, q), 1)
                        for name, q in (("10", 10), ("50", 50), ("99", 99), ("99_9", 99.9))})
            out["min_us"] = round(ordered[0], 1)
            out["max_us"] = round(ordered[-1], 1)
            out["mean_us"] = round(statistics.fmean(ordered), 1)
        if self.transit_us:
            ordered = sorted(self.transit_us)
            out.update({f"transit_p{name}_us": round(percentile(ordered, q), 1)
                        for name, q in (("10", 10), ("50", 50), ("99", 99))})
        return out


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


# --------------------------------------------------------------------------
# vhost case: two front-ends in this process, ping-pong through the system
# --------------------------------------------------------------------------

class OvsDpdkSleep(bench.OvsDpdk):
    """OVS-DPDK whose idle PMD sleeps (up to OVS_MAX_SLEEP_US), like vswitchd's."""

    name = "ovs-dpdk-sleep"

    def start(self) -> None:
        super().start()
        self.vsctl("set", "Open_vSwitch", ".", f"other_config:pmd-maxsleep={OVS_MAX_SLEEP_US}")


class VswitchdPoll(bench.Vswitchd):
    """vswitchd whose PMD never sleeps (pmd.sleep: false): the always-polling case."""

    name = "vswitchd-poll"

    def config(self) -> dict:
        config = super().config()
        config["pmd"]["sleep"] = False
        return config


class VswitchdCpuQos(bench.Vswitchd):
    """vswitchd whose PMD sleeps, its CPU kept to idle states it leaves at once
    (pmd.cpu_resume_latency_us: 0): the wake-up without the hardware's or hypervisor's part."""

    name = "vswitchd-cpu-qos"

    def config(self) -> dict:
        config = super().config()
        config["pmd"]["cpu_resume_latency_us"] = 0
        return config


VSWITCHD_CLASSES = {"vswitchd": bench.Vswitchd, "vswitchd-cpu-qos": VswitchdCpuQos, "vswitchd-poll": VswitchdPoll}
VHOST_SYSTEM_CLASSES = {**VSWITCHD_CLASSES, "testpmd-io": bench.TestPmdIo,
                        "ovs-dpdk": bench.OvsDpdk, "ovs-dpdk-sleep": OvsDpdkSleep}


def workdir_name(case: str, system: str, rate: int, load: str) -> str:
    """Short, because the vhost-user sockets live in it (a UNIX socket path
    has at most 107 bytes), and the scratch directory may be deep (pytest's)."""
    return f"{case[0]}{rate}{load[0]}-{system}"


def ethernet(dst: str, src: str, seq: int) -> bytes:
    header = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
    payload = seq.to_bytes(8, "little")
    return (header + ETHERTYPE_EXPERIMENTAL.to_bytes(2, "big") + payload).ljust(FRAME_BYTES, b"\0")


class Guest:
    """One front-end: busy-polled RX ring with buffers kept posted, TX with a kick per frame."""

    RX_BUFFERS = 64

    def __init__(self, path: Path, server: bool):
        from tests.support.frontend import VhostUserFrontend
        self.fe = VhostUserFrontend(path, timeout=30)
        self.server = server
        self.arrived_ns = 0          # when wait_frame last saw a frame in the RX ring
        if server:
            self.fe.listen()

    def connect(self) -> None:
        self.fe.accept() if self.server else self.fe.connect()
        self.fe.handshake()
        # A polling guest, like DPDK's: no interrupts wanted.
        from tests.support.virtio_driver import VIRTQ_AVAIL_F_NO_INTERRUPT
        for ring in self.fe.rings:
            ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
        self.fe.post_rx(0, self.RX_BUFFERS)
        self.rx = self.fe.rx_ring(0)
        self.tx = self.fe.tx_ring(0)

    def send(self, frame: bytes) -> int:
        """Sends frame and kicks; returns the moment it was made available
        (perf_counter ns), taken after the Python work of writing it."""
        self.tx.get_used()
        head = self.tx.post_tx(frame, publish=False)
        published_ns = time.perf_counter_ns()
        self.tx.publish_raw(head)
        self.fe.kick(self.tx.index)
        return published_ns

    def wait_frame(self, deadline_ns: int) -> bytes | None:
        """Busy-polls the RX ring until a frame arrives (its bytes) or the
        deadline passes (None); self.arrived_ns is when the ring showed it,
        before the Python work of reading it."""
        rx = self.rx
        while rx.used_idx == rx.last_used_idx:
            if time.perf_counter_ns() > deadline_ns:
                return None
        self.arrived_ns = time.perf_counter_ns()
        frames = rx.read_rx_frames()
        rx.post_rx(len(frames))
        self.fe.kick(rx.index)
        return frames[0].data if frames else None

    def close(self) -> None:
        self.fe.close()


class BackgroundFlow:
    """The vhost case's load: guest C sends bursts to guest D, D's ring is drained; run between round trips."""

    def __init__(self, c: Guest, d: Guest):
        self.c, self.d = c, d
        self.frame = ethernet(MAC_D, MAC_C, 0)
        self.period_ns = LOAD_PERIOD_US * 1000
        self.next_ns = 0
        self.sent = 0
        self.received = 0

    def step(self) -> None:
        """Sends the next burst if it is due, and drains D."""
        now = time.perf_counter_ns()
        if now >= self.next_ns:
            tx = self.c.tx
            tx.get_used()
            # A ring the switch has not emptied yet takes no more: the flow slows down, it never blocks.
            for _ in range(min(LOAD_BURST, tx.free_count() - 1)):
                tx.post_tx(self.frame)
                self.sent += 1
            self.c.fe.kick(tx.index)
            self.next_ns = now + self.period_ns
        rx = self.d.rx
        if rx.used_idx != rx.last_used_idx:
            frames = rx.read_rx_frames()
            self.received += len(frames)
            rx.post_rx(len(frames))
            self.d.fe.kick(rx.index)


def learn(x: Guest, y: Guest, mac_x: str, mac_y: str, what: str) -> None:
    """Until a frame from each reached the other: the switch has learned both MACs."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = time.perf_counter_ns()
        x.send(ethernet(mac_y, mac_x, 0))
        y.send(ethernet(mac_x, mac_y, 0))
        if y.wait_frame(now + 50_000_000) is not None and x.wait_frame(now + 50_000_000) is not None:
            return
        time.sleep(0.05)
    raise RuntimeError(f"no frame came back through the system within 20 s ({what})")


def drain(guest: Guest) -> None:
    rx = guest.rx
    if rx.used_idx != rx.last_used_idx:
        rx.post_rx(len(rx.read_rx_frames()))
        guest.fe.kick(rx.index)


def measure_vhost(system_cls, rate: int, seconds: float, args, scratch: Path, load: str = "idle") -> Result:
    result = Result("vhost", system_cls.name, rate, load)
    workdir = scratch / workdir_name("vhost", system_cls.name, rate, load)
    workdir.mkdir()
    system = system_cls(workdir, args.gen_core, args.sut_core)
    if load == "busy":
        system.socket_paths += [workdir / "c.sock", workdir / "d.sock"]
    guests: list[Guest] = []
    try:
        guests = [Guest(path, system_cls.generator_is_server) for path in system.socket_paths]
        system.start()
        for guest in guests:
            guest.connect()
        a, b = guests[:2]
        # Every MAC learned (and the links up) before the clock starts.
        learn(a, b, MAC_A, MAC_B, "A and B")
        flow = None
        if load == "busy":
            c, d = guests[2:]
            learn(c, d, MAC_C, MAC_D, "C and D")
            flow = BackgroundFlow(c, d)
        time.sleep(0.05)
        for guest in guests:
            drain(guest)   # late answers of the learning rounds, frames flooded before every MAC was learned
        interval_ns = int(1e9 / rate)
        start = time.perf_counter_ns()
        for seq in range(1, int(rate * seconds) + 1):
            wait_until(start + seq * interval_ns, flow)
            result.sent += 1
            times = ping_pong(a, b, seq)
            if times is None:
                result.lost += 1
            else:
                result.rtt_us.append(times[0] / 1000)
                result.transit_us.append(times[1] / 1000)
        if flow is not None:
            result.load_frames = flow.received
            if flow.received < flow.sent // 2:
                raise RuntimeError(f"the background flow did not get through: {flow.received} of {flow.sent}")
    except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the run
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"latency: vhost {system_cls.name} {rate}/s {load} failed: {result.error}")
    finally:
        for guest in guests:
            guest.close()
        system.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def ping_pong(a: Guest, b: Guest, seq: int) -> tuple[int, int] | None:
    """One frame A -> B -> A; returns the round trip and the transit (both
    in nanoseconds), or None if it was lost.  The transit is the time the
    two frames spent between being made available and showing in the
    receiver's ring: the round trip without the harness's Python at either
    end, as a TWAMP sender subtracts its reflector's turnaround."""
    t0 = time.perf_counter_ns()
    deadline = t0 + int(LOST_AFTER_S * 1e9)
    out_ns = a.send(ethernet(MAC_B, MAC_A, seq))
    got = b.wait_frame(deadline)
    if got is None:
        return None
    back_ns = b.send(ethernet(MAC_A, MAC_B, seq))
    back = a.wait_frame(deadline)
    t1 = time.perf_counter_ns()
    if back is None or int.from_bytes(back[14:22], "little") != seq:
        return None
    return t1 - t0, (b.arrived_ns - out_ns) + (a.arrived_ns - back_ns)


def wait_until(when_ns: int, flow: BackgroundFlow | None = None) -> None:
    """Sleeps until when_ns (perf_counter), spinning the last 200 us for a punctual start;
    with a background flow, runs it instead of sleeping."""
    if flow is not None:
        while time.perf_counter_ns() < when_ns:
            flow.step()
        return
    left = when_ns - time.perf_counter_ns()
    if left > 300_000:
        time.sleep((left - 200_000) / 1e9)
    while time.perf_counter_ns() < when_ns:
        pass


# --------------------------------------------------------------------------
# tap case: ping between two namespaces
# --------------------------------------------------------------------------

class Namespaces:
    """The tool's own network namespaces, removed together."""

    def __init__(self, tag: str):
        self.names: list[str] = []
        self.tag = tag

    def add(self, role: str) -> str:
        name = f"vsl-{os.getpid()}-{self.tag}-{role}"
        bench.run(["ip", "netns", "add", name])
        self.names.append(name)
        bench.run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def remove(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names = []


def configure_address(netns: str, ifname: str, address: str) -> None:
    bench.run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", ifname])
    bench.run(["ip", "-n", netns, "link", "set", ifname, "up"])


class TapVswitchd:
    name = "vswitchd"

    def __init__(self, workdir: Path, args, netns: list[str], system_name: str = "vswitchd"):
        self.sut = VSWITCHD_CLASSES[system_name](workdir, args.gen_core, args.sut_core)
        self.netns = netns
        self.sut.ports = lambda: [{"name": f"tap{i}", "type": "tap", "ifname": "eth0", "netns": ns}
                                  for i, ns in enumerate(netns)]
        self.sut.socket_paths = []

    def start(self) -> None:
        self.sut.start()
        for ns, address in zip(self.netns, TAP_ADDRESSES):
            configure_address(ns, "eth0", address)

    def stop(self) -> None:
        self.sut.stop()


class LinuxBridge:
    name = "linux-bridge"

    def __init__(self, workdir: Path, args, netns: list[str], namespaces: Namespaces):
        self.netns = netns
        self.namespaces = namespaces

    def start(self) -> None:
        hub = self.namespaces.add("br")
        bench.run(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])
        bench.run(["ip", "-n", hub, "link", "set", "br0", "up"])
        for i, (ns, address) in enumerate(zip(self.netns, TAP_ADDRESSES)):
            bench.run(["ip", "-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                       "netns", ns])
            bench.run(["ip", "-n", hub, "link", "set", f"p{i}", "master", "br0", "up"])
            configure_address(ns, "eth0", address)

    def stop(self) -> None:
        pass   # the namespaces go, and the bridge and veths with them


PING_TIME = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


def measure_tap(system_name: str, rate: int, seconds: float, args, scratch: Path, load: str = "idle") -> Result:
    result = Result("tap", system_name, rate, load)
    workdir = scratch / workdir_name("tap", system_name, rate, load)
    workdir.mkdir()
    namespaces = Namespaces(f"{len(list(scratch.iterdir()))}")
    system = None
    background = None
    try:
        pair = [namespaces.add(role) for role in ("abcd" if load == "busy" else "ab")]
        if system_name == "linux-bridge":
            system = LinuxBridge(workdir, args, pair, namespaces)
        else:
            system = TapVswitchd(workdir, args, pair, system_name)
        system.start()

        def pinger(ns: str) -> list[str]:
            return ["ip", "netns", "exec", ns, "taskset", "-c", str(args.gen_core), "ping", "-n"]

        ping = pinger(pair[0])
        # Until the first reply: addresses resolved, MACs learned.
        for ns, target in ((pair[0], TAP_ADDRESSES[1]), *(((pair[2], TAP_ADDRESSES[3]),) if load == "busy" else ())):
            deadline = time.monotonic() + 20
            while subprocess.run([*pinger(ns), "-c", "1", "-W", "1", target], capture_output=True).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ping reply through the system within 20 s ({ns} to {target})")
        if load == "busy":
            background = subprocess.Popen([*pinger(pair[2]), "-q", "-i", "0.0002", "-s", "1000", TAP_ADDRESSES[3]],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True)
            time.sleep(0.2)
        count = int(rate * seconds)
        done = subprocess.run([*ping, "-c", str(count), "-i", f"{1 / rate:.4f}", "-W", str(int(LOST_AFTER_S)),
                               TAP_ADDRESSES[1]], capture_output=True, text=True, timeout=seconds * 2 + 30)
        times = [float(t) * 1000 for _, t in PING_TIME.findall(done.stdout)]
        result.sent, result.rtt_us = count, times
        result.lost = count - len(times)
        if background is not None:
            background.send_signal(signal.SIGINT)   # ping prints its summary on SIGINT
            summary = background.communicate(timeout=10)[0]
            received = re.search(r"(\d+) received", summary)
            result.load_frames = 2 * int(received.group(1)) if received else 0
            if not result.load_frames:
                raise RuntimeError(f"the background ping got no reply: {summary.strip()[-200:]}")
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"latency: tap {system_name} {rate}/s {load} failed: {result.error}")
    finally:
        if background is not None:
            bench.stop_process(background, "background ping")
        if system is not None:
            system.stop()
        namespaces.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def render(rows: list[dict]) -> str:
    headers = ["case", "system", "frames/s", "load", "sent", "lost", "p50 us", "p99 us", "p99.9 us", "max us",
               "transit p50", "transit p99", "status"]
    cells = [headers]
    for r in rows:
        cells.append([r["case"], r["system"], str(r["rate"]), r["load"], str(r["sent"]), str(r["lost"]),
                      *(bench.fmt(r.get(k), 1) for k in ("p50_us", "p99_us", "p99_9_us", "max_us",
                                                         "transit_p50_us", "transit_p99_us")),
                      r["error"] or "ok"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The results as a README table: one row per case, system and load, a column group per rate."""
    rates = sorted({r["rate"] for r in rows})
    keys = sorted({(r["case"], r["system"], r["load"]) for r in rows},
                  key=lambda k: (CASES.index(k[0]), LOADS.index(k[2]),
                                 (VHOST_SYSTEMS if k[0] == "vhost" else TAP_SYSTEMS).index(k[1])))
    by = {(r["case"], r["system"], r["load"], r["rate"]): r for r in rows}
    head = ["case", "load", "system"] + [f"{rate}/s p50 / p99 / p99.9" for rate in rates]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, system, load in keys:
        cells = [case, load, system]
        for rate in rates:
            r = by.get((case, system, load, rate))
            if r is None or r.get("p50_us") is None:
                cells.append((r or {}).get("error") or "")
            else:
                lost = f" ({r['lost']} lost)" if r["lost"] else ""
                transit = f", transit {r['transit_p50_us']:.0f}" if r.get("transit_p50_us") is not None else ""
                cells.append(f"{r['p50_us']:.0f} / {r['p99_us']:.0f} / {r['p99_9_us']:.0f}{transit}{lost}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(paths: list[str]) -> str:
    """One README table from several saved runs (--report): a row per case, load, system and run.

    p10 is computed from the samples: on a busy host, other work only adds
    delay, and the low percentiles are the closest to a system's own cost."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = {}
    for n, run in enumerate(runs):
        for r in run["samples_us"]:
            rows.setdefault((r["case"], r["load"], r["system"]), {}).setdefault(n, {})[r["rate"]] = sorted(r["rtt_us"])
    rates = sorted({rate for runs_ in rows.values() for by_rate in runs_.values() for rate in by_rate})
    keys = sorted(rows, key=lambda k: (CASES.index(k[0]), LOADS.index(k[1]),
                                       (VHOST_SYSTEMS if k[0] == "vhost" else TAP_SYSTEMS).index(k[2])))
    head = ["case", "load", "system", "run"]
    for rate in rates:
        head += [f"{rate}/s p10", "p50", "p99", "p99.9"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        for n in sorted(rows[k]):
            cells = [*k, str(n + 1)]
            for rate in rates:
                x = rows[k][n].get(rate)
                cells += ([f"{percentile(x, q):.0f}" for q in (10, 50, 99, 99.9)] if x else ["-"] * 4)
            lines.append("| " + " | ".join(cells) + " |")
    dates = ", ".join(f"run {n + 1}: {run['date']}, load average {run['machine'].get('load_average_at_start')}"
                      f" at start, {run['machine'].get('load_average_at_end', '?')} at end" for n, run in enumerate(runs))
    return dates + "\n\n" + "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    """p50 bars with p99 whiskers, a panel per case and load; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(r["case"], r["load"]) for r in rows}, key=lambda k: (CASES.index(k[0]), LOADS.index(k[1])))
    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (case, load) in zip(axes[0], panels):
        systems = [s for s in (VHOST_SYSTEMS if case == "vhost" else TAP_SYSTEMS)
                   if any(r["system"] == s and r["case"] == case for r in rows)]
        width = 0.8 / max(1, len(rates))
        for i, rate in enumerate(rates):
            got = [next((r for r in rows if (r["case"], r["system"], r["load"], r["rate"]) == (case, s, load, rate)
                         and r.get("p50_us") is not None), None) for s in systems]
            p50 = [g["p50_us"] if g else 0 for g in got]
            p99 = [g["p99_us"] - g["p50_us"] if g else 0 for g in got]
            ax.bar([x + i * width for x in range(len(systems))], p50, width, yerr=[[0] * len(p99), p99],
                   capsize=3, label=f"{rate} frames/s")
        ax.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(len(systems))])
        ax.set_xticklabels(systems, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{case}, {load}")
        ax.set_yscale("log")   # a busy host puts milliseconds in the tails
        ax.set_ylabel("round trip, us (bar p50, whisker p99)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m tools.latency", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated cases (default {','.join(CASES)})")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated systems (default all: vhost {','.join(VHOST_SYSTEMS)}; "
                        f"tap {','.join(TAP_SYSTEMS)}); a system a case does not have is skipped there")
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)),
                   help="comma-separated frames per second (default 10,500)")
    p.add_argument("--loads", default=",".join(LOADS),
                   help="comma-separated: idle (nothing else through the switch), busy (a background flow "
                        "between two more ports; see Method) (default idle,busy)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement (default 20)")
    p.add_argument("--plot", default=None, help="also plot p50/p99 to this PNG (needs matplotlib)")
    p.add_argument("--gen-core", type=int, default=0, help="core of this process and the pinger (default 0)")
    p.add_argument("--sut-core", type=int, default=1, help="the system's packet thread core (default 1)")
    p.add_argument("--json-out", default="results/latency.json", help="JSON results (default results/latency.json)")
    p.add_argument("--smoke", action="store_true", help="short run for the test suite: 2 s per measurement")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds = 2.0
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or any(c not in CASES for c in args.cases):
        p.error(f"--cases: choose from {', '.join(CASES)}")
    args.loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if not args.loads or any(x not in LOADS for x in args.loads):
        p.error(f"--loads: choose from {', '.join(LOADS)}")
    known = set(VHOST_SYSTEMS) | set(TAP_SYSTEMS)
    args.systems = [s.strip() for s in args.systems.split(",")] if args.systems else sorted(known)
    if any(s not in known for s in args.systems):
        p.error(f"--systems: choose from {', '.join(sorted(known))}")
    try:
        args.rates = [int(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates must be comma-separated integers, got {args.rates!r}")
    if not args.rates or any(not 1 <= r <= 5000 for r in args.rates):
        p.error("--rates must be between 1 and 5000 frames per second")
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv_list = sys.argv[1:] if argv is None else argv
    if argv_list[:1] == ["--report"]:
        # No measurement: a table of runs saved before (their JSON files).
        print(report(argv_list[1:]))
        return 0
    if argv_list[:1] == ["--replot"] and len(argv_list) == 3:
        # No measurement: the plot of a run saved before (JSON in, PNG out).
        run = json.loads(Path(argv_list[1]).read_text())
        made = plot(run["results"], Path(argv_list[2]), f"{run['command']}  ({run['date']})")
        print(f"plot: {made}" if made else "plot: matplotlib not installed, none made")
        return 0 if made else 1
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("latency: must run as root (hugepages, namespaces, vhost-user sockets)")
        return 2
    signal.signal(signal.SIGTERM, bench._raise_keyboard_interrupt)
    os.sched_setaffinity(0, {args.gen_core})
    plan = []
    for case in args.cases:
        names = VHOST_SYSTEMS if case == "vhost" else TAP_SYSTEMS
        plan += [(case, s) for s in names if s in args.systems]
    unavailable = {}
    for case, name in plan:
        if case == "vhost":
            try:
                VHOST_SYSTEM_CLASSES[name].check(False)
            except bench.Unavailable as exc:
                unavailable[f"{case}/{name}"] = str(exc)
    scratch = Path(tempfile.mkdtemp(prefix="vsl-"))
    results: list[Result] = []
    started = datetime.datetime.now().astimezone()
    machine = bench.machine_info(argparse.Namespace(gen_core=args.gen_core, sut_core=args.sut_core))
    try:
        for rate in args.rates:
            for load in args.loads:
                for case, name in plan:
                    if f"{case}/{name}" in unavailable:
                        results.append(Result(case, name, rate, load,
                                              error=f"unavailable: {unavailable[f'{case}/{name}']}"))
                        continue
                    log(f"latency: {case} {name} at {rate} frames/s, {load}, for {args.seconds:g} s ...")
                    if case == "vhost":
                        result = measure_vhost(VHOST_SYSTEM_CLASSES[name], rate, args.seconds, args, scratch, load)
                    else:
                        result = measure_tap(name, rate, args.seconds, args, scratch, load)
                    results.append(result)
    except KeyboardInterrupt:
        log("latency: interrupted; reporting what was measured")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [r.summary() for r in results]
    print(render(rows))
    out = {
        "tool": "tools/latency.py",
        "command": " ".join(["python3", "-m", "tools.latency", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "method": __doc__.split("Method\n------\n", 1)[1].split("\nEvery process")[0].strip(),
        "machine": machine,
        "results": rows,
        "samples_us": [{"case": r.case, "system": r.system, "rate": r.rate, "load": r.load, "rtt_us": r.rtt_us,
                        "transit_us": r.transit_us} for r in results],
    }
    path = Path(args.json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # Compact: every sample is kept (to 0.1 us), thousands of them a point.
    for samples in out["samples_us"]:
        samples["rtt_us"] = [round(x, 1) for x in samples["rtt_us"]]
        samples["transit_us"] = [round(x, 1) for x in samples["transit_us"]]
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"json: {path}")
    print(markdown(rows))
    if args.plot:
        made = plot(rows, Path(args.plot), f"{out['command']}  ({out['date']})")
        print(f"plot: {made}" if made else "plot: matplotlib not installed, none made")
    return 0 if all(r.error is None and r.rtt_us for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
