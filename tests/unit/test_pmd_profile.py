"""The switch's own cost without a generator: the PMD's stage timer
(struct vs_pmd_profile, tools/scale.py --profile), the null port's copy
mode (the switch's one copy, without a guest) and the copy benchmark
(tools/copy_bench.py).  No timing is asserted: only that the figures add up
and that the timer's code runs only when asked (callgrind counts
instructions, which a busy host does not change).  README "The switch's own
cost" has the figures."""

from __future__ import annotations

import pytest

from tests.support.callgrind import pmd_instructions
from tests.support.null_pmd import two_null_ports
from tests.support.null_pmd import NullPort
from tools import copy_bench
from tools.scale import STAGES
from vswitch.native import ffi, lib

PASSES = 300


def two_generators(closing, length: int, copy: bool):
    a, b, pmd = two_null_ports(closing)
    for port, dst, src in ((a, 0x020000000002, 0x020000000001), (b, 0x020000000001, 0x020000000002)):
        assert lib.vs_null_port_generate(port.np, dst.to_bytes(6, "big"), src, 1, length) == 0
        if copy:
            assert lib.vs_null_port_copy_tx(port.np, 64) == 0
    return a, b, pmd.pmd


def test_the_stage_timer_accounts_for_every_busy_pass_and_only_when_on(closing):
    a, b, pmd = two_generators(closing, 1518, copy=True)
    for _ in range(PASSES):
        assert lib.vs_pmd_poll_once(pmd) == 2 * lib.VS_BURST
    assert pmd.profile.packets == 0 and pmd.profile.busy_cycles == 0
    assert all(pmd.profile.cycles[i] == 0 for i in range(lib.VS_PMD_STAGES))
    pmd.profiling = 1
    for _ in range(PASSES):
        assert lib.vs_pmd_poll_once(pmd) == 2 * lib.VS_BURST
    prof = pmd.profile
    stages = {name: prof.cycles[i] for name, i in STAGES}
    assert prof.packets == PASSES * 2 * lib.VS_BURST and prof.bursts == PASSES * 2
    for name in ("rx", "learn_lookup", "group", "tx", "rx_done"):
        assert stages[name] > 0, stages
    assert stages["vlan"] == 0, "no port has VLAN settings: the plain path ran"
    assert sum(stages.values()) <= prof.busy_cycles, (stages, prof.busy_cycles)
    print({k: round(v / prof.packets, 1) for k, v in stages.items()},
          f"busy {prof.busy_cycles / prof.packets:.1f} cycles/frame")
    # Every frame was forwarded and, in copy mode, copied whole after a 12-byte header.
    for src, dst in ((a, b), (b, a)):
        assert dst.np.queues[0].stats.tx_packets == 2 * PASSES * lib.VS_BURST
        frame = ffi.buffer(src.np.queues[0].frames, 1518)[:]
        sink = ffi.buffer(dst.np.sink, 12 + 1518)[:]
        assert sink[:12] == bytes(12) and sink[12:] == frame


def test_copy_mode_refuses_bad_sizes(closing):
    (p,) = (NullPort(0),)
    closing(p)
    assert lib.vs_null_port_copy_tx(p.np, 0) == -22
    assert lib.vs_null_port_copy_tx(p.np, 100) == -22        # not a power of two
    assert lib.vs_null_port_copy_tx(p.np, 1 << 17) == -22
    assert lib.vs_null_port_copy_tx(p.np, 8) == 0 and p.np.sink_slots == 8


def test_the_stage_timer_costs_nothing_when_off(tmp_path):
    """Without profiling, no instruction of the timed copy of the loop runs (the
    loop that does run was compiled without the TSC reads)."""
    off_total, off = pmd_instructions(tmp_path, "off", "--passes", "200")
    on_total, on = pmd_instructions(tmp_path, "on", "--passes", "200", "--profile")
    assert on.get("poll_pass_profiled", 0) > 0, sorted(on)
    assert off.get("poll_pass_profiled", 0) == 0, off.get("poll_pass_profiled")
    frames = 201 * 32
    print(f"instructions per frame: profiling off {off_total / frames:.1f}, on {on_total / frames:.1f}")
    assert 0 < off_total < on_total


