"""Live migration of a QEMU guest between two vhost-user ports of one switch.

Two QEMU processes on this host (tools/vmkit.py guests, TCG): the source
boots on port `src`; the destination starts on port `dst` with `-incoming
unix:...`, and the source's HMP monitor sends `migrate unix:...`.  Behind a
TAP port, a network namespace pings the guest every 10 ms and sends it a
paced TCP stream that runs across the switch-over.  Afterwards the guest
(now in the destination QEMU) still has its address, has every byte of the
stream (SHA-256 on both ends), the lost pings are counted and printed, and
the switch's FDB points at `dst` right after the migration completes.

It runs twice: pre-copy, and postcopy (both ports with `postcopy: true`;
`migrate_set_capability postcopy-ram on` on both sides, `migrate`, then
`migrate_start_postcopy`): the destination guest then runs before all its
memory has arrived, and the switch's mappings of it are registered with the
userfaultfd it gave the destination QEMU (POSTCOPY_ADVISE / LISTEN, the
postcopy SET_MEM_TABLE exchange, POSTCOPY_END), which the test reads from
the destination port's counters and the switch's log.

While the pages move, the switch logs every page it writes (RX buffers,
used rings) in the dirty bitmap QEMU gave it: the test checks the source
port logged pages, and a stale RX buffer at the destination would show as a
wrong checksum.  After the switch-over QEMU sends SEND_RARP to the
destination port (the guest lacks GUEST_ANNOUNCE) and the switch learns the
guest's MAC there.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from pathlib import Path

import pytest

from tests.support.daemon import Vswitchd
from tests.support.netns import in_ns, python_in_ns
from tests.system.test_qemu_guests import BOOT_TIMEOUT, kit, wait_links  # noqa: F401 (fixtures)
from tools import vmkit

pytestmark = [pytest.mark.system, pytest.mark.qemu]

GUEST_IP, NS_IP = "10.200.11.2", "10.200.11.1"
GUEST_MAC = "52:54:00:c8:0b:02"
PING_INTERVAL_MS = 10
STREAM_BYTES = 6 << 20
STREAM_RATE = 1 << 20                    # bytes/s: the stream lasts ~6 s and spans the migration
MIGRATION_TIMEOUT = 60.0
# What the test fails on; the goal (under 100 ms of loss) is printed and compared, not asserted,
# because a TCG guest on a shared 2-core host stalls for unrelated reasons.
LOSS_LIMIT_MS = 2000
DOWNTIME_LIMIT_MS = 50


# Guest RAM 8 KiB short of 256 MiB, because of a QEMU bug, not ours.  QEMU before 9.0 (commit 03bfc2188f,
# "physmem: Fix migration dirty bitmap coherency with TCG memory access"; Debian 12's 7.2 lacks it) has
# a fast path in its dirty bitmap sync for RAM blocks whose length is a multiple of 64 pages (256 KiB):
# it clears the bits without making the vCPUs' TLB entries for those pages trap the next store again,
# so the TCG guest's later stores through them set no dirty bit and the pages are never sent again.  A
# length that is not such a multiple takes the per-page path, which resets the TLB entries.  QEMU
# rounds -m up to 8 KiB, so 8 KiB less is the nearest size that avoids the fast path.
GUEST_MEMORY_KB = 256 * 1024 - 8


class MigratingGuest(vmkit.Guest):
    """A vmkit guest with extra QEMU arguments (its monitor, -incoming) and GUEST_MEMORY_KB of RAM."""

    def __init__(self, *args, qemu_args: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.qemu_args = qemu_args

    def command_line(self) -> list[str]:
        line = super().command_line()
        line[line.index("-m") + 1] = f"{GUEST_MEMORY_KB}K"
        backend = line.index("-object") + 1
        assert f"size={self.memory_mb}M," in line[backend], line[backend]
        line[backend] = line[backend].replace(f"size={self.memory_mb}M,", f"size={GUEST_MEMORY_KB}K,")
        return line + self.qemu_args

    def took_over(self) -> None:
        """The migrated guest runs here now: its shell is this QEMU's console."""
        self._booted = True

    def gone(self) -> None:
        """The guest left this QEMU: stop() must not type into a paused console."""
        self._booted = False


class Monitor:
    """QEMU's human monitor on a UNIX socket."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self._read_to_prompt()

    def _read_to_prompt(self) -> str:
        data = b""
        while not data.endswith(self.PROMPT):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"monitor closed: {data!r}")
            data += chunk
        return data[:-len(self.PROMPT)].decode(errors="replace")

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        # The monitor echoes the command line, escape sequences and all; what follows is the answer.
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self._read_to_prompt())

    def close(self) -> None:
        self.sock.close()


def switch_over_ms(log: str) -> int | None:
    """From the source's last ring stopping (GET_VRING_BASE) to the switch learning the guest's MAC
    behind the destination port (SEND_RARP), by the switch's own log."""
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
    stops = re.findall(stamp + r".*port 'src': vring \d+ stopped", log, re.M)
    learned = re.findall(stamp + r".*port 'dst': RARP for", log, re.M)
    if not stops or not learned:
        return None
    parse = lambda text: time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:]) / 1000
    return round((parse(learned[0]) - parse(stops[-1])) * 1000)


