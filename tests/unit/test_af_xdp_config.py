"""The af-xdp port type's keys: defaults, one-line refusals, the command
line, and a switch without libxdp (no interface, no root needed: the
refusal comes before anything is attached)."""

from __future__ import annotations

import pytest

from tests.support.daemon import Vswitchd
from vswitch.config import ConfigError, parse, validate_port
from vswitch.ports import registry


def problems_of(spec: dict) -> list[str]:
    problems: list[str] = []
    assert validate_port(spec, None, problems) is None
    return problems


def test_af_xdp_is_registered_with_its_keys_and_defaults():
    t = registry.get("af-xdp")
    assert t is not None
    assert [k.name for k in t.keys] == ["ifname", "netns", "queues", "mode", "zero_copy"]
    assert validate_port({"name": "x", "type": "af-xdp", "ifname": "veth0"}, None, []) == \
        {"name": "x", "type": "af-xdp", "ifname": "veth0", "queues": 1, "mode": "auto", "zero_copy": "auto"}


@pytest.mark.parametrize("extra, problem", [
    ({"ifname": None}, "ifname: required: the interface to attach to (e.g. veth0)"),
    ({"ifname": "a/b"}, "ifname: 'a/b' is not an interface name (1 to 15 letters, digits, '_', '-' or '.')"),
    ({"mode": "fast"}, "mode: 'fast' must be one of 'auto', 'native', 'generic'"),
    ({"mode": "server"}, "mode: 'server' must be one of 'auto', 'native', 'generic'"),
    ({"zero_copy": True}, "zero_copy: True must be one of 'auto', 'on', 'off'"),
    ({"queues": 17}, "queues: 17 must be a whole number from 1 to 16"),
    ({"path": "/x"}, "unknown key 'path' for a af-xdp port"),
])
def test_bad_keys_are_one_line_each(extra, problem):
    spec = {"name": "x", "type": "af-xdp", "ifname": "veth0", **extra}
    spec = {k: v for k, v in spec.items() if v is not None}
    assert problems_of(spec) == [f"port 'x': {problem}"]


def test_mode_choices_stay_per_type():
    """vhost-user and af-xdp both have `mode`, each with its own choices."""
    assert problems_of({"name": "v", "type": "vhost-user", "path": "/tmp/v.sock", "mode": "native"}) == \
        ["port 'v': mode: 'native' must be 'server' or 'client'"]
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [{"name": "x", "type": "af-xdp", "mode": "native"}]}, "x.yaml")
    assert exc.value.problems == ["x.yaml: ports[0] (x).ifname: required: the interface to attach to (e.g. veth0)"]


def test_vswitchctl_add_port_flags():
    from vswitch.control.cli import add_port_request, build_parser
    args = build_parser().parse_args(["add-port", "x", "--type", "af-xdp", "--ifname", "veth0", "--queues", "2",
                                      "--mode", "native", "--zero-copy", "off", "--netns", "ns1"])
    assert add_port_request(args) == ("port/add", {"name": "x", "type": "af-xdp", "ifname": "veth0", "queues": 2,
                                                   "mode": "native", "zero_copy": "off", "netns": "ns1"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["add-port", "x", "--type", "af-xdp", "--ifname", "veth0", "--mode", "fast"])


def test_without_libxdp_only_the_af_xdp_port_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VSWITCH_LIBXDP", "/nonexistent.so")
    monkeypatch.setenv("VSWITCH_AF_XDP_DIR", str(tmp_path / "af-xdp"))
    with Vswitchd(tmp_path, ports=[{"name": "n1", "type": "null"}]) as d:
        r = d.ctl_raw("add-port", "x", "--type", "af-xdp", "--ifname", "lo")
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == [
            "vswitchctl: port 'x': af-xdp ports need libxdp, which cannot be loaded (/nonexistent.so: cannot open "
            "shared object file: No such file or directory); install it with: apt-get install libxdp1"]
        assert [p["name"] for p in d.ctl("show")["ports"]] == ["n1"]
        assert list((tmp_path / "af-xdp").iterdir()) == []


def test_without_a_dispatcher_the_port_says_why(tmp_path, monkeypatch):
    """libxdp chains programs only with a BPF filesystem and kernel BTF: the
    reason the port logs names what is missing and how to mount the first."""
    from vswitch.ports import af_xdp

    monkeypatch.setattr(af_xdp, "BPFFS", str(tmp_path))            # a directory, not a mount
    monkeypatch.setattr(af_xdp, "KERNEL_BTF", str(tmp_path / "none"))
    reason = af_xdp.dispatcher_missing_reason()
    assert f"no BPF filesystem at {tmp_path}: mount -t bpf bpf {tmp_path}" in reason
    assert "the kernel has no BTF" in reason
