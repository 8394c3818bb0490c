"""Port types as plug-ins: the PMD reaches every port through its type's
operations table (ports/port.h) and knows no type by name.

The null port (ports/null.c) and a port type made up in the test itself,
with cffi callbacks for its operations, are driven by the PMD loop in the
test's thread (vs_pmd_poll_once), or by a PMD thread where sleeping is the
point.  cffi callbacks take the GIL, which vs_pmd_poll_once releases, so
they are fine for a test, if far too slow for traffic.
"""

from __future__ import annotations

import errno
import pathlib
import re
import time

import pytest

from tests.support.frames import BROADCAST, frame, mac
from tests.support.null_pmd import DEADLINE, NullPort, Pmd, null_stats
from tests.unit.test_ring_engine import Guest
from vswitch.native import ffi, lib
from vswitch.ports import policing

PMD_C = pathlib.Path(__file__).resolve().parents[2] / "vswitch" / "pmd" / "pmd.c"


# --- The null port through the PMD ------------------------------------------------

def test_pmd_forwards_between_a_vhost_port_and_a_null_port(closing):
    guest, null = Guest(0), NullPort(1)
    closing(guest)
    closing(null)
    pmd = Pmd([guest.port, null.port], [(guest.port, 0), (null.port, 0)])
    closing(pmd)
    guest.rx[0].post_rx(8)

    hello = frame(BROADCAST, mac(9), b"from the null port")
    assert null.inject(hello) == 0
    assert pmd.poll() == 1
    assert [f.data for f in guest.rx[0].read_rx_frames()] == [hello]
    q = null.np.queues[0]
    assert (q.head, q.tail) == (1, 1), "rx_done gave the slot back"
    assert null_stats(null)["rx_packets"] == 1

    # mac(9) is now learned on the null port: unicast goes there alone.
    to_null = frame(mac(9), mac(1), b"x" * 100)
    head = guest.tx[0].post_tx(to_null)
    assert pmd.poll() == 1
    assert guest.tx[0].get_used() == [(head, 0)]
    assert null_stats(null) == {"rx_packets": 1, "rx_bytes": len(hello), "rx_dropped": 0,
                                "tx_packets": 1, "tx_bytes": len(to_null)}
    assert pmd.pmd.stats.unicast == 1 and pmd.pmd.stats.flooded == 1

    # Down: unicast frames for it are counted on the port, not sent.
    null.port.link_up = 0
    guest.tx[0].post_tx(to_null)
    pmd.poll()
    assert null_stats(null)["tx_packets"] == 1 and null.port.stats.tx_dropped_down == 1


def test_a_move_inside_one_burst_redirects_the_rest_of_that_burst(closing):
    """The PMD remembers the last destination it looked up for the rest of a
    burst; a frame that moves that MAC must make it look again."""
    a, b, c = NullPort(0), NullPort(1), NullPort(2)
    for p in (a, b, c):
        closing(p)
    pmd = Pmd([a.port, b.port, c.port], [(a.port, 0), (b.port, 0), (c.port, 0)])
    closing(pmd)
    assert a.inject(frame(BROADCAST, mac(1))) == 0     # mac(1) behind a
    assert b.inject(frame(BROADCAST, mac(2))) == 0     # mac(2) behind b
    assert pmd.poll() == 2
    before = {p.port.port_no: null_stats(p)["tx_packets"] for p in (a, b, c)}

    # One burst from c: to mac(1), then mac(1) itself broadcasts from c, then to mac(1) again.
    for f in (frame(mac(1), mac(3)), frame(BROADCAST, mac(1)), frame(mac(1), mac(3))):
        assert c.inject(f) == 0
    assert pmd.poll() == 3
    sent = {p.port.port_no: null_stats(p)["tx_packets"] - before[p.port.port_no] for p in (a, b, c)}
    # The third frame's destination now lives on its own input port: it goes nowhere.
    assert sent == {0: 2, 1: 1, 2: 0}
    assert pmd.fib.lookup(mac(1).hex(":")) == 2


