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
        return send_and_read_line(s, path, payload, timeout)


def send_and_read_line(s: socket.socket, path: str, payload: bytes, timeout: float) -> bytes:
    """Connects s to path, sends payload and reads one reply line (less if the server closes first)."""
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
                                  ["fdb", "flush"], ["pmd-stats"], ["control-stats"], ["version"]])
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


def test_call_runs_any_registered_command(daemon):
    assert daemon.ctl("call", "version") == daemon.ctl("version")
    # Values are JSON when they parse as JSON, else strings.
    assert daemon.ctl("call", "fdb/set-aging", "seconds=300") == {"aging_seconds": 300}
    out = daemon.ctl_raw("call", "port/show", "name=7")
    assert out.returncode == 1 and out.stderr == "vswitchctl: port/show: argument 'name' must be a string, not 7\n"
    out = daemon.ctl_raw("call", "port/show", "name=ghost")
    assert out.returncode == 1 and out.stderr == "vswitchctl: no port named 'ghost'\n"
    # A command with a formatter prints it as the subcommand does; COMMAND alone is `call COMMAND`.
    human = daemon.ctl_raw("call", "port/list")
    assert human.returncode == 0 and human.stdout == daemon.ctl_raw("list-ports").stdout == "PORT  TYPE  LINK\n"
    assert daemon.ctl_raw("port/list").stdout == human.stdout
    # The lock counters move whenever any thread takes the table's lock (the
    # aging sweep does, in the background), so two reads may differ there.
    by_path, by_subcommand = daemon.ctl("fdb/stats"), daemon.ctl("fdb", "stats")
    assert by_path.keys() == by_subcommand.keys()
    assert {k: v for k, v in by_path.items() if not k.startswith("lock_")} == \
        {k: v for k, v in by_subcommand.items() if not k.startswith("lock_")}
    out = daemon.ctl_raw("call", "no/such")
    assert out.returncode == 1 and out.stderr == "vswitchctl: unknown command 'no/such' (see list-commands)\n"
    out = daemon.ctl_raw("call", "version", "oops")
    assert out.returncode == 2 and "'oops' is not key=value" in out.stderr


def test_port_types_are_listed(daemon):
    types = {t["type"]: t for t in daemon.ctl("port-types")["types"]}
    assert {"vhost-user", "tap", "af-packet"} <= set(types)
    path = next(k for k in types["vhost-user"]["keys"] if k["key"] == "path")
    assert path["required"] and path["flag"] == "--path"
    human = daemon.ctl_raw("call", "port/types").stdout
    assert human.split("\n")[0].split() == ["TYPE", "KEY", "VALUE", "DEFAULT", "DESCRIPTION"]
    assert any(line.split()[:4] == ["af-packet", "ifname", "str", "required"] for line in human.splitlines())


def test_events_subscribe_is_a_registered_command(daemon):
    from vswitch.control.cli import call_streaming
    listed = {c["command"]: c for c in daemon.ctl("list-commands")["commands"]}
    assert listed["events/subscribe"].get("stream") is True
    # The reply comes once the subscription is in place: an event after it is seen.
    result, events = call_streaming(daemon.control_socket, "events/subscribe")
    assert result == {"subscribed": True}
    sock = str(daemon.dir / "ev.sock")
    daemon.ctl("add-port", "ev", "--type", "vhost-user", "--path", sock)
    daemon.ctl("del-port", "ev")
    assert next(events)["event"] == "port-added" and next(events)["event"] == "port-removed"
    events.close()
    # Arguments are checked like any command's, and the connection stays a normal one.
    reply = json.loads(request(daemon.control_socket, b'{"command": "events/subscribe", "args": {"x": 1}}\n'))
    assert reply["ok"] is False and "unknown argument 'x'" in reply["error"]


def test_vswitchctl_streams_a_streaming_command(daemon):
    import subprocess, sys, time
    from tests.support.daemon import REPO
    proc = subprocess.Popen([sys.executable, "-m", "vswitch.control.cli", "--socket", daemon.control_socket,
                             "events/subscribe"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # The client subscribes on its own time: make events until one arrives.
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline:
            daemon.ctl("add-port", "ev2", "--type", "vhost-user", "--path", str(daemon.dir / "ev2.sock"))
            daemon.ctl("del-port", "ev2")
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    reader.join(5)
    assert lines and " port-" in lines[0] and " ev2" in lines[0], lines


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


# --------------------------------------------------------------------------- peer credentials

NOBODY = 65534          # uid nobody and gid nogroup on Debian
DAEMON_GROUP = "daemon"  # present on every Debian system; nobody is not in it


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can reach (pytest's own tmp is root-only)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="vswitch-ctl-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def request_as(path: str, payload: bytes, uid: int, gid: int, groups=(), timeout: float = 10.0) -> tuple[dict, bool]:
    """Sends one request from a forked child running as uid/gid/groups.

    Returns the reply and whether the daemon closed the connection after it.
    """
    import select
    import signal
    import time
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, talk, report through the pipe, never return
        status = 1
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                buf = send_and_read_line(s, path, payload, timeout / 2)
                try:
                    closed = s.recv(1) == b""
                except socket.timeout:
                    closed = False
            os.write(w, json.dumps({"reply": buf.decode(), "closed": closed}).encode())
            status = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"exception": repr(exc)}).encode())
        finally:
            os._exit(status)
    os.close(w)
    deadline = time.monotonic() + timeout
    out = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(out or b'{"exception": "child timed out"}')
    assert "exception" not in result, result["exception"]
    return json.loads(result["reply"]), result["closed"]


