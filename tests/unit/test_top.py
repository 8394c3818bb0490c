"""`vswitchctl top`: ports sorted by traffic rate, and the PMD threads' load."""

from __future__ import annotations

import re
import threading
import time

from tests.support.daemon import Vswitchd
from tests.support.frames import frame, mac


def test_top_shows_the_busiest_port_first_and_the_pmd(tmp_path):
    ports = [{"name": n, "type": "vhost-user", "path": str(tmp_path / f"{n}.sock")} for n in ("idle", "busy", "sink")]
    with Vswitchd(tmp_path, ports=ports) as d:
        guests = d.connect_guests(["idle", "busy", "sink"], rx_buffers=128)
        stop = threading.Event()

        def send():
            # From "busy" to "sink" (learned), about 200 frames a second; and as
            # many from "busy" to its own MAC, which the switch receives and drops
            # (the destination is behind the port it came from).  So "busy" moves
            # twice the frames "sink" does: with only the first, the two tied and
            # either could be listed first.
            while not stop.is_set():
                guests[1].send_frame(0, frame(mac(3), mac(2)))
                guests[1].send_frame(0, frame(mac(2), mac(2)))
                received = guests[2].rx_ring(0).read_rx_frames()
                if received:
                    guests[2].post_rx(0, len(received))
                time.sleep(0.005)

        guests[2].send_frame(0, frame(mac(2), mac(3)))   # sink's MAC learned
        guests[1].send_frame(0, frame(mac(3), mac(2)))   # busy's too, before the clock starts
        sender = threading.Thread(target=send)
        sender.start()
        try:
            out = d.ctl_raw("top", "--interval", "0.5", "--iterations", "2")
        finally:
            stop.set()
            sender.join()
            for fe in guests:
                fe.close()
    assert out.returncode == 0, out.stderr
    screens = out.stdout.split("vswitch top: ")[1:]
    assert len(screens) == 2, out.stdout
    last = screens[-1]
    ports = [line.split()[0] for line in last.splitlines() if re.match(r"^(idle|busy|sink)\s", line)]
    assert ports[:2] == ["busy", "sink"] and ports[2] == "idle", last
    busy = next(line for line in last.splitlines() if line.startswith("busy")).split()
    assert 100 < float(busy[3].replace(",", "")) < 2000, last    # RX PPS: about 400
    assert re.search(r"^PMD\s+CPU\s+BUSY %", last, re.M) and re.search(r"^0\s", last, re.M), last


def test_top_arguments(tmp_path):
    with Vswitchd(tmp_path, ports=[]) as d:
        out = d.ctl_raw("top", "--interval", "0")
        assert out.returncode != 0 and out.stderr.strip() == "vswitchctl: --interval takes a positive number of seconds"