def fdb(switch: Vswitchd) -> dict[str, str]:
    return {e["mac"]: e["port"] for e in switch.ctl("fdb", "show")["entries"]}


@pytest.fixture
def migration_rig(request, tmp_path: Path, kit: Path, netns):  # noqa: F811
    """(switch, source, destination, netns, tmp_path, mode); mode is the param, "precopy" or "postcopy"."""
    mode = getattr(request, "param", "precopy")
    ifname = f"vsm{netns.split('-')[-1]}{netns.split('-')[-2][-4:]}"[:15]
    postcopy = {"postcopy": True} if mode == "postcopy" else {}
    ports = [{"name": "src", "type": "vhost-user", "path": str(tmp_path / "src.sock"), **postcopy},
             {"name": "dst", "type": "vhost-user", "path": str(tmp_path / "dst.sock"), **postcopy},
             {"name": "host", "type": "tap", "ifname": ifname, "netns": netns}]
    with contextlib.ExitStack() as stack:
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        # guest_announce=off: QEMU sends SEND_RARP at the switch-over, whose timing switch_over_ms reads
        # (a guest with GUEST_ANNOUNCE announces itself instead: tests/system/test_announce.py).
        common = dict(ip=f"{GUEST_IP}/24", mac=GUEST_MAC, log_dir=tmp_path, kit_dir=kit,
                      device_options="guest_announce=off")
        source = MigratingGuest("vm-src", tmp_path / "src.sock", **common, qemu_args=[
            "-monitor", f"unix:{tmp_path / 'src.mon'},server=on,wait=off"])
        destination = MigratingGuest("vm-dst", tmp_path / "dst.sock", **common, qemu_args=[
            "-monitor", f"unix:{tmp_path / 'dst.mon'},server=on,wait=off",
            "-incoming", f"unix:{tmp_path / 'migrate.sock'}"])
        stack.enter_context(source)
        source.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["src", "host"])
        stack.enter_context(destination)
        yield switch, source, destination, netns, tmp_path, mode


# A destination guest that stops answering, or a stream that breaks, fails the test with what broke.
# With 256 MiB exactly this happened in about half the pre-copy runs: QEMU's lost TCG stores (see
# GUEST_MEMORY_KB), found by tests/support/migration_memcmp.py; README, Live migration.
DESTINATION_FAILURE = "destination guest broke after the switch-over: "


def postcopy_state(switch: Vswitchd, port: str) -> dict:
    return switch.port(port)["vhost"]["postcopy"]


