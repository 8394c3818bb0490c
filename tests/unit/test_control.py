"""The control socket and vswitchctl against a running vswitchd (no ports needed)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from tests.support.daemon import Vswitchd


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Vswitchd(tmp_path_factory.mktemp("ctl"), ports=[]) as d:
        yield d


def request(path: str, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf


def test_socket_mode(daemon):
    assert stat.S_IMODE(os.stat(daemon.control_socket).st_mode) == 0o660


def test_list_commands_is_generated_from_the_registry(daemon):
    names = {c["command"] for c in daemon.ctl("list-commands")["commands"]}
    assert {"port/show", "port/list", "fdb/show", "fdb/flush", "fdb/stats", "pmd/stats", "version"} <= names
    human = daemon.ctl_raw("list-commands")
    assert human.returncode == 0 and "fdb/show [port=<str>]" in human.stdout


@pytest.mark.parametrize("args", [["show"], ["list-ports"], ["fdb", "show"], ["fdb", "stats"],
                                  ["fdb", "flush"], ["pmd-stats"], ["version"]])
def test_every_command_in_human_and_json(daemon, args):
    human = daemon.ctl_raw(*args)
    assert human.returncode == 0, human.stderr
    assert human.stdout.strip()
    parsed = daemon.ctl(*args)
    assert isinstance(parsed, dict)


def test_errors_are_one_line_and_non_zero(daemon):
    out = daemon.ctl_raw("show", "nosuchport")
    assert out.returncode == 1
    assert out.stderr == "vswitchctl: no port named 'nosuchport'\n"
    out = daemon.ctl_raw("fdb", "show", "--port", "ghost")
    assert out.returncode == 1 and out.stderr.count("\n") == 1


def test_cli_usage_errors(daemon):
    out = daemon.ctl_raw("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_no_daemon_is_a_clear_error(tmp_path):
    from tests.support.daemon import REPO
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "vswitch.control.cli", "--socket", str(tmp_path / "none.sock"),
                          "show"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "is vswitchd running?" in out.stderr


@pytest.mark.parametrize("payload, error", [
    (b"this is not json\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"command": "no/such"}\n', "unknown command 'no/such'"),
    (b'{"command": 5}\n', "unknown command 5"),
    (b'{"command": "port/show", "args": {"name": 7}}\n', "must be a string"),
    (b'{"command": "port/show", "args": {"colour": "red"}}\n', "unknown argument 'colour'"),
    (b'{"command": "port/show", "args": [1]}\n', "must be a JSON object"),
])
def test_malformed_requests_get_an_error_reply(daemon, payload, error):
    reply = json.loads(request(daemon.control_socket, payload))
    assert reply["ok"] is False and error in reply["error"]


def test_oversized_request_closes_only_that_connection(daemon):
    reply = request(daemon.control_socket, b'{"command": "' + b"x" * 200_000 + b'"}\n')
    assert b"larger than" in reply
    assert daemon.ctl("version")["version"]


def test_half_sent_request_then_close(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.control_socket)
        s.sendall(b'{"command": "vers')
    assert daemon.ctl("version")["version"]


def test_many_clients_at_once(daemon):
    results, errors = [], []
    idle = socket.socket(socket.AF_UNIX)  # an idle client must not block the others
    idle.connect(daemon.control_socket)

    def client():
        try:
            for _ in range(10):
                reply = json.loads(request(daemon.control_socket, b'{"command": "port/list"}\n'))
                results.append(reply["ok"])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    idle.close()
    assert not errors and results == [True] * 200
    assert daemon.proc.poll() is None


def test_sigterm_shuts_down_cleanly(tmp_path):
    d = Vswitchd(tmp_path, ports=[]).start()
    assert d.stop() == 0
    assert not os.path.exists(d.control_socket)
    assert "stopped" in d.log()


def test_control_group_owns_the_socket(tmp_path):
    import grp
    group = "daemon"  # present on every Debian system
    with Vswitchd(tmp_path, ports=[], extra={"control_group": group}) as d:
        st = os.stat(d.control_socket)
        assert st.st_gid == grp.getgrnam(group).gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660


def test_unknown_control_group_is_a_config_error(tmp_path):
    d = Vswitchd(tmp_path, ports=[], extra={"control_group": "no-such-group-here"})
    with pytest.raises(RuntimeError, match="control_group: no group named 'no-such-group-here'"):
        d.start()


def test_vswitch_socket_environment_variable(tmp_path, daemon):
    from tests.support.daemon import REPO
    import subprocess, sys
    env = dict(os.environ, VSWITCH_SOCKET=daemon.control_socket)
    out = subprocess.run([sys.executable, "-m", "vswitch.control.cli", "version"], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert out.returncode == 0 and out.stdout.strip() == daemon.ctl("version")["version"]
