"""Software checksum and TCP segmentation (vswitch/pmd/offload.c) through cffi,
checked against the checksums scapy computes."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from vswitch.native import ffi, lib

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def make_pkt(frame: bytes, *, pieces: int = 1, flags=0, gso_type=0, gso_size=0, csum_start=0, csum_offset=0):
    """A struct vs_pkt over `frame` split into `pieces` segments; returns (pkt, keepalive)."""
    pkt = ffi.new("struct vs_pkt *")
    bufs = []
    cut = [len(frame) * i // pieces for i in range(pieces + 1)]
    for i in range(pieces):
        chunk = frame[cut[i]:cut[i + 1]]
        buf = ffi.new("uint8_t[]", chunk or b"\0")
        bufs.append(buf)
        pkt.segs[i].addr = buf
        pkt.segs[i].len = len(chunk)
    pkt.nsegs = pieces
    pkt.len = len(frame)
    pkt.vnet.flags = flags
    pkt.vnet.gso_type = gso_type
    pkt.vnet.gso_size = gso_size
    pkt.vnet.csum_start = csum_start
    pkt.vnet.csum_offset = csum_offset
    return pkt, bufs


def run_fit(pkts, caps=0):
    batch = ffi.new("struct vs_offload_batch *")
    ptrs = ffi.new("struct vs_pkt *[]", pkts)
    frames, start = [], 0
    while start < len(pkts):
        start = lib.vs_offload_fit(batch, ptrs, len(pkts), start, caps)
        for i in range(batch.n):
            p = batch.out[i]
            frames.append((b"".join(ffi.buffer(p.segs[s].addr, p.segs[s].len)[:] for s in range(p.nsegs)),
                           p.vnet.flags, p.vnet.gso_type))
    return frames, batch.errors


def partial(frame_pkt, l4):
    """The frame as a sender with checksum offload leaves it: the L4 checksum
    field holds the pseudo-header sum only (what Linux puts there)."""
    full = bytes(frame_pkt)
    layer = frame_pkt[l4]
    ip = frame_pkt[IP] if IP in frame_pkt else frame_pkt[IPv6]
    l4_len = len(bytes(layer))
    if IP in frame_pkt:
        pseudo = bytes(ip)[12:20] + bytes([0, layer.__class__ is TCP and 6 or 17]) + l4_len.to_bytes(2, "big")
    else:
        pseudo = bytes(ip)[8:40] + l4_len.to_bytes(4, "big") + bytes([0, 0, 0, layer.__class__ is TCP and 6 or 17])
    s = 0
    for i in range(0, len(pseudo), 2):
        s += int.from_bytes(pseudo[i:i + 2], "big")
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    start = len(full) - l4_len
    off = 16 if layer.__class__ is TCP else 6
    return full[:start + off] + s.to_bytes(2, "big") + full[start + off + 2:], start, off


@pytest.mark.parametrize("pieces", [1, 3, 7])
@pytest.mark.parametrize("kind", ["tcp4", "udp4", "tcp6", "udp6"])
def test_checksum_fill_matches_scapy(kind, pieces):
    l3 = IP(src="10.250.0.1", dst="10.250.0.2") if kind.endswith("4") else IPv6(src="fd00::1", dst="fd00::2")
    l4 = TCP(sport=1234, dport=80, seq=1000, flags="PA") if kind.startswith("tcp") else UDP(sport=53, dport=5353)
    pkt_s = Ether(**MAC) / l3 / l4 / (b"payload-of-odd-length-" * 11 + b"x")
    frame, start, off = partial(pkt_s, TCP if kind.startswith("tcp") else UDP)
    pkt, keep = make_pkt(frame, pieces=pieces, flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=off)
    out, errors = run_fit([pkt])
    assert errors == 0 and len(out) == 1
    data, flags, gso = out[0]
    assert flags == 0 and gso == 0
    assert data == bytes(pkt_s), "checksum differs from scapy's"


def test_frames_a_port_takes_pass_untouched():
    frame = bytes(Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / TCP() / b"x")
    pkt, keep = make_pkt(frame, flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)
    ptrs = ffi.new("struct vs_pkt *[]", [pkt])
    assert lib.vs_offload_needed(ptrs, 1, lib.VS_OFFLOAD_CSUM) == 0
    assert lib.vs_offload_needed(ptrs, 1, 0) == 1
    out, errors = run_fit([pkt], caps=lib.VS_OFFLOAD_CSUM)
    assert out[0][0] == frame and out[0][1] == lib.VS_NET_HDR_F_NEEDS_CSUM


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [False, True])
@pytest.mark.parametrize("payload_len,mss", [(4000, 1448), (1448 * 3, 1448), (100, 1448), (20000, 536)])
def test_segmentation_matches_scapy(v6, vlan, payload_len, mss):
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.250.0.1", dst="10.250.0.2", id=777, flags="DF")
    eth = Ether(**MAC) / Dot1Q(vlan=5) if vlan else Ether(**MAC)
    tcp = TCP(sport=40000, dport=5001, seq=0xFFFFF000, ack=99, flags="FPA" if payload_len > mss else "PA",
              window=500, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    big = eth / l3 / tcp / payload
    if not v6:
        big[IP].len = 0   # a GSO frame's IP length is not trusted
    frame, start, off = partial(big, TCP)
    gso_type = lib.VS_NET_HDR_GSO_TCPV6 if v6 else lib.VS_NET_HDR_GSO_TCPV4
    pkt, keep = make_pkt(frame, pieces=5, flags=lib.VS_NET_HDR_F_NEEDS_CSUM, gso_type=gso_type, gso_size=mss,
                         csum_start=start, csum_offset=off)
    out, errors = run_fit([pkt])
    assert errors == 0
    expected_n = max(1, -(-payload_len // mss))
    assert len(out) == expected_n
    got_payload = b""
    for i, (data, flags, gso) in enumerate(out):
        assert flags == 0 and gso == 0
        p = Ether(data)
        seg_payload = bytes(p[TCP].payload)
        assert len(seg_payload) == min(mss, payload_len - i * mss)
        assert p[TCP].seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        last = i == expected_n - 1
        assert bool(p[TCP].flags.F) == (last and "F" in str(tcp.flags))
        assert bool(p[TCP].flags.P) == last
        if v6:
            assert p[IPv6].plen == len(bytes(p[TCP]))
        else:
            assert p[IP].len == len(bytes(p[IP])) and p[IP].id == 777 + i
        # Recompute with scapy: the frame must not change.
        ref = Ether(data)
        del ref[TCP].chksum
        if not v6:
            del ref[IP].chksum
        assert bytes(Ether(bytes(ref))) == data, f"segment {i}: checksums differ from scapy's"
        got_payload += seg_payload
    assert got_payload == payload


def test_cwr_only_on_first_segment():
    big = Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / TCP(flags="AC") / (b"z" * 3000)
    frame, start, off = partial(big, TCP)
    pkt, keep = make_pkt(frame, gso_type=lib.VS_NET_HDR_GSO_TCPV4 | lib.VS_NET_HDR_GSO_ECN, gso_size=1000,
                         flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=off)
    out, _ = run_fit([pkt], caps=lib.VS_OFFLOAD_CSUM | lib.VS_OFFLOAD_TSO4)   # TSO but no ECN: segment
    assert [bool(Ether(d)[TCP].flags.C) for d, _, _ in out] == [True, False, False]


@pytest.mark.parametrize("bad", ["csum_past_end", "not_tcp", "zero_mss", "too_many_segments", "udp_gso", "short"])
def test_bad_headers_are_dropped_and_counted(bad):
    big = Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / TCP() / (b"z" * 3000)
    frame = bytes(big)
    kw = dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16,
              gso_type=lib.VS_NET_HDR_GSO_TCPV4, gso_size=1000)
    if bad == "csum_past_end":
        kw.update(gso_type=0, csum_start=len(frame) - 1)
    elif bad == "not_tcp":
        frame = bytes(Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / UDP() / (b"z" * 3000))
    elif bad == "zero_mss":
        kw.update(gso_size=0)
    elif bad == "too_many_segments":
        kw.update(gso_size=10)
    elif bad == "udp_gso":
        kw.update(gso_type=lib.VS_NET_HDR_GSO_UDP)
    elif bad == "short":
        frame = frame[:30]
        kw.update(gso_type=lib.VS_NET_HDR_GSO_TCPV4)
    good = bytes(Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / TCP() / b"ok")
    pkt, keep = make_pkt(frame, **kw)
    ok, keep2 = make_pkt(good)
    out, errors = run_fit([pkt, ok])
    assert errors == 1
    assert [d for d, _, _ in out] == [good]


def test_a_burst_of_gso_frames_comes_out_in_order():
    pkts, keep, payloads = [], [], []
    for i in range(32):
        payload = bytes([i]) * 9000
        big = Ether(**MAC) / IP(src="10.250.0.1", dst="10.250.0.2") / TCP(seq=i * 100000) / payload
        frame, start, off = partial(big, TCP)
        pkt, k = make_pkt(frame, gso_type=lib.VS_NET_HDR_GSO_TCPV4, gso_size=1448,
                          flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=off)
        pkts.append(pkt)
        keep.append(k)
        payloads.append(payload)
    out, errors = run_fit(pkts)
    assert errors == 0 and len(out) == 32 * 7
    joined = b"".join(bytes(Ether(d)[TCP].payload) for d, _, _ in out)
    assert joined == b"".join(payloads)
