"""A port's ingress policing: the `policing` key every port type takes.

    policing: {pps: 100000, bps: 1G, burst_packets: 1000, burst_bytes: 1M}

Frames the port receives beyond `pps` packets or `bps` bits per second are
dropped before they are switched (counted in police_dropped), as Open
vSwitch's ingress_policing_rate does.  Either limit may be given alone.  The
buckets let `burst_packets` frames or `burst_bytes` bytes through at once
after a quiet spell: by default what the rate allows in 100 ms, and at least a
burst of 32 frames and 64 KiB (a TSO frame must fit, or it could never pass).
Rates take k, M, G suffixes (powers of 1000); bps counts frame bytes without
FCS, times 8.  The PMD reads a struct vs_police (ports/port.h) built here.
"""

from __future__ import annotations

import re

MAX_PPS = 1_000_000_000
MAX_BPS = 10 ** 13
MIN_BURST_PACKETS = 32            # one receive burst (VS_BURST)
MIN_BURST_BYTES = 65536           # the largest GSO frame a guest may send
BURST_SECONDS = 0.1           # a PMD or peer delayed this long by a busy host loses no rate
KEYS = ("pps", "bps", "burst_packets", "burst_bytes")
FORM = "{pps: N, bps: N, burst_packets: N, burst_bytes: N} (pps and/or bps; k, M, G suffixes)"
_SUFFIX = {"": 1, "k": 1000, "K": 1000, "m": 1000 ** 2, "M": 1000 ** 2, "g": 1000 ** 3, "G": 1000 ** 3}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")


class PolicingProblem(ValueError):
    """What is wrong with a `policing` value, in one line."""


def _amount(key: str, value, low: int, high: int) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str):
        m = _NUMBER.match(value)
        value = float(m.group(1)) * _SUFFIX[m.group(2)] if m else None
    if not isinstance(value, (int, float)) or value != value or not low <= value <= high:
        raise PolicingProblem(f"{key} must be a number from {low} to {high} (k, M, G suffixes allowed)")
    return int(value)


def check(value) -> dict:
    """The normalised settings, every key filled in, or PolicingProblem."""
    if not isinstance(value, dict):
        raise PolicingProblem(f"{value!r} must be a mapping: {FORM}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise PolicingProblem(f"unknown key '{unknown[0]}' ({', '.join(KEYS)})")
    pps = _amount("pps", value["pps"], 1, MAX_PPS) if value.get("pps") is not None else 0
    bps = _amount("bps", value["bps"], 8, MAX_BPS) if value.get("bps") is not None else 0
    if not pps and not bps:
        raise PolicingProblem(f"give a rate: pps, bps or both: {FORM}")
    out = {}
    if pps:
        out["pps"] = pps
        default = max(MIN_BURST_PACKETS, int(pps * BURST_SECONDS))
        out["burst_packets"] = (_amount("burst_packets", value["burst_packets"], 1, MAX_PPS)
                                if value.get("burst_packets") is not None else default)
    elif value.get("burst_packets") is not None:
        raise PolicingProblem("burst_packets needs pps")
    if bps:
        out["bps"] = bps
        default = max(MIN_BURST_BYTES, int(bps / 8 * BURST_SECONDS))
        out["burst_bytes"] = (_amount("burst_bytes", value["burst_bytes"], 64, MAX_BPS)
                              if value.get("burst_bytes") is not None else default)
    elif value.get("burst_bytes") is not None:
        raise PolicingProblem("burst_bytes needs bps")
    return out


def to_c(spec: dict | None):
    """A new struct vs_police for validated settings, or ffi.NULL for none."""
    from vswitch.native import ffi

    if spec is None:
        return ffi.NULL
    c = ffi.new("struct vs_police *")
    c.packets_per_sec = spec.get("pps", 0)
    c.bytes_per_sec = spec.get("bps", 0) / 8
    c.burst_packets = spec.get("burst_packets", 0)
    c.burst_bytes = spec.get("burst_bytes", 0)
    return c


def _si(n: int) -> str:
    for factor, suffix in ((1000 ** 3, "G"), (1000 ** 2, "M"), (1000, "k")):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def describe(spec: dict | None) -> str:
    """One word for `vswitchctl show`: "-", "100kpps", "1Gbps", "100kpps+1Gbps"."""
    if spec is None:
        return "-"
    parts = ([f"{_si(spec['pps'])}pps"] if "pps" in spec else []) + ([f"{_si(spec['bps'])}bps"] if "bps" in spec else [])
    return "+".join(parts)