@pytest.mark.parametrize("migration_rig", ["precopy", "postcopy"], indirect=True)
def test_live_migration_keeps_address_stream_and_moves_the_fdb(migration_rig, request, require_tool):
    require_tool("ping", "iputils-ping")
    switch, source, destination, netns, tmp_path, mode = migration_rig
    for _ in range(20):
        if in_ns(netns, "ping", "-c", "1", "-W", "1", GUEST_IP, check=False).returncode == 0:
            break
    else:
        pytest.fail(f"no reply from the guest before migration:\n{source.output[-2000:]}")
    assert fdb(switch).get(GUEST_MAC) == "src"

    # The console ignores the modem lines: the destination's serial port may not carry the source's
    # carrier state over, and a carrier drop would hang up the console shell (PID 1).
    # nc in a subshell: not a job of the console shell, which could exit when it ends (tools/vmkit.py Guest.run).
    source.run("stty clocal -hupcl; (nc -l -p 5001 </dev/null >/tmp/in &)")
    time.sleep(0.5)
    pinger = python_in_ns(netns, "-m", "tests.support.migration_traffic", "ping", GUEST_IP, str(PING_INTERVAL_MS))
    sender = python_in_ns(netns, "-m", "tests.support.migration_traffic", "send", GUEST_IP, "5001",
                          str(STREAM_BYTES), str(STREAM_RATE))
    monitors: list[Monitor] = []
    try:
        assert pinger.stdout.readline().strip() == "pinging"
        time.sleep(1.5)                       # the stream is flowing
        src_mon = Monitor(tmp_path / "src.mon")
        monitors.append(src_mon)
        # A local UNIX socket: no need for QEMU's default bandwidth cap.  QEMU stops the guest for its
        # last pass once what is left fits the downtime limit (300 ms by default); the pings lost are
        # mostly that stop, so the limit is the goal, 100 ms, less room for the switch-over.
        src_mon.command("migrate_set_parameter max-bandwidth 4G")
        src_mon.command(f"migrate_set_parameter downtime-limit {DOWNTIME_LIMIT_MS}")
        if mode == "postcopy":
            # Both sides, before the migration starts; the destination's QEMU asks its vhost-user
            # back-end for PAGEFAULT here (and refuses the capability without it).
            dst_mon = Monitor(tmp_path / "dst.mon")
            monitors.append(dst_mon)
            for mon in (dst_mon, src_mon):
                out = mon.command("migrate_set_capability postcopy-ram on")
                assert "rror" not in out and "not capable" not in out, out
        # The PMD's longest gap between passes from here on: in postcopy it includes the time a PMD
        # slept on a page not yet migrated (README, Postcopy: the PMD stalls).
        switch.ctl("pmd-stats", "--reset-gap")
        started = time.monotonic()
        out = src_mon.command(f"migrate -d unix:{tmp_path / 'migrate.sock'}")
        assert "rror" not in out, out
        if mode == "postcopy":
            # From the first pass on: the destination runs with most of its memory still at the source.
            out = src_mon.command("migrate_start_postcopy")
            assert "rror" not in out, out
        status, statuses = "", set()
        while time.monotonic() < started + MIGRATION_TIMEOUT:
            info = src_mon.command("info migrate")
            status = re.search(r"Migration status: (\S+)", info).group(1)
            statuses.add(status)
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        completed_at = time.monotonic()
        assert status == "completed", f"migration {status}:\n{info}\n{switch.log()[-3000:]}"
        # The FDB follows at once (SEND_RARP to the destination port): the first look after the
        # migration completed finds the guest's MAC behind `dst`.
        first_look = fdb(switch).get(GUEST_MAC)
        assert first_look == "dst", fdb(switch)
        # ... and the switch sent the guest's RARP out of the other ports (the TAP port, here).
        assert switch.port("dst")["stats"]["rarp_sent"] >= 1, switch.port("dst")["stats"]
        source.gone()
        destination.took_over()
        src_log = switch.port("src")["vhost"]["dirty_log"]
        assert src_log["mapped"] and src_log["bits_set"] > 0 and src_log["pending"] == 0, src_log
        postcopy = None
        if mode == "postcopy":
            # The destination port went through ADVISE, LISTEN, the acknowledged table and END.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                postcopy = postcopy_state(switch, "dst")
                if postcopy["ends"]:
                    break
                time.sleep(0.1)
            assert postcopy["listens"] == 1 and postcopy["ends"] == 1 and postcopy["refused"] == 0, postcopy
            assert not postcopy["advised"] and postcopy["registered_regions"] == 0, postcopy
            assert "postcopy memory table acknowledged; 1 regions registered" in switch.log(), switch.log()[-3000:]
            # The destination ran in postcopy for a while (a pass that finished first would complete
            # as pre-copy and prove nothing here).
            assert "postcopy-active" in statuses, statuses
        pmd_max_gap_us = max(p["max_gap_us"] for p in switch.ctl("pmd-stats")["pmds"])
        total_ms = (completed_at - started) * 1000
        downtime = re.search(r"downtime: (\d+) ms", info)

        # The guest runs on at the destination.
        try:
            destination.run("echo alive", timeout=30)
        except (OSError, vmkit.VmkitError) as exc:
            pytest.fail(DESTINATION_FAILURE + f"its console stopped answering: {exc}")
        out, err = sender.communicate(timeout=60)
        if sender.returncode != 0:
            pytest.fail(DESTINATION_FAILURE + f"the TCP stream broke: {err.strip()[-300:]}")
        sent, digest, seconds = out.split()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.communicate()
        pinger.terminate()
        ping_out = pinger.communicate(timeout=30)[0]
        for mon in monitors:
            mon.close()
    pings = json.loads(ping_out.strip().splitlines()[-1])

    # The guest, now in the destination QEMU, has its address and every byte of the stream.
    try:
        addresses = destination.run("ip -4 addr show eth0", timeout=60)
        text = destination.run("sleep 1; wc -c < /tmp/in; sha256sum /tmp/in", timeout=60)
    except (OSError, vmkit.VmkitError) as exc:
        pytest.fail(DESTINATION_FAILURE + f"the guest died after the stream: {exc}")
    assert f"{GUEST_IP}/24" in addresses, addresses
    assert str(STREAM_BYTES) in text and digest in text, f"the guest got: {text}"
    assert in_ns(netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP, check=False).returncode == 0
    assert fdb(switch).get(GUEST_MAC) == "dst"

    figures = {
        "migration_ms": round(total_ms), "qemu_downtime_ms": int(downtime.group(1)) if downtime else None,
        "fdb_moved_after_source_stopped_ms": switch_over_ms(switch.log()),
        "pings_sent": pings["sent"], "pings_lost": pings["lost"],
        "lost_ms": pings["lost_ms"], "longest_gap_ms": pings["longest_gap_ms"],
        "src_pages_logged": src_log.get("bits_set"), "stream_seconds": float(seconds), "mode": mode,
        "pmd_max_gap_ms": round(pmd_max_gap_us / 1000, 1),
    }
    if mode == "postcopy":
        postcopy_ms = re.search(r"postcopy request count: (\d+)", info)
        figures["postcopy_requests"] = int(postcopy_ms.group(1)) if postcopy_ms else None
    print("live migration:", json.dumps(figures))
    (tmp_path / "migration.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    assert src_log["mapped"] and src_log["bits_set"] > 0, src_log
    assert pings["lost_ms"] < LOSS_LIMIT_MS, pings
