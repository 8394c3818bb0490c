"""Capture and mirroring in the fast path (pmd/capture.h, README "Capture and mirroring").

Null ports driven by vs_pmd_poll_once in the test's thread, as in
test_port_ops.py: frames are injected into one port, and what a capture ring
holds, what each port was sent and what it dropped are read back.
"""

from __future__ import annotations

import struct

import pytest

from tests.support.frames import BROADCAST, frame, mac
from tests.support.null_pmd import NullPort, Pmd, null_stats
from vswitch.capture import Capture, CaptureProblem, build_monitor, check_mirror, check_mirrors
from vswitch.native import ffi, lib
from vswitch.ports import vlan


def ports(closing, n: int) -> list[NullPort]:
    out = [NullPort(i) for i in range(n)]
    for p in out:
        closing(p)
    return out


def monitor(rx=(), tx=(), rx_mirrors=(), tx_mirrors=(), mirror_output=False):
    """A struct vs_monitor by hand (the switch builds them with capture.build_monitor)."""
    t = ffi.new("struct vs_monitor *")
    for i, c in enumerate(rx):
        t.rx_captures[i] = c.c
    for i, c in enumerate(tx):
        t.tx_captures[i] = c.c
    for i, p in enumerate(rx_mirrors):
        t.rx_mirrors[i] = p.port
    for i, p in enumerate(tx_mirrors):
        t.tx_mirrors[i] = p.port
    t.n_rx_captures, t.n_tx_captures = len(rx), len(tx)
    t.n_rx_mirrors, t.n_tx_mirrors = len(rx_mirrors), len(tx_mirrors)
    t.mirror_output = int(mirror_output)
    return t


def frames_of(cap: Capture) -> list[bytes]:
    return [data for _, _, data in cap.read()]


def test_rx_tx_and_both_captures_see_each_frame_once_in_order(closing):
    a, b = ports(closing, 2)
    rx_a, tx_b, both_a = Capture("a", "rx"), Capture("b", "tx"), Capture("a", "both")
    a.port.monitor = ta = monitor(rx=[rx_a, both_a], tx=[both_a])
    b.port.monitor = tb = monitor(tx=[tx_b])
    pmd = Pmd([a.port, b.port], [(a.port, 0), (b.port, 0)])
    closing(pmd)
    sent_by_a = [frame(BROADCAST, mac(1), bytes([i]) * 60) for i in range(5)]
    for f in sent_by_a:
        assert a.inject(f) == 0
    pmd.poll()
    reply = frame(mac(1), mac(2), b"reply" * 20)
    assert b.inject(reply) == 0
    pmd.poll()
    assert frames_of(rx_a) == sent_by_a
    assert frames_of(tx_b) == sent_by_a
    assert frames_of(both_a) == sent_by_a + [reply]
    assert null_stats(b)["tx_packets"] == 5 and null_stats(a)["tx_packets"] == 1
    assert (rx_a.captured, rx_a.dropped, both_a.captured) == (5, 0, 6)
    del ta, tb


def test_snaplen_keeps_the_first_bytes_and_the_wire_length(closing):
    a, b = ports(closing, 2)
    cap = Capture("a", "rx", snaplen=20)
    a.port.monitor = t = monitor(rx=[cap])
    pmd = Pmd([a.port, b.port], [(a.port, 0)])
    closing(pmd)
    f = frame(BROADCAST, mac(1), b"y" * 500)
    a.inject(f)
    short = frame(BROADCAST, mac(1), b"")[:14]
    a.inject(short)
    pmd.poll()
    got = cap.read()
    assert [(wire, data) for _, wire, data in got] == [(len(f), f[:20]), (14, short)]
    assert all(t_ns > 1.6e18 for t_ns, _, _ in got)   # wall-clock nanoseconds, as pcap wants
    del t


def test_a_full_ring_drops_and_counts_while_forwarding_goes_on(closing):
    a, b = ports(closing, 2)
    cap = Capture("a", "rx", slots=4)
    a.port.monitor = t = monitor(rx=[cap])
    pmd = Pmd([a.port, b.port], [(a.port, 0)])
    closing(pmd)
    for round_ in range(3):
        for i in range(10):
            assert a.inject(frame(BROADCAST, mac(1), bytes([round_, i]) * 30)) == 0
        pmd.poll()
    # Nobody read: the ring kept its first 4 frames, the rest were counted, every frame was forwarded.
    assert (cap.captured, cap.dropped) == (4, 26)
    assert null_stats(b)["tx_packets"] == 30
    assert len(cap.read()) == 4
    # Drained, the ring takes frames again.
    a.inject(frame(BROADCAST, mac(1)))
    pmd.poll()
    assert (cap.captured, cap.dropped, len(cap.read())) == (5, 26, 1)
    del t