def test_policing_passes_a_full_bucket_then_drops_and_counts(closing):
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    pmd = Pmd([a.port, b.port], [(a.port, 0)])
    closing(pmd)
    # 1 packet per second: nothing refills while the test runs, the bucket's 10 are all that pass.
    police = policing.to_c(policing.check({"pps": 1, "burst_packets": 10}))
    a.port.police = police
    for _ in range(40):
        assert a.inject(frame(BROADCAST, mac(1))) == 0
    assert pmd.poll(2) == 40
    assert null_stats(b)["tx_packets"] == 10
    assert a.port.stats.police_dropped == 30

    # Bytes: 1000 bytes of bucket take three 300-byte frames of the next burst, not a fourth.
    a.port.police = police = policing.to_c(policing.check({"bps": 8, "burst_bytes": 1000}))
    for _ in range(5):
        assert a.inject(frame(BROADCAST, mac(1), b"x" * (300 - 14))) == 0
    assert pmd.poll() == 5
    assert null_stats(b)["tx_packets"] == 13 and a.port.stats.police_dropped == 32

    # Without a policer everything passes again.
    a.port.police = ffi.NULL
    for _ in range(5):
        assert a.inject(frame(BROADCAST, mac(1))) == 0
    pmd.poll()
    assert null_stats(b)["tx_packets"] == 18 and a.port.stats.police_dropped == 32


def test_null_port_refuses_bad_frames_and_counts_a_full_queue(closing):
    null = NullPort(0, queues=2)
    closing(null)
    assert null.inject(b"short") == -errno.EINVAL
    assert null.inject(frame(BROADCAST, mac(1)), queue=2) == -errno.EINVAL
    assert null.inject(b"\0" * (lib.VS_NULL_FRAME_MAX + 1)) == -errno.EMSGSIZE
    for _ in range(lib.VS_NULL_SLOTS):
        assert null.inject(frame(BROADCAST, mac(1))) == 0
    assert null.inject(frame(BROADCAST, mac(1))) == -errno.ENOSPC
    assert null_stats(null, 0)["rx_dropped"] == 1
    assert null.inject(frame(BROADCAST, mac(1)), queue=1) == 0, "the other queue is not full"
    bad = ffi.new("struct vs_null_port *")
    assert lib.vs_null_port_init(bad, 0) == -errno.EINVAL
    assert lib.vs_null_port_init(bad, lib.VS_NULL_MAX_QUEUES + 1) == -errno.EINVAL
    lib.vs_null_port_fini(bad)


def test_an_idle_pmd_sleeps_on_the_null_ports_fd_and_an_injected_frame_wakes_it(closing):
    """Every polled queue can wake the PMD, so it sleeps for as long as it
    may (here far longer than the test waits): only the port's fd, handed
    over by idle_arm, can bring the frame through in time."""
    guest, null = Guest(0), NullPort(1)
    closing(guest)
    closing(null)
    guest.rx[0].post_rx(8)
    pmd = Pmd([guest.port, null.port], [(null.port, 0)])
    pmd.pmd.max_notify_sleep_ms = 60_000
    closing(pmd)
    pmd.start()
    for round_ in range(3):
        pmd.wait_asleep()
        sent = frame(BROADCAST, mac(9), bytes([round_]) * 50)
        assert null.inject(sent) == 0
        deadline = time.monotonic() + DEADLINE / 2
        got = []
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
            got = guest.rx[0].read_rx_frames()
        assert [f.data for f in got] == [sent], f"round {round_}: the sleeping PMD did not wake for the frame"
    assert pmd.pmd.stats.kick_wakeups >= 3 and pmd.pmd.stats.sleeps >= 2


# --- A port type made up by the test ---------------------------------------------

