"""Reload (SIGHUP, `vswitchctl reload`): the config file's differences are applied, nothing else moves."""

from __future__ import annotations

import signal

import pytest
import yaml

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for


def vhost(tmp_path, name: str, **extra) -> dict:
    return {"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"), **extra}


def rewrite(d: Vswitchd, **changes) -> None:
    config = yaml.safe_load(d.config_path.read_text())
    config.update(changes)
    d.config_path.write_text(yaml.safe_dump(config))


@pytest.fixture
def switch(tmp_path):
    ports = [vhost(tmp_path, "vm0"), vhost(tmp_path, "vm1"), vhost(tmp_path, "old")]
    with Vswitchd(tmp_path, ports=ports) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        yield d, guests
        for fe in guests:
            fe.close()


def forwards(g0, g1, n: int = 1) -> bool:
    for _ in range(n):
        g0.send_frame(0, frame(BROADCAST, mac(1)))
    return len(g1.receive(0, n, timeout=2)) == n


def test_reload_applies_only_the_difference(switch, tmp_path):
    d, (g0, g1) = switch
    assert forwards(g0, g1)
    before = d.port("vm0")["stats"]["rx_packets"]
    ports = [vhost(tmp_path, "vm0"), vhost(tmp_path, "vm1"), {"name": "new", "type": "null"}]
    rewrite(d, ports=ports, fdb={"aging_seconds": 42, "max_entries": 8192,
                                 "static": [{"mac": "02:00:00:00:00:99", "port": "vm1"}]})
    result = d.ctl("reload")
    assert (result["added"], result["removed"], result["changed"], result["unchanged"]) == (["new"], ["old"], [], 2)
    assert result["fdb"] == ["aging_seconds=42", "static 02:00:00:00:00:99 -> vm1"]
    assert result["errors"] == [] and result["restart_needed"] == []
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["vm0", "vm1", "new"]
    # The untouched ports kept their guests, links and counters.
    assert d.port("vm0")["link"] == "up" and d.port("vm0")["stats"]["rx_packets"] == before
    assert forwards(g0, g1, 3)
    assert d.ctl("fdb", "stats")["aging_seconds"] == 42
    assert "reloaded: added new; removed old; 2 port(s) untouched" in d.log()


def test_a_changed_port_is_recreated(switch, tmp_path):
    d, (g0, g1) = switch
    ports = [vhost(tmp_path, "vm0"), vhost(tmp_path, "vm1", queues=2), vhost(tmp_path, "old")]
    rewrite(d, ports=ports)
    out = d.ctl_raw("reload")
    assert out.returncode == 0
    assert out.stdout.strip() == "reloaded: changed vm1; 2 port(s) untouched"
    assert d.port("vm1")["queues"] == 2 and d.port("vm1")["link"] == "down"   # its guest must reconnect
    assert d.port("vm0")["link"] == "up"


def test_vlan_and_policing_change_in_place(switch, tmp_path):
    d, (g0, g1) = switch
    ports = [vhost(tmp_path, "vm0", policing={"pps": "10k"}), vhost(tmp_path, "vm1"),
             vhost(tmp_path, "old", vlan={"mode": "access", "tag": 10})]
    rewrite(d, ports=ports)
    out = d.ctl_raw("reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded: changed vm0, old; 1 port(s) untouched"
    # vm0 kept its guest: the settings were swapped under it.
    assert d.port("vm0")["link"] == "up"
    assert d.port("vm0")["policing"] == {"pps": 10000, "burst_packets": 1000}
    assert d.port("old")["vlan"] == {"mode": "access", "tag": 10}
    assert forwards(g0, g1, 3)


def test_an_invalid_file_changes_nothing(switch, tmp_path):
    d, (g0, g1) = switch
    rewrite(d, ports=[vhost(tmp_path, "vm0"), {"name": "bad", "type": "vhost-user"}], fdb={"aging_seconds": -1})
    out = d.ctl_raw("reload")
    assert out.returncode != 0
    line = out.stderr.strip()
    assert line.startswith("vswitchctl: reload refused, nothing changed: ") and "\n" not in line
    assert "ports[1] (bad).path: required" in line and "fdb.aging_seconds: -1" in line
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["vm0", "vm1", "old"]
    assert forwards(g0, g1)


def test_sighup_reloads(switch, tmp_path):
    d, _ = switch
    rewrite(d, ports=[vhost(tmp_path, "vm0"), vhost(tmp_path, "vm1")], pmd={"cpus": [0]})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded:" in d.log(), what="the reload")
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["vm0", "vm1"]
    assert "not applied until a restart: pmd.cpus" in d.log()
    rewrite(d, ports="not a list")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused, nothing changed" in d.log(), what="the refusal")
    assert d.proc.poll() is None


def test_a_larger_mac_table_than_allocated_waits_for_a_restart(switch):
    """fdb.max_entries within the table allocated at start is applied; above it, reported
    as needing a restart, with the running limit untouched."""
    d, _ = switch
    rewrite(d, fdb={"max_entries": 65536})
    assert d.ctl("reload")["fdb"] == ["max_entries=65536"]
    rewrite(d, fdb={"max_entries": 1_000_000})
    result = d.ctl("reload")
    assert result["fdb"] == [] and result["errors"] == []
    assert result["restart_needed"] == ["fdb.max_entries (above the 65536 allocated at start)"]
    assert d.ctl("fdb", "stats")["max_entries"] == 65536
