"""Port types, one module each, behind the Port interface in base.py."""

from __future__ import annotations

# The one list of port types: config validation and vswitchctl read it.
PORT_TYPES = ("vhost-user", "tap", "af-packet")


def create_port(spec: dict, port_no: int, emit, quiesce, on_rarp, reclaim=None):
    """Builds the port object for a validated spec (see vswitch.config)."""
    kind = spec["type"]
    if kind == "vhost-user":
        from vswitch.ports.vhost_user import VhostUserPort

        return VhostUserPort(spec["name"], port_no, spec, emit, quiesce, on_rarp, reclaim)
    if kind == "tap":
        from vswitch.ports.tap import TapPort

        return TapPort(spec["name"], port_no, spec, emit)
    if kind == "af-packet":
        from vswitch.ports.af_packet import AfPacketPort

        return AfPacketPort(spec["name"], port_no, spec, emit)
    raise ValueError(f"port '{spec['name']}': unknown type '{kind}'")
