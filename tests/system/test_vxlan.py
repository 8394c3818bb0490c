"""VXLAN between "hosts": network namespaces joined by a veth pair (the
underlay, 10.99.0.0/24), each with an L2 segment behind a VTEP (10.100.0.0/24).

* vswitchd (its tunnel in host namespace h1, a TAP port into namespace g1)
  against a Linux `vxlan` device bridged to namespace g2 in host h2;
* the same against Open vSwitch in host h2 (its kernel datapath where the kernel has
  the openvswitch module, else, as on the development machine, its userspace datapath);
* two vswitchd, one per host, and a namespace ("a guest") that moves from
  one host's switch to the other's: both MAC tables follow.

Each pings and moves TCP data checked by SHA-256 (tests/support/tcpxfer.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import wait_for
from tests.support.netns import in_ns, namespaces, ping_until, python_in_ns, sh, unique

pytestmark = pytest.mark.system

VNI = 5001
H1, H2 = "10.99.0.1", "10.99.0.2"
G1, G2, MOVER = "10.100.0.1", "10.100.0.2", "10.100.0.9"
MOVER_MAC = "02:00:00:00:00:99"
TRANSFER_BYTES = 4 << 20
INNER_MTU = 1450    # the underlay's 1500 minus VXLAN's 50 bytes


@contextlib.contextmanager
def hosts(extra: int = 0):
    """h1, h2 (underlay veth between them) and g1, g2 and `extra` more namespaces."""
    with namespaces(4 + extra) as names:
        h1, h2 = names[0], names[1]
        a, b = unique("vxu", 1), unique("vxu", 2)
        sh("ip", "link", "add", a, "netns", h1, "type", "veth", "peer", "name", b, "netns", h2)
        for ns, ifname, addr in ((h1, a, H1), (h2, b, H2)):
            # A veth hands a partial checksum on as it is, where a NIC would complete it:
            # a Linux VTEP's inner checksums would arrive unfinished at the other end.
            in_ns(ns, "ethtool", "-K", ifname, "tx", "off")
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", ifname)
            in_ns(ns, "ip", "link", "set", ifname, "up")
            in_ns(ns, "ip", "link", "set", "lo", "up")
        for ns in names[2:]:
            in_ns(ns, "ip", "link", "set", "lo", "up")
        yield names


def vxlan_spec(host_ns: str, local: str, remote: str) -> dict:
    return {"name": "vx", "type": "vxlan", "local_ip": local, "remote": [remote], "vni": VNI, "netns": host_ns}


def tap_spec(name: str, ns: str, n: int) -> dict:
    return {"name": name, "type": "tap", "ifname": unique("vxt", n), "netns": ns}


def configure(ns: str, ifname: str, addr: str, mac: str | None = None) -> None:
    if mac:
        in_ns(ns, "ip", "link", "set", ifname, "address", mac)
    in_ns(ns, "ip", "link", "set", ifname, "mtu", str(INNER_MTU))
    in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", ifname)
    in_ns(ns, "ip", "link", "set", ifname, "up")


def wait_link(ns: str, ifname: str, timeout: float = 5.0) -> None:
    wait_for(lambda: in_ns(ns, "ip", "link", "show", ifname, check=False).returncode == 0, timeout,
             f"{ifname} in {ns}")


def behind_bridge(host: str, guest: str, vxlan_dev: str) -> None:
    """A bridge in `host` with `vxlan_dev` and a veth to `guest`, which gets G2."""
    br, a, b = unique("vxb", 1), unique("vxg", 1), unique("vxg", 2)
    in_ns(host, "ip", "link", "add", br, "type", "bridge")
    sh("ip", "link", "add", a, "netns", host, "type", "veth", "peer", "name", b, "netns", guest)
    for dev in (vxlan_dev, a):
        in_ns(host, "ip", "link", "set", dev, "master", br)
        in_ns(host, "ip", "link", "set", dev, "up")
    in_ns(host, "ip", "link", "set", br, "up")
    configure(guest, b, G2)


def tcp_transfer(src_ns: str, dst_ns: str, dst_ip: str, port: int = 5101) -> None:
    """TRANSFER_BYTES from src_ns to dst_ns; both ends' byte counts and SHA-256 must agree."""
    server = python_in_ns(dst_ns, "-m", "tests.support.tcpxfer", "serve", str(port))
    try:
        assert server.stdout.readline().strip() == "listening"
        sender = python_in_ns(src_ns, "-m", "tests.support.tcpxfer", "send", dst_ip, str(port), str(TRANSFER_BYTES))
        sent, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        got, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        assert got.split()[:2] == sent.split()[:2] == [str(TRANSFER_BYTES), sent.split()[1]]
    finally:
        for proc in (server,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(autouse=True)
def _tools(require_tool):
    require_tool("ip", "iproute2")
    require_tool("ethtool")


def test_vswitchd_and_a_linux_vxlan_device(tmp_path):
    with hosts() as (h1, h2, g1, g2):
        dev = unique("vxl", 1)
        in_ns(h2, "ip", "link", "add", dev, "type", "vxlan", "id", str(VNI), "local", H2, "remote", H1,
              "dstport", "4789")
        behind_bridge(h2, g2, dev)
        with Vswitchd(tmp_path, ports=[vxlan_spec(h1, H1, H2), tap_spec("g1", g1, 1)]) as d:
            wait_link(g1, unique("vxt", 1))
            configure(g1, unique("vxt", 1), G1)
            ping_until(g1, G2)
            tcp_transfer(g1, g2, G2)
            tcp_transfer(g2, g1, G1, port=5102)
            g2_mac = in_ns(g2, "cat", f"/sys/class/net/{unique('vxg', 2)}/address").stdout.strip()
            entries = {e["mac"]: e for e in d.ctl("fdb", "show")["entries"]}
            assert (entries[g2_mac]["port"], entries[g2_mac]["remote"]) == ("vx", H2)
            stats = d.port("vx")["stats"]
            assert stats["rx_packets"] > 1000 and stats["tx_packets"] > 1000
            assert stats["rx_unknown_remote"] == stats["rx_wrong_vni"] == stats["rx_malformed"] == 0


def test_two_vswitchd_and_a_guest_moving_between_them(tmp_path):
    with hosts(extra=1) as (h1, h2, g1, g2, mover):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = Vswitchd(tmp_path / "a", ports=[vxlan_spec(h1, H1, H2), tap_spec("g1", g1, 1),
                                            tap_spec("mover", mover, 3)])
        b = Vswitchd(tmp_path / "b", ports=[vxlan_spec(h2, H2, H1), tap_spec("g2", g2, 2)])
        with a, b:
            for ns, n, addr, mac in ((g1, 1, G1, None), (g2, 2, G2, None), (mover, 3, MOVER, MOVER_MAC)):
                wait_link(ns, unique("vxt", n))
                configure(ns, unique("vxt", n), addr, mac)
            ping_until(g1, G2)
            tcp_transfer(g1, g2, G2)
            ping_until(g2, MOVER)

            def where(d):
                return {(e["port"], e.get("remote")) for e in d.ctl("fdb", "show")["entries"]
                        if e["mac"] == MOVER_MAC}

            assert where(a) == {("mover", None)} and where(b) == {("vx", H1)}

            # The guest moves: its interface goes from host 1's switch to host 2's, same MAC and address.
            assert a.ctl_raw("del-port", "mover").returncode == 0
            out = b.ctl_raw("add-port", "mover", "--type", "tap", "--ifname", unique("vxt", 4), "--netns", mover)
            assert out.returncode == 0, out.stderr
            wait_link(mover, unique("vxt", 4))
            configure(mover, unique("vxt", 4), MOVER, MOVER_MAC)
            ping_until(mover, G1)
            assert where(a) == {("vx", H2)} and where(b) == {("mover", None)}
            ping_until(g2, MOVER)
            tcp_transfer(g1, mover, MOVER, port=5103)


# --- Open vSwitch -------------------------------------------------------------------

OVS_TOOLS = ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovsdb-tool", "ovs-appctl")


class PrivateOvs:
    """ovsdb-server and ovs-vswitchd of this test only, in network namespace ns, with their own
    database, run and log directory; stopped by PID."""

    def __init__(self, directory, ns: str):
        self.dir, self.ns = directory, ns
        self.db = directory / "conf.db"
        self.sock = directory / "db.sock"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "OVS_RUNDIR": str(directory), "OVS_LOGDIR": str(directory),
                    "OVS_DBDIR": str(directory), "OVS_SYSCONFDIR": str(directory)}

    def start(self):
        schema = "/usr/share/openvswitch/vswitch.ovsschema"
        sh("ovsdb-tool", "create", str(self.db), schema)
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "ovsdb-server", str(self.db), f"--remote=punix:{self.sock}",
             f"--pidfile={self.dir / 'ovsdb-server.pid'}", f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
             f"--log-file={self.dir / 'ovsdb-server.log'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: self.sock.exists(), 10, "ovsdb-server's socket")
        self.vsctl("--no-wait", "init")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "ovs-vswitchd", f"unix:{self.sock}",
             f"--pidfile={self.dir / 'ovs-vswitchd.pid'}", f"--unixctl={self.dir / 'ovs-vswitchd.ctl'}",
             f"--log-file={self.dir / 'ovs-vswitchd.log'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: (self.dir / "ovs-vswitchd.ctl").exists(), 10, "ovs-vswitchd's control socket")
        return self

    def vsctl(self, *args: str) -> str:
        return in_ns(self.ns, "ovs-vsctl", f"--db=unix:{self.sock}", "--timeout=20", *args).stdout

    def appctl(self, *args: str) -> str:
        return in_ns(self.ns, "ovs-appctl", f"--target={self.dir / 'ovs-vswitchd.ctl'}", *args).stdout

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log(self) -> str:
        path = self.dir / "ovs-vswitchd.log"
        return path.read_text()[-4000:] if path.exists() else ""


