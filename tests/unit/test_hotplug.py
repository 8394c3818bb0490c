"""Run-time port management through vswitchctl: add, remove, events, persistence, leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.support.frames import frame, mac, wait_for
from tests.support.daemon import REPO, Vswitchd
from tests.support.frontend import VhostUserFrontend
from vswitch.config import load


@pytest.fixture
def daemon(tmp_path):
    with Vswitchd(tmp_path, ports=[]) as d:
        yield d


def sock(d: Vswitchd, name: str) -> str:
    return str(d.dir / f"{name}.sock")


def add(d: Vswitchd, name: str, *extra: str) -> subprocess.CompletedProcess:
    return d.ctl_raw("add-port", name, "--type", "vhost-user", "--path", sock(d, name), *extra)


def names(d: Vswitchd) -> list[str]:
    return [p["name"] for p in d.ctl("list-ports")["ports"]]


# --- Commands -------------------------------------------------------------------------

def test_add_and_delete_ports_human_and_json(daemon):
    d = daemon
    out = add(d, "vm1")
    assert out.returncode == 0 and out.stdout == "added port vm1 (vhost-user)\n"
    info = d.ctl("add-port", "vm2", "--type", "vhost-user", "--path", sock(d, "vm2"), "--mode", "server",
                 "--queues", "2")
    assert (info["name"], info["queues"], info["link"]) == ("vm2", 2, "down")
    assert os.path.exists(sock(d, "vm1")) and os.path.exists(sock(d, "vm2"))
    assert names(d) == ["vm1", "vm2"]
    assert "vm1" in d.ctl_raw("list-ports").stdout
    out = d.ctl_raw("del-port", "vm1")
    assert out.returncode == 0 and out.stdout == "removed port vm1\n"
    assert d.ctl("del-port", "vm2") == {"removed": "vm2"}
    assert names(d) == [] and not os.path.exists(sock(d, "vm1"))


def test_stats_and_watch(daemon):
    d = daemon
    add(d, "vm1")
    out = d.ctl_raw("stats")
    assert out.returncode == 0 and out.stdout.split()[0:3] == ["PORT", "RX-PACKETS", "RX-BYTES"]
    assert d.ctl("stats", "vm1")["ports"][0]["rx_packets"] == 0
    watch = subprocess.Popen([sys.executable, "-m", "vswitch.control.cli", "--socket", d.control_socket,
                              "stats", "--watch", "0.3"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(1.5)
    watch.send_signal(signal.SIGINT)
    text, _ = watch.communicate(timeout=5)
    assert watch.returncode == 130
    assert text.count("PORT") >= 3 and "RX-PPS" in text
    assert d.ctl_raw("stats", "--watch", "0").returncode == 1


def test_fdb_commands(daemon):
    d = daemon
    add(d, "vm1")
    out = d.ctl_raw("fdb", "add", "02:00:00:00:00:aa", "vm1")
    assert out.returncode == 0 and "02:00:00:00:00:aa -> vm1" in out.stdout
    [entry] = d.ctl("fdb", "show")["entries"]
    assert entry == {"mac": "02:00:00:00:00:aa", "vlan": 0, "port": "vm1", "age": entry["age"], "static": True}
    assert "static" in d.ctl_raw("fdb", "show").stdout
    assert d.ctl("fdb", "flush")["flushed"] == 0  # static entries stay
    assert d.ctl("fdb", "del", "02:00:00:00:00:aa") == {"removed": "02:00:00:00:00:aa"}
    out = d.ctl_raw("fdb", "del", "02:00:00:00:00:aa")
    assert out.returncode == 1 and out.stderr == "vswitchctl: no MAC table entry for 02:00:00:00:00:aa\n"
    assert d.ctl_raw("fdb", "add", "not-a-mac", "vm1").stderr.startswith("vswitchctl: 'not-a-mac' is not a MAC")
    assert d.ctl_raw("fdb", "add", "02:00:00:00:00:ab", "ghost").stderr == "vswitchctl: no port named 'ghost'\n"
    assert d.ctl("set", "fdb-aging", "60") == {"aging_seconds": 60}
    assert d.ctl("set", "fdb-max", "100") == {"max_entries": 100}
    stats = d.ctl("fdb", "stats")
    assert stats["aging_seconds"] == 60 and stats["max_entries"] == 100
    assert d.ctl_raw("set", "fdb-max", "0").returncode == 1
    assert d.ctl_raw("set", "fdb-aging", "-5").returncode == 1
    assert "aging_seconds: 60" in d.ctl_raw("fdb", "stats").stdout


def test_config_dump(daemon):
    d = daemon
    add(d, "vm1", "--queues", "2")
    d.ctl("fdb", "add", "02:00:00:00:00:01", "vm1")
    out = d.ctl_raw("config", "dump")
    assert out.returncode == 0
    data = yaml.safe_load(out.stdout)
    assert data["ports"] == [{"name": "vm1", "type": "vhost-user", "path": sock(d, "vm1"), "mode": "server",
                              "queues": 2, "mtu": 1500}]
    assert data["fdb"]["static"] == [{"mac": "02:00:00:00:00:01", "port": "vm1"}]
    assert d.ctl("config", "dump")["config"] == data


def test_version_and_list_commands(daemon):
    assert daemon.ctl_raw("version").stdout.strip() == daemon.ctl("version")["version"]
    listed = {c["command"] for c in daemon.ctl("list-commands")["commands"]}
    assert {"port/add", "port/del", "stats/show", "fdb/add", "fdb/del", "fdb/set-aging", "fdb/set-max",
            "config/dump"} <= listed


# --- Validation ----------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (["vm1", "--type", "vhost-user", "--path", "{dir}/other.sock"], "port 'vm1' already exists"),
    (["vm9", "--type", "vhost-user", "--path", "{dir}/vm1.sock"], "port 'vm9': path {dir}/vm1.sock is already used by port 'vm1'"),
    (["vm9", "--type", "vhost-user", "--path", "/no/such/dir/x.sock"], "port 'vm9': path: directory /no/such/dir does not exist"),
    (["vm9", "--type", "vhost-user", "--path", "{dir}/vm9.sock", "--queues", "0"], "port 'vm9': queues: 0 must be a whole number from 1 to 16"),
    (["vm9", "--type", "vhost-user", "--path", "{dir}/vm9.sock", "--queues", "17"], "port 'vm9': queues: 17 must be"),
    (["9bad", "--type", "vhost-user", "--path", "{dir}/x.sock"], "port name: '9bad' is not a port name"),
    (["a-name-that-is-far-too-long", "--type", "vhost-user", "--path", "{dir}/x.sock"], "port name: 'a-name-that-is-far-too-long' is not a port name"),
    (["vm9", "--type", "vhost-user"], "port 'vm9': path: required: the vhost-user socket's absolute path"),
])
def test_bad_add_port_is_refused_and_creates_nothing(daemon, args, error):
    d = daemon
    add(d, "vm1")
    before = sorted(os.listdir(d.dir))
    args = [a.replace("{dir}", str(d.dir)) for a in args]
    out = d.ctl_raw("add-port", *args)
    assert out.returncode == 1
    assert out.stderr.startswith("vswitchctl: " + error.replace("{dir}", str(d.dir))), out.stderr
    assert out.stderr.count("\n") == 1
    assert names(d) == ["vm1"] and sorted(os.listdir(d.dir)) == before


def test_unknown_type_over_the_socket(daemon):
    from vswitch.control.cli import ControlError, call
    with pytest.raises(ControlError, match="'warp' is not a port type"):
        call(daemon.control_socket, "port/add", {"name": "x", "type": "warp"})


def test_cli_argument_errors(daemon):
    out = daemon.ctl_raw("add-port", "vm1", "--type", "floppy")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = daemon.ctl_raw("add-port", "vm1", "--type", "vhost-user", "--queues", "many")
    assert out.returncode == 2 and "invalid int value" in out.stderr
    assert daemon.ctl_raw("del-port", "ghost").stderr == "vswitchctl: no port named 'ghost'\n"


# --- Events --------------------------------------------------------------------------

class EventStream:
    def __init__(self, d: Vswitchd, json_output: bool = True):
        args = ["--json"] if json_output else []
        self.proc = subprocess.Popen([sys.executable, "-m", "vswitch.control.cli", "--socket", d.control_socket,
                                      *args, "events"], stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: list[str] = []
        time.sleep(0.8)  # let it subscribe

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=5)
        self.lines = out.splitlines()
        return self.lines


def test_events_follow_a_guest(daemon, tmp_path):
    d = daemon
    stream = EventStream(d)
    human = EventStream(d, json_output=False)
    add(d, "vm1")
    fe = VhostUserFrontend(sock(d, "vm1")).connect()
    fe.handshake()
    wait_for(lambda: d.port("vm1")["link"] == "up", what="link up")
    fe.close()
    wait_for(lambda: d.port("vm1")["link"] == "down", what="link down")
    d.ctl("del-port", "vm1")
    time.sleep(0.3)
    events = [json.loads(line) for line in stream.stop()]
    kinds = [(e["event"], e.get("state")) for e in events]
    assert kinds[0] == ("port-added", None)
    assert ("link", "up") in kinds and ("link", "down") in kinds
    assert kinds.index(("link", "up")) < kinds.index(("link", "down"))
    queue_events = [e for e in events if e["event"] == "queue"]
    assert {(e["queue"], e["direction"], e["state"]) for e in queue_events} >= {
        (0, "rx", "enabled"), (0, "tx", "enabled"), (0, "rx", "disabled"), (0, "tx", "disabled")}
    assert kinds[-1] == ("port-removed", None)
    assert all(e["port"] == "vm1" for e in events)
    text = human.stop()
    assert any(" link vm1 state=up" in line for line in text)


# --- Guests come and go without the switch noticing ----------------------------------------

def test_removing_a_port_detaches_its_guest(daemon):
    d = daemon
    add(d, "vm1")
    fe = VhostUserFrontend(sock(d, "vm1")).connect()
    fe.handshake()
    wait_for(lambda: d.port("vm1")["link"] == "up", what="link up")
    d.ctl("del-port", "vm1")
    assert fe.wait_closed(timeout=5)
    fe.close()


def test_hotplug_keeps_other_ports_forwarding(daemon):
    d = daemon
    for name in ("vm1", "vm2"):
        add(d, name)
    g1 = VhostUserFrontend(sock(d, "vm1")).connect()
    g2 = VhostUserFrontend(sock(d, "vm2")).connect()
    for g in (g1, g2):
        g.handshake()
    wait_for(lambda: d.port("vm2")["link"] == "up", what="links up")
    sent = 0
    for cycle in range(10):
        add(d, "vm3")
        g2.post_rx(0, 8)
        for _ in range(5):
            g1.send_frame(0, frame(mac(2), mac(1)))
            sent += 1
        d.ctl("del-port", "vm3")
    got = g2.receive(0, sent, timeout=3)
    assert len(got) == sent
    assert d.port("vm2")["stats"]["tx_dropped"] == 0
    for g in (g1, g2):
        g.close()


# --- Persistence ---------------------------------------------------------------------

def test_persist_survives_a_restart(tmp_path):
    d = Vswitchd(tmp_path, ports=[], extra={"persist": True}).start()
    try:
        d.ctl("add-port", "vm1", "--type", "vhost-user", "--path", str(tmp_path / "vm1.sock"), "--queues", "2")
        d.ctl("add-port", "vm2", "--type", "vhost-user", "--path", str(tmp_path / "vm2.sock"))
        d.ctl("fdb", "add", "02:00:00:00:00:05", "vm2")
        d.ctl("set", "fdb-aging", "77")
        d.ctl("del-port", "vm1")
    finally:
        assert d.stop() == 0
    cfg = load(str(d.config_path))
    assert [p["name"] for p in cfg.ports] == ["vm2"] and cfg.fdb_aging_seconds == 77
    again = Vswitchd(tmp_path, ports=[])
    again.config_path = d.config_path
    again.config = yaml.safe_load(d.config_path.read_text())
    with again.start():
        assert names(again) == ["vm2"]
        assert again.ctl("fdb", "show")["entries"][0]["mac"] == "02:00:00:00:00:05"
        assert again.ctl("fdb", "stats")["aging_seconds"] == 77


def test_persist_flag_on_the_command_line(tmp_path):
    d = Vswitchd(tmp_path, ports=[])
    d.extra_args = ["--persist"]
    d.start()
    try:
        d.ctl("add-port", "vm1", "--type", "vhost-user", "--path", str(tmp_path / "vm1.sock"))
    finally:
        d.stop()
    assert [p["name"] for p in load(str(d.config_path)).ports] == ["vm1"]


def test_without_persist_the_file_is_untouched(tmp_path, daemon):
    before = daemon.config_path.read_text()
    add(daemon, "vm1")
    assert daemon.config_path.read_text() == before


def test_kill_9_during_config_churn_leaves_a_loadable_file(tmp_path):
    d = Vswitchd(tmp_path, ports=[], extra={"persist": True}, log_level="warning").start()
    stop = time.monotonic() + 4
    churn = subprocess.Popen([sys.executable, "-c", f"""
