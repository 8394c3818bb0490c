"""vswitch-cni driven as a runtime drives it (CNI_* variables, config on stdin), without a switch:
VERSION, and every refusal is CNI error JSON with the spec's code, a non-zero exit, and nothing made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import IN_CI
from tests.support.daemon import REPO
from vswitch.cni import attachment_mac, port_name


def plugin(env: dict, config, *, command: str = "ADD") -> tuple[int, dict | None]:
    """Runs `python -m vswitch.cni` with only these variables (as a runtime does); (status, stdout JSON)."""
    full = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, **env}
    full = {k: v for k, v in full.items() if v is not None}
    stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
    proc = subprocess.run([sys.executable, "-m", "vswitch.cni"], input=stdin, env=full, capture_output=True,
                          timeout=60, cwd=REPO)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def tap_config(tmp_path, **over) -> dict:
    config = {"cniVersion": "1.0.0", "name": "net1", "type": "vswitch-cni",
              "control_socket": str(tmp_path / "vswitchd.sock"), "kind": "tap",
              "ipam": {"type": "host-local", "subnet": "10.251.0.0/24", "dataDir": str(tmp_path / "ipam")}}
    config.update(over)
    return {k: v for k, v in config.items() if v is not None}


ENV = {"CNI_CONTAINERID": "abc123", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/usr/lib/cni"}


def test_version_lists_the_supported_versions():
    status, out = plugin({}, {"cniVersion": "1.0.0"}, command="VERSION")
    assert status == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}


@pytest.mark.parametrize("over,env,code,words", [
    ({"kind": "macvlan"}, {}, 7, "kind: 'macvlan' must be one of: tap, vhost-user"),
    ({"kind": None}, {}, 7, "kind: None must be one of"),
    ({"ipam": None}, {}, 7, "ipam: required for kind tap"),
    ({"cniVersion": "0.2.0"}, {}, 1, "cniVersion '0.2.0' is not supported"),
    ({"vlan": 4095}, {}, 7, "vlan: 4095 must be a VLAN ID"),
    ({"control_socket": "relative.sock"}, {}, 7, "control_socket: must be an absolute path"),
    ({}, {"CNI_CONTAINERID": None}, 4, "CNI_CONTAINERID is not set"),
    ({}, {"CNI_IFNAME": "x" * 16}, 4, "is not an interface name"),
    ({}, {"CNI_NETNS": None}, 4, "CNI_NETNS is not set"),
    ({}, {"CNI_PATH": None}, 4, "CNI_PATH is not set"),
    ({}, {}, 11, "vswitchd unreachable"),
])
def test_bad_requests_are_cni_errors_and_allocate_nothing(tmp_path, over, env, code, words):
    status, out = plugin({**ENV, **env}, tap_config(tmp_path, **over))
    assert status != 0 and out["code"] == code and words in out["msg"], out
    assert out["cniVersion"] == "1.0.0" and set(out) <= {"cniVersion", "code", "msg", "details"}
    assert not (tmp_path / "ipam").exists()   # host-local never ran: no address taken


def test_config_that_is_not_json_is_a_decoding_failure():
    status, out = plugin(ENV, b"{not json")
    assert status != 0 and out["code"] == 6


def test_unknown_command_is_an_environment_error(tmp_path):
    status, out = plugin(ENV, tap_config(tmp_path), command="FROB")
    assert status != 0 and out["code"] == 4 and "CNI_COMMAND" in out["msg"]


def test_port_names_are_short_unique_and_stable():
    names = {port_name(f"container{i}", ifname) for i in range(500) for ifname in ("eth0", "net1")}
    assert len(names) == 1000
    assert all(len(n) <= 15 and n[0].isalpha() for n in names)
    assert port_name("c", "eth0") == port_name("c", "eth0")
    mac = attachment_mac("c", "eth0")
    assert int(mac[:2], 16) & 0x03 == 0x02   # locally administered, unicast


def vhost_request(tmp_path, cni_args: str, **over):
    from vswitch.cni import Request

    config = tap_config(tmp_path, kind="vhost-user", socket_dir="/run/vswitch/cni", ipam=None, **over)
    env = {**ENV, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "0123456789abcdef", "CNI_IFNAME": "net1",
           "CNI_ARGS": cni_args}
    return Request(env, json.dumps(config).encode())


def test_vhost_user_sockets_live_in_a_per_pod_directory(tmp_path):
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=dpdk-0;K8S_POD_UID=x"
    assert vhost_request(tmp_path, args).socket_path == "/run/vswitch/cni/0123456789ab/net1.sock"
    assert vhost_request(tmp_path, args, socket_subdir="pod").socket_path == "/run/vswitch/cni/default_dpdk-0/net1.sock"


@pytest.mark.parametrize("cni_args", ["", "K8S_POD_NAMESPACE=default", "K8S_POD_NAMESPACE=../x;K8S_POD_NAME=a",
                                      "garbage"])
def test_pod_socket_directories_need_kubernetes_names(tmp_path, cni_args):
    from vswitch.cni import CniError

    with pytest.raises(CniError) as exc:
        vhost_request(tmp_path, cni_args, socket_subdir="pod")
    assert exc.value.code == 4


def test_the_installed_vswitch_cni_command_answers_as_a_runtime_calls_it():
    """The executable a runtime finds in its CNI_PATH, as the package installed it."""
    path = shutil.which("vswitch-cni")
    if path is None:
        if IN_CI:
            pytest.fail("vswitch-cni is not on PATH after the test command installed the package")
        pytest.skip("vswitch-cni is not installed: run tools/install.sh (it reinstalls the package)")
    proc = subprocess.run([path], input=json.dumps({"cniVersion": "1.0.0"}).encode(),
                          env={"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}


def test_the_package_installs_the_plugin_as_vswitch_cni():
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["vswitch-cni"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
