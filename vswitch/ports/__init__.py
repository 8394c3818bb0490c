"""Port types, one module each, behind the Port interface in base.py.

Each type registers itself (registry.py); nothing here names one.
"""

from __future__ import annotations

from vswitch.ports import registry


def port_type_names() -> list[str]:
    """The registered port types, by name (config validation and vswitchctl read them)."""
    return registry.names()


def create_port(spec: dict, port_no: int, emit, quiesce, on_rarp, reclaim=None, port_defaults=None):
    """Builds the port object for a validated spec (see vswitch.config).  port_defaults:
    the switch-wide values of port keys (socket_owner ...) for the types that take them."""
    port_type = registry.get(spec["type"])
    if port_type is None:
        raise ValueError(f"port '{spec['name']}': unknown type '{spec['type']}'")
    return port_type.cls.create(spec, port_no, emit=emit, quiesce=quiesce, on_rarp=on_rarp, reclaim=reclaim,
                                port_defaults=port_defaults)
