"""vswitch-cni driven as a container runtime drives it: CNI_* variables and the network config on
stdin, `python -m vswitch.cni` in a process of its own, against network namespaces the test
creates (`ip netns add`; CNI_NETNS is their file in /run/netns), a running vswitchd, and the
standard host-local IPAM plugin (Debian containernetworking-plugins) with its data in tmp_path.

Two tap "pods" get addresses and ping each other; CHECK passes, then fails once the port is removed
by hand; DEL removes ports and frees addresses (host-local's files) and is idempotent; 20 concurrent
ADDs then DELs leak nothing; a DPDK testpmd "pod" on a vhost-user ADD's socket answers a tap
pod's pings; a config the switch refuses gives CNI error JSON and takes no address.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from tests.support.daemon import REPO, Vswitchd
from tests.support.netns import in_ns, namespaces, sh
from tests.support.testpmd import TestPmd, virtio_user_vdev

pytestmark = pytest.mark.system

CNI_PATH = "/usr/lib/cni"
SUBNET = "10.252.0.0/24"


@pytest.fixture(autouse=True)
def host_local():
    if not os.access(os.path.join(CNI_PATH, "host-local"), os.X_OK):
        pytest.skip("host-local IPAM plugin not found (Debian package containernetworking-plugins); "
                    "run tools/setup-test-env.sh as root to install it")


@pytest.fixture
def switch(tmp_path):
    with Vswitchd(tmp_path, ports=[]) as d:
        yield d


def config(d: Vswitchd, tmp_path, kind: str = "tap", **over) -> dict:
    c = {"cniVersion": "1.0.0", "name": "cninet", "type": "vswitch-cni", "control_socket": d.control_socket,
         "kind": kind, "socket_dir": str(tmp_path / "sockets"),
         "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(tmp_path / "ipam")}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def cni(command: str, cfg: dict, container: str, netns: str | None, ifname: str = "eth0") -> tuple[int, dict | None]:
    """One plugin run, with only the variables a runtime sets; (exit status, stdout JSON)."""
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": (netns if netns.startswith("/") else f"/run/netns/{netns}") if netns else "", "CNI_IFNAME": ifname, "CNI_PATH": CNI_PATH,
           "CNI_ARGS": ""}
    proc = subprocess.run([sys.executable, "-m", "vswitch.cni"], input=json.dumps(cfg).encode(), env=env,
                          capture_output=True, timeout=120, cwd=REPO)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out


def add(cfg, container, netns, ifname="eth0") -> dict:
    status, out = cni("ADD", cfg, container, netns, ifname)
    assert status == 0, out
    return out


def allocated(tmp_path) -> set[str]:
    """The addresses host-local holds: one file per address in its data directory."""
    directory = tmp_path / "ipam" / "cninet"
    if not directory.exists():
        return set()
    return {p.name for p in directory.iterdir() if p.name[0].isdigit() and not p.name.startswith("last")}


def port_names(d: Vswitchd) -> set[str]:
    return {p["name"] for p in d.ctl("list-ports")["ports"]}


def ping(netns: str, ip: str, count: int = 3) -> str:
    return in_ns(netns, "busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "2", ip, check=False).stdout


def test_two_tap_pods_ping_check_and_del(switch, tmp_path):
    cfg = config(switch, tmp_path)
    cfg["ipam"]["routes"] = [{"dst": "10.253.0.0/16"}]
    with namespaces(2) as (ns1, ns2):
        r1, r2 = add(cfg, "pod1-cid", ns1), add(cfg, "pod2-cid", ns2)
        for result, ns in ((r1, ns1), (r2, ns2)):
            assert result["cniVersion"] == "1.0.0"
            assert result["interfaces"] == [{"name": "eth0", "mac": result["interfaces"][0]["mac"],
                                             "sandbox": f"/run/netns/{ns}"}]
            ip = result["ips"][0]
            assert ip["interface"] == 0 and ip["address"].startswith("10.252.0.") and ip["gateway"] == "10.252.0.1"
            mac = in_ns(ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
            assert mac == result["interfaces"][0]["mac"]
            assert result["routes"] == [{"dst": "10.253.0.0/16"}]
            route = in_ns(ns, "ip", "route", "show", "10.253.0.0/16").stdout
            assert "via 10.252.0.1 dev eth0" in route, route   # the IPAM result's gateway
        assert allocated(tmp_path) == {r["ips"][0]["address"].split("/")[0] for r in (r1, r2)}
        assert len(port_names(switch)) == 2

        peer = r2["ips"][0]["address"].split("/")[0]
        out = ping(ns1, peer)
        assert "3 packets transmitted, 3 packets received" in out, out

        # CHECK with the ADD's result passes, then fails once the port is removed by hand.
        status, out = cni("CHECK", dict(cfg, prevResult=r1), "pod1-cid", ns1)
        assert status == 0 and out is None, out
        from vswitch.cni import port_name
        switch.ctl("del-port", port_name("pod1-cid", "eth0"))
        status, out = cni("CHECK", dict(cfg, prevResult=r1), "pod1-cid", ns1)
        assert status != 0 and out["code"] == 103 and "missing" in out["msg"], out

        # DEL frees the address whatever is left of the port, and again is no error.
        for _ in range(2):
            assert cni("DEL", cfg, "pod1-cid", ns1) == (0, None)
            assert cni("DEL", cfg, "pod2-cid", ns2) == (0, None)
        assert port_names(switch) == set() and allocated(tmp_path) == set()
        assert in_ns(ns2, "ip", "link", "show", "eth0", check=False).returncode != 0

    # A namespace already gone (and CNI_NETNS empty, as runtimes may send it) is not an error either.
    with namespaces(1) as (ns3,):
        add(cfg, "pod3-cid", ns3)
    assert cni("DEL", cfg, "pod3-cid", None) == (0, None)
    assert port_names(switch) == set() and allocated(tmp_path) == set()


def test_a_namespace_named_by_a_process_as_docker_and_podman_give_it(switch, tmp_path):
    cfg = config(switch, tmp_path)
    with namespaces(1) as (ns,):
        holder = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
        try:
            path = f"/proc/{holder.pid}/ns/net"
            result = add(cfg, "proc-cid", path)
            assert result["interfaces"][0]["sandbox"] == path
            address = result["ips"][0]["address"]
            assert address in in_ns(ns, "ip", "-o", "addr", "show", "dev", "eth0").stdout
            assert cni("CHECK", dict(cfg, prevResult=result), "proc-cid", path) == (0, None)
            assert cni("DEL", cfg, "proc-cid", path) == (0, None)
        finally:
            holder.kill()
            holder.wait()
    assert port_names(switch) == set() and allocated(tmp_path) == set()


def test_twenty_concurrent_adds_then_dels_leak_nothing(switch, tmp_path):
    cfg = config(switch, tmp_path)
    ours = lambda: {n for n in os.listdir("/run/netns") if n.startswith(f"vsx-{os.getpid()}-")}
    before = ours()
    with namespaces(20) as names:
        pods = [(f"conc-{i:02d}-cid", ns) for i, ns in enumerate(names)]
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda p: cni("ADD", cfg, *p), pods))
        assert all(status == 0 for status, _ in results), [out for status, out in results if status]
        addresses = {out["ips"][0]["address"] for _, out in results}
        assert len(addresses) == 20 and len(allocated(tmp_path)) == 20
        assert len(port_names(switch)) == 20
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda p: cni("DEL", cfg, *p), pods))
        assert all(r == (0, None) for r in results), results
        assert port_names(switch) == set() and allocated(tmp_path) == set()
        for _, ns in pods:
            assert in_ns(ns, "ip", "link", "show", "eth0", check=False).returncode != 0
    assert ours() == before   # other tests on this machine make and remove their own meanwhile


def test_a_refused_port_gives_cni_error_and_keeps_no_address(switch, tmp_path):
    with namespaces(1) as (ns,):
        # A VLAN mode without its tag: the switch refuses the port after host-local gave an address.
        cfg = config(switch, tmp_path, vlan={"mode": "access"})
        status, out = cni("ADD", cfg, "bad-cid", ns)
        assert status != 0 and out["code"] == 100 and "vswitchd" in out["msg"], out
        for bad in (config(switch, tmp_path, kind="bogus"), config(switch, tmp_path, ipam=None),
                    config(switch, tmp_path, cniVersion="9.9.9")):
            status, out = cni("ADD", bad, "bad-cid", ns)
            assert status != 0 and out["code"] in (1, 7), out
        assert port_names(switch) == set() and allocated(tmp_path) == set()
        assert in_ns(ns, "ip", "link", "show", "eth0", check=False).returncode != 0


def fake_ipam(tmp_path, add_output: str, add_status: int) -> str:
    """A CNI_PATH with an IPAM plugin `fake` that answers ADD as told and logs every command."""
    directory = tmp_path / "fake-cni"
    directory.mkdir(exist_ok=True)
    script = directory / "fake"
    script.write_text(f"""#!/bin/sh
