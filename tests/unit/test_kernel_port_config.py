"""Config validation of TAP and AF_PACKET ports, and the example configs that use them."""

from __future__ import annotations

import pathlib

import pytest

from vswitch.config import ConfigError, load, parse, validate_port

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["host-to-vm.yaml", "vm-to-veth.yaml"])
def test_example_configs_load(name):
    cfg = load(str(REPO / "configs" / name))
    kinds = {p["type"] for p in cfg.ports}
    assert "vhost-user" in kinds and kinds & {"tap", "af-packet"}


def test_tap_defaults_its_interface_name_to_the_port_name():
    problems = []
    assert validate_port({"name": "host", "type": "tap"}, None, problems) == \
        {"name": "host", "type": "tap", "ifname": "host", "queues": 1, "mtu": 1500}
    assert problems == []


@pytest.mark.parametrize("spec,message", [
    ({"name": "p", "type": "af-packet"}, "port 'p': ifname: required"),
    ({"name": "p", "type": "af-packet", "ifname": "x" * 16}, "port 'p': ifname: 'xxxxxxxxxxxxxxxx' is not an interface name"),
    ({"name": "p", "type": "tap", "ifname": "a/b"}, "port 'p': ifname: 'a/b' is not an interface name"),
    ({"name": "p", "type": "tap", "netns": "no-such-ns-for-vswitch"}, "port 'p': netns: no network namespace named"),
    ({"name": "p", "type": "tap", "queues": 17}, "port 'p': queues: 17 must be"),
    ({"name": "p", "type": "af-packet", "ifname": "veth0", "queues": 2}, "port 'p': unknown key 'queues' for a af-packet port"),
    ({"name": "p", "type": "tap", "path": "/tmp/x"}, "port 'p': unknown key 'path' for a tap port"),
])
def test_bad_kernel_port_specs_are_one_line_each(spec, message):
    problems = []
    assert validate_port(spec, None, problems) is None
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_two_ports_on_one_interface_are_refused_in_a_file():
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [{"name": "a", "type": "af-packet", "ifname": "veth0"},
                         {"name": "b", "type": "af-packet", "ifname": "veth0"}]}, "x.yaml")
    assert exc.value.problems == ["x.yaml: ports[1] (b): interface veth0 is already attached by port 'a'"]


def test_netns_takes_a_path_as_cni_gives_it():
    # A CNI runtime names a pod's namespace by a file (/proc/PID/ns/net, /var/run/netns/X), not an `ip netns` name.
    problems = []
    port = validate_port({"name": "p", "type": "tap", "ifname": "eth0", "netns": "/proc/self/ns/net"}, None, problems)
    assert problems == [] and port["netns"] == "/proc/self/ns/net"


@pytest.mark.parametrize("path,message", [
    ("/no/such/netns/file", "no network namespace file /no/such/netns/file"),
    ("/proc/self/ns/../ns/net", "must be a normalized absolute path"),
    ("/etc/hostname", "/etc/hostname is not a network namespace"),
])
def test_netns_paths_that_are_not_namespaces_are_refused(path, message):
    problems = []
    assert validate_port({"name": "p", "type": "tap", "netns": path}, None, problems) is None
    assert len(problems) == 1 and message in problems[0], problems
