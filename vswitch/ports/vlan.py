"""A port's VLAN settings: the `vlan` key every port type takes.

Modes follow Open vSwitch's vlan_mode (ovs-vswitchd.conf.db(5), Port table):

* `access` (`tag` required, no `trunks`): the port is in VLAN `tag`; frames
  enter and leave untagged; a frame that arrives with an 802.1Q header whose
  VLAN ID is not 0 is dropped (a priority tag, VID 0, is taken).
* `trunk` (`trunks` optional, no `tag`): frames arrive tagged with their
  VLAN, or untagged for VLAN 0, and leave tagged (VLAN 0 untouched).  Without
  `trunks` the port carries every VLAN, VLAN 0 included; with it, only those
  listed (so untagged frames are dropped).
* `native-untagged` (`tag` required, `trunks` optional): a trunk whose native
  VLAN `tag` enters and leaves untagged.
* `native-tagged`: as native-untagged, but the native VLAN leaves tagged.

A port without `vlan` is in VLAN 0 only and forwards frames as they are,
tags included: a switch without VLAN settings behaves as it did before.
The PMD reads the settings from a struct vs_vlan (ports/port.h) built here.
"""

from __future__ import annotations

# Each mode's VS_VLAN_* constant in port.h.  The C library is loaded only by
# to_c(): vswitchctl checks settings without it.
MODES = {"access": "VS_VLAN_ACCESS", "trunk": "VS_VLAN_TRUNK",
         "native-untagged": "VS_VLAN_NATIVE_UNTAGGED", "native-tagged": "VS_VLAN_NATIVE_TAGGED"}
MIN_VID, MAX_VID = 1, 4094
FORMS = ("{mode: access, tag: 10}, {mode: trunk, trunks: [10, 20]} or "
         "{mode: native-untagged, tag: 10, trunks: [20]}")


class VlanProblem(ValueError):
    """What is wrong with a `vlan` value, in one line."""


def _vid(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_VID <= value <= MAX_VID:
        raise VlanProblem(f"{what} {value!r} must be a VLAN ID from {MIN_VID} to {MAX_VID}")
    return value


def parse_trunks(text: str) -> list[int]:
    """A command line's trunks: "10,20,100-110" (spaces allowed)."""
    vids: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise VlanProblem(f"trunks {text!r} must be VLAN IDs separated by commas, e.g. 10,20,100-110") from None
        if first > last:
            raise VlanProblem(f"trunks {part!r}: the range is backwards")
        _vid(first, "trunks: VLAN"), _vid(last, "trunks: VLAN")
        vids.extend(range(first, last + 1))
    if not vids:
        raise VlanProblem("trunks must list at least one VLAN ID")
    return sorted(set(vids))


def check(value) -> dict:
    """The normalised settings ({mode, tag?, trunks?}), or VlanProblem.  As in
    OVS, a missing mode means access when a tag is given, else trunk."""
    if not isinstance(value, dict):
        raise VlanProblem(f"{value!r} must be a mapping: {FORMS}")
    unknown = sorted(set(value) - {"mode", "tag", "trunks"})
    if unknown:
        raise VlanProblem(f"unknown key '{unknown[0]}' (mode, tag, trunks)")
    mode = value.get("mode")
    if mode is None:
        mode = "access" if value.get("tag") is not None else "trunk"
    if mode not in MODES:
        raise VlanProblem(f"mode {mode!r} must be one of {', '.join(MODES)}")
    out: dict = {"mode": mode}
    tag, trunks = value.get("tag"), value.get("trunks")
    if mode == "trunk":
        if tag is not None:
            raise VlanProblem("a trunk port takes no tag (native-untagged or native-tagged has a native VLAN)")
    elif tag is None:
        raise VlanProblem(f"mode {mode} needs a tag (its VLAN, {MIN_VID} to {MAX_VID})")
    else:
        out["tag"] = _vid(tag, "tag")
    if trunks is not None:
        if mode == "access":
            raise VlanProblem("an access port takes no trunks (it is in its tag's VLAN only)")
        if isinstance(trunks, str):
            trunks = parse_trunks(trunks)
        if not isinstance(trunks, list) or not trunks:
            raise VlanProblem(f"trunks {trunks!r} must be a list of VLAN IDs, e.g. [10, 20]")
        out["trunks"] = sorted({_vid(v, "trunks: VLAN") for v in trunks})
    return out


def carried(spec: dict | None) -> set[int] | None:
    """The VLANs a port carries: None for all of them (0 to 4094)."""
    if spec is None:
        return {0}
    mode = spec["mode"]
    if mode == "access":
        return {spec["tag"]}
    if "trunks" not in spec:
        return None
    return set(spec["trunks"]) | ({spec["tag"]} if "tag" in spec else set())


def to_c(spec: dict | None):
    """A new struct vs_vlan for validated settings, or ffi.NULL for none."""
    from vswitch.native import ffi, lib

    if spec is None:
        return ffi.NULL
    c = ffi.new("struct vs_vlan *")
    c.mode = getattr(lib, MODES[spec["mode"]])
    c.tag = spec.get("tag", 0)
    vids = carried(spec)
    for vid in range(MAX_VID + 1) if vids is None else vids:
        c.carries[vid >> 6] |= 1 << (vid & 63)
    return c


def describe(spec: dict | None) -> str:
    """One word for `vswitchctl show`: "access:10", "trunk:10,20", "trunk:all",
    "native-untagged:10+20,30" (the native VLAN, then the others)."""
    if spec is None:
        return "-"
    trunks = ",".join(map(str, spec["trunks"])) if "trunks" in spec else "all"
    if spec["mode"] == "access":
        return f"access:{spec['tag']}"
    if spec["mode"] == "trunk":
        return f"trunk:{trunks}"
    return f"{spec['mode']}:{spec['tag']}+{trunks}"