cat >/dev/null
echo "$CNI_COMMAND" >> {tmp_path}/fake.log
[ "$CNI_COMMAND" = ADD ] || exit 0
echo '{add_output}'
exit {add_status}
""")
    script.chmod(0o755)
    return str(directory)


@pytest.mark.parametrize("output,status,code", [
    ('{"cniVersion": "1.0.0", "code": 11, "msg": "pool busy"}', 1, 11),     # the plugin's own code kept
    ('{"cniVersion": "1.0.0", "ips": [{"addr": "10.0.0.1/24"}]}', 0, 199),   # a result we cannot read
    ('{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}', 0, 102),   # ip refuses it
])
def test_ipam_failures_undo_the_add(switch, tmp_path, output, status, code, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CNI_PATH", fake_ipam(tmp_path, output, status))
    with namespaces(1) as (ns,):
        status_, out = cni("ADD", config(switch, tmp_path, ipam={"type": "fake"}), "fake-cid", ns)
        assert status_ != 0 and out["code"] == code, out
        assert port_names(switch) == set()
        assert in_ns(ns, "ip", "link", "show", "eth0", check=False).returncode != 0
        log = (tmp_path / "fake.log").read_text().split()
        assert log == ["ADD"] if code == 11 else log == ["ADD", "DEL"]   # an address given is given back


@pytest.mark.dpdk
def test_dpdk_pod_on_a_vhost_user_add_pings_a_tap_pod(switch, tmp_path):
    with namespaces(2) as (tap_ns, dpdk_ns):
        tap = add(config(switch, tmp_path), "tap-pod-cid", tap_ns)
        vhost_cfg = config(switch, tmp_path, kind="vhost-user")
        dpdk = add(vhost_cfg, "dpdk-pod-cid", dpdk_ns, "net1")
        interface = dpdk["interfaces"][0]
        socket_path = interface["socketPath"]
        assert socket_path == str(tmp_path / "sockets" / "dpdk-pod-cid"[:12] / "net1.sock")
        assert os.path.exists(socket_path)
        dpdk_ip = dpdk["ips"][0]["address"].split("/")[0]
        status, out = cni("CHECK", dict(vhost_cfg, prevResult=dpdk), "dpdk-pod-cid", dpdk_ns, "net1")
        assert status == 0, out

        in_ns(tap_ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        guest = TestPmd([virtio_user_vdev(0, socket_path, mac=interface["mac"])],
                        ["--forward-mode=icmpecho", "--port-topology=loop"],
                        main_lcore=1, log_path=tmp_path / "testpmd.log")
        with guest:
            guest.start()
            out = ping(tap_ns, dpdk_ip, 5)
            assert "5 packets transmitted, 5 packets received" in out, out + guest.tail()
        for container, ns, ifname, cfg in (("tap-pod-cid", tap_ns, "eth0", config(switch, tmp_path)),
                                           ("dpdk-pod-cid", dpdk_ns, "net1", vhost_cfg)):
            assert cni("DEL", cfg, container, ns, ifname) == (0, None)
        assert port_names(switch) == set() and allocated(tmp_path) == set()
        assert not os.path.exists(os.path.dirname(socket_path))
