"""pmd.cpu_resume_latency_us: the PMD CPUs' PM QoS, set while the switch runs and put back after."""

from __future__ import annotations

import json
import logging
import os
import time

import psutil
import pytest
import yaml

from tests.support.daemon import Vswitchd
from vswitch.config import ConfigError, parse
from vswitch.pmd.cpu_wake import STRICT, CpuResumeLatency, attribute

# --- a CPU tree of files standing in for /sys/devices/system/cpu ---


def fake_cpus(root, values: dict[int, str]) -> str:
    for cpu, value in values.items():
        os.makedirs(os.path.dirname(attribute(cpu, str(root))))
        with open(attribute(cpu, str(root)), "w") as f:
            f.write(value + "\n")
    return str(root)


def read(root, cpu: int) -> str:
    with open(attribute(cpu, root)) as f:
        return f.read().strip()


def test_held_while_running_and_put_back_after(tmp_path):
    root = fake_cpus(tmp_path / "sys", {0: "0", 1: "0", 2: "25"})
    state = str(tmp_path / "state.json")
    held = CpuResumeLatency([1, 2], 0, state, root)
    held.hold()
    assert (read(root, 0), read(root, 1), read(root, 2)) == ("0", STRICT, STRICT)
    assert json.load(open(state)) == {"1": "0", "2": "25"}, "the originals are kept until they are put back"
    held.release()
    assert (read(root, 0), read(root, 1), read(root, 2)) == ("0", "0", "25")
    assert not os.path.exists(state)


def test_a_bound_in_microseconds_is_written_as_such(tmp_path):
    root = fake_cpus(tmp_path / "sys", {3: "0"})
    held = CpuResumeLatency([3], 20, str(tmp_path / "state.json"), root)
    held.hold()
    assert read(root, 3) == "20"
    held.release()
    assert read(root, 3) == "0"


def test_a_switch_killed_while_holding_leaves_the_true_originals_to_the_next(tmp_path):
    """The first holder dies without release(); the next one must put back
    what was there before the first, not the first one's setting."""
    root = fake_cpus(tmp_path / "sys", {1: "0"})
    state = str(tmp_path / "state.json")
    CpuResumeLatency([1], 0, state, root).hold()           # killed: never released
    assert read(root, 1) == STRICT
    second = CpuResumeLatency([1], 0, state, root)
    second.hold()
    second.release()
    assert read(root, 1) == "0"
    assert not os.path.exists(state)


def test_a_cpu_the_killed_switch_held_and_this_one_does_not_is_put_back(tmp_path):
    root = fake_cpus(tmp_path / "sys", {1: "0", 2: "40"})
    state = str(tmp_path / "state.json")
    CpuResumeLatency([1], 0, state, root).hold()           # killed: never released
    second = CpuResumeLatency([2], 0, state, root)        # pmd.cpus changed meanwhile
    second.hold()
    assert (read(root, 1), read(root, 2)) == ("0", STRICT)
    assert json.load(open(state)) == {"2": "40"}
    second.release()
    assert (read(root, 1), read(root, 2)) == ("0", "40")


def test_a_cpu_that_cannot_be_set_is_logged_and_the_others_are_set(tmp_path, caplog):
    root = fake_cpus(tmp_path / "sys", {0: "0"})
    held = CpuResumeLatency([0, 7], 0, str(tmp_path / "state.json"), root)
    with caplog.at_level(logging.WARNING):
        held.hold()
    assert read(root, 0) == STRICT
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "cannot set CPU 7" in lines[0], lines
    held.release()
    assert read(root, 0) == "0"


def test_an_unreadable_state_file_is_reported_and_ignored(tmp_path, caplog):
    root = fake_cpus(tmp_path / "sys", {1: "10"})
    state = tmp_path / "state.json"
    state.write_text("{not json")
    held = CpuResumeLatency([1], 0, str(state), root)
    with caplog.at_level(logging.WARNING):
        held.hold()
    assert any("ignoring unreadable" in r.getMessage() for r in caplog.records)
    held.release()
    assert read(root, 1) == "10"


# --- the config key ---