class ScriptedPort:
    """A port type defined here, in Python: the PMD must drive it through its table alone."""

    def __init__(self, port_no: int, caps: int = 0):
        self.keep = []
        self.to_receive: list[bytes] = []
        self.sent: list[tuple[int, bytes, int]] = []     # (queue hint, frame, unicast of its burst)
        self.calls: list[str] = []
        self.caps = caps
        ops = ffi.new("struct vs_port_ops *")
        ops.name = self._keep(ffi.new("char[]", b"scripted"))
        ops.rx_burst = self._keep(ffi.callback("uint32_t(struct vs_port *, uint32_t, struct vs_pkt *, uint32_t)",
                                               self._rx_burst))
        ops.rx_done = self._keep(ffi.callback("void(struct vs_port *, uint32_t, struct vs_pkt *, uint32_t)",
                                              self._rx_done))
        ops.tx_burst = self._keep(ffi.callback("void(struct vs_port *, uint32_t, struct vs_pkt **, uint32_t, "
                                               "uint32_t)", self._tx_burst))
        ops.offload_caps = self._keep(ffi.callback("uint32_t(struct vs_port *)", self._offload_caps))
        self.ops = ops
        self.port = ffi.new("struct vs_port *")
        self.port.port_no = port_no
        self.port.ops = ops
        self.port.link_up = 1
        self.buffers = []

    def _keep(self, obj):
        self.keep.append(obj)
        return obj

    def _rx_burst(self, port, queue, pkts, max_):
        # An assertion would be lost in a callback: a wrong port shows in the call log.
        self.calls.append(f"rx_burst {queue}" if port == self.port else "rx_burst on another port")
        n = 0
        while self.to_receive and n < max_:
            data = self.to_receive.pop(0)
            buf = ffi.new("uint8_t[]", data)
            self.buffers.append(buf)
            pkt = pkts[n]
            pkt.len = len(data)
            pkt.nsegs = 1
            pkt.head = 0
            pkt.segs[0].addr = buf
            pkt.segs[0].len = len(data)
            n += 1
        return n

    def _rx_done(self, port, queue, pkts, n):
        self.calls.append(f"rx_done {queue} {n}")
        self.buffers.clear()

    def _tx_burst(self, port, queue_hint, pkts, n, unicast):
        self.calls.append(f"tx_burst {n}")
        for i in range(n):
            pkt = pkts[i]
            data = b"".join(ffi.buffer(pkt.segs[s].addr, pkt.segs[s].len)[:] for s in range(pkt.nsegs))
            self.sent.append((queue_hint, data, unicast))

    def _offload_caps(self, port):
        return self.caps


def test_a_port_type_made_up_by_the_test_is_driven_through_its_table_alone(closing):
    guest = Guest(0)
    closing(guest)
    custom = ScriptedPort(1)
    pmd = Pmd([guest.port, custom.port], [(guest.port, 0), (custom.port, 3)])
    closing(pmd)
    guest.rx[0].post_rx(8)

    assert pmd.poll() == 0
    assert custom.calls == ["rx_burst 3"], "nothing received: no rx_done"

    custom.calls.clear()
    first = frame(BROADCAST, mac(7), b"scripted")
    custom.to_receive.append(first)
    assert pmd.poll() == 1
    assert custom.calls == ["rx_burst 3", "rx_done 3 1"]
    assert [f.data for f in guest.rx[0].read_rx_frames()] == [first]

    custom.calls.clear()
    reply = frame(mac(7), mac(1), b"reply")
    guest.tx[0].post_tx(reply)
    assert pmd.poll() == 1
    # The guest's queue 0 is the hint; one frame, sent here by the MAC table.
    assert custom.sent == [(0, reply, 1)]
    assert custom.calls == ["tx_burst 1", "rx_burst 3"]

    custom.port.link_up = 0
    guest.tx[0].post_tx(reply)
    pmd.poll()
    assert len(custom.sent) == 1 and custom.port.stats.tx_dropped_down == 1


def test_pmd_c_names_no_port_type():
    """The loop itself reaches ports through their tables only.  The one
    ring-engine name left is the PMD thread's watch over its own
    notification writes (vs_call_watch), which belongs to the thread, not
    to a port."""
    code = re.sub(r"/\*.*?\*/", "", PMD_C.read_text(), flags=re.S)
    names = set(re.findall(r"\b\w*(?:vhost|vring|virtio|kport|tap|af_packet|afxdp|af_xdp|null_port|vxlan)\w*\b",
                           code, flags=re.I))
    assert names <= {"vs_vring_watch_calls"}, names
    assert not re.search(r"\bVS_PORT_\w+", code), "a port type constant"


@pytest.mark.parametrize("accessor,name", [("vs_vhost_port_ops", b"vhost-user"), ("vs_tap_port_ops", b"tap"),
                                           ("vs_af_packet_port_ops", b"af-packet"), ("vs_null_port_ops", b"null"),
                                           ("vs_vxlan_port_ops", b"vxlan")])
def test_every_port_type_has_a_table_that_can_receive_and_transmit(accessor, name):
    ops = getattr(lib, accessor)()
    assert ffi.string(ops.name) == name
    assert ops.rx_burst != ffi.NULL and ops.tx_burst != ffi.NULL and ops.idle_arm != ffi.NULL
