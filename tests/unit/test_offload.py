"""Software checksum and TCP segmentation (vswitch/pmd/offload.c) through cffi,
checked against the checksums scapy computes."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from vswitch.native import ffi, lib

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def make_pkt(frame: bytes, *, pieces: int = 1, flags=0, gso_type=0, gso_size=0, csum_start=0, csum_offset=0,
             hdr_len=0):
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
    pkt.vnet.hdr_len = hdr_len
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


# --- Headers a port takes as they are (issue 8, item 6) ------------------------
# A TAP or AF_PACKET port with offloads (and a guest with GUEST_CSUM/TSO) is
# handed the virtio-net header as it came: whatever the kernel would have to
# trust is checked first, and a frame whose header fails is dropped and counted.

IP4 = dict(src="10.250.0.1", dst="10.250.0.2")
IP6 = dict(src="fd00::1", dst="fd00::2")


def gso_frame(v6=False, vlan=False, payload=3000, l4=None):
    eth = Ether(**MAC) / Dot1Q(vlan=5) if vlan else Ether(**MAC)
    big = eth / (IPv6(**IP6) if v6 else IP(**IP4)) / (l4 or TCP(sport=40000, dport=5001)) / (b"g" * payload)
    return partial(big, TCP if l4 is None else l4.__class__)


def huge_gso_frame():
    """An IPv4 TCP frame of VS_MAX_FRAME bytes: 65536 after the Ethernet header, one
    more than an IPv4 total length can say (scapy cannot build it, so it is padded)."""
    frame, start, off = gso_frame(payload=1000)
    return frame + b"g" * (lib.VS_MAX_FRAME - len(frame)), start, off


def gso_kw(v6=False, mss=1448, **kw):
    gso_type = lib.VS_NET_HDR_GSO_TCPV6 if v6 else lib.VS_NET_HDR_GSO_TCPV4
    return dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, gso_type=gso_type, gso_size=mss, **kw)


def bad_header_case(bad):
    """A frame and header fields that a port taking offloads must not be handed."""
    frame, start, off = gso_frame()
    kw = gso_kw(csum_start=start, csum_offset=off)
    if bad == "csum_field_past_the_end":
        frame = bytes(Ether(**MAC) / IP(**IP4) / UDP() / b"tiny")
        kw = dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=60, csum_offset=6)
    elif bad == "csum_offset_not_tcp_or_udp":
        kw = dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=10)
    elif bad == "csum_start_inside_the_ip_header":
        kw = dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=12, csum_offset=16)
    elif bad == "unknown_flag":
        kw.update(flags=lib.VS_NET_HDR_F_NEEDS_CSUM | 4)
    elif bad == "hdr_len_past_the_end":
        kw.update(hdr_len=len(frame) + 1)
    elif bad == "gso_size_zero":
        kw.update(gso_size=0)
    elif bad == "gso_size_tiny":
        kw.update(gso_size=lib.VS_OFFLOAD_MIN_MSS - 1)
    elif bad == "gso_size_past_64k_with_headers":
        kw.update(gso_size=65535 - 40 + 1)   # one segment of it: IPv4 total length 65536
    elif bad == "gso_tcpv6_on_ipv4":
        kw.update(gso_type=lib.VS_NET_HDR_GSO_TCPV6)
    elif bad == "gso_tcpv4_on_ipv6":
        frame, start, off = gso_frame(v6=True)
        kw.update(csum_start=start, csum_offset=off)
    elif bad == "gso_tcp_on_udp":
        frame, start, off = gso_frame(l4=UDP(sport=53, dport=53))
        kw.update(csum_start=start, csum_offset=off)
    elif bad == "gso_udp":
        kw.update(gso_type=lib.VS_NET_HDR_GSO_UDP)
    elif bad == "gso_ecn_alone":
        kw.update(gso_type=lib.VS_NET_HDR_GSO_ECN)
    elif bad == "gso_csum_not_at_tcp":
        kw.update(csum_start=start + 4)
    elif bad == "gso_csum_offset_udp":
        kw.update(csum_offset=6)
    elif bad == "gso_headers_cut_short":
        frame = frame[:40]
    elif bad == "gso_frame_past_64k_of_ip":
        frame, start, off = huge_gso_frame()
        kw.update(csum_start=start, csum_offset=off)
    else:
        raise AssertionError(bad)
    return frame, kw


BAD_HEADERS = ["csum_field_past_the_end", "csum_offset_not_tcp_or_udp", "csum_start_inside_the_ip_header",
               "unknown_flag", "hdr_len_past_the_end", "gso_size_zero", "gso_size_tiny",
               "gso_size_past_64k_with_headers", "gso_tcpv6_on_ipv4", "gso_tcpv4_on_ipv6", "gso_tcp_on_udp",
               "gso_udp", "gso_ecn_alone", "gso_csum_not_at_tcp", "gso_csum_offset_udp", "gso_headers_cut_short",
               "gso_frame_past_64k_of_ip"]


@pytest.mark.parametrize("bad", BAD_HEADERS)
def test_a_header_a_port_would_trust_is_checked(bad):
    frame, kw = bad_header_case(bad)
    pkt, keep = make_pkt(frame, pieces=3, **kw)
    good = bytes(Ether(**MAC) / IP(**IP4) / TCP() / b"ok")
    ok, keep2 = make_pkt(good)
    assert lib.vs_offload_hdr_valid(pkt) == 0
    ptrs = ffi.new("struct vs_pkt *[]", [pkt])
    assert lib.vs_offload_needed(ptrs, 1, lib.VS_OFFLOAD_ALL) == 1
    out, errors = run_fit([pkt, ok], caps=lib.VS_OFFLOAD_ALL)
    assert errors == 1
    assert [d for d, _, _ in out] == [good]


GOOD_HEADERS = ["gso_tcpv4", "gso_tcpv6", "gso_vlan", "gso_ecn", "gso_without_needs_csum", "gso_one_segment",
                "gso_kernel_hdr_len", "csum_udp", "csum_tcp6", "data_valid", "hdr_len_only"]


def good_header_case(good):
    frame, start, off = gso_frame(v6=good == "gso_tcpv6", vlan=good == "gso_vlan")
    kw = gso_kw(v6=good == "gso_tcpv6", csum_start=start, csum_offset=off, hdr_len=start + 20)
    if good == "gso_ecn":
        kw.update(gso_type=lib.VS_NET_HDR_GSO_TCPV4 | lib.VS_NET_HDR_GSO_ECN)
    elif good == "gso_without_needs_csum":
        kw.update(flags=0, csum_start=0, csum_offset=0)
    elif good == "gso_one_segment":
        kw.update(gso_size=9000)
    elif good == "gso_kernel_hdr_len":
        kw.update(hdr_len=len(frame))    # Linux says skb_headlen(), which may hold payload too
    elif good in ("csum_udp", "csum_tcp6"):
        pkt_s = Ether(**MAC) / (IP(**IP4) / UDP() if good == "csum_udp" else IPv6(**IP6) / TCP()) / b"data"
        frame, start, off = partial(pkt_s, UDP if good == "csum_udp" else TCP)
        kw = dict(flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=off)
    elif good == "data_valid":
        kw = dict(flags=lib.VS_NET_HDR_F_DATA_VALID)    # what a TAP says of a checked frame
    elif good == "hdr_len_only":
        kw = dict(hdr_len=54)
    return frame, kw


@pytest.mark.parametrize("good", GOOD_HEADERS)
def test_a_sound_header_passes_to_a_port_that_takes_it(good):
    frame, kw = good_header_case(good)
    pkt, keep = make_pkt(frame, pieces=2, **kw)
    assert lib.vs_offload_hdr_valid(pkt) == 1
    ptrs = ffi.new("struct vs_pkt *[]", [pkt])
    assert lib.vs_offload_needed(ptrs, 1, lib.VS_OFFLOAD_ALL) == 0
    out, errors = run_fit([pkt], caps=lib.VS_OFFLOAD_ALL)
    assert errors == 0 and [d for d, _, _ in out] == [frame]


@pytest.mark.parametrize("caps", [0, "csum"])
def test_checksum_field_past_the_end_of_a_short_frame(caps):
    # The field lies within the first VS_OFFLOAD_HDR_MAX bytes, so only the
    # frame-length check stands between it and the bytes after the frame.
    frame = bytes(Ether(**MAC) / IP(**IP4) / UDP(sport=53, dport=53) / b"tiny")
    assert len(frame) < 60 + 6 + 2 <= lib.VS_OFFLOAD_HDR_MAX
    pkt, keep = make_pkt(frame, flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=60, csum_offset=6)
    good, keep2 = make_pkt(frame, flags=lib.VS_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    out, errors = run_fit([pkt, good], caps=lib.VS_OFFLOAD_CSUM if caps == "csum" else 0)
    assert errors == 1 and len(out) == 1
    assert len(out[0][0]) == len(frame)


def test_segment_ip_length_never_wraps_16_bits():
    # One segment of 65536 bytes after the Ethernet header: its IPv4 total
    # length would be written as 0.  Segmenting in software must refuse it.
    frame, start, off = huge_gso_frame()
    assert len(frame) - 14 > 0xFFFF
    pkt, keep = make_pkt(frame, pieces=4, **gso_kw(mss=65500, csum_start=start, csum_offset=off))
    out, errors = run_fit([pkt], caps=0)
    assert errors == 1 and out == []
