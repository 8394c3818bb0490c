"""VXLAN over the AF_XDP underlay (`underlay: {type: af-xdp, interface: IF}`):
vswitchd's tunnel in host namespace h1 sends and receives its datagrams
through an XDP socket on h1's underlay veth, against a Linux `vxlan` device
bridged to namespace g2 in host h2 (the hosts of test_vxlan.py).

No static neighbour anywhere: the kernel in h1 keeps the VTEP address and
answers and asks ARP (the port's XDP program passes everything that is not
the tunnel's), and the port learns the next hop's MAC from the kernel.
The cases: ping and checksummed TCP both ways, what `show` says, hostile
datagrams counted by reason; deleting the port leaves no XDP program; a
switch killed with -9 leaves its program, the next start removes it and
forwards again.
"""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import Vswitchd
from tests.support.netns import in_ns, ping_until, python_in_ns, unique
from tests.system.test_vxlan import (G1, G2, H1, H2, VNI, behind_bridge, configure, hosts, tap_spec, tcp_transfer,
                                     wait_link)
from tests.support.frames import wait_for

pytestmark = pytest.mark.system

STRANGER = "10.99.0.3"     # a second address on h2: not a remote of the tunnel
NOBODY = "10.99.0.77"      # a remote on the underlay's subnet that answers no ARP: never resolved


@pytest.fixture(autouse=True)
def _tools(require_tool, tmp_path, monkeypatch):
    require_tool("ip", "iproute2")
    require_tool("ethtool")
    # The records of attached interfaces (af_xdp.py) go to the test's own directory.
    monkeypatch.setenv("VSWITCH_AF_XDP_DIR", str(tmp_path / "af-xdp"))


def xdp_spec(h1: str, *more_remotes: str) -> dict:
    return {"name": "vx", "type": "vxlan", "local_ip": H1, "remote": [H2, *more_remotes], "vni": VNI, "netns": h1,
            "underlay": {"type": "af-xdp", "interface": unique("vxu", 1)}}


def xdp_prog_id(ns: str, ifname: str) -> int:
    """The id of the XDP program on ifname (any mode), 0 if none."""
    [link] = json.loads(in_ns(ns, "ip", "-j", "-d", "link", "show", ifname).stdout)
    xdp = link.get("xdp") or {}
    return int((xdp.get("prog") or {}).get("id", 0) or next(
        (a.get("prog", {}).get("id", 0) for a in xdp.get("attached", []) if a.get("prog")), 0))


def linux_vtep(h2: str, g2: str) -> None:
    dev = unique("vxl", 1)
    in_ns(h2, "ip", "link", "add", dev, "type", "vxlan", "id", str(VNI), "local", H2, "remote", H1,
          "dstport", "4789")
    behind_bridge(h2, g2, dev)