import time
from vswitch.control.cli import call, ControlError
i = 0
while time.monotonic() < {stop} + 10:
    try:
        call({d.control_socket!r}, "port/add", {{"name": f"p{{i % 20}}", "type": "vhost-user",
             "path": {str(tmp_path)!r} + f"/p{{i % 20}}.sock"}})
        if i % 3 == 0:
            call({d.control_socket!r}, "port/del", {{"name": f"p{{(i * 7) % 20}}"}})
    except ControlError:
        pass
    except OSError:
        break
    i += 1
"""], cwd=REPO)
    time.sleep(2.5)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    churn.wait(timeout=15)
    cfg = load(str(d.config_path))  # raises if the file were broken
    assert isinstance(cfg.ports, list)
    d.stop()


# --- Leaks ---------------------------------------------------------------------------

def test_500_add_del_cycles_leak_nothing(daemon):
    """Half the cycles with a front-end connected (memory mapped, eventfds passed)."""
    d = daemon
    proc = psutil.Process(d.proc.pid)
    from vswitch.control.cli import call

    def cycle(i: int) -> None:
        path = sock(d, "hp")
        call(d.control_socket, "port/add", {"name": "hp", "type": "vhost-user", "path": path})
        if i % 2:
            fe = VhostUserFrontend(path).connect()
            fe.handshake()
            wait_for(lambda: call(d.control_socket, "port/show", {"name": "hp"})["ports"][0]["link"] == "up",
                     what="link up")
            call(d.control_socket, "port/del", {"name": "hp"})
            fe.wait_closed(timeout=5)
            fe.close()
        else:
            call(d.control_socket, "port/del", {"name": "hp"})

    for i in range(20):  # warm up: caches, first allocations
        cycle(i)
    fds0, maps0, rss0 = proc.num_fds(), len(proc.memory_maps(grouped=False)), proc.memory_info().rss
    for i in range(500):
        cycle(i)
    time.sleep(0.5)
    fds1, maps1, rss1 = proc.num_fds(), len(proc.memory_maps(grouped=False)), proc.memory_info().rss
    assert fds1 <= fds0, f"open fds grew from {fds0} to {fds1}"
    assert maps1 <= maps0 + 2, f"memory mappings grew from {maps0} to {maps1}"
    assert rss1 - rss0 < 8 << 20, f"RSS grew by {(rss1 - rss0) >> 10} KiB"


# --- Limits ---------------------------------------------------------------------------

def test_forty_ports_of_sixteen_queues(daemon):
    """A dense host: 40 vhost-user ports with 16 queue pairs each are all added and all polled."""
    d = daemon
    for n in range(1, 41):
        out = add(d, f"p{n}", "--queues", "16")
        assert out.returncode == 0, f"port p{n}: {out.stderr.strip()}"
    assert names(d) == [f"p{n}" for n in range(1, 41)]
    polled = sum(len(p["rx_queues"]) for p in d.ctl("pmd/stats")["pmds"])
    assert polled == 40 * 16


def test_the_port_limit_is_refused_before_anything_changes(daemon):
    """Every port number in use (each port polling the most queues a port can have): one more
    port is refused with one clear line, and nothing of it is left behind."""
    from vswitch.control.cli import call
    from vswitch.native import lib

    d = daemon
    for n in range(lib.VS_MAX_PORTS):
        call(d.control_socket, "port/add", {"name": f"n{n}", "type": "null", "queues": 16})
    polled = sum(len(p["rx_queues"]) for p in d.ctl("pmd/stats")["pmds"])
    assert polled == lib.VS_MAX_PORTS * 16
    out = add(d, "one-more")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].endswith(f"no room for another port (at most {lib.VS_MAX_PORTS})")
    assert "one-more" not in names(d) and len(names(d)) == lib.VS_MAX_PORTS
    assert not os.path.exists(sock(d, "one-more"))
    # The switch still works: a port removed makes room for one more.
    d.ctl("del-port", "n0")
    assert add(d, "one-more").returncode == 0


def test_vhost_user_ports_of_sixteen_queues_up_to_the_limit(daemon):
    """The issue's dense host, with the port type it named: vhost-user ports of 16 queue
    pairs are added until every port number is used (256 x 16 polled queues); the next
    one is refused with one clear line, and `list-ports` shows no half-created port."""
    from vswitch.control.cli import call
    from vswitch.native import lib

    d = daemon
    for n in range(1, lib.VS_MAX_PORTS + 1):
        call(d.control_socket, "port/add", {"name": f"p{n}", "type": "vhost-user", "path": sock(d, f"p{n}"),
                                            "queues": 16})
    polled = sum(len(p["rx_queues"]) for p in d.ctl("pmd/stats")["pmds"])
    assert polled == lib.VS_MAX_PORTS * 16
    out = add(d, "p257", "--queues", "16")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.strip().endswith(f"no room for another port (at most {lib.VS_MAX_PORTS})"), out.stderr
    assert names(d) == [f"p{n}" for n in range(1, lib.VS_MAX_PORTS + 1)]
    assert not os.path.exists(sock(d, "p257"))
