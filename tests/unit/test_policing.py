"""The `policing` port key: config validation, vswitchctl (add-port flags,
`set port NAME policing`), `show`, and the running config.  That the rate
holds is tests/system/test_policing.py; the bucket itself is
tests/unit/test_port_ops.py::test_policing_passes_a_full_bucket_then_drops_and_counts."""

from __future__ import annotations

import pytest

from tests.support.daemon import Vswitchd
from vswitch.config import ConfigError, parse


def null_port(name: str, **extra) -> dict:
    return {"name": name, "type": "null", **extra}


@pytest.mark.parametrize("policing, normalised", [
    ({"pps": 100000}, {"pps": 100000, "burst_packets": 10000}),
    ({"pps": "1k"}, {"pps": 1000, "burst_packets": 100}),
    ({"pps": 10}, {"pps": 10, "burst_packets": 32}),
    ({"bps": "1G"}, {"bps": 10 ** 9, "burst_bytes": 12_500_000}),
    ({"bps": "100k"}, {"bps": 100_000, "burst_bytes": 65536}),
    ({"pps": "2.5M", "bps": "10G", "burst_packets": 64, "burst_bytes": "1M"},
     {"pps": 2_500_000, "burst_packets": 64, "bps": 10 ** 10, "burst_bytes": 10 ** 6}),
])
def test_policing_settings_are_valid_for_every_port_type(tmp_path, policing, normalised):
    cfg = parse({"ports": [null_port("n", policing=policing),
                           {"name": "v", "type": "vhost-user", "path": str(tmp_path / "v.sock"),
                            "policing": policing},
                           {"name": "t", "type": "tap", "policing": policing}]})
    assert [p["policing"] for p in cfg.ports] == [normalised] * 3


@pytest.mark.parametrize("policing, problem", [
    ({}, "give a rate: pps, bps or both"),
    ({"pps": 0}, "pps must be a number from 1 to 1000000000"),
    ({"pps": -5}, "pps must be a number from 1"),
    ({"pps": "fast"}, "pps must be a number"),
    ({"pps": True}, "pps must be a number"),
    ({"bps": "5T"}, "bps must be a number from 8"),
    ({"burst_packets": 10}, "give a rate"),
    ({"bps": "1M", "burst_packets": 10}, "burst_packets needs pps"),
    ({"pps": "1M", "burst_bytes": 10000}, "burst_bytes needs bps"),
    ({"pps": 10, "burst": 5}, "unknown key 'burst'"),
    ("10M", "'10M' must be a mapping"),
])
def test_bad_policing_settings_are_one_clear_line(policing, problem):
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [null_port("n", policing=policing)]}, "x.yaml")
    [line] = exc.value.problems
    assert line.startswith("x.yaml: ports[0] (n).policing: ") and problem in line, line


@pytest.fixture
def switch(tmp_path):
    with Vswitchd(tmp_path, ports=[null_port("n0"), null_port("n1", policing={"pps": "1k"})]) as d:
        yield d


def test_set_port_policing_at_run_time(switch):
    d = switch
    assert d.port("n1")["policing"] == {"pps": 1000, "burst_packets": 100}
    assert "policing 1kpps" in d.ctl_raw("show").stdout
    out = d.ctl_raw("set", "port", "n0", "policing", "--bps", "100M", "--burst-bytes", "1M")
    assert out.returncode == 0, out.stderr
    assert d.port("n0")["policing"] == {"bps": 10 ** 8, "burst_bytes": 10 ** 6}
    assert "policing 100Mbps" in d.ctl_raw("show", "n0").stdout
    # The running config keeps it, as `config dump` shows.
    assert "burst_bytes: 1000000" in d.ctl_raw("config", "dump").stdout
    assert d.ctl_raw("set", "port", "n1", "policing", "none").returncode == 0
    assert d.port("n1")["policing"] is None
    assert "port 'n0': policing 100Mbps" in d.log()


def test_add_port_with_policing_flags(switch, tmp_path):
    d = switch
    out = d.ctl_raw("add-port", "vm3", "--type", "vhost-user", "--path", str(tmp_path / "vm3.sock"),
                    "--pps", "50k", "--bps", "1G")
    assert out.returncode == 0, out.stderr
    assert d.port("vm3")["policing"] == {"pps": 50000, "burst_packets": 5000, "bps": 10 ** 9,
                                         "burst_bytes": 12_500_000}
    assert "--burst-packets" in d.ctl_raw("add-port", "--help").stdout


def test_bad_policing_requests_are_one_line_and_change_nothing(switch, tmp_path):
    d = switch
    for args, error in [
        (("set", "port", "n1", "policing", "--pps", "0"), "port 'n1': policing: pps must be a number from 1"),
        (("set", "port", "n1", "policing", "--pps", "lots"), "port 'n1': policing: pps must be a number"),
        (("set", "port", "n1", "policing"), "set port NAME policing: give --pps, --bps"),
        (("set", "port", "n1", "policing", "none", "--pps", "5"), "set port NAME policing: 'none' takes no --pps"),
        (("set", "port", "n1", "policing", "--tag", "5"), "set port NAME policing: takes only --pps"),
        (("set", "port", "n1", "vlan", "--pps", "5"), "set port NAME vlan: takes only --vlan-mode"),
        (("set", "port", "ghost", "policing", "--pps", "5"), "no port named 'ghost'"),
        (("add-port", "vm9", "--type", "null", "--burst-bytes", "5000"), "port 'vm9': policing: give a rate"),
    ]:
        out = d.ctl_raw(*args)
        assert out.returncode != 0 and out.stderr.count("\n") == 1, out
        assert error in out.stderr, out.stderr
    assert d.port("n1")["policing"] == {"pps": 1000, "burst_packets": 100}
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["n0", "n1"]
