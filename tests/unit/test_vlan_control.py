"""The `vlan` port key: config validation, vswitchctl (add-port flags, `set port NAME vlan`),
`show`, and the MAC table per VLAN (`fdb show`, `fdb flush --vlan`), against a running vswitchd."""

from __future__ import annotations

import struct

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac
from vswitch.config import ConfigError, parse


def null_port(name: str, **extra) -> dict:
    return {"name": name, "type": "null", **extra}


def problems(ports) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse({"ports": ports}, "x.yaml")
    return exc.value.problems


@pytest.mark.parametrize("vlan, normalised", [
    ({"mode": "access", "tag": 10}, {"mode": "access", "tag": 10}),
    ({"tag": 10}, {"mode": "access", "tag": 10}),
    ({"mode": "trunk", "trunks": [20, 10, 20]}, {"mode": "trunk", "trunks": [10, 20]}),
    ({"mode": "trunk"}, {"mode": "trunk"}),
    ({}, {"mode": "trunk"}),
    ({"mode": "trunk", "trunks": "10,20-22"}, {"mode": "trunk", "trunks": [10, 20, 21, 22]}),
    ({"mode": "native-untagged", "tag": 10, "trunks": [20]}, {"mode": "native-untagged", "tag": 10, "trunks": [20]}),
    ({"mode": "native-tagged", "tag": 5}, {"mode": "native-tagged", "tag": 5}),
])
def test_vlan_settings_are_valid_for_every_port_type(tmp_path, vlan, normalised):
    cfg = parse({"ports": [null_port("n", vlan=vlan),
                           {"name": "v", "type": "vhost-user", "path": str(tmp_path / "v.sock"), "vlan": vlan},
                           {"name": "t", "type": "tap", "vlan": vlan}]})
    assert [p["vlan"] for p in cfg.ports] == [normalised] * 3
    assert "vlan" not in parse({"ports": [null_port("n")]}).ports[0]


@pytest.mark.parametrize("vlan, problem", [
    ({"mode": "access", "tag": 4095}, "tag 4095 must be a VLAN ID from 1 to 4094"),
    ({"mode": "access", "tag": 0}, "tag 0 must be a VLAN ID from 1 to 4094"),
    ({"mode": "access"}, "mode access needs a tag"),
    ({"mode": "native-untagged", "trunks": [10]}, "mode native-untagged needs a tag"),
    ({"mode": "hybrid", "tag": 10}, "mode 'hybrid' must be one of access, trunk, native-untagged, native-tagged"),
    ({"mode": "trunk", "trunks": [10, 5000]}, "trunks: VLAN 5000 must be a VLAN ID from 1 to 4094"),
    ({"mode": "trunk", "trunks": []}, "trunks [] must be a list of VLAN IDs"),
    ({"mode": "trunk", "tag": 10}, "a trunk port takes no tag"),
    ({"mode": "access", "tag": 10, "trunks": [20]}, "an access port takes no trunks"),
    ({"mode": "access", "tag": "ten"}, "tag 'ten' must be a VLAN ID"),
    ({"mode": "access", "tag": True}, "tag True must be a VLAN ID"),
    ({"mode": "access", "tag": 10, "colour": 1}, "unknown key 'colour'"),
    (10, "10 must be a mapping"),
])
def test_bad_vlan_settings_are_one_clear_line(vlan, problem):
    [line] = problems([null_port("n", vlan=vlan)])
    assert line.startswith("x.yaml: ports[0] (n).vlan: ") and problem in line, line


def tagged(dst: bytes, src: bytes, vid: int, payload: bytes = b"x" * 50) -> bytes:
    return dst + src + struct.pack("!HH", 0x8100, vid) + b"\x08\x00" + payload


@pytest.fixture
def switch(tmp_path):
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(3)]
    ports[0]["vlan"] = {"mode": "access", "tag": 10}
    ports[1]["vlan"] = {"mode": "trunk", "trunks": [10, 20]}
    with Vswitchd(tmp_path, ports=ports) as d:
        guests = d.connect_guests(["vm0", "vm1", "vm2"], rx_buffers=64)
        yield d, guests
        for g in guests:
            g.close()