def test_the_copy_benchmark_copies_right_and_reports_every_point():
    rows = copy_bench.run([64, 1518, 9000], copies=2000, cold_copies=200, reps=2)
    assert all(r["dst_offset"] == 0 for r in rows)
    assert [(r["size"], r["cache"], r["routine"]) for r in rows] == [
        (size, cache, routine) for size in (64, 1518, 9000) for cache in ("warm", "cold")
        for routine in ("memcpy", "copy_frame")]
    for r in rows:
        assert r["copies"] == (2000 if r["cache"] == "warm" else 200)
        assert r["cycles_per_copy"] > 0 and r["bytes_per_cycle"] > 0
        assert len(r["runs_cycles_per_copy"]) == 2
    print(copy_bench.table(rows))
    # The routine checks its copies (-EIO) and its settings.
    with pytest.raises(OSError, match="Invalid argument"):
        copy_bench.run_one(0, "memcpy", False, 10)
    with pytest.raises(OSError, match="Invalid argument"):
        copy_bench.run_one(lib.VS_COPY_MAX_SIZE + 1, "copy_frame", False, 10)
    with pytest.raises(OSError, match="Invalid argument"):
        copy_bench.run_one(64, "memcpy", False, 10, lib.VS_COPY_MAX_OFFSET + 1)
    # The largest frame at the largest offset is copied whole (the routine checks it: -EIO).
    assert copy_bench.run_one(lib.VS_COPY_MAX_SIZE, "copy_frame", False, 3, lib.VS_COPY_MAX_OFFSET)["copies"] == 3
    # A cold loop takes each buffer once: asked for more, it copies one per buffer.
    pool_buffers = lib.VS_COPY_POOL_BYTES // 12288
    assert copy_bench.run_one(64, "memcpy", True, pool_buffers + 5)["copies"] == pool_buffers


def test_the_profile_tool_runs_and_its_stages_add_up(tmp_path):
    from tools import scale
    assert scale.main(["--profile", "64,1518", "--smoke", "--out-dir", str(tmp_path)]) == 0
    import json
    rows = json.loads((tmp_path / "profile.json").read_text())["results"]
    assert [r["frame"] for r in rows] == [64, 1518] and all(r["copy"] for r in rows)
    for r in rows:
        stages = sum(r[name] for name, _ in STAGES)
        assert r["loop"] >= 0 and abs(stages + r["loop"] - r["profiled_busy"]) < 1, r
        assert r["tx"] > 0 and r["learn_lookup"] > 0 and r["cycles_per_packet_min"] > 0
        assert r["frames_per_burst"] == lib.VS_BURST


@pytest.mark.parametrize("size", [4096, 9000])
def test_a_frame_copy_is_not_slowed_by_4k_aliasing(size):
    """glibc copies large blocks with `rep movsb`, which on this machine runs 20-80x slower when
    the destination is a few bytes ahead of the source modulo 4 KiB; vs_vq_copy_frame puts the
    frame 12 bytes after the header, so a source at the same page offset as the destination buffer
    lands exactly there (dst_offset 0 -> +12).  The switch's copy must not pay for it: within 4x of
    the same copy at +76 (dst_offset 64), best of 5 loops each (before the fix: 50x)."""
    aliased = copy_bench.measure(size, "copy_frame", False, 2000, 5, dst_offset=0)["cycles_per_copy"]
    apart = copy_bench.measure(size, "copy_frame", False, 2000, 5, dst_offset=64)["cycles_per_copy"]
    print(f"{size} B: {aliased:.0f} cycles at +12, {apart:.0f} at +76")
    assert aliased < 4 * apart, f"{aliased:.0f} cycles at +12 against {apart:.0f} at +76"
