"""The port type registry: one declaration per type, and everything derived from it.

The proof that a port type is a plug-in: tests/support/dummy_port.py, a
type that exists in that file only, shows up in config validation, the
control command's arguments, list-commands, `vswitchctl add-port` and its
--help, and works through the control socket.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import textwrap

import pytest

from tests.support.daemon import Vswitchd
from vswitch.config import ConfigError, parse, validate_port
from vswitch.ports import registry

DUMMY = "tests.support.dummy_port"


@pytest.fixture
def dummy():
    """The dummy type registered in this process for one test, and forgotten after it."""
    module = importlib.import_module(DUMMY)
    registry.register(module.DummyPort)
    yield module
    registry.unregister("dummy")
    sys.modules.pop(DUMMY, None)


def problems_of(spec: dict) -> list[str]:
    problems: list[str] = []
    assert validate_port(spec, None, problems) is None
    return problems


def add_port_help() -> str:
    from vswitch.control.cli import build_parser
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["add-port", "--help"])
    return out.getvalue()


def test_the_builtin_types_are_registered():
    assert {"vhost-user", "tap", "af-packet"} <= set(registry.names())


def test_the_null_port_is_registered():
    assert "null" in registry.names()


def test_every_key_is_a_port_add_argument_and_an_add_port_flag():
    from vswitch.control.cli import build_parser
    from vswitch.control.commands import registry as commands
    port_add = commands.get("port/add")
    helped = add_port_help()
    for t in registry.port_types():
        for key in t.keys:
            assert f"[{key.name}=<{key.shown_type}>]" in port_add.usage, (t.name, key.name)
            assert key.flag in helped, key.flag
        assert f"vswitchctl add-port NAME --type {t.name} {t.synopsis}".rstrip() in helped
        assert t.name in port_add.help
    assert "[max_memory=<size>]" in port_add.usage
    # --type's choices are the registry's.
    parser = build_parser()
    for name in registry.names():
        parser.parse_args(["add-port", "p", "--type", name])
    with pytest.raises(SystemExit):
        parser.parse_args(["add-port", "p", "--type", "warp"])


def test_dummy_type_validates_with_one_line_errors(dummy):
    assert validate_port({"name": "d", "type": "dummy", "label": "lab"}, None, []) == \
        {"name": "d", "type": "dummy", "label": "lab", "burst": 32, "verbose": False}
    assert problems_of({"name": "d", "type": "dummy"}) == \
        ["port 'd': label: required: what the port is for, 1 to 8 lower-case letters"]
    assert problems_of({"name": "d", "type": "dummy", "label": "Lab"}) == \
        ["port 'd': label: 'Lab' is not a label (1 to 8 lower-case letters)"]
    assert problems_of({"name": "d", "type": "dummy", "label": "lab", "burst": 65}) == \
        ["port 'd': burst: 65 must be a whole number from 1 to 64"]
    assert problems_of({"name": "d", "type": "dummy", "label": "lab", "verbose": "yes"}) == \
        ["port 'd': verbose: 'yes' must be true or false"]
    assert problems_of({"name": "d", "type": "dummy", "label": "lab", "path": "/x"}) == \
        ["port 'd': unknown key 'path' for a dummy port"]
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [{"name": "d", "type": "dummy", "burst": True}]}, "x.yaml")
    assert exc.value.problems == ["x.yaml: ports[0] (d).label: required: what the port is for, 1 to 8 lower-case letters",
                                  "x.yaml: ports[0] (d).burst: True must be a whole number from 1 to 64"]


def test_dummy_type_is_in_port_add_list_commands_and_vswitchctl(dummy):
    from vswitch.control.cli import add_port_request, build_parser
    from vswitch.control.commands import registry as commands
    port_add = commands.get("port/add")
    assert "[label=<str>]" in port_add.usage and "[burst=<int>]" in port_add.usage
    assert "dummy (label, burst, verbose)" in port_add.help
    assert any(c["command"] == "port/add" and "label=<str>" in c["usage"] for c in commands.describe())
    args = build_parser().parse_args(["add-port", "d", "--type", "dummy", "--label", "lab", "--burst", "8",
                                      "--verbose"])
    assert add_port_request(args) == ("port/add", {"name": "d", "type": "dummy", "label": "lab", "burst": 8,
                                                   "verbose": True})
    text = add_port_help()
    assert "--type {" in text and "dummy" in text.split("--type {")[1].split("}")[0]
    assert "vswitchctl add-port NAME --type dummy --label LABEL [--burst N] [--verbose]" in text
    assert "dummy: frames per burst" in text
    # Forgotten again, it is gone from everything derived.
    registry.unregister("dummy")
    assert "dummy" not in port_add.help and "label" not in {a.name for a in port_add.args}
    assert problems_of({"name": "d", "type": "dummy"})[0].startswith("port 'd': type: 'dummy' is not a port type")


def test_a_module_in_the_package_is_found_by_the_scan(tmp_path, monkeypatch):
    """Adding a type is adding its module: the package scan imports it, nothing lists it."""
    package = importlib.import_module("vswitch.ports")
    (tmp_path / "scanned_example.py").write_text(textwrap.dedent("""
        from vswitch.ports.base import Port
        from vswitch.ports.registry import Key, register

        @register
        class ScannedPort(Port):
            type = "scanned"
            keys = (Key("colour", str, "any colour"),)
    """))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "scanned" in registry.names()
        assert validate_port({"name": "s", "type": "scanned", "colour": "red"}, None, []) == \
            {"name": "s", "type": "scanned", "colour": "red"}
    finally:
        registry.unregister("scanned")
        sys.modules.pop("vswitch.ports.scanned_example", None)


def test_a_key_name_has_one_value_type_across_types():
    from vswitch.ports.base import Port

    class Clash(Port):
        type = "clash"
        keys = (registry.Key("queues", str, "not a number here"),)
    assert "tap" in registry.names()
    with pytest.raises(ValueError, match="key 'queues' is a str here but a int"):
        registry.register(Clash)
    assert "clash" not in registry.names()


def test_dummy_port_through_the_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.PLUGIN_ENV, DUMMY)   # the daemon and each vswitchctl load it
    with Vswitchd(tmp_path, ports=[{"name": "d1", "type": "dummy", "label": "one"}]) as d:
        assert d.port("d1")["type"] == "dummy" and d.port("d1")["label"] == "one"
        listed = d.ctl_raw("list-commands", check=True).stdout
        assert "label=<str>" in listed and "dummy (label, burst, verbose)" in listed
        helped = d.ctl_raw("add-port", "--help", check=True).stdout
        assert "dummy" in helped and "--label LABEL" in helped
        assert d.ctl_raw("--help", check=True).stdout.count("dummy") == 1

        out = d.ctl_raw("add-port", "d2", "--type", "dummy", "--label", "two", "--burst", "4")
        assert out.returncode == 0 and out.stdout == "added port d2 (dummy)\n", out.stderr
        assert d.port("d2")["burst"] == 4
        out = d.ctl_raw("add-port", "d3", "--type", "dummy", "--label", "three", "--burst", "99")
        assert out.returncode == 1 and out.stderr == "vswitchctl: port 'd3': burst: 99 must be a whole number from 1 to 64\n"
        out = d.ctl_raw("add-port", "d3", "--type", "dummy")
        assert out.returncode == 1 and "port 'd3': label: required" in out.stderr
        types = {t["type"]: t for t in d.ctl("call", "port/types")["types"]}
        assert [k["key"] for k in types["dummy"]["keys"]] == ["label", "burst", "verbose"]
        assert d.ctl("del-port", "d2") == {"removed": "d2"}
        assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["d1"]


def test_bad_dummy_port_in_the_config_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.PLUGIN_ENV, DUMMY)
    d = Vswitchd(tmp_path, ports=[{"name": "d1", "type": "dummy", "label": "UPPER"}])
    with pytest.raises(RuntimeError, match=r"ports\[0\] \(d1\)\.label: 'UPPER' is not a label"):
        d.start()


def test_null_port_through_the_daemon(tmp_path):
    with Vswitchd(tmp_path, ports=[{"name": "n1", "type": "null"}]) as d:
        info = d.port("n1")
        assert (info["type"], info["mode"], info["link"], info["queues"], info["offloads"]) == \
            ("null", "null", "up", 1, True)
        out = d.ctl_raw("add-port", "n2", "--type", "null", "--queues", "2", "--no-offloads")
        assert out.returncode == 0 and out.stdout == "added port n2 (null)\n", out.stderr
        assert (d.port("n2")["queues"], d.port("n2")["offloads"]) == (2, False)
        out = d.ctl_raw("add-port", "n3", "--type", "null", "--queues", "17")
        assert out.returncode == 1 and out.stderr == "vswitchctl: port 'n3': queues: 17 must be a whole number from 1 to 16\n"
        assert d.ctl("del-port", "n2") == {"removed": "n2"}
        assert d.ctl("stats", "n1")["ports"][0]["tx_packets"] == 0
