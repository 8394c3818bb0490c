"""Call and kick eventfds a hostile front-end controls (issue 8, item 1).

The switch writes a guest's call eventfd to interrupt it and reads a kick
eventfd when the guest wakes an idle PMD.  The front-end shares those file
descriptions: it can pass something that is not an eventfd at all, clear
O_NONBLOCK, saturate a call counter so that the next write blocks, or drain a
kick between the PMD's poll and its read.  None of that may stall a PMD, and
so the other ports.

Frames go through real vswitchd processes with in-process front-ends; the
C-level cases run PMD threads in this process against mock guests
(test_ring_engine.Guest), where the ring lock and the fault bit can be seen.
A switch that hangs makes these tests fail at a deadline, never hang: every
wait is bounded, and each test releases the hostile fd before it cleans up.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from tests.support.frontend import RequestFailed, VhostUserFrontend
from tests.unit.test_ring_engine import F_MRG, F_V1, Guest
from tests.unit.test_vhost_protocol import frontends, loop_thread, make_harness, server  # noqa: F401 (fixtures)
from tests.support.virtio_driver import VIRTQ_AVAIL_F_NO_INTERRUPT
from vswitch.fib import MacTable
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Request, bits

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE     # the largest count; adding 1 to it blocks
FRAMES = 200
DEADLINE = 10.0                      # seconds: generous for a loaded machine


def saturate_and_block(fd: int) -> None:
    """What a front-end can do to a call eventfd it shares with the switch:
    fill the counter and clear O_NONBLOCK, so that the next write blocks."""
    os.set_blocking(fd, False)
    while True:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        try:
            os.eventfd_write(fd, EVENTFD_MAX)
            break
        except BlockingIOError:     # the switch wrote in between: drain again
            continue
    os.set_blocking(fd, True)


def release(fd: int) -> None:
    """Drains the counter, which unblocks a writer."""
    os.set_blocking(fd, False)
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def vhost_ports(tmp_path, n):
    return [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(n)]


def hostile_guest(d: Vswitchd, name: str) -> VhostUserFrontend:
    """A front-end without EVENT_IDX (so every burst notifies), with receive buffers posted."""
    path = next(p["path"] for p in d.config["ports"] if p["name"] == name)
    fe = VhostUserFrontend(path, disable_features=bits(protocol.VIRTIO_RING_F_EVENT_IDX)).connect()
    fe.handshake()
    fe.post_rx(0, 64)
    wait_for(lambda: d.port(name)["link"] == "up", what=f"{name} up")
    return fe


def two_pmd_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))[:2]


def port_stats(d: Vswitchd) -> dict:
    return {p["name"]: p["stats"] for p in d.ctl("show")["ports"]}


def timed_ctl(d: Vswitchd, *args: str) -> tuple[float, object]:
    start = time.monotonic()
    out = d.ctl(*args)
    return time.monotonic() - start, out


def vswitchd_fd_targets(d: Vswitchd) -> set[str]:
    fd_dir = f"/proc/{d.proc.pid}/fd"
    targets = set()
    for name in os.listdir(fd_dir):
        try:
            targets.add(os.readlink(f"{fd_dir}/{name}"))
        except OSError:
            pass
    return targets


# --- (a) only eventfds ------------------------------------------------------------------

@pytest.mark.parametrize("request_kind", [Request.SET_VRING_KICK, Request.SET_VRING_CALL], ids=["kick", "call"])
def test_a_pipe_as_kick_or_call_fd_is_refused_counted_and_disturbs_nothing(tmp_path, request_kind):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3)) as d:
        g0, g1 = d.connect_guests(["vm0", "vm1"], rx_buffers=128)
        fe = VhostUserFrontend(tmp_path / "vm2.sock").connect()
        read_end, write_end = os.pipe()
        try:
            fe.handshake(stop_before=Request.SET_VRING_KICK)
            pipe_name = os.readlink(f"/proc/self/fd/{write_end}")
            # With NEED_REPLY: a failure ack, and the connection stays.
            with pytest.raises(RequestFailed):
                fe.request(request_kind, protocol.pack_vring_fd(0), [write_end])
            fe.sync()
            vhost = d.port("vm2")["vhost"]
            assert vhost["connected"] and vhost["protocol_errors"] == 1
            assert pipe_name not in vswitchd_fd_targets(d), "the refused fd was kept"
            lines = [line for line in d.log().splitlines() if "not an eventfd" in line]
            assert len(lines) == 1 and f"{request_kind.name}: vring 0" in lines[0], lines
            # Without NEED_REPLY the front-end would carry on with a ring that never
            # works: the connection is closed, and counted once more.
            fe.request(request_kind, protocol.pack_vring_fd(0), [read_end], need_reply=False)
            assert fe.wait_closed(DEADLINE)
            wait_for(lambda: d.port("vm2")["vhost"]["protocol_errors"] == 2, what="a second protocol error")
            # The other ports never noticed.
            for i in range(100):
                g0.send_frame(0, frame(BROADCAST, mac(1), i.to_bytes(2, "big") * 20))
            got = g1.receive(0, 100, timeout=DEADLINE)
            assert len(got) == 100
            stats = port_stats(d)
            assert stats["vm0"]["rx_packets"] == 100 and stats["vm1"]["tx_packets"] == 100
        finally:
            os.close(read_end)
            os.close(write_end)
            for g in (fe, g0, g1):
                g.close()


def test_accepted_eventfds_are_made_non_blocking_and_a_new_call_fd_mends_a_broken_call(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    vr = server.dev.vrings[0]
    vr.call_broken = 1                       # as a PMD leaves it after a write was cut short
    kick, call = os.eventfd(0), os.eventfd(0)    # blocking, as a front-end may pass them
    try:
        fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(0), [kick])
        fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(0), [call])
        # The file description is shared: the back-end's O_NONBLOCK shows here.
        assert not os.get_blocking(kick) and not os.get_blocking(call)
        assert vr.call_broken == 0 and lib.vs_vring_is_enabled(server.dev.vrings + 0)
        assert server.protocol_errors == 0
    finally:
        os.close(kick)
        os.close(call)


# --- (b, c) a call write that blocks ----------------------------------------------------

@pytest.mark.parametrize("pmds", [1, 2], ids=["one-pmd", "two-pmds"])
def test_blocking_saturated_call_fd_does_not_stop_the_other_ports(tmp_path, pmds):
    extra = {"pmd": {"cpus": two_pmd_cpus()}} if pmds == 2 else None
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3), extra=extra) as d:
        g0, g1 = d.connect_guests(["vm0", "vm1"], rx_buffers=250)
        hostile = hostile_guest(d, "vm2")
        callfd = hostile.callfds[0]
        senders = [(g0, g1, 1)] if pmds == 1 else [(g0, g1, 1), (g1, g0, 2)]
        try:
            saturate_and_block(callfd)
            # Broadcasts reach the hostile port too, whose interrupt then blocks.
            # With two PMDs, vm0 and vm1 are polled by different threads and both
            # deliver into vm2's receive ring.
            for i in range(FRAMES):
                for src, _, n in senders:
                    src.send_frame(0, frame(BROADCAST, mac(n), i.to_bytes(2, "big") * 20))
            for src, dst, n in senders:
                got = dst.receive(0, FRAMES, timeout=DEADLINE)
                assert len(got) == FRAMES, (len(got), port_stats(d))
                assert [f.data[14:16] for f in got] == [i.to_bytes(2, "big") for i in range(FRAMES)]
            seconds, _ = timed_ctl(d, "show")
            assert seconds < DEADLINE
            stats = port_stats(d)
            for src, dst, n in senders:
                name_src, name_dst = f"vm{n - 1}", f"vm{2 - n}"
                assert stats[name_src]["rx_packets"] == FRAMES
                assert stats[name_dst]["tx_packets"] == FRAMES
                assert stats[name_dst]["tx_dropped"] == 0
            assert hostile.rx_ring(0).used_idx >= 1     # it did get frames, and so interrupts
            blocked = sum(p["calls_blocked"] for p in d.ctl("pmd-stats")["pmds"])
            assert 1 <= blocked <= pmds
        finally:
            release(callfd)
            for g in (hostile, g0, g1):
                g.close()


def test_del_port_of_a_port_whose_call_write_blocks_returns_quickly(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3)) as d:
        g0, g1 = d.connect_guests(["vm0", "vm1"], rx_buffers=128)
        hostile = hostile_guest(d, "vm2")
        callfd = hostile.callfds[0]
        try:
            saturate_and_block(callfd)
            g0.send_frame(0, frame(BROADCAST, mac(1)))
            wait_for(lambda: hostile.rx_ring(0).used_idx, timeout=DEADLINE, what="a frame in vm2's ring")
            seconds, _ = timed_ctl(d, "del-port", "vm2")
            print(f"del-port of the port whose call write blocked: {seconds:.2f} s")
            assert seconds < 5.0, f"del-port took {seconds:.1f} s"
            assert "vm2" not in port_stats(d)
            for _ in range(50):
                g0.send_frame(0, frame(BROADCAST, mac(1)))
            assert len(g1.receive(0, 51, timeout=DEADLINE)) == 51
            assert d.proc.poll() is None
        finally:
            release(callfd)
            for g in (hostile, g0, g1):
                g.close()


# --- (d) a kick drained behind the PMD's back -------------------------------------------

def kick_and_take_back(kickfd: int, delay_us: float) -> None:
    """Kicks, and after `delay_us` takes the count back: if the PMD has just
    seen the eventfd readable, it then finds it empty."""
    os.eventfd_write(kickfd, 1)
    end = time.perf_counter() + delay_us / 1e6
    while time.perf_counter() < end:
        pass
    try:
        os.preadv(kickfd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        pass


def test_kick_fd_made_blocking_and_drained_by_the_front_end_does_not_hang_the_idle_pmd(tmp_path):
    ports = vhost_ports(tmp_path, 3)
    ports[2]["queues"] = 2
    with Vswitchd(tmp_path, ports=ports, log_level="info") as d:
        g0, g1 = d.connect_guests(["vm0", "vm1"], rx_buffers=64)
        hostile = VhostUserFrontend(tmp_path / "vm2.sock", queues=2).connect()
        hostile.handshake()
        wait_for(lambda: d.port("vm2")["link"] == "up", what="vm2 up")
        kickfd = hostile.kickfds[1]          # its first TX ring's: the idle PMD sleeps on it
        # The same eventfd kicks its second TX ring too: whichever of the two the
        # PMD reads first drains it for the other, as a front-end reading its own
        # kick would.  That makes the race below certain once per kick.
        hostile.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(3), [kickfd])
        os.set_blocking(kickfd, True)
        try:
            for attempt in range(100):
                time.sleep(0.003)            # long enough for the PMD to fall asleep
                if attempt % 2:
                    kick_and_take_back(kickfd, (attempt % 20) / 2)
                else:
                    os.eventfd_write(kickfd, 1)
                g0.send_frame(0, frame(BROADCAST, mac(1), attempt.to_bytes(2, "big") * 20))
                got = g1.receive(0, 1, timeout=3.0)
                assert len(got) == 1, f"attempt {attempt}: the PMD stopped forwarding"
                g1.post_rx(0, 1)
            pmd = d.ctl("pmd-stats")["pmds"][0]
            assert pmd["sleeps"] > 0 and pmd["kick_wakeups"] > 0
        finally:
            os.set_blocking(kickfd, False)
            os.eventfd_write(kickfd, 1)      # frees a PMD blocked in read(), for a clean stop
            for g in (hostile, g0, g1):
                g.close()


# --- The ring engine and the PMD thread, in process -------------------------------------

class PmdRunner:
    """A PMD thread in this process, polling `polled` and delivering to every guest."""

    def __init__(self, fib: MacTable, guests: list[Guest], polled: list[Guest]):
        self.pmd = ffi.new("struct vs_pmd *")
        assert lib.vs_pmd_init(self.pmd, fib.c) == 0
        self.table = ffi.new("struct vs_port_table *")
        for g in guests:
            self.table.ports[g.port.port_no] = g.port
            self.table.live[self.table.n_live] = g.port.port_no
            self.table.n_live += 1
        for g in polled:
            for q in range(g.dev.nr_queue_pairs):
                self.table.poll[self.table.n_poll].port = g.port
                self.table.poll[self.table.n_poll].queue = q
                self.table.n_poll += 1
        lib.vs_pmd_publish(self.pmd, self.table)
        self.thread = threading.Thread(target=lib.vs_pmd_run, args=(self.pmd,), daemon=True)
        self.thread.start()

    def stalled(self, seconds: float = 0.2) -> bool:
        """True if the thread made no pass at all for `seconds`."""
        before = self.pmd.epoch
        time.sleep(seconds)
        return self.pmd.epoch == before

    def stop(self) -> None:
        lib.vs_pmd_stop(self.pmd)
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "the PMD thread did not stop"
        lib.vs_pmd_fini(self.pmd)


@pytest.fixture
def hostile_rig():
    """Guests 0 and 1 are well behaved; guest 2 has no EVENT_IDX and a call
    eventfd on its receive ring that the test saturates and makes blocking."""
    fib = MacTable(max_entries=1024)
    guests = [Guest(0), Guest(1), Guest(2, features=F_V1 | F_MRG)]
    for g in guests:
        g.rx[0].post_rx(200)
    callfd = guests[2].add_callfd(0)
    runners: list[PmdRunner] = []
    yield fib, guests, callfd, runners
    for g in guests:
        for fd in g.callfds.values():
            release(fd)
    for r in runners:
        r.stop()
    fib.close()
    for g in guests:
        g.close()


def wait_blocked_in_call(runner: PmdRunner, hostile: Guest) -> None:
    wait_for(lambda: hostile.rx[0].used_idx >= 1, timeout=DEADLINE, what="a frame in the hostile ring")
    wait_for(runner.stalled, timeout=DEADLINE, what="the PMD to block in its call write")


def test_no_ring_lock_is_held_while_a_call_write_blocks(hostile_rig):
    fib, (g0, g1, g2), callfd, runners = hostile_rig
    saturate_and_block(callfd)
    a = PmdRunner(fib, [g0, g1, g2], polled=[g0])
    runners.append(a)
    b = PmdRunner(fib, [g0, g1, g2], polled=[g1])
    runners.append(b)
    g0.tx[0].post_tx(frame(BROADCAST, mac(1)))
    wait_blocked_in_call(a, g2)     # no watchdog here: it stays blocked
    assert g2.vring(0).lock == 0, "the receive ring's lock is held across the call write"
    # The guest asks for no more interrupts: the other PMD delivers into the same
    # ring, and keeps forwarding, while the first is still blocked.
    g2.rx[0].set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    for i in range(20):
        g1.tx[0].post_tx(frame(BROADCAST, mac(2), bytes([i]) * 40))
        got = wait_for(lambda: g0.rx[0].read_rx_frames(), timeout=DEADLINE, what=f"frame {i} in guest 0")
        assert len(got) == 1 and got[0].data[14] == i
    wait_for(lambda: g2.rx[0].used_idx == 21, timeout=DEADLINE, what="guest 1's frames in guest 2")
    assert a.stalled()


class Watchdog:
    """The control plane's call watchdog (vs_call_watchdog_run) over one PMD, as a context manager."""

    def __init__(self, runner: PmdRunner):
        self.pmds = ffi.new("struct vs_pmd *[]", [runner.pmd])
        self.c = ffi.new("struct vs_call_watchdog *")
        self.c.pmds = self.pmds
        self.c.n_pmds = 1
        self.c.interval_ms = 10
        self.c.stall_ms = lib.VS_PMD_CALL_STALL_MS
        self.thread = threading.Thread(target=lib.vs_call_watchdog_run, args=(self.c,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.c.stop = 1
        self.thread.join(DEADLINE)


def test_watchdog_cuts_a_blocked_call_write_short_and_marks_the_device(hostile_rig):
    fib, (g0, g1, g2), callfd, runners = hostile_rig
    saturate_and_block(callfd)
    runner = PmdRunner(fib, [g0, g1, g2], polled=[g0])
    runners.append(runner)
    with Watchdog(runner):
        received = 0
        for i in range(60):
            g0.tx[0].post_tx(frame(BROADCAST, mac(1), bytes([i]) * 40))
            if i % 10 == 9:
                received += len(wait_for(lambda: g1.rx[0].read_rx_frames(), timeout=DEADLINE,
                                         what="frames in guest 1"))
        while received < 60:
            got = wait_for(lambda: g1.rx[0].read_rx_frames(), timeout=DEADLINE, what="frames in guest 1")
            received += len(got)
        assert received == 60
    vr = g2.vring(0)
    assert g2.dev.fault & lib.VS_DEV_FAULT_CALL_BLOCKED
    assert not g0.dev.fault and not g1.dev.fault
    assert vr.call_broken and vr.stats.calls_blocked == 1
    assert runner.pmd.call_watch.blocked == 1 and runner.pmd.call_watch.signals >= 1
    # The broken call fd is left alone from then on: nothing is written to it.
    assert vr.stats.notifications == 0
    assert g2.rx[0].used_idx == 60


def test_a_signal_the_watchdog_did_not_aim_at_this_write_only_retries_it(hostile_rig):
    fib, (g0, g1, g2), callfd, runners = hostile_rig
    saturate_and_block(callfd)
    runner = PmdRunner(fib, [g0, g1, g2], polled=[g0])
    runners.append(runner)
    g0.tx[0].post_tx(frame(BROADCAST, mac(1)))
    wait_blocked_in_call(runner, g2)
    for _ in range(3):
        signal.pthread_kill(runner.thread.ident, lib.vs_pmd_watchdog_signal())
    assert runner.stalled()
    vr = g2.vring(0)
    assert not vr.call_broken and not g2.dev.fault
    release(callfd)
    wait_for(lambda: vr.stats.notifications == 1, timeout=DEADLINE, what="the retried notification")
    assert os.eventfd_read(callfd) == 1


def test_idle_pmd_never_blocks_reading_a_kick_eventfd_that_another_reader_emptied():
    """In process: two rings share one blocking kick eventfd, so the PMD's
    first read empties it for the second.  vs_pmd_quiesce tells a PMD asleep
    in ppoll() (its wakefd wakes it) from one blocked in read() (nothing does)."""
    fib = MacTable(max_entries=64)
    guest = Guest(0, queues=2)
    kickfd = os.eventfd(0)                   # blocking, as a front-end may leave it
    guest.vring(1).kickfd = kickfd
    guest.vring(3).kickfd = kickfd
    runner = PmdRunner(fib, [guest], polled=[guest])
    try:
        for attempt in range(20):
            time.sleep(0.005)                # the PMD falls asleep
            os.eventfd_write(kickfd, 1)
            assert lib.vs_pmd_quiesce(runner.pmd, 2000) == 0, \
                f"attempt {attempt}: the idle PMD blocked reading an empty kick eventfd"
        assert runner.pmd.stats.kick_wakeups >= 20
    finally:
        os.eventfd_write(kickfd, 1)          # frees a PMD blocked in read()
        runner.stop()
        fib.close()
        guest.close()
        os.close(kickfd)


def test_watchdog_also_cuts_a_blocked_call_write_on_a_transmit_ring(hostile_rig):
    """The guest's TX ring is notified when its buffers come back, outside any lock."""
    fib, (g0, g1, g2), _, runners = hostile_rig
    callfd = g2.add_callfd(1)
    saturate_and_block(callfd)
    runner = PmdRunner(fib, [g0, g1, g2], polled=[g0, g2])
    runners.append(runner)
    with Watchdog(runner):
        g2.tx[0].post_tx(frame(BROADCAST, mac(3)))
        wait_for(lambda: g2.vring(1).call_broken, timeout=DEADLINE, what="the TX call cut short")
        # (A faulted device's own frames may be refused from here on: only guest 0 sends.)
        for i in range(20):
            g0.tx[0].post_tx(frame(BROADCAST, mac(1), bytes([i]) * 40))
        got = []
        wait_for(lambda: got.extend(g1.rx[0].read_rx_frames()) or len(got) == 21, timeout=DEADLINE,
                 what="21 frames in guest 1")
    assert g2.dev.fault & lib.VS_DEV_FAULT_CALL_BLOCKED and g2.vring(1).stats.calls_blocked == 1
    assert g2.vring(1).stats.notifications == 0