def test_ring_records_cross_the_wrap_in_order():
    cap = Capture("a", "rx", snaplen=64, slots=4)
    buf = [ffi.new("uint8_t[]", bytes([i]) * (20 + i)) for i in range(11)]
    pkts = [ffi.new("struct vs_pkt *") for _ in buf]
    for p, b in zip(pkts, buf):
        p.len, p.nsegs = len(b), 1
        p.segs[0].addr, p.segs[0].len = b, len(b)
    seen = []
    for i in range(0, 11, 3):
        lib.vs_capture_frames(cap.c, ffi.new("struct vs_pkt *[]", pkts[i:i + 3]), len(pkts[i:i + 3]), 7)
        seen += frames_of(cap)
    assert seen == [bytes(b) for b in buf] and cap.dropped == 0


def test_mirror_copies_received_and_sent_frames_to_the_output_port(closing):
    a, b, out = ports(closing, 3)
    watch = Capture("out", "tx")
    a.port.monitor = ta = monitor(rx_mirrors=[out])          # select a, direction rx
    b.port.monitor = tb = monitor(tx_mirrors=[out])          # select b, direction tx
    out.port.monitor = to = monitor(tx=[watch], mirror_output=True)
    pmd = Pmd([a.port, b.port, out.port], [(a.port, 0), (b.port, 0), (out.port, 0)])
    # A mirror output port is left out of flooding (the switch does this in PmdThread.publish).
    pmd.table.n_live = 2
    closing(pmd)
    f1 = frame(BROADCAST, mac(1), b"one" * 20)
    a.inject(f1)
    pmd.poll()
    # Received on a (mirrored once), sent to b (mirrored once): two copies, the flood none.
    assert frames_of(watch) == [f1, f1]
    f2 = frame(mac(1), mac(2), b"two" * 20)
    b.inject(f2)
    pmd.poll()
    assert frames_of(watch) == []                     # b's received frames are not selected (tx only)
    assert null_stats(a)["tx_packets"] == 1 and null_stats(out)["tx_packets"] == 2


def test_frames_received_on_a_mirror_output_are_dropped_and_never_learned(closing):
    a, out = ports(closing, 2)
    out.port.monitor = t = monitor(mirror_output=True)
    pmd = Pmd([a.port, out.port], [(a.port, 0), (out.port, 0)])
    pmd.table.n_live = 1
    closing(pmd)
    for _ in range(3):
        out.inject(frame(BROADCAST, mac(7)))
    pmd.poll()
    assert out.port.stats.mirror_output_dropped == 3
    assert null_stats(a)["tx_packets"] == 0
    assert pmd.fib.entries() == []
    del t


def test_vlan_tagged_frames_are_captured_as_they_are_on_each_ports_wire(closing):
    access, trunk = ports(closing, 2)
    access.port.vlan = va = vlan.to_c(vlan.check({"mode": "access", "tag": 10}))
    trunk.port.vlan = vt = vlan.to_c(vlan.check({"mode": "trunk"}))
    rx_access, tx_trunk = Capture("access", "rx"), Capture("trunk", "tx")
    access.port.monitor = t1 = monitor(rx=[rx_access])
    trunk.port.monitor = t2 = monitor(tx=[tx_trunk])
    pmd = Pmd([access.port, trunk.port], [(access.port, 0)])
    pmd.table.n_vlan = 2
    closing(pmd)
    untagged = frame(BROADCAST, mac(1), b"v" * 50)
    access.inject(untagged)
    pmd.poll()
    assert frames_of(rx_access) == [untagged]
    tagged = untagged[:12] + struct.pack("!HH", 0x8100, 10) + untagged[12:]
    assert frames_of(tx_trunk) == [tagged]
    del va, vt, t1, t2


def test_a_port_without_a_monitor_costs_one_load_and_branch_per_burst():
    """The hooks read the monitor pointer once per received burst and once per
    transmitted group, and call out of line only when it is set."""
    import pathlib

    source = (pathlib.Path(__file__).resolve().parents[2] / "vswitch" / "pmd" / "pmd.c").read_text()
    assert source.count("__atomic_load_n(&in->monitor") == 1 and source.count("__atomic_load_n(&out->monitor") == 1
    assert source.count("unlikely(monitor != NULL)") == 2
    assert "__attribute__((noinline)) void monitor_group" in source
    assert "__attribute__((noinline)) bool monitor_received" in source


