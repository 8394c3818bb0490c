"""The PMD's learning of a burst of many sources (pmd.c prefetch_sources,
vswitch.h vs_fib_learn_check, fib.c vs_fib_learn_at): a known source is
checked without a call or a store, everything that must change still does,
and the learn takes the entry that check found instead of walking again.

The PMD's clock is held (struct vs_pmd clock_sec), so which frames fall in
the same second as the learning is the test's choice, not the host's.
"""

from __future__ import annotations

import array

from tests.support.callgrind import pmd_instructions
from tests.support.cpu import cpu_has
from tests.support.null_pmd import two_null_ports
from vswitch.native import ffi, lib

SECOND = 1_000_000
BURST = 32


def entries(fib) -> list:
    out = ffi.new("struct vs_fib_entry[]", fib.n_entries + 1)
    n = lib.vs_fib_dump(fib, out, fib.n_entries + 1)
    return sorted((out[i].key, out[i].port_no, out[i].sub, out[i].last_seen, out[i].lru_prev, out[i].lru_next)
                  for i in range(n))


def generate(port, n_src: int, base: int = 0x020000000000) -> None:
    # To a unicast MAC nobody has: every frame floods, every frame a new source until all are known.
    assert lib.vs_null_port_generate(port.np, (0x02FF00000001).to_bytes(6, "big"), base, n_src, 60) == 0


def test_known_sources_in_the_same_second_leave_every_entry_as_it_was(closing):
    a, b, pmd = two_null_ports(closing, polled=1)
    generate(a, 512)
    pmd.pmd.clock_sec = SECOND
    pmd.poll(512 // BURST)
    fib = pmd.fib.c
    assert fib.n_entries == 512 and fib.stats.learned == 512
    learned = entries(fib)
    assert {e[3] for e in learned} == {SECOND}
    pmd.poll(4 * 512 // BURST)          # each source four times more, in the same second
    assert entries(fib) == learned      # no last_seen, no list link rewritten
    assert fib.stats.learned == 512 and fib.stats.moved == 0
    pmd.pmd.clock_sec = SECOND + 1
    pmd.poll(512 // BURST)              # the next second: each refreshed, once
    refreshed = entries(fib)
    assert {e[3] for e in refreshed} == {SECOND + 1}
    assert [e[:3] for e in refreshed] == [e[:3] for e in learned]
    assert fib.stats.learned == 512 and fib.stats.moved == 0


def test_known_sources_that_appear_on_another_port_move_in_the_same_second(closing):
    a, b, pmd = two_null_ports(closing, polled=1)
    generate(a, 64)
    generate(b, 64)                     # the same 64 sources
    pmd.pmd.clock_sec = SECOND
    pmd.poll(64 // BURST)
    fib = pmd.fib.c
    assert {e[1] for e in entries(fib)} == {0} and len(entries(fib)) == 64
    pmd.table.poll[0].port = b.port     # now the PMD receives from port 1 only, still in the same second
    pmd.poll(64 // BURST)
    assert {e[1] for e in entries(fib)} == {1}
    assert fib.stats.moved == 64 and fib.stats.learned == 64
    assert (fib.port_count[0], fib.port_count[1]) == (0, 64)


def colliding_keys(fib, first: int, n: int) -> list:
    """n keys from first on (unicast MACs, VLAN 0) in first's bucket, hashed in C a chunk at a time."""
    chunk = 1 << 16
    buckets = ffi.new("uint32_t[]", chunk)
    target = lib.vs_fib_hash(fib, first) & fib.bucket_mask
    found = []
    for start in range(first, first + 64 * chunk, chunk):
        lib.vs_fib_buckets_of(fib, ffi.new("uint64_t[]", list(range(start, start + chunk))), chunk, buckets)
        found += [start + i for i, b in enumerate(array.array("I", bytes(ffi.buffer(buckets)))) if b == target]
        if len(found) >= n:
            return found[:n]
    raise AssertionError(f"only {len(found)} keys share a bucket")


def test_a_burst_of_sources_in_one_bucket_is_held_to_the_chain_bound(closing):
    # The burst's learn is handed the check's "not found" and counts the
    # bucket itself: a full one still refuses, and its known keys still move.
    a, b, pmd = two_null_ports(closing, polled=1)
    fib = pmd.fib.c
    fib.hash_key[0], fib.hash_key[1] = 0x1234, 0x5678     # while empty; secret in a real run
    same = colliding_keys(fib, 0x020000000000, lib.VS_FIB_MAX_CHAIN + 5)
    to = (0x02FF00000001).to_bytes(6, "big")
    pmd.pmd.clock_sec = SECOND
    for k in same:
        assert a.inject(to + k.to_bytes(6, "big") + b"\x08\x00" + bytes(46)) == 0
    assert pmd.poll() == len(same)                        # one burst, every source a new one
    assert fib.n_entries == fib.stats.learned == lib.VS_FIB_MAX_CHAIN and fib.stats.refused == 5
    pmd.table.poll[0].port = b.port                       # the same sources behind the other port
    for k in same:
        assert b.inject(to + k.to_bytes(6, "big") + b"\x08\x00" + bytes(46)) == 0
    assert pmd.poll() == len(same)
    assert fib.stats.moved == lib.VS_FIB_MAX_CHAIN and fib.stats.refused == 10
    assert (fib.port_count[0], fib.port_count[1]) == (0, lib.VS_FIB_MAX_CHAIN)


def test_a_thousand_known_sources_cost_at_most_1_33x_the_instructions_of_two(tmp_path):
    # Instructions inside vs_pmd_poll_once per frame (tools/pmd_cost.py --macs,
    # deterministic under callgrind), every frame a source known in this
    # second; the same 64 frames a pass in every run.  Two sources cost the
    # table one learn a burst (the memo), a thousand one per frame.  Before
    # the burst was hashed together and the known source checked inline:
    # 1.70x; with SipHash-1-3 four keys at a time in AVX2, 1.43x.  On this
    # host: 1.28x hashed with AES rounds, 1.70x with SipHash one at a time
    # (a CPU without AES-NI).
    passes = "300"
    two, _ = pmd_instructions(tmp_path, "2", "--macs", "2", "--passes", passes)
    scalar, per_function = pmd_instructions(tmp_path, "scalar", "--macs", "1000", "--passes", passes, "--siphash")
    assert scalar / two < 1.76, (scalar / two, per_function)
    if cpu_has("aes"):
        many, per_function = pmd_instructions(tmp_path, "1000", "--macs", "1000", "--passes", passes)
        assert many / two < 1.33, (many / two, per_function)


def test_a_refresh_walks_the_bucket_once(tmp_path):
    # As above, with every frame's source seen in a new second (--refresh:
    # 15 passes, about one cycle of the 1,000 sources), so every frame calls
    # the learn.  When the learn walked the source's bucket again after the
    # inline check: 1.78x two sources' instructions with AVX2 SipHash, 2.03x
    # one key at a time; handed the check's entry, 1.64x and 1.89x; hashed
    # with AES rounds, 1.48x (SipHash one at a time: 1.90x) on this host.
    passes = "15"
    two, _ = pmd_instructions(tmp_path, "2", "--macs", "2", "--passes", passes)
    scalar, per_function = pmd_instructions(tmp_path, "scalar", "--macs", "1000", "--passes", passes,
                                            "--refresh", "--siphash")
    assert scalar / two < 1.95, (scalar / two, per_function)
    if cpu_has("aes"):
        many, per_function = pmd_instructions(tmp_path, "1000", "--macs", "1000", "--passes", passes, "--refresh")
        assert many / two < 1.53, (many / two, per_function)
