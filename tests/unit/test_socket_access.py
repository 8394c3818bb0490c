"""Socket ownership for hypervisors: socket_owner, socket_group, socket_mode (per switch and per port).

A QEMU started by libvirt runs as its own user; it can connect to a switch's
vhost-user socket only if the socket (and its directory) let it.  These
tests connect as the unprivileged user `nobody`, from a forked child that
drops root, with a real vhost-user handshake.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile

import pytest

from tests.support.child import run_in_child
from tests.support.daemon import Vswitchd
from tests.support.frontend import VhostUserFrontend
from vswitch.config import ConfigError, parse

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing a socket's owner needs root")


@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's own tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="vs-access-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def handshake_as_nobody(path: str) -> None:
    """In a child: become nobody, connect and do the whole vhost-user handshake."""
    def body():
        os.setgroups([])
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        fe = VhostUserFrontend(path, timeout=3).connect()
        try:
            fe.handshake()
        finally:
            fe.close()
    run_in_child(body, timeout=20, name="the handshake as nobody")


def test_a_port_socket_owned_by_the_hypervisor_user(tmp_path, open_dir):
    path = os.path.join(open_dir, "vm1.sock")
    ports = [{"name": "vm1", "type": "vhost-user", "path": path, "socket_owner": "nobody",
              "socket_group": NOGROUP.gr_name, "socket_mode": "0660"}]
    with Vswitchd(tmp_path, ports=ports) as d:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, NOGROUP.gr_gid, 0o660)
        handshake_as_nobody(path)
        info = d.port("vm1")
        assert info["link"] in ("up", "down") and info["stats"]["rx_errors"] == 0


def test_switch_wide_defaults_and_a_port_that_overrides_them(tmp_path, open_dir):
    a, b = os.path.join(open_dir, "a.sock"), os.path.join(open_dir, "b.sock")
    ports = [{"name": "a", "type": "vhost-user", "path": a},
             {"name": "b", "type": "vhost-user", "path": b, "socket_mode": "0600"}]
    with Vswitchd(tmp_path, ports=ports, extra={"socket_group": NOGROUP.gr_name, "socket_mode": "0660"}):
        assert (os.stat(a).st_gid, stat.S_IMODE(os.stat(a).st_mode)) == (NOGROUP.gr_gid, 0o660)
        assert (os.stat(b).st_gid, stat.S_IMODE(os.stat(b).st_mode)) == (NOGROUP.gr_gid, 0o600)
        handshake_as_nobody(a)
        # b is the group's too, but only its owner (root) may write to it: nobody is refused.
        with pytest.raises(pytest.fail.Exception, match="PermissionError"):
            handshake_as_nobody(b)


def test_without_the_keys_nobody_is_refused(tmp_path, open_dir):
    path = os.path.join(open_dir, "vm1.sock")
    with Vswitchd(tmp_path, ports=[{"name": "vm1", "type": "vhost-user", "path": path}]):
        assert os.stat(path).st_uid == 0
        with pytest.raises(pytest.fail.Exception, match="PermissionError"):
            handshake_as_nobody(path)


def test_add_port_flags_set_them_at_run_time(tmp_path, open_dir):
    path = os.path.join(open_dir, "vm1.sock")
    with Vswitchd(tmp_path, ports=[]) as d:
        d.ctl("add-port", "vm1", "--type", "vhost-user", "--path", path, "--socket-owner", "nobody",
              "--socket-mode", "600")
        st = os.stat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, 0o600)
        handshake_as_nobody(path)
        out = d.ctl_raw("add-port", "vm2", "--type", "vhost-user", "--path", os.path.join(open_dir, "vm2.sock"),
                        "--socket-owner", "no-such-user")
        assert out.returncode != 0
        assert out.stderr.strip() == "vswitchctl: port 'vm2': socket_owner: no user 'no-such-user' on this host"
        assert not os.path.exists(os.path.join(open_dir, "vm2.sock"))


@pytest.mark.parametrize("data, error", [
    ({"socket_owner": "no-such-user"}, "my.yaml: socket_owner: no user 'no-such-user' on this host"),
    ({"socket_group": "no-such-group"}, "my.yaml: socket_group: no group 'no-such-group' on this host"),
    ({"socket_mode": "0999"}, "my.yaml: socket_mode: '0999' must be permission bits in octal"),
    ({"ports": [{"name": "vm1", "type": "vhost-user", "path": "/tmp/x.sock", "socket_mode": "rw"}]},
     "my.yaml: ports[0] (vm1).socket_mode: 'rw' must be permission bits in octal"),
])
def test_bad_values_are_one_line_each(data, error):
    with pytest.raises(ConfigError) as exc:
        parse(data, "my.yaml")
    assert any(p.startswith(error) for p in exc.value.problems), exc.value.problems


def test_yaml_octal_numbers_are_taken_as_modes():
    cfg = parse({"socket_mode": 0o660, "ports": [{"name": "vm1", "type": "vhost-user", "path": "/tmp/x.sock",
                                                   "socket_mode": 0o600}]}, "my.yaml")
    assert cfg.port_defaults == {"socket_mode": "0660"} and cfg.ports[0]["socket_mode"] == "0600"


def test_the_runtime_directory_follows_the_switch_wide_keys(tmp_path):
    from vswitch.daemon import make_run_dir

    grouped, owned, plain = (str(tmp_path / n) for n in ("grouped", "owned", "plain"))
    make_run_dir(grouped, {"socket_group": NOGROUP.gr_name})
    make_run_dir(owned, {"socket_owner": "nobody"})
    make_run_dir(plain, {})
    assert (os.stat(grouped).st_gid, stat.S_IMODE(os.stat(grouped).st_mode)) == (NOGROUP.gr_gid, 0o750)
    assert stat.S_IMODE(os.stat(owned).st_mode) == 0o751
    assert (os.stat(plain).st_gid, stat.S_IMODE(os.stat(plain).st_mode) & 0o007) == (0, 0)