@pytest.mark.parametrize("spec, problem", [
    ({"name": "m1", "select": ["a"], "output": "ghost"}, "m (m1).output: no port named 'ghost'"),
    ({"name": "m1", "select": ["ghost"], "output": "b"}, "m (m1).select: no port named 'ghost'"),
    ({"name": "m1", "select": ["a", "b"], "output": "b"}, "port 'b' cannot be both selected and the output"),
    ({"name": "m1", "select": ["a", "a"], "output": "b"}, "port 'a' is listed twice"),
    ({"name": "m1", "select": [], "output": "b"}, "must be a list of port names"),
    ({"name": "m1", "select": ["a"], "output": "b", "select_direction": "up"}, "select_direction: 'up' must be"),
    ({"name": "1x", "select": ["a"], "output": "b"}, "is not a mirror name"),
    ({"name": "m1", "select": ["a"], "output": "b", "colour": 1}, "unknown key 'colour'"),
])
def test_bad_mirrors_are_one_line(spec, problem):
    with pytest.raises(CaptureProblem) as exc:
        check_mirror(spec, {"a", "b"}, "m")
    assert problem in str(exc.value) and "\n" not in str(exc.value)


def test_mirrors_must_not_mirror_an_output_port_nor_share_a_name():
    m1 = check_mirror({"name": "m1", "select": ["a"], "output": "b"}, None, "m")
    m2 = check_mirror({"name": "m2", "select": ["b"], "output": "c"}, None, "m")
    with pytest.raises(CaptureProblem, match="port 'b' is selected by mirror 'm2': an output port cannot"):
        check_mirrors([m1, m2], "mirrors")
    with pytest.raises(CaptureProblem, match="mirror 'm1' is defined twice"):
        check_mirrors([m1, dict(m1)], "mirrors")


@pytest.mark.parametrize("kwargs, problem", [
    ({"direction": "sideways"}, "direction 'sideways' must be one of rx, tx, both"),
    ({"snaplen": 0}, "snaplen 0 must be a whole number from 1 to 65535"),
])
def test_bad_capture_arguments(kwargs, problem):
    with pytest.raises(CaptureProblem, match=problem):
        Capture("a", **kwargs)


class _Port:
    def __init__(self, name):
        self.name, self.c = name, ffi.new("struct vs_port *")


def test_build_monitor_only_for_ports_that_need_them():
    ports = {n: _Port(n) for n in ("a", "b", "c", "d")}
    mirrors = [{"name": "m", "select": ["a", "b"], "output": "c", "select_direction": "tx"}]
    cap = Capture("a", "rx")
    ta, refs = build_monitor(ports["a"], [cap], mirrors, ports)
    assert (ta.n_rx_captures, ta.n_tx_captures, ta.n_rx_mirrors, ta.n_tx_mirrors) == (1, 0, 0, 1)
    assert ta.tx_mirrors[0] == ports["c"].c and ports["c"] in refs and cap in refs
    tc, _ = build_monitor(ports["c"], [cap], mirrors, ports)
    assert tc.mirror_output == 1 and tc.n_rx_mirrors == 0
    assert build_monitor(ports["d"], [cap], mirrors, ports) == (ffi.NULL, [])


def test_several_writers_and_a_reader_lose_nothing_uncounted():
    """Two threads write one ring at once (as two PMDs sending to one port do)
    while the test reads it: every frame is read whole exactly once or counted
    as dropped."""
    import threading

    cap = Capture("a", "both", snaplen=64, slots=64)
    per_writer, bursts = 4, 2000

    def writer(w: int) -> None:
        bufs = [ffi.new("uint8_t[60]", struct.pack("!BI", w, i) * 12) for i in range(per_writer)]
        pkts = [ffi.new("struct vs_pkt *") for _ in bufs]
        for p, b in zip(pkts, bufs):
            p.len, p.nsegs = len(b), 1
            p.segs[0].addr, p.segs[0].len = b, len(b)
        arr = ffi.new("struct vs_pkt *[]", pkts)
        for burst in range(bursts):
            for i, b in enumerate(bufs):
                b[0:5] = struct.pack("!BI", w, burst * per_writer + i)
            lib.vs_capture_frames(cap.c, arr, per_writer, burst)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        seen += cap.read()
    seen += cap.read()
    for t in threads:
        t.join()
    total = 2 * per_writer * bursts
    assert len(seen) + cap.dropped == total and cap.captured == len(seen)
    keys = [struct.unpack("!BI", data[:5]) for _, _, data in seen]
    assert len(set(keys)) == len(keys)
    assert {(len(data), wire) for _, wire, data in seen} == {(60, 60)}
    for w in range(2):
        mine = [n for ww, n in keys if ww == w]
        assert mine == sorted(mine)   # one writer's frames stay in its order