def config_problems(pmd: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse({"pmd": pmd}, "x.yaml")
    return exc.value.problems


@pytest.mark.parametrize("value", [-1, 1_000_001, True, "0", 1.5])
def test_the_bound_must_be_whole_microseconds_in_range(value):
    found = config_problems({"cpus": [0], "cpu_resume_latency_us": value})
    assert len(found) == 1 and found[0].startswith("x.yaml: pmd.cpu_resume_latency_us:"), found


def test_the_bound_needs_the_pmd_cpus():
    found = config_problems({"cpu_resume_latency_us": 0})
    assert found == ["x.yaml: pmd.cpu_resume_latency_us needs pmd.cpus: it applies to the PMDs' own CPUs"]


def test_the_bound_round_trips_through_the_config():
    cfg = parse({"pmd": {"cpus": [0], "cpu_resume_latency_us": 0}})
    assert cfg.pmd_cpu_resume_latency_us == 0
    assert parse(cfg.to_yaml_data()).pmd_cpu_resume_latency_us == 0
    assert parse({}).pmd_cpu_resume_latency_us is None
    assert "cpu_resume_latency_us" not in parse({}).to_yaml_data().get("pmd", {})


# --- the daemon, on this host's own CPU attributes ---


@pytest.fixture
def pmd_cpu():
    """This host's last CPU of ours and its real attribute, put back as it was after the test."""
    cpu = max(psutil.Process().cpu_affinity())
    path = attribute(cpu)
    if os.geteuid() != 0 or not os.access(path, os.W_OK):
        pytest.skip(f"needs root and a writable {path} (a kernel with CPU PM QoS, sysfs mounted read-write)")
    original = open(path).read().strip()
    yield cpu, path, original
    with open(path, "w") as f:
        f.write(original)


def poll_entries(cpu: int) -> int | None:
    """How often the CPU's idle loop chose polling (cpuidle state POLL), if it has cpuidle."""
    path = f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state0"
    try:
        if open(f"{path}/name").read().strip() != "POLL":
            return None
        return int(open(f"{path}/usage").read())
    except OSError:
        return None


def test_the_daemon_holds_its_pmd_cpu_and_puts_it_back_even_after_kill_9(tmp_path, pmd_cpu):
    cpu, path, original = pmd_cpu
    d = Vswitchd(tmp_path, ports=[], extra={"pmd": {"cpus": [cpu], "cpu_resume_latency_us": 0}}).start()
    assert open(path).read().strip() == STRICT, d.log()
    assert d.ctl("pmd-stats")["pmds"][0]["cpu_resume_latency"] == STRICT
    assert f"cpu {cpu} idle states (pm_qos_resume_latency_us): left within 0 us: its idle CPU polls" \
        in d.ctl_raw("pmd-stats", check=True).stdout
    polls = poll_entries(cpu)
    time.sleep(0.5)   # the PMD sleeps: its CPU idles, and may only poll
    if polls is not None:
        assert poll_entries(cpu) > polls, "the CPU's idle loop should have polled"
    d.kill()          # SIGKILL: no chance to put the value back
    assert open(path).read().strip() == STRICT
    d.start()         # the same config, so the same state file
    assert open(path).read().strip() == STRICT
    assert d.stop() == 0, d.log()
    assert open(path).read().strip() == original, "the value from before the first switch"
    assert not os.path.exists(d.control_socket + ".cpu-resume-latency.json")


def test_the_daemon_without_the_key_leaves_the_cpus_alone(tmp_path, pmd_cpu):
    cpu, path, _ = pmd_cpu
    with open(path, "w") as f:
        f.write("123")
    with Vswitchd(tmp_path, ports=[], extra={"pmd": {"cpus": [cpu]}}):
        assert open(path).read().strip() == "123"
    assert open(path).read().strip() == "123"


def test_a_reload_reports_the_key_needs_a_restart(tmp_path, pmd_cpu):
    cpu, path, _ = pmd_cpu
    with Vswitchd(tmp_path, ports=[], extra={"pmd": {"cpus": [cpu], "cpu_resume_latency_us": 0}}) as d:
        data = yaml.safe_load(open(d.config_path))
        data["pmd"]["cpu_resume_latency_us"] = 50
        d.config_path.write_text(yaml.safe_dump(data))
        result = d.ctl("reload")
        assert "pmd.cpu_resume_latency_us" in json.dumps(result), result
        assert open(path).read().strip() == STRICT, "a reload does not apply it"