def hostile(ns: str, source: str, payload_hex: str, size_pad: int = 0, port: int = 4789) -> None:
    """One UDP datagram from source (an address of ns) to the tunnel's address and port (or another)."""
    script = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"s.bind(('{source}', 0)); "
              f"s.sendto(bytes.fromhex('{payload_hex}') + b'z' * {size_pad}, ('{H1}', {port}))")
    proc = python_in_ns(ns, "-c", script)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_tunnel_over_af_xdp_to_a_linux_vxlan_device(tmp_path):
    with hosts() as (h1, h2, g1, g2):
        linux_vtep(h2, g2)
        ifname = unique("vxu", 1)
        with Vswitchd(tmp_path, ports=[xdp_spec(h1, NOBODY), tap_spec("g1", g1, 1)]) as d:
            wait_link(g1, unique("vxt", 1))
            configure(g1, unique("vxt", 1), G1)
            ping_until(g1, G2, timeout=20)
            tcp_transfer(g1, g2, G2)
            tcp_transfer(g2, g1, G1, port=5102)

            info = d.port("vx")
            under = info["underlay"]
            h2_mac = in_ns(h2, "cat", f"/sys/class/net/{unique('vxu', 2)}/address").stdout.strip()
            assert (under["type"], under["interface"]) == ("af-xdp", ifname)
            assert info["remotes"][0]["next_hop_mac"] == h2_mac
            assert under["stats"]["rx_packets"] > 1000 and under["stats"]["tx_packets"] > 1000
            assert under["xdp_program"]["id"] == xdp_prog_id(h1, ifname) != 0
            stats = info["stats"]
            assert stats["rx_packets"] > 1000 and stats["tx_packets"] > 1000
            # The remote nobody answers ARP for: its copies of floods are counted, not sent.
            assert info["remotes"][1]["next_hop_mac"] is None and info["remotes"][1]["tx_packets"] == 0
            assert "not resolved" in info["remotes"][1]["unresolved"]
            assert stats["tx_no_neighbour"] >= 1
            # The kernel resolved H2 by ARP (passed by the XDP program), nobody set it.
            neigh = in_ns(h1, "ip", "neigh", "show", H2, "dev", ifname).stdout
            assert h2_mac in neigh and "PERMANENT" not in neigh
            g2_mac = in_ns(g2, "cat", f"/sys/class/net/{unique('vxg', 2)}/address").stdout.strip()
            entries = {e["mac"]: e for e in d.ctl("fdb", "show")["entries"]}
            assert (entries[g2_mac]["port"], entries[g2_mac]["remote"]) == ("vx", H2)
            text = d.ctl_raw("show").stdout
            print(text)
            assert f"underlay af-xdp on {ifname}" in text and f"{H2} via {h2_mac}" in text, text
            assert f"{NOBODY} via unresolved: next hop {NOBODY} not resolved yet" in text, text
            assert "tx_no_neighbour" in text, text

            # Hostile datagrams, each dropped and counted by reason.
            in_ns(h2, "ip", "addr", "add", f"{STRANGER}/24", "dev", unique("vxu", 2))
            inner = "ffffffffffff020000000009" + "0800" + "00" * 46
            hostile(h2, H2, f"08000000{VNI + 1:06x}00" + inner)            # a VNI the port does not carry
            hostile(h2, STRANGER, f"08000000{VNI:06x}00" + inner)          # not from the remote
            hostile(h2, H2, "080000")                                      # a runt
            hostile(h2, H2, f"08000000{VNI:06x}00" + inner, size_pad=3000)  # fragmented by h2's kernel
            wait_for(lambda: d.port("vx")["stats"]["rx_fragments"] >= 1, what="the fragment count")
            stats = d.port("vx")["stats"]
            assert (stats["rx_wrong_vni"], stats["rx_unknown_remote"], stats["rx_malformed"]) == (1, 1, 1), stats
            # ARP and ping to the VTEP's own address still reach h1's kernel.
            in_ns(h2, "ip", "neigh", "flush", "dev", unique("vxu", 2))
            in_ns(h2, "ping", "-c", "1", "-W", "2", H1)
            # So does UDP to another port of the same address (the program takes only dst_port's).
            server = python_in_ns(h1, "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                  f"s.bind(('{H1}', 5555)); s.settimeout(10); print('ready', flush=True); "
                                  "print(s.recv(100).decode())")
            try:
                assert server.stdout.readline().strip() == "ready"
                hostile(h2, H2, b"to the kernel".hex(), port=5555)
                out, err = server.communicate(timeout=15)
                assert server.returncode == 0 and out.strip() == "to the kernel", err
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()

            # Deleting the port takes its XDP program off the interface.
            assert d.ctl_raw("del-port", "vx").returncode == 0
            assert xdp_prog_id(h1, ifname) == 0
            assert list((tmp_path / "af-xdp").iterdir()) == []

            # The same from the command line (--underlay af-xdp:IF), and the tunnel works again.
            out = d.ctl_raw("add-port", "vx", "--type", "vxlan", "--local-ip", H1, "--remote", H2, "--vni", str(VNI),
                            "--netns", h1, "--underlay", f"af-xdp:{ifname}")
            assert out.returncode == 0, out.stderr
            assert d.port("vx")["underlay"]["interface"] == ifname and xdp_prog_id(h1, ifname) != 0
            ping_until(g1, G2, timeout=20)


def test_killed_switch_leaves_a_program_the_next_start_removes(tmp_path):
    with hosts() as (h1, h2, g1, g2):
        linux_vtep(h2, g2)
        ifname = unique("vxu", 1)
        d = Vswitchd(tmp_path, ports=[xdp_spec(h1), tap_spec("g1", g1, 1)])
        try:
            d.start()
            first = d.port("vx")["underlay"]["xdp_program"]["id"]
            assert xdp_prog_id(h1, ifname) == first != 0
            d.kill()
            assert xdp_prog_id(h1, ifname) == first, "killed: the program stays"
            # Its map has no socket now: the tunnel's frames go to h1's kernel instead of nowhere.
            in_ns(h2, "ping", "-c", "1", "-W", "2", H1)
            d.start()
            second = d.port("vx")["underlay"]["xdp_program"]["id"]
            assert second != first and xdp_prog_id(h1, ifname) == second
            assert f"removed XDP program {first}" in d.log()
            wait_link(g1, unique("vxt", 1))
            configure(g1, unique("vxt", 1), G1)
            ping_until(g1, G2, timeout=20)
            tcp_transfer(g1, g2, G2)
            d.stop()
            assert xdp_prog_id(h1, ifname) == 0
        finally:
            d.stop()
