"""The YAML configuration: schema, validation and defaults.

Validation collects every problem, each as one line naming the file, the
key and what is wrong, so that a user fixes a broken file in one go.
"""

from __future__ import annotations

import contextlib
import grp
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field

import yaml

from vswitch.fib import MAX_ENTRIES, DEFAULT_AGING_SECONDS, DEFAULT_MAX_ENTRIES, FibError, parse_mac
from vswitch.ports import registry as port_registry
from vswitch.ports.registry import SOCKET_ACCESS_KEYS, KeyProblem

DEFAULT_CONTROL_SOCKET = "/run/vswitch/vswitchd.sock"
PORT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
# Guest memory one vhost-user port may map, in bytes: large enough for real
# VMs, small enough that sparse multi-terabyte files cannot use up the
# switch's address space (128 TiB on x86-64).
DEFAULT_MAX_MEMORY = 1 << 40
MIN_MAX_MEMORY = 1 << 20
MAX_MAX_MEMORY = 64 << 40


# Port keys that may also be set once for the whole switch, at the top level.
SWITCH_WIDE_PORT_KEYS = {key.name: key for key in SOCKET_ACCESS_KEYS}


class ConfigError(ValueError):
    """One or more problems, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Config:
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_group: str | None = None
    persist: bool = False
    fdb_aging_seconds: int = DEFAULT_AGING_SECONDS
    fdb_max_entries: int = DEFAULT_MAX_ENTRIES
    fdb_static: list[dict] = field(default_factory=list)
    pmd_cpus: list[int] = field(default_factory=list)
    pmd_sleep: bool = True                # False: the PMDs poll when idle instead of sleeping
    pmd_yield: bool = False               # True: a PMD yields its CPU after a pass with under half a burst
    # Microseconds the PMD CPUs may take to leave an idle state (vswitch/pmd/cpu_wake.py); None: the host's.
    pmd_cpu_resume_latency_us: int | None = None
    metrics_listen: str | None = None     # "HOST:PORT" of the Prometheus endpoint, or None
    # Switch-wide values of port keys (socket_owner, socket_group, socket_mode) for ports that set none.
    port_defaults: dict = field(default_factory=dict)
    ports: list[dict] = field(default_factory=list)
    mirrors: list[dict] = field(default_factory=list)   # vswitch/capture.py check_mirror

    def to_yaml_data(self) -> dict:
        """The config as a YAML document would hold it (defaults written out)."""
        data: dict = {"control_socket": self.control_socket}
        if self.control_group:
            data["control_group"] = self.control_group
        if self.persist:
            data["persist"] = True
        data["fdb"] = {"aging_seconds": self.fdb_aging_seconds, "max_entries": self.fdb_max_entries}
        if self.fdb_static:
            data["fdb"]["static"] = [dict(e) for e in self.fdb_static]
        if self.pmd_cpus:
            data["pmd"] = {"cpus": list(self.pmd_cpus)}
        if not self.pmd_sleep:
            data.setdefault("pmd", {})["sleep"] = False
        if self.pmd_yield:
            data.setdefault("pmd", {})["yield"] = True
        if self.pmd_cpu_resume_latency_us is not None:
            data.setdefault("pmd", {})["cpu_resume_latency_us"] = self.pmd_cpu_resume_latency_us
        if self.metrics_listen:
            data["metrics"] = {"listen": self.metrics_listen}
        data.update(self.port_defaults)
        data["ports"] = [dict(p) for p in self.ports]
        if self.mirrors:
            data["mirrors"] = [dict(m, select=list(m["select"])) for m in self.mirrors]
        return data


# One second: a bound above it keeps no idle state out that a CPU has.
MAX_CPU_RESUME_LATENCY_US = 1_000_000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _whole_number(section: dict, key: str, default: int, low: int, high: int, where: str,
                  problems: list[str]) -> int:
    """section[key] if it is a whole number in [low, high]; else a problem is noted and the default kept."""
    value = section.get(key, default)
    if not _is_int(value) or not low <= value <= high:
        problems.append(f"{where}{key}: {value!r} must be a whole number from {low} to {high}")
        return default
    return value


def _section(data: dict, name: str, keys: tuple[str, ...], where: str, problems: list[str]) -> dict:
    """data[name] as a mapping ({} if absent or empty); a non-mapping or a key not in `keys` is noted as a problem."""
    section = data.get(name, {}) or {}
    if not isinstance(section, dict):
        problems.append(f"{where}: {name}: must be a mapping ({', '.join(keys)})")
        return {}
    for key in section:
        if key not in keys:
            problems.append(f"{where}: {name}: unknown key '{key}'")
    return section


def parse_listen(listen) -> tuple[str, int]:
    """"HOST:PORT" (an IPv4 address or a name, or [IPv6]:PORT) -> (host, port); ValueError says what is wrong."""
    if not isinstance(listen, str) or ":" not in listen:
        raise ValueError(f"{listen!r} must be HOST:PORT, e.g. 127.0.0.1:9477")
    host, _, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9477")
    return host, int(port)


def validate_port(spec, where: str | None, problems: list[str]) -> dict | None:
    """Checks one port entry against its type's keys (vswitch.ports.registry);
    returns it with defaults filled in, or None.

    `where` names the entry in a file ("my.yaml: ports[2]"); None means it
    came from the control socket, and messages start "port 'NAME': ".
    """
    if not isinstance(spec, dict):
        problems.append(f"{where or 'port'}: must be a mapping with name, type, ...")
        return None
    before = len(problems)
    name = spec.get("name")
    if not isinstance(name, str) or not PORT_NAME.match(name):
        problems.append(f"{where + '.name' if where else 'port name'}: {name!r} is not a port name "
                        "(a letter, then up to 14 letters, digits, '-' or '_')")
        name = None
    if where:
        label = f"{where} ({name})." if name else f"{where}."
    else:
        label = f"port '{name}': " if name else "port: "
    kind = spec.get("type")
    port_type = port_registry.get(kind)
    if port_type is None:
        problems.append(f"{label}type: {kind!r} is not a port type "
                        f"(one of: {', '.join(port_registry.names())})")
        return None
    out = {"name": name, "type": kind}
    for key in spec:
        if key not in port_registry.COMMON_KEYS and port_type.key(key) is None \
                and port_registry.generic_key(key) is None:
            problems.append(f"{label.rstrip('.: ')}: unknown key '{key}' for a {kind} port")
    for key in (*port_type.keys, *port_registry.GENERIC_KEYS):
        if spec.get(key.name) is not None:
            value, check = spec[key.name], True
        elif callable(key.default):   # derived from the other keys (a TAP's ifname): checked like a given value
            value, check = (key.default(out) if name else None), True
        else:
            value, check = key.default, False
        if value is None:
            if key.required:
                problems.append(f"{label}{key.name}: required: {key.help}")
            continue
        if check:
            try:
                value = key.validate(value)
            except KeyProblem as exc:
                problems.append(f"{label}{key.name}: {exc}")
                continue
        out[key.name] = value
    if len(problems) == before:
        # Rules between a type's keys, once each key is right on its own.
        problems.extend(f"{label}{problem}" for problem in port_type.cls.check_spec(out))
    return out if len(problems) == before else None


def parse(data, source: str = "<config>") -> Config:
    """Validates already-loaded YAML data."""
    problems: list[str] = []
    cfg = Config()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping (control_socket, fdb, ports)"])
    for key in data:
        if key not in ("control_socket", "control_group", "persist", "fdb", "pmd", "metrics", "ports", "mirrors") \
                and key not in SWITCH_WIDE_PORT_KEYS:
            problems.append(f"{source}: unknown key '{key}'")
    sock = data.get("control_socket", DEFAULT_CONTROL_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/"):
        problems.append(f"{source}: control_socket: {sock!r} must be an absolute path")
    else:
        cfg.control_socket = sock

    group = data.get("control_group")
    if group is not None:
        if not isinstance(group, str):
            problems.append(f"{source}: control_group: {group!r} must be a group name")
        else:
            try:
                grp.getgrnam(group)
                cfg.control_group = group
            except KeyError:
                problems.append(f"{source}: control_group: no group named '{group}'")
    persist = data.get("persist", False)
    if not isinstance(persist, bool):
        problems.append(f"{source}: persist: {persist!r} must be true or false")
    else:
        cfg.persist = persist

    fdb = _section(data, "fdb", ("aging_seconds", "max_entries", "static"), source, problems)
    cfg.fdb_aging_seconds = _whole_number(fdb, "aging_seconds", DEFAULT_AGING_SECONDS, 1, 10**6,
                                          f"{source}: fdb.", problems)
    cfg.fdb_max_entries = _whole_number(fdb, "max_entries", DEFAULT_MAX_ENTRIES, 1, MAX_ENTRIES,
                                        f"{source}: fdb.", problems)

    static = fdb.get("static", []) or []
    if not isinstance(static, list):
        problems.append(f"{source}: fdb.static: must be a list of {{mac, port}}")
        static = []

    pmd = _section(data, "pmd", ("cpus", "sleep", "yield", "cpu_resume_latency_us"), source, problems)
    sleep = pmd.get("sleep", True)
    if not isinstance(sleep, bool):
        problems.append(f"{source}: pmd.sleep: {sleep!r} must be true or false")
    else:
        cfg.pmd_sleep = sleep
    pmd_yield = pmd.get("yield", False)
    if not isinstance(pmd_yield, bool):
        problems.append(f"{source}: pmd.yield: {pmd_yield!r} must be true or false")
    else:
        cfg.pmd_yield = pmd_yield
    cpus = pmd.get("cpus", [])
    ncpu = os.cpu_count() or 1
    if not isinstance(cpus, list) or not all(_is_int(c) and 0 <= c < ncpu for c in cpus) \
            or len(set(cpus)) != len(cpus):
        problems.append(f"{source}: pmd.cpus: {cpus!r} must be a list of distinct CPU numbers below {ncpu}")
    else:
        cfg.pmd_cpus = cpus
    resume = pmd.get("cpu_resume_latency_us")
    if resume is not None:
        if not _is_int(resume) or not 0 <= resume <= MAX_CPU_RESUME_LATENCY_US:
            problems.append(f"{source}: pmd.cpu_resume_latency_us: {resume!r} must be microseconds from 0 "
                            f"(no idle state but polling) to {MAX_CPU_RESUME_LATENCY_US}")
        elif not pmd.get("cpus"):
            problems.append(f"{source}: pmd.cpu_resume_latency_us needs pmd.cpus: it applies to the PMDs' own CPUs")
        else:
            cfg.pmd_cpu_resume_latency_us = resume

    for name, key in SWITCH_WIDE_PORT_KEYS.items():
        if data.get(name) is not None:
            try:
                cfg.port_defaults[name] = key.validate(data[name])
            except KeyProblem as exc:
                problems.append(f"{source}: {name}: {exc}")

    metrics = data.get("metrics")
    if metrics is not None:
        listen = metrics.get("listen") if isinstance(metrics, dict) else None
        unknown = [k for k in metrics if k != "listen"] if isinstance(metrics, dict) else []
        if unknown:
            problems.append(f"{source}: metrics: unknown key '{unknown[0]}'")
        try:
            parse_listen(listen)
            cfg.metrics_listen = listen
        except ValueError as exc:
            problems.append(f"{source}: metrics.listen: {exc}")

    ports = data.get("ports", []) or []
    if not isinstance(ports, list):
        problems.append(f"{source}: ports: must be a list")
        ports = []
    names, paths, interfaces = {}, {}, {}
    for i, spec in enumerate(ports):
        port = validate_port(spec, f"{source}: ports[{i}]", problems)
        if port is None:
            continue
        if port["name"] in names:
            problems.append(f"{source}: ports[{i}]: port name '{port['name']}' is already used by ports[{names[port['name']]}]")
            continue
        if port.get("path") in paths:
            problems.append(f"{source}: ports[{i}] ({port['name']}): path {port['path']} is already used by port '{paths[port['path']]}'")
            continue
        interface = (port.get("ifname"), port.get("netns"))
        if interface in interfaces:
            problems.append(f"{source}: ports[{i}] ({port['name']}): interface {port['ifname']} is already "
                            f"attached by port '{interfaces[interface]}'")
            continue
        names[port["name"]] = i
        if port.get("path"):
            paths[port["path"]] = port["name"]
        if port.get("ifname"):
            interfaces[interface] = port["name"]
        cfg.ports.append(port)
    for i, entry in enumerate(static):
        where = f"{source}: fdb.static[{i}]"
        if not isinstance(entry, dict) or not {"mac", "port"} <= set(entry) <= {"mac", "port", "vlan"}:
            problems.append(f"{where}: must be a mapping with mac, port and optionally vlan")
            continue
        vlan = entry.get("vlan", 0)
        if not _is_int(vlan) or not 0 <= vlan <= 4094:
            problems.append(f"{where}.vlan: {vlan!r} must be a VLAN ID from 0 to 4094")
            continue
        try:
            parse_mac(str(entry["mac"]))
        except FibError as exc:
            problems.append(f"{where}.mac: {exc}")
            continue
        if entry["port"] not in names:
            problems.append(f"{where}.port: no port named {entry['port']!r}")
            continue
        cfg.fdb_static.append({"mac": str(entry["mac"]).lower(), "port": entry["port"],
                               **({"vlan": vlan} if vlan else {})})
    _parse_mirrors(data.get("mirrors"), source, names, cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_mirrors(mirrors, source: str, port_names, cfg: Config, problems: list[str]) -> None:
    """`mirrors: [{name, select: [ports], output: port, select_direction: rx|tx|both}]`."""
    from vswitch.capture import CaptureProblem, check_mirror, check_mirrors

    if mirrors is None:
        return
    if not isinstance(mirrors, list):
        problems.append(f"{source}: mirrors: must be a list of {{name, select, output}}")
        return
    checked = []
    for i, spec in enumerate(mirrors):
        try:
            checked.append(check_mirror(spec, set(port_names), f"{source}: mirrors[{i}]"))
        except CaptureProblem as exc:
            problems.append(str(exc))
    if len(checked) == len(mirrors):
        try:
            check_mirrors(checked, f"{source}: mirrors")
            cfg.mirrors = checked
        except CaptureProblem as exc:
            problems.append(str(exc))


def save(path: str, cfg: Config) -> None:
    """Writes the config back to its file, atomically: a crash leaves the old file or the new
    one, never a mix.  What the user wrote stays as written (comments, key order, flow or block
    style): the file is edited in place with ruamel.yaml's round-trip loader, only where the
    running config differs, and defaults the file left out stay out."""
    directory = os.path.dirname(os.path.abspath(path))
    text = _updated_yaml(path, cfg)
    fd, tmp = tempfile.mkstemp(prefix=".vswitchd-config-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _updated_yaml(path: str, cfg: Config) -> str:
    from ruamel.yaml import YAML

    rt = YAML()   # round-trip: comments and order survive a load and a dump
    rt.default_flow_style = None
    rt.preserve_quotes = True
    rt.width = 4096                                # no line of the user's is folded
    rt.indent(mapping=2, sequence=4, offset=2)     # "  - item", as this project's configs are written
    try:
        with open(path, encoding="utf-8") as f:
            doc = rt.load(f)
    except (OSError, Exception):   # noqa: BLE001 - missing or unreadable: written anew
        doc = None
    new = cfg.to_yaml_data()
    plain = ("# Written by vswitchd (persist: true): changes made with vswitchctl are saved here.\n"
             + yaml.safe_dump(new, sort_keys=False, default_flow_style=None))
    if not isinstance(doc, dict):
        return plain
    _merge_into(doc, new, Config().to_yaml_data())
    out = io.StringIO()
    rt.dump(doc, out)
    # ruamel.yaml cannot keep every layout (an end-of-line comment on a block mapping
    # followed by a flow mapping in a list comes out as one broken line): what it
    # wrote must read back as the running config, or the file is written plainly.
    try:
        if parse(yaml.safe_load(out.getvalue()), path).to_yaml_data() == new:
            return out.getvalue()
    except (yaml.YAMLError, ConfigError):
        pass
    logging.getLogger(__name__).warning("%s: could not keep the file's comments and layout; rewritten plainly", path)
    return plain


def _merge_into(doc: dict, new: dict, defaults: dict) -> None:
    """Makes the mapping `doc` say what `new` says, touching only what differs; a key `new` has at
    its default value is not added where `doc` lacks it."""
    for key in [k for k in doc if k not in new]:
        del doc[key]
    for key, value in new.items():
        if key == "ports" and isinstance(doc.get(key), list):
            _merge_ports(doc[key], value)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge_into(doc[key], value, defaults.get(key) or {})
        elif key not in doc:
            if value != defaults.get(key):
                doc[key] = value
        elif doc[key] != value:
            doc[key] = value


def _merge_ports(entries: list, ports: list[dict]) -> None:
    """Port entries matched by name: removed ports go, kept ones are updated in place, new ones
    are appended without the keys left at their type's defaults."""
    wanted = {p["name"]: p for p in ports}
    for entry in [e for e in entries if not isinstance(e, dict) or e.get("name") not in wanted]:
        entries.remove(entry)
    have = {e["name"] for e in entries}
    for entry in entries:
        _merge_into(entry, wanted[entry["name"]], _port_defaults(wanted[entry["name"]]))
    for port in ports:
        if port["name"] not in have:
            defaults = _port_defaults(port)
            entries.append({k: v for k, v in port.items() if k in ("name", "type") or v != defaults.get(k)})


def _port_defaults(spec: dict) -> dict:
    port_type = port_registry.get(spec.get("type"))
    if port_type is None:
        return {}
    return {k.name: k.default for k in port_type.keys if k.default is not None and not callable(k.default)}


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}:{where}: not valid YAML: {problem}"]) from None
    return parse(data, path)
