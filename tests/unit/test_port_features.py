"""Per-port feature control and the `mtu` key: config validation, vswitchctl
flags, and what a vhost-user front-end is offered.

The `features` key is a flag-set key of the port registry (registry.Key with
`names`): a mapping of known names to true/false in YAML, `name=on|off,...`
on the command line.  Each name stands for the virtio feature bits of
vhost.protocol.FEATURE_GROUPS.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.daemon import REPO, Vswitchd
from tests.support.frontend import RequestFailed, VhostUserFrontend
from vswitch.config import ConfigError, parse, validate_port
from vswitch.ports import registry
from vswitch.vhost import protocol
from vswitch.vhost.protocol import FEATURE_GROUPS, OFFERED_FEATURES, Request, bits


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(data, "x.yaml")
    return exc.value.problems


def vhost(tmp_path, **keys) -> dict:
    return {"name": "vm1", "type": "vhost-user", "path": str(tmp_path / "vm1.sock"), **keys}


# --------------------------------------------------------------------------- config

def test_features_map_names_to_booleans(tmp_path):
    cfg = parse({"ports": [vhost(tmp_path, features={"mrg_rxbuf": False, "tso": False, "in_order": True})]})
    assert cfg.ports[0]["features"] == {"mrg_rxbuf": False, "tso": False, "in_order": True}
    # Absent: nothing is turned off, and nothing is written out.
    assert "features" not in parse({"ports": [vhost(tmp_path)]}).ports[0]


def test_every_feature_name_covers_bits():
    assert {"packed", "mrg_rxbuf", "tso", "csum", "in_order", "event_idx", "indirect", "mq"} <= set(FEATURE_GROUPS)
    for name, mask in FEATURE_GROUPS.items():
        assert mask, name
    assert FEATURE_GROUPS["tso"] == bits(protocol.VIRTIO_NET_F_HOST_TSO4, protocol.VIRTIO_NET_F_HOST_TSO6,
                                         protocol.VIRTIO_NET_F_HOST_ECN, protocol.VIRTIO_NET_F_GUEST_TSO4,
                                         protocol.VIRTIO_NET_F_GUEST_TSO6, protocol.VIRTIO_NET_F_GUEST_ECN)
    # TSO needs checksum offload (virtio 5.1.3.1): turning csum off turns TSO off too.
    assert FEATURE_GROUPS["csum"] & FEATURE_GROUPS["tso"] == FEATURE_GROUPS["tso"]
    assert FEATURE_GROUPS["packed"] == bits(protocol.VIRTIO_F_RING_PACKED)


@pytest.mark.parametrize("features,message", [
    ({"warp": False}, "features: unknown feature 'warp' (one of: "),
    ({"tso": "off"}, "features: tso: 'off' must be true or false"),
    ({"tso": 0}, "features: tso: 0 must be true or false"),
    (["tso"], "features: ['tso'] must be a mapping of feature names to true or false"),
    ("tso=off", "features: 'tso=off' must be a mapping of feature names to true or false"),
])
def test_bad_features_are_one_line(tmp_path, features, message):
    found = problems_of({"ports": [vhost(tmp_path, features=features)]})
    assert len(found) == 1, found
    assert found[0].startswith("x.yaml: ports[0] (vm1).features: ") and message in found[0], found


def test_features_is_a_flag_set_key():
    key = registry.get("vhost-user").key("features")
    assert key.type is dict and key.shown_type == "features"
    assert set(key.names) == set(FEATURE_GROUPS)
    assert key.parse_flag("mrg_rxbuf=off,tso=no, in_order=false") == \
        {"mrg_rxbuf": False, "tso": False, "in_order": False}
    assert key.parse_flag("csum=on") == {"csum": True}
    with pytest.raises(registry.KeyProblem, match="'tso=maybe' is not NAME=on or NAME=off"):
        key.parse_flag("tso=maybe")
    with pytest.raises(registry.KeyProblem, match="unknown feature 'warp'"):
        key.parse_flag("warp=off")


@pytest.mark.parametrize("kind", ["vhost-user", "tap", "af-packet"])
def test_mtu_key(tmp_path, kind):
    spec = {"vhost-user": vhost(tmp_path), "tap": {"name": "t1", "type": "tap"},
            "af-packet": {"name": "a1", "type": "af-packet", "ifname": "lo"}}[kind]
    port = validate_port({**spec, "mtu": 9000}, None, [])
    assert port["mtu"] == 9000
    found: list[str] = []
    assert validate_port({**spec, "mtu": 67}, None, found) is None
    assert found == [f"port '{spec['name']}': mtu: 67 must be a whole number from 68 to 65535"]
    default = validate_port(spec, None, [])
    # AF_PACKET follows the interface's MTU unless told otherwise.
    assert default.get("mtu") == (None if kind == "af-packet" else 1500)


# --------------------------------------------------------------------------- vswitchctl

def vswitchctl(switch, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vswitch.control.cli", "--socket", switch.control_socket, *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def test_vswitchctl_add_port_with_features(tmp_path):
    with Vswitchd(tmp_path, ports=[]) as switch:
        out = vswitchctl(switch, "add-port", "vm1", "--type", "vhost-user", "--path", str(tmp_path / "vm1.sock"),
                         "--features", "mrg_rxbuf=off,tso=off", "--mtu", "9000")
        assert out.returncode == 0, out.stderr
        port = switch.port("vm1")
        assert port["features"] == {"mrg_rxbuf": False, "tso": False}
        assert port["mtu"] == 9000
        offered = int(port["vhost"]["offered_features"], 16)
        assert offered == OFFERED_FEATURES & ~FEATURE_GROUPS["mrg_rxbuf"] & ~FEATURE_GROUPS["tso"]
        text = vswitchctl(switch, "show", "vm1").stdout
        assert "offered:" in text and "mrg_rxbuf" not in text.split("offered:")[1].split("\n")[0]
        assert "guest_csum" in text.split("offered:")[1].split("\n")[0]

        bad = vswitchctl(switch, "add-port", "vm2", "--type", "vhost-user", "--path", str(tmp_path / "vm2.sock"),
                         "--features", "warp=off")
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
            f"argument --features: unknown feature 'warp' (one of: {', '.join(sorted(FEATURE_GROUPS))})")
        # Through the control socket, the daemon checks it: one line.
        bad = vswitchctl(switch, "port/add", "name=vm2", "type=vhost-user", f"path={tmp_path / 'vm2.sock'}",
                         'features={"tso": "no"}')
        assert bad.returncode == 1
        assert bad.stderr == "vswitchctl: port 'vm2': features: tso: 'no' must be true or false\n"
        assert [p["name"] for p in switch.ctl("show")["ports"]] == ["vm1"]


# --------------------------------------------------------------------------- the vhost-user protocol

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def frame(dst: bytes, src: bytes, size: int = 200) -> bytes:
    return dst + src + b"\x08\x00" + bytes(i & 0xFF for i in range(size - 14))


def test_masked_features_are_not_offered_and_cannot_be_set(tmp_path):
    masked = FEATURE_GROUPS["mrg_rxbuf"] | FEATURE_GROUPS["event_idx"] | FEATURE_GROUPS["tso"]
    off = {"mrg_rxbuf": False, "event_idx": False, "tso": False}
    ports = [vhost(tmp_path, features=off),
             {"name": "vm2", "type": "vhost-user", "path": str(tmp_path / "vm2.sock")},
             {"name": "vm3", "type": "vhost-user", "path": str(tmp_path / "vm3.sock"), "features": off}]
    with Vswitchd(tmp_path, ports=ports) as switch:
        a, b = switch.connect_guests(["vm1", "vm2"])
        c = VhostUserFrontend(str(tmp_path / "vm3.sock")).connect()
        try:
            assert a.offered_features == OFFERED_FEATURES & ~masked
            assert a.features & masked == 0
            assert b.offered_features == OFFERED_FEATURES
            # Frames cross both ways, into a guest without mergeable buffers or event idx.
            a.send_frame(0, frame(MAC_B, MAC_A))
            assert [f.data for f in b.receive(0)] == [frame(MAC_B, MAC_A)]
            b.send_frame(0, frame(MAC_A, MAC_B, 1500))
            assert [f.data for f in a.receive(0)] == [frame(MAC_A, MAC_B, 1500)]
            port = switch.port("vm1")
            assert int(port["vhost"]["features"], 16) == a.features
            assert int(port["vhost"]["offered_features"], 16) == OFFERED_FEATURES & ~masked
            assert "mrg_rxbuf" not in port["vhost"]["offered_feature_names"]
            assert "guest_csum" in port["vhost"]["offered_feature_names"]
            assert "event_idx" not in port["vhost"]["negotiated_feature_names"]
            assert "version_1" in port["vhost"]["negotiated_feature_names"]
            # A front-end asking for a masked bit is refused like any bit not offered.
            c.handshake(stop_before=Request.SET_FEATURES)
            with pytest.raises(RequestFailed):
                c.set_u64(Request.SET_FEATURES, c.features | bits(protocol.VIRTIO_NET_F_MRG_RXBUF),
                          need_reply=True)
            c.sync()
            assert "SET_FEATURES: features 0x8000 were not offered" in switch.log()
            assert switch.port("vm3")["stats"]["protocol_errors"] == 1
        finally:
            for fe in (a, b, c):
                fe.close()