def test_vlans_through_the_daemon_and_vswitchctl(switch):
    d, (vm0, vm1, vm2) = switch
    vm0.send_frame(0, frame(BROADCAST, mac(1)))
    assert [f.data for f in vm1.receive(0, 1, timeout=2)] == [tagged(BROADCAST, mac(1), 10)]
    assert vm2.receive(0, 1, timeout=0.2) == []   # no vlan: VLAN 0 only

    # A tagged frame on an access port: dropped and counted, shown by `show`.
    vm0.send_frame(0, tagged(BROADCAST, mac(1), 10))
    assert vm1.receive(0, 1, timeout=0.3) == []
    port = d.port("vm0")
    assert port["vlan"] == {"mode": "access", "tag": 10} and port["stats"]["vlan_dropped"] == 1
    text = d.ctl_raw("show").stdout
    assert text.splitlines()[0].split()[:6] == ["PORT", "TYPE", "MODE", "LINK", "QUEUES", "VLAN"]
    assert "access:10" in text and "trunk:10,20" in text
    assert "port vm0: vlan_dropped 1" in text

    # fdb show has the VLAN; the same MAC in VLAN 20 is a second entry.
    vm1.send_frame(0, tagged(BROADCAST, mac(1), 20))
    rows = {(e["mac"], e["vlan"], e["port"]) for e in d.ctl("fdb", "show")["entries"]}
    assert rows == {("02:00:00:00:00:01", 10, "vm0"), ("02:00:00:00:00:01", 20, "vm1")}
    assert {e["vlan"] for e in d.ctl("fdb", "show", "--vlan", "20")["entries"]} == {20}
    assert d.ctl("fdb", "flush", "--vlan", "20") == {"flushed": 1}
    assert [(e["vlan"], e["port"]) for e in d.ctl("fdb", "show")["entries"]] == [(10, "vm0")]

    # At run time: vm0 moves to VLAN 20; its VLAN-10 entries go.
    out = d.ctl_raw("set", "port", "vm0", "vlan", "--vlan-mode", "access", "--tag", "20")
    assert out.returncode == 0, out.stderr
    assert d.ctl("fdb", "show")["entries"] == []
    vm1.receive(0, 8, timeout=0.2)
    vm0.send_frame(0, frame(BROADCAST, mac(1)))
    assert [f.data for f in vm1.receive(0, 1, timeout=2)] == [tagged(BROADCAST, mac(1), 20)]
    assert d.ctl("config", "dump")["config"]["ports"][0]["vlan"] == {"mode": "access", "tag": 20}

    # And back to no settings at all: VLAN 0, like vm2.
    assert d.ctl_raw("set", "port", "vm0", "vlan", "none").returncode == 0
    vm0.send_frame(0, frame(BROADCAST, mac(3)))
    assert [f.data for f in vm2.receive(0, 1, timeout=2)] == [frame(BROADCAST, mac(3))]
    assert "vlan" not in d.ctl("config", "dump")["config"]["ports"][0]


def test_bad_vlan_requests_are_one_line_and_change_nothing(switch, tmp_path):
    d, _ = switch
    for args, error in [
        (("set", "port", "vm0", "vlan", "--vlan-mode", "access", "--tag", "4095"),
         "port 'vm0': vlan: tag 4095 must be a VLAN ID from 1 to 4094"),
        (("set", "port", "vm0", "vlan", "--vlan-mode", "access"), "port 'vm0': vlan: mode access needs a tag"),
        (("set", "port", "vm0", "vlan", "--vlan-mode", "bogus", "--tag", "3"),
         "port 'vm0': vlan: mode 'bogus' must be one of access, trunk, native-untagged, native-tagged"),
        (("set", "port", "ghost", "vlan", "--tag", "3"), "no port named 'ghost'"),
        (("add-port", "vm9", "--type", "vhost-user", "--path", str(tmp_path / "vm9.sock"), "--vlan-mode", "trunk",
          "--trunks", "10,9999"), "port 'vm9': vlan: trunks: VLAN 9999 must be a VLAN ID from 1 to 4094"),
        (("add-port", "vm9", "--type", "vhost-user", "--path", str(tmp_path / "vm9.sock"), "--tag", "0"),
         "port 'vm9': vlan: tag 0 must be a VLAN ID from 1 to 4094"),
        (("fdb", "flush", "--vlan", "5000"), "fdb/flush: vlan 5000 must be a VLAN ID from 0 to 4094"),
    ]:
        out = d.ctl_raw(*args)
        assert out.returncode != 0 and out.stderr.count("\n") == 1, out
        assert error in out.stderr, out.stderr
    assert d.port("vm0")["vlan"] == {"mode": "access", "tag": 10}
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["vm0", "vm1", "vm2"]