def openvswitch_module() -> bool:
    """Whether this kernel has Open vSwitch's datapath (loaded, or loadable)."""
    if os.path.isdir("/sys/module/openvswitch"):
        return True
    try:
        return sh("modprobe", "-q", "openvswitch", check=False).returncode == 0
    except FileNotFoundError:
        return False


def test_vswitchd_and_open_vswitch(tmp_path, require_tool):
    """OVS's kernel datapath where the kernel has it, else its userspace datapath (said on stdout)."""
    for tool in OVS_TOOLS:
        require_tool(tool, "openvswitch-switch")
    kernel = openvswitch_module()
    print("Open vSwitch datapath:", "kernel" if kernel else "userspace (netdev): this kernel has no openvswitch module")
    with hosts() as (h1, h2, g1, g2):
        underlay = unique("vxu", 2)
        ovs_dir = tmp_path / "ovs"
        ovs_dir.mkdir()
        ovs = PrivateOvs(ovs_dir, h2)
        try:
            ovs.start()
            datapath = "system" if kernel else "netdev"
            if not kernel:
                # The userspace datapath's tunnels leave through a bridge of its own that
                # holds the underlay interface and the local address.
                in_ns(h2, "ip", "addr", "flush", "dev", underlay)
                ovs.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
                ovs.vsctl("add-port", "br-phy", underlay)
                in_ns(h2, "ip", "addr", "add", f"{H2}/24", "dev", "br-phy")
                in_ns(h2, "ip", "link", "set", "br-phy", "up")
            a, b = unique("vxg", 1), unique("vxg", 2)
            sh("ip", "link", "add", a, "netns", h2, "type", "veth", "peer", "name", b, "netns", g2)
            in_ns(h2, "ip", "link", "set", a, "up")
            # OVS's userspace datapath reads g2's frames from the veth with AF_PACKET and
            # does not complete a partial checksum: g2 finishes its own.
            in_ns(g2, "ethtool", "-K", b, "tx", "off")
            configure(g2, b, G2)
            ovs.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", f"datapath_type={datapath}")
            ovs.vsctl("add-port", "br-int", a)
            ovs.vsctl("add-port", "br-int", "vx", "--", "set", "interface", "vx", "type=vxlan",
                      f"options:remote_ip={H1}", f"options:local_ip={H2}", f"options:key={VNI}")
            with Vswitchd(tmp_path, ports=[vxlan_spec(h1, H1, H2), tap_spec("g1", g1, 1)]) as d:
                wait_link(g1, unique("vxt", 1))
                configure(g1, unique("vxt", 1), G1)
                try:
                    ping_until(g1, G2, timeout=20)
                except AssertionError:
                    raise AssertionError(f"no ping through OVS; its log:\n{ovs.log()}\n"
                                         f"{ovs.appctl('ovs/route/show')}") from None
                tcp_transfer(g1, g2, G2)
                tcp_transfer(g2, g1, G1, port=5102)
                g2_mac = in_ns(g2, "cat", f"/sys/class/net/{b}/address").stdout.strip()
                entries = {e["mac"]: e for e in d.ctl("fdb", "show")["entries"]}
                assert (entries[g2_mac]["port"], entries[g2_mac]["remote"]) == ("vx", H2)
        finally:
            ovs.stop()
            time.sleep(0.1)
