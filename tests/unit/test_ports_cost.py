"""Many ports (issue 14): the PMD's cost per frame does not grow with the
port count.  Counted in instructions inside vs_pmd_poll_once by valgrind's
callgrind over tools/pmd_cost.py --ports (N null ports, every port's MAC
learned before counting), which is exact where cycles on a shared host are
not; README "Latency and scale" has the figures."""

from __future__ import annotations

from tests.support.callgrind import pmd_instructions

BURST = 32


def per_frame(tmp_path, n_ports: int, mode: str, passes: int) -> tuple[float, dict[str, int]]:
    total, per_function = pmd_instructions(tmp_path, f"{mode}-{n_ports}", "--ports", str(n_ports), "--mode", mode,
                                           "--passes", str(passes))
    return total / (passes * n_ports * BURST), per_function


def test_unicast_instructions_per_frame_at_64_ports_are_within_15_percent_of_2_ports(tmp_path):
    # Each frame costs its learn, lookup and place in its destination's group;
    # the receive and transmit calls are per burst.  Nothing is done per port
    # per frame, so 64 ports cost what 2 do.  On this host: 201.6 and 191.5
    # (0.95x: the pass's own work is shared by more frames).
    two, two_fn = per_frame(tmp_path, 2, "unicast", 100)
    many, many_fn = per_frame(tmp_path, 64, "unicast", 10)
    print(f"unicast instructions per frame: 2 ports {two:.1f}, 64 ports {many:.1f}")
    assert many / two < 1.15, (two, many, two_fn, many_fn)


def test_flood_instructions_per_delivered_copy_fall_from_8_to_64_ports(tmp_path):
    # A flooded frame is received, learned and looked up once and sent to the
    # N-1 other ports, so a copy costs its share of that per-frame work plus
    # its own (its place in a group, the offload check, the port's count):
    # per copy = F / (N-1) + C, which falls as the ports grow.  If it does
    # not fall from 8 ports to 64, a copy does work that grows with the port
    # count (a walk of the port table per copy, say).  On this host: 62.1 at
    # 8 ports, 46.5 at 32, 44.2 at 64 (F about 140, C about 42).
    eight, eight_fn = per_frame(tmp_path, 8, "flood", 20)
    many, many_fn = per_frame(tmp_path, 64, "flood", 3)
    per_copy_8, per_copy_64 = eight / 7, many / 63
    print(f"flood instructions per delivered copy: 8 ports {per_copy_8:.1f}, 64 ports {per_copy_64:.1f}")
    assert per_copy_64 < per_copy_8, (per_copy_8, per_copy_64, eight_fn, many_fn)