def test_add_port_with_vlan_flags(switch, tmp_path):
    d, _ = switch
    out = d.ctl_raw("add-port", "vm3", "--type", "vhost-user", "--path", str(tmp_path / "vm3.sock"),
                    "--vlan-mode", "native-untagged", "--tag", "10", "--trunks", "20,30-31")
    assert out.returncode == 0, out.stderr
    assert d.port("vm3")["vlan"] == {"mode": "native-untagged", "tag": 10, "trunks": [20, 30, 31]}
    assert d.ctl("call", "port/set-vlan", "name=vm3", 'vlan={"mode": "trunk"}')["vlan"] == {"mode": "trunk"}
    assert "--vlan-mode" in d.ctl_raw("add-port", "--help").stdout


def test_static_entries_per_vlan(switch, tmp_path):
    d, (vm0, vm1, vm2) = switch
    assert d.ctl("fdb", "add", "02:00:00:00:00:09", "vm0", "--vlan", "10") == \
        {"mac": "02:00:00:00:00:09", "port": "vm0", "vlan": 10, "static": True}
    d.ctl("fdb", "add", "02:00:00:00:00:09", "vm1", "--vlan", "20")
    d.ctl("fdb", "add", "02:00:00:00:00:09", "vm2")
    rows = {(e["vlan"], e["port"]) for e in d.ctl("fdb", "show")["entries"] if e["static"]}
    assert rows == {(10, "vm0"), (20, "vm1"), (0, "vm2")}
    # Unicast in VLAN 20 goes to vm1 alone, by the static entry.
    vm1.send_frame(0, tagged(mac(9), mac(4), 20))
    assert vm0.receive(0, 1, timeout=0.3) == [] and vm2.receive(0, 1, timeout=0.3) == []
    static = d.ctl("config", "dump")["config"]["fdb"]["static"]
    assert {"mac": "02:00:00:00:00:09", "port": "vm0", "vlan": 10} in static
    assert {"mac": "02:00:00:00:00:09", "port": "vm2"} in static
    assert d.ctl("fdb", "del", "02:00:00:00:00:09", "--vlan", "10") == {"removed": "02:00:00:00:00:09", "vlan": 10}
    rows = {(e["vlan"], e["port"]) for e in d.ctl("fdb", "show")["entries"] if e["static"]}
    assert rows == {(20, "vm1"), (0, "vm2")}
    out = d.ctl_raw("fdb", "add", "02:00:00:00:00:09", "vm0", "--vlan", "4095")
    assert out.returncode == 1 and out.stderr == "vswitchctl: fdb/add: vlan 4095 must be a VLAN ID from 0 to 4094\n"


def test_static_entries_with_a_vlan_in_the_config(tmp_path):
    cfg = parse({"ports": [null_port("n")], "fdb": {"static": [
        {"mac": "02:00:00:00:00:01", "port": "n", "vlan": 10}, {"mac": "02:00:00:00:00:01", "port": "n"}]}})
    assert cfg.fdb_static == [{"mac": "02:00:00:00:00:01", "port": "n", "vlan": 10},
                              {"mac": "02:00:00:00:00:01", "port": "n"}]
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [null_port("n")], "fdb": {"static": [{"mac": "02:00:00:00:00:01", "port": "n", "vlan": 5000}]}},
              "x.yaml")
    assert exc.value.problems == ["x.yaml: fdb.static[0].vlan: 5000 must be a VLAN ID from 0 to 4094"]
