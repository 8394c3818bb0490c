"""Capture and mirroring through a running vswitchd: `vswitchctl capture ... -w FILE`
read back with scapy, mirrors in the config, at run time and on reload, and
one-line errors for bad requests (README "Capture and mirroring")."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from scapy.utils import rdpcap

from tests.support.daemon import REPO, Vswitchd
from tests.support.frames import BROADCAST, frame, mac
from vswitch.config import ConfigError, parse

DEADLINE = 10.0


def vhost_ports(tmp_path, n: int) -> list[dict]:
    return [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(n)]


@pytest.fixture
def three(tmp_path):
    d = Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3))
    with d:
        guests = d.connect_guests(["vm0", "vm1", "vm2"])
        try:
            yield d, guests
        finally:
            for g in guests:
                g.close()


def start_capture(d: Vswitchd, *args: str) -> subprocess.Popen:
    """`vswitchctl capture ARGS` in the background, returned once the switch is capturing."""
    before = d.log().count("capture started")
    proc = subprocess.Popen([sys.executable, "-m", "vswitch.control.cli", "--socket", d.control_socket,
                             "capture", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + DEADLINE
    while d.log().count("capture started") == before:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"capture did not start: {err.decode()}\n{d.log()[-2000:]}")
        time.sleep(0.02)
    return proc


def finish(proc: subprocess.Popen) -> tuple[bytes, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"capture did not end: {err.decode()}")
    assert proc.returncode == 0, err.decode()
    return out, err.decode()


def test_capture_count_writes_the_exact_frames_to_a_pcap_file(three, tmp_path):
    d, (g0, g1, g2) = three
    pcap = tmp_path / "vm0.pcap"
    proc = start_capture(d, "vm0", "--direction", "rx", "--count", "4", "-w", str(pcap))
    sent = [frame(BROADCAST, mac(1), bytes([i]) * (60 + i)) for i in range(6)]
    for f in sent:
        g0.send_frame(0, f)
        g0.wait_tx_done(0)
    _, err = finish(proc)
    assert "4 frames written from port vm0" in err
    # Traffic flowed on: every frame reached the other guests.
    assert len(g1.receive(0, 6, timeout=2)) == 6
    packets = rdpcap(str(pcap))
    assert [bytes(p) for p in packets] == sent[:4]
    assert [p.wirelen for p in packets] == [len(f) for f in sent[:4]]
    assert packets[0].time > 1.6e9


def test_capture_tx_with_snaplen_keeps_the_frames_heads(three, tmp_path):
    d, (g0, g1, g2) = three
    pcap = tmp_path / "vm1.pcap"
    proc = start_capture(d, "vm1", "--direction", "tx", "--snaplen", "20", "--count", "3", "-w", str(pcap))
    sent = [frame(BROADCAST, mac(2), bytes([i]) * 100) for i in range(3)]
    for f in sent:
        g2.send_frame(0, f)     # sent to vm1 (and vm0) by the switch
        g2.wait_tx_done(0)
    # vm1's own frames are received, not sent to it: a tx capture does not see them.
    finish(proc)
    packets = rdpcap(str(pcap))
    assert [bytes(p) for p in packets] == [f[:20] for f in sent]
    assert [p.wirelen for p in packets] == [len(f) for f in sent]
    assert d.port("vm1")["stats"]["capture_dropped"] == 0


@pytest.mark.parametrize("args, error", [
    (("ghost", "-w", "x.pcap"), "no port named 'ghost'"),
    (("vm0", "--direction", "up", "-w", "x.pcap"), "capture: direction 'up' must be one of rx, tx, both"),
    (("vm0", "--snaplen", "0", "-w", "x.pcap"), "capture: snaplen 0 must be a whole number from 1 to 65535"),
    (("vm0", "--count", "0", "-w", "x.pcap"), "capture: --count 0 must be at least 1"),
])
def test_bad_capture_requests_are_one_line(tmp_path, args, error):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 1)) as d:
        out = d.ctl_raw("capture", *args)
        assert out.returncode != 0 and out.stderr.count("\n") == 1, out
        assert error in out.stderr, out.stderr
        assert not (REPO / "x.pcap").exists()


def test_mirror_from_the_config_copies_to_the_output_port_which_takes_no_traffic(tmp_path):
    mirrors = [{"name": "m1", "select": ["vm0"], "output": "vm2", "select_direction": "rx"}]
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3), extra={"mirrors": mirrors}) as d:
        g0, g1, g2 = d.connect_guests(["vm0", "vm1", "vm2"])
        try:
            f = frame(BROADCAST, mac(1), b"mirror me" * 5)
            g0.send_frame(0, f)
            assert [r.data for r in g2.receive(0, 1, timeout=2)] == [f]   # the copy
            assert [r.data for r in g1.receive(0, 1, timeout=2)] == [f]   # the frame, once
            assert g2.receive(0, 1, timeout=0.3) == []                     # no flood to the output
            # What the output port sends is dropped and counted, never switched or learned.
            g2.send_frame(0, frame(BROADCAST, mac(3)))
            assert g1.receive(0, 1, timeout=0.5) == [] and g0.receive(0, 1, timeout=0.1) == []
            assert d.port("vm2")["stats"]["mirror_output_dropped"] == 1
            assert "02:00:00:00:00:03" not in d.ctl_raw("fdb", "show").stdout
            # vm1 sends: not selected, so no copy.
            g1.send_frame(0, frame(BROADCAST, mac(2)))
            assert len(g0.receive(0, 1, timeout=2)) == 1 and g2.receive(0, 1, timeout=0.3) == []
            assert d.ctl("mirror", "list")["mirrors"] == [{**mirrors[0]}]
        finally:
            for g in (g0, g1, g2):
                g.close()


def test_mirrors_at_run_time_persist_and_reload(tmp_path):
    d = Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3))
    d.extra_args = ["--persist"]
    with d:
        out = d.ctl_raw("mirror", "add", "m1", "--select", "vm0,vm1", "--output", "vm2")
        assert out.returncode == 0, out.stderr
        assert d.ctl("mirror", "list")["mirrors"] == [
            {"name": "m1", "select": ["vm0", "vm1"], "output": "vm2", "select_direction": "both"}]
        assert yaml.safe_load(d.config_path.read_text())["mirrors"] == [
            {"name": "m1", "select": ["vm0", "vm1"], "output": "vm2"}]
        assert "mirrors:" in d.ctl_raw("config", "dump").stdout
        for args, error in [
            (("mirror", "add", "m1", "--select", "vm0", "--output", "vm2"), "mirror 'm1' already exists"),
            (("mirror", "add", "m2", "--select", "vm0", "--output", "vm0"), "cannot be both selected and the output"),
            (("mirror", "add", "m2", "--select", "ghost", "--output", "vm1"), "no port named 'ghost'"),
            (("mirror", "add", "m2", "--select", "vm2", "--output", "vm1"), "an output port cannot be mirrored"),
            (("mirror", "add", "m2", "--select", "vm0", "--output", "vm1", "--direction", "up"),
             "select_direction: 'up' must be one of"),
            (("mirror", "del", "m9"), "no mirror named 'm9'"),
        ]:
            out = d.ctl_raw(*args)
            assert out.returncode != 0 and out.stderr.count("\n") == 1, out
            assert error in out.stderr, out.stderr
        # Reload: the file now says another mirror.
        config = yaml.safe_load(d.config_path.read_text())
        config["mirrors"] = [{"name": "m2", "select": ["vm1"], "output": "vm0", "select_direction": "tx"}]
        d.config_path.write_text(yaml.safe_dump(config))
        out = d.ctl_raw("reload")
        assert out.returncode == 0 and "mirrors set: m2" in out.stdout, out
        assert [m["name"] for m in d.ctl("mirror", "list")["mirrors"]] == ["m2"]
        # Removing a mirror's output port removes the mirror.
        assert d.ctl_raw("del-port", "vm0").returncode == 0
        assert d.ctl("mirror", "list")["mirrors"] == []
        assert "mirrors" not in yaml.safe_load(d.config_path.read_text())


@pytest.mark.parametrize("mirrors, problem", [
    ([{"name": "m1", "select": ["a"], "output": "ghost"}], "x.yaml: mirrors[0] (m1).output: no port named 'ghost'"),
    ([{"name": "m1", "select": ["a", "b"], "output": "a"}],
     "x.yaml: mirrors[0] (m1).output: port 'a' cannot be both selected and the output"),
    ([{"name": "m1", "select": ["a"], "output": "b"}, {"name": "m1", "select": ["a"], "output": "b"}],
     "x.yaml: mirrors[1].name: mirror 'm1' is defined twice"),
    ("m1", "x.yaml: mirrors: must be a list of {name, select, output}"),
])
def test_bad_mirror_config_is_one_line(mirrors, problem):
    ports = [{"name": "a", "type": "null"}, {"name": "b", "type": "null"}]
    with pytest.raises(ConfigError) as exc:
        parse({"ports": ports, "mirrors": mirrors}, "x.yaml")
    assert exc.value.problems == [problem]


def test_good_mirror_config_round_trips():
    ports = [{"name": "a", "type": "null"}, {"name": "b", "type": "null"}]
    cfg = parse({"ports": ports, "mirrors": [{"name": "m1", "select": ["a"], "output": "b",
                                               "select_direction": "tx"}]}, "x.yaml")
    assert parse(cfg.to_yaml_data(), "y.yaml").mirrors == cfg.mirrors == [
        {"name": "m1", "select": ["a"], "output": "b", "select_direction": "tx"}]


def test_a_stopped_reader_costs_captured_frames_not_forwarding(three, tmp_path):
    """The capture client is frozen (SIGSTOP): its socket fills, the ring
    fills, and the switch drops and counts captured frames while every frame
    is still forwarded."""
    import signal

    d, (g0, g1, g2) = three
    proc = start_capture(d, "vm0", "--direction", "rx", "-w", str(tmp_path / "slow.pcap"))
    proc.send_signal(signal.SIGSTOP)
    try:
        total, batch = 8000, 100
        ring = g0.tx_ring(0)
        for _ in range(total // batch):
            for i in range(batch):
                ring.post_tx(frame(BROADCAST, mac(1), b"s" * 200))
            g0.kick(ring.index)
            g0.wait_tx_done(0)
        stats = d.port("vm0")["stats"]
        assert stats["rx_packets"] == total
        assert stats["capture_dropped"] > 0, stats
        sent = {n: d.port(n)["stats"] for n in ("vm1", "vm2")}
        assert all(s["tx_packets"] + s["tx_dropped"] == total for s in sent.values()), sent
        assert "capture_dropped" in d.ctl_raw("show", "vm0").stdout
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.communicate(timeout=DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while "capture ended" not in d.log():
        assert time.monotonic() < deadline, d.log()[-2000:]
        time.sleep(0.05)