def info_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " INFO " in line or " WARNING " in line]


def test_client_outside_the_control_group_is_refused(shared_dir):
    with Vswitchd(shared_dir, ports=[], extra={"control_group": DAEMON_GROUP}) as d:
        # The kernel already keeps others out of a 0660 socket; open it up to reach our own check.
        os.chmod(d.control_socket, 0o666)
        reply, closed = request_as(d.control_socket, b'{"command": "version"}\n', NOBODY, NOBODY)
        assert reply == {"ok": False,
                         "error": f"permission denied: uid {NOBODY} is not root and not in group '{DAEMON_GROUP}'"}
        assert closed
        # A change is refused the same way and changes nothing.
        reply, _ = request_as(d.control_socket, b'{"command": "fdb/set-aging", "args": {"seconds": 77}}\n',
                              NOBODY, NOBODY)
        assert reply["ok"] is False and "permission denied" in reply["error"]
        assert "aging_seconds: 77" not in d.ctl_raw("config", "dump", check=True).stdout
        assert d.ctl("control-stats")["refused_clients"] == 2
        assert f"refused a control client: uid {NOBODY}" in d.log()
        assert d.proc.poll() is None


def test_members_of_the_control_group_are_accepted(shared_dir):
    import grp
    gid = grp.getgrnam(DAEMON_GROUP).gr_gid
    with Vswitchd(shared_dir, ports=[], extra={"control_group": DAEMON_GROUP}) as d:
        # A supplementary group, and the primary group, both count.
        for primary, groups in ((NOBODY, [gid]), (gid, [])):
            reply, _ = request_as(d.control_socket, b'{"command": "version"}\n', NOBODY, primary, groups)
            assert reply["ok"] is True, reply
        reply, _ = request_as(d.control_socket, b'{"command": "fdb/set-aging", "args": {"seconds": 77}}\n',
                              NOBODY, NOBODY, [gid])
        assert reply == {"ok": True, "result": {"aging_seconds": 77}}
        assert any(f"uid {NOBODY} pid " in line and "fdb/set-aging seconds=77" in line
                   for line in info_lines(d.log())), d.log()
        assert d.ctl("control-stats")["refused_clients"] == 0


def test_only_root_without_a_control_group(shared_dir):
    with Vswitchd(shared_dir, ports=[]) as d:
        os.chmod(d.control_socket, 0o666)
        reply, closed = request_as(d.control_socket, b'{"command": "version"}\n', NOBODY, NOBODY)
        assert reply["ok"] is False and closed
        assert reply["error"] == f"permission denied: uid {NOBODY} is not root and no control_group is configured"


def test_changes_are_logged_with_the_peer_uid_and_pid(daemon):
    reply = json.loads(request(daemon.control_socket,
                               b'{"command": "fdb/set-max", "args": {"entries": 4096}}\n'))
    assert reply["ok"] is True
    reply = json.loads(request(daemon.control_socket, b'{"command": "port/list"}\n'))
    assert reply["ok"] is True
    lines = info_lines(daemon.log())
    change = [line for line in lines if "fdb/set-max" in line]
    assert len(change) == 1 and f"uid 0 pid {os.getpid()}: fdb/set-max entries=4096" in change[0], lines
    assert not [line for line in lines if "port/list" in line], "a read-only command was logged at info"
    # A refused change is logged too, with its error.
    reply = json.loads(request(daemon.control_socket, b'{"command": "port/del", "args": {"name": "ghost"}}\n'))
    assert reply["ok"] is False
    assert any(f"uid 0 pid {os.getpid()}: port/del name=ghost" in line and "no port named" in line
               for line in info_lines(daemon.log())), daemon.log()
    # A client cannot forge log lines through its arguments.
    reply = json.loads(request(daemon.control_socket,
                               b'{"command": "port/del", "args": {"name": "x\\n2026 INFO forged"}}\n'))
    assert reply["ok"] is False
    assert not [line for line in daemon.log().splitlines() if line.startswith("2026 INFO forged")]


def test_control_stats_count_requests(daemon):
    before = daemon.ctl("control-stats")
    request(daemon.control_socket, b"not json\n")
    after = daemon.ctl("control-stats")
    assert after["bad_requests"] == before["bad_requests"] + 1
    assert after["connections"] >= before["connections"] + 2
    human = daemon.ctl_raw("control-stats")
    assert human.returncode == 0 and "refused_clients: " in human.stdout


def test_rate_limited_log_counts_what_it_holds_back(caplog):
    import asyncio
    import logging
    from vswitch.ratelimit import RateLimitedLog
    now = [100.0]
    logger = logging.getLogger("test.ratelimit")
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    limited = RateLimitedLog(logger, "port 'p'", interval=1.0, clock=lambda: now[0])
    assert limited.log(logging.WARNING, "refused %d", 1) is True
    assert not any(limited.log(logging.WARNING, "refused %d", i) for i in range(2, 1001))
    now[0] += 1.0
    assert limited.log(logging.WARNING, "refused %d", 1001) is True
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1", "refused 1001 (999 similar lines suppressed before this one)"]
    # On a loop, a flood that stops still leaves its count in the log, once the interval is over.
    caplog.clear()

    async def flood_then_stop():
        timed = RateLimitedLog(logger, "port 'p'", interval=0.05)
        for i in range(10):
            timed.log(logging.WARNING, "refused %d", i)
        await asyncio.sleep(0.5)
    asyncio.run(flood_then_stop())
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "port 'p': 9 more similar log lines suppressed"]
