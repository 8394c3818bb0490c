"""`vswitchctl capture PORT -w - | tcpdump -r -`: the pcap stream read by the real tcpdump
while guests (in-process vhost-user front-ends) send through the switch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import require_tool
from tests.support.daemon import REPO, Vswitchd
from tests.support.frames import BROADCAST, frame, mac

pytestmark = [pytest.mark.system]

DEADLINE = 10.0


def test_capture_to_stdout_piped_into_tcpdump(tmp_path):
    tcpdump = require_tool("tcpdump", "tcpdump")
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports) as d:
        g0, g1 = d.connect_guests(["vm0", "vm1"])
        try:
            ctl = subprocess.Popen([sys.executable, "-m", "vswitch.control.cli", "--socket", d.control_socket,
                                    "capture", "vm1", "--direction", "tx", "--count", "3", "-w", "-"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
            dump = subprocess.Popen([tcpdump, "-r", "-", "-nn", "-e"], stdin=ctl.stdout, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            ctl.stdout.close()   # tcpdump holds the pipe's read end now
            try:
                deadline = time.monotonic() + DEADLINE
                while "capture started" not in d.log():
                    assert ctl.poll() is None and time.monotonic() < deadline, ctl.stderr.read().decode()
                    time.sleep(0.02)
                for i in range(3):
                    g0.send_frame(0, frame(BROADCAST, mac(1), bytes([i]) * 80))
                    g0.wait_tx_done(0)
                out, err = dump.communicate(timeout=DEADLINE)
                assert ctl.wait(DEADLINE) == 0, ctl.stderr.read().decode()
            finally:
                for proc in (ctl, dump):
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            lines = out.splitlines()
            assert len(lines) == 3, (out, err)
            assert all("02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff" in line and "length 94" in line for line in lines), out
            assert "3 frames written from port vm1" in ctl.stderr.read().decode()
        finally:
            g0.close()
            g1.close()
