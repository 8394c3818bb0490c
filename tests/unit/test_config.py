"""Config validation: every problem reported, one line each, with file and key."""

import pytest
import yaml

from vswitch.config import ConfigError, load, parse


def test_default_config_is_valid(tmp_path):
    # The default's socket directory (/run/vswitch) need not exist here; point it at tmp_path.
    data = yaml.safe_load(open("configs/default.yaml"))
    for p in data["ports"]:
        p["path"] = str(tmp_path / (p["name"] + ".sock"))
    cfg = parse(data, "default.yaml")
    assert [p["name"] for p in cfg.ports] == ["vm1", "vm2"]
    assert cfg.fdb_aging_seconds == 300 and cfg.fdb_max_entries == 8192


def test_defaults_are_filled_in(tmp_path):
    cfg = parse({"ports": [{"name": "a", "type": "vhost-user", "path": str(tmp_path / "a.sock")}]})
    assert cfg.ports[0]["mode"] == "server" and cfg.ports[0]["queues"] == 1


def problems(data, tmp_path=None):
    with pytest.raises(ConfigError) as exc:
        parse(data, "x.yaml")
    return exc.value.problems


def test_every_problem_is_reported(tmp_path):
    sock = str(tmp_path / "a.sock")
    found = problems({
        "fdb": {"aging_seconds": -1, "max_entries": "many"},
        "colour": "blue",
        "ports": [
            {"name": "1bad", "type": "vhost-user", "path": sock},
            {"name": "b", "type": "warp-drive"},
            {"name": "c", "type": "vhost-user", "path": "/no/such/dir/c.sock"},
            {"name": "d", "type": "vhost-user", "path": sock, "mode": "both", "queues": 99},
        ],
    })
    text = "\n".join(found)
    assert "x.yaml: unknown key 'colour'" in text
    assert "fdb.aging_seconds" in text and "fdb.max_entries" in text
    assert "'1bad' is not a port name" in text
    assert "'warp-drive' is not a port type" in text
    assert "directory /no/such/dir does not exist" in text
    assert "mode: 'both'" in text and "queues: 99" in text
    assert all(line.startswith("x.yaml") for line in found)


def test_duplicates_are_refused(tmp_path):
    a = str(tmp_path / "a.sock")
    found = problems({"ports": [
        {"name": "vm1", "type": "vhost-user", "path": a},
        {"name": "vm1", "type": "vhost-user", "path": str(tmp_path / "b.sock")},
        {"name": "vm2", "type": "vhost-user", "path": a},
    ]})
    assert any("port name 'vm1' is already used" in p for p in found)
    assert any(f"path {a} is already used by port 'vm1'" in p for p in found)


def test_broken_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ports:\n  - {name: vm1, type: vhost-user\n")
    with pytest.raises(ConfigError) as exc:
        load(str(f))
    [line] = exc.value.problems
    assert line.startswith(f"{f}: line ") and "not valid YAML" in line


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path / "nope.yaml"))
    assert "cannot read" in str(exc.value)


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in problems(["a"])[0]


def test_pmd_sleep_is_a_boolean_and_pmd_keys_are_checked(tmp_path):
    assert parse({}).pmd_sleep is True
    cfg = parse({"pmd": {"sleep": False}})
    assert cfg.pmd_sleep is False and cfg.to_yaml_data()["pmd"] == {"sleep": False}
    assert parse(cfg.to_yaml_data()).pmd_sleep is False
    found = "\n".join(problems({"pmd": {"sleep": "no", "spin": 1}}))
    assert "x.yaml: pmd.sleep: 'no' must be true or false" in found
    assert "x.yaml: pmd: unknown key 'spin'" in found
    assert "pmd: must be a mapping" in "\n".join(problems({"pmd": [1]}))
    assert parse({}).pmd_yield is False
    cfg = parse({"pmd": {"yield": True}})
    assert cfg.pmd_yield is True and parse(cfg.to_yaml_data()).pmd_yield is True
    assert "x.yaml: pmd.yield: 1 must be true or false" in "\n".join(problems({"pmd": {"yield": 1}}))


def test_a_section_that_is_not_a_mapping_names_every_key_it_takes():
    assert "x.yaml: fdb: must be a mapping (aging_seconds, max_entries, static)" in problems({"fdb": [1]})
    assert "x.yaml: pmd: must be a mapping (cpus, sleep, yield, cpu_resume_latency_us)" in problems({"pmd": 3})
