"""The port type registry: each port type declares itself once, here.

A port type is its class (a `Port`, see base.py) with three class
attributes: `type` (its name in configs and on the command line), `help`
(one line) and `keys` (its config keys, each a `Key`: value type, default,
checks, help and the `vswitchctl add-port` flag).  The class registers
itself with the `register` decorator, in its own module.  Everything else
is derived from the registry, so none of it can disagree with the port
types: config validation (config.validate_port), the control command
`port/add` (its arguments, usage and help in list-commands), and
`vswitchctl add-port` (its flags, `--type` choices and --help).

Which modules are port types: every module of the vswitch.ports package is
imported on first use (a package scan), so a new type is one new module and
nothing else; modules that register nothing (base, kernel, this one) are
harmless.  Modules outside the package (an out-of-tree type, a test's) are
named in $VSWITCH_PORT_MODULES, comma-separated.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import grp
import importlib
import os
import pkgutil
import pwd
import re
import threading
from typing import Any, Callable

from vswitch.native import lib
from vswitch.ports import policing, vlan

PLUGIN_ENV = "VSWITCH_PORT_MODULES"

# Keys every port has; a type declares only its own.
COMMON_KEYS = ("name", "type")
MAX_QUEUES = lib.VS_MAX_PORT_QUEUES


class KeyProblem(ValueError):
    """What is wrong with a key's value, as the rest of the line after "KEY: "."""


_TYPE_NAMES = {str: "str", int: "int", bool: "bool", dict: "map"}


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key of a port type.

    `type` is the value's type in YAML and JSON (str, int, bool, or dict for
    a flag set).  A value is checked by `check` when the key has one (it gets
    the raw value, returns the value to keep and raises KeyProblem), else by
    its type, `low`/`high` and `choices`.  A flag set (type dict) maps some
    of its `names` to true or false; on the command line it is
    `NAME=on|off,...` (parse_flag_set).  When the key is absent: `required`
    keys are a problem, a `default` (a value, or a function of the checked
    spec so far) is filled in, and otherwise the key stays absent.
    """
    name: str
    type: type = str
    help: str = ""
    required: bool = False
    default: Any = None
    low: int | None = None
    high: int | None = None
    choices: tuple = ()
    names: tuple = ()              # a flag set's names (type dict)
    check: Callable[[Any], Any] | None = None
    # The command line: how a flag's text becomes a value (default: `type`, or
    # parse_flag_set for a flag set), and what --help calls it.
    parse_flag: Callable[[str], Any] | None = None
    metavar: str | None = None
    type_name: str = ""            # what usage lines call the type (default: str, int, bool, map)

    def __post_init__(self):
        if self.type is dict and self.parse_flag is None:
            object.__setattr__(self, "parse_flag", self.parse_flag_set)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_type(self) -> str:
        return self.type_name or _TYPE_NAMES.get(self.type, self.type.__name__)

    def validate(self, value):
        """The value to keep, or KeyProblem."""
        if self.check is not None:
            return self.check(value)
        if self.type is dict:
            return self._validate_flag_set(value)
        if self.choices:
            if not isinstance(value, self.type) or value not in self.choices:
                raise KeyProblem(f"{value!r} must be {_one_of(self.choices)}")
        elif self.type is int:
            if not _is_int(value) or (self.low is not None and value < self.low) \
                    or (self.high is not None and value > self.high):
                if self.low is not None and self.high is not None:
                    raise KeyProblem(f"{value!r} must be a whole number from {self.low} to {self.high}")
                raise KeyProblem(f"{value!r} must be a whole number")
        elif self.type is bool:
            if not isinstance(value, bool):
                raise KeyProblem(f"{value!r} must be true or false")
        elif not isinstance(value, self.type):
            raise KeyProblem(f"{value!r} must be a {self.shown_type}")
        return value

    def _validate_flag_set(self, value) -> dict:
        if not isinstance(value, dict):
            raise KeyProblem(f"{value!r} must be a mapping of {self._flag_word} names to true or false")
        for name, on in value.items():
            if name not in self.names:
                raise KeyProblem(f"unknown {self._flag_word} {name!r} (one of: {', '.join(sorted(self.names))})")
            if not isinstance(on, bool):
                raise KeyProblem(f"{name}: {on!r} must be true or false")
        return dict(value)

    @property
    def _flag_word(self) -> str:
        """What one name of a flag set is called in messages ("feature" for `features`)."""
        return self.shown_type[:-1] if self.shown_type.endswith("s") else self.shown_type

    def parse_flag_set(self, text: str) -> dict:
        """A flag set from the command line: `mrg_rxbuf=off,tso=off` (on/off, true/false, yes/no, 1/0)."""
        out = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, word = item.partition("=")
            on = _FLAG_WORDS.get(word.strip().lower())
            if on is None:
                raise KeyProblem(f"{item!r} is not NAME=on or NAME=off")
            out[name.strip()] = on
        return self._validate_flag_set(out)

    def describe(self) -> dict:
        default = None if callable(self.default) else self.default
        return {"key": self.name, "type": self.shown_type, "required": self.required, "default": default,
                "help": self.help, "flag": self.flag, **({"choices": list(self.choices)} if self.choices else {}),
                **({"names": list(self.names)} if self.names else {})}


_FLAG_WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False,
               "1": True, "0": False}


@dataclasses.dataclass(frozen=True)
class PortType:
    name: str
    cls: type
    keys: tuple[Key, ...]
    help: str = ""

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)

    @property
    def synopsis(self) -> str:
        """Its `vswitchctl add-port` flags, e.g. `--ifname IF [--netns NS]`."""
        parts = []
        for k in self.keys:
            part = k.flag if k.type is bool else f"{k.flag} {_metavar(k)}"
            parts.append(part if k.required else f"[{part}]")
        return " ".join(parts)

    def describe(self) -> dict:
        return {"type": self.name, "help": self.help, "keys": [k.describe() for k in self.keys]}


_types: dict[str, PortType] = {}
_loaded = False


def register(cls):
    """Class decorator: registers a port type from its `type`, `help` and `keys`."""
    name = getattr(cls, "type", "")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"port type {cls.__name__}: type {name!r} must be a lower-case name")
    keys = tuple(getattr(cls, "keys", ()))
    seen = set(COMMON_KEYS) | {k.name for k in GENERIC_KEYS}
    for key in keys:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key.name):
            raise ValueError(f"port type '{name}': key {key.name!r} must be a lower-case name (a-z, 0-9, _)")
        if key.name in seen:
            raise ValueError(f"port type '{name}': key '{key.name}' declared twice (or is a common key)")
        seen.add(key.name)
        # One key name means one value type for every port type: the control
        # command and the command line have one argument for it.
        for other in _types.values():
            same = other.key(key.name)
            if same is not None and other.name != name and \
                    (same.type, same.shown_type) != (key.type, key.shown_type):
                raise ValueError(f"port type '{name}': key '{key.name}' is a {key.shown_type} here "
                                 f"but a {same.shown_type} in port type '{other.name}'")
    old = _types.get(name)
    if old is not None and old.cls.__qualname__ != cls.__qualname__:
        raise ValueError(f"port type '{name}' registered twice ({old.cls.__qualname__}, {cls.__qualname__})")
    _types[name] = PortType(name, cls, keys, getattr(cls, "help", "") or "")
    return cls


def unregister(name: str) -> None:
    """Forgets a port type (for tests that register one of their own)."""
    _types.pop(name, None)


def load() -> None:
    """Imports every port type module once: the package's, then $VSWITCH_PORT_MODULES."""
    global _loaded
    if _loaded:
        return
    _loaded = True   # first: a module that asks the registry while it loads gets what is there so far
    try:
        package = importlib.import_module("vswitch.ports")
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"vswitch.ports.{module.name}")
        for name in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ImportError(f"${PLUGIN_ENV}: cannot import port type module {name}: {exc}") from exc
    except BaseException:
        _loaded = False
        raise


def port_types() -> list[PortType]:
    """Every registered port type, by name."""
    load()
    return [_types[name] for name in sorted(_types)]


def names() -> list[str]:
    return [t.name for t in port_types()]


def get(name) -> PortType | None:
    load()
    return _types.get(name) if isinstance(name, str) else None


def all_keys() -> dict[str, tuple[Key, list[str]]]:
    """Every key any type declares: name -> (the key, the types that have it), in declaration
    order, then the keys every type has (GENERIC_KEYS)."""
    out: dict[str, tuple[Key, list[str]]] = {}
    types = port_types()
    for t in types:
        for key in t.keys:
            out.setdefault(key.name, (key, []))[1].append(t.name)
    for key in GENERIC_KEYS:
        out[key.name] = (key, [t.name for t in types])
    return out


def generic_key(name: str) -> Key | None:
    return next((k for k in GENERIC_KEYS if k.name == name), None)


def key_help(name: str) -> str:
    """A key's help across the types that have it: "tap, vhost-user: queue
    pairs", or each type's own when they differ."""
    generic = generic_key(name)
    if generic is not None:
        return f"any type: {generic.help}"
    by_help: dict[str, list[str]] = {}
    for t in port_types():
        if t.key(name) is not None:
            by_help.setdefault(t.key(name).help, []).append(t.name)
    return "; ".join(f"{', '.join(kinds)}: {text}" for text, kinds in by_help.items())


# Checks and keys that several port types share.

# Interface names as the kernel takes them (IFNAMSIZ - 1), without the
# characters `ip` and sysfs trip over.
IFNAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,15}$")
NETNS_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,64}$")
NETNS_DIR = "/run/netns"   # where `ip netns add` keeps its namespaces


def interface_name(value) -> str:
    if not isinstance(value, str) or not IFNAME.match(value):
        raise KeyProblem(f"{value!r} is not an interface name (1 to 15 letters, digits, '_', '-' or '.')")
    return value


NS_GET_NSTYPE = 0xB703       # ioctl on a namespace file: its CLONE_NEW* type (linux/nsfs.h)
CLONE_NEWNET = 0x40000000


def network_namespace(value) -> str:
    """An `ip netns` name, or the absolute path of a namespace file (what a CNI runtime gives:
    /proc/PID/ns/net, /var/run/netns/X), which the ports open as they are."""
    if isinstance(value, str) and value.startswith("/"):
        return network_namespace_path(value)
    if not isinstance(value, str) or not NETNS_NAME.match(value):
        raise KeyProblem(f"{value!r} is not a network namespace name")
    if not os.path.exists(os.path.join(NETNS_DIR, value)):
        raise KeyProblem(f"no network namespace named '{value}' (create it with: ip netns add {value})")
    return value


def network_namespace_path(path: str) -> str:
    if os.path.normpath(path) != path:
        raise KeyProblem(f"{path!r} must be a normalized absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyProblem(f"no network namespace file {path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise KeyProblem(f"{path} is not a network namespace")
    return path


def call_in_network_namespace(netns: str | None, opener: Callable[[int], int], thread_name: str) -> int:
    """Runs `opener(netns_fd)`, a C call that may enter the namespace with setns(), on a short-lived
    thread, and returns its result (a negative errno on failure); netns_fd is -1 without `netns`.

    setns() changes only the calling thread: a thread of its own keeps the
    event loop's thread in the switch's own namespace whatever happens.
    Raises OSError if the namespace cannot be opened.
    """
    netns_fd = -1
    if netns:
        try:
            # An absolute path (a CNI runtime's namespace file) is taken as it is by join().
            netns_fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"network namespace {netns}: {exc.strerror}") from None
    result: list[int] = []
    try:
        helper = threading.Thread(target=lambda: result.append(opener(netns_fd)), name=thread_name)
        helper.start()
        helper.join()
    finally:
        if netns_fd >= 0:
            os.close(netns_fd)
    return result[0] if result else -errno.EIO


def settings_check(check, problem):
    """A Key's check from a settings module's check(), whose one-line complaints are `problem`s."""
    def key_check(value) -> dict:
        try:
            return check(value)
        except problem as exc:
            raise KeyProblem(str(exc)) from None
    return key_check


# Keys every port type takes, whatever its own keys (a type may not declare them).
VLAN_KEY = Key("vlan", dict, "VLAN settings: {mode: access|trunk|native-untagged|native-tagged, tag: N, "
               "trunks: [N, ...]}; none: VLAN 0, tags carried untouched",
               check=settings_check(vlan.check, vlan.VlanProblem), type_name="mapping")
POLICING_KEY = Key("policing", dict, "ingress policing: {pps: N, bps: N, burst_packets: N, burst_bytes: N} "
                   "(k, M, G suffixes); none: no limit",
                   check=settings_check(policing.check, policing.PolicingProblem), type_name="mapping")
GENERIC_KEYS = (VLAN_KEY, POLICING_KEY)

NETNS_KEY = Key("netns", str, "the interface's network namespace (an ip netns name, or a namespace file's absolute path)", check=network_namespace,
                metavar="NS")


def user_check(value) -> str | int:
    """A user name or uid that exists on this host."""
    try:
        if _is_int(value):
            pwd.getpwuid(value)
        elif isinstance(value, str):
            pwd.getpwnam(value)
        else:
            raise KeyError
    except KeyError:
        raise KeyProblem(f"no user {value!r} on this host") from None
    return value


def group_check(value) -> str | int:
    """A group name or gid that exists on this host."""
    try:
        if _is_int(value):
            grp.getgrgid(value)
        elif isinstance(value, str):
            grp.getgrnam(value)
        else:
            raise KeyError
    except KeyError:
        raise KeyProblem(f"no group {value!r} on this host") from None
    return value


def mode_check(value) -> str:
    """Permission bits as an octal string ("0660", "660") or a number (YAML reads 0660 as 432)."""
    if _is_int(value) and 0 <= value <= 0o777:
        return f"{value:04o}"
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return f"{int(value, 8):04o}"
    raise KeyProblem(f"{value!r} must be permission bits in octal, e.g. \"0660\"")


# Who may connect to a socket the switch creates: for a hypervisor that runs as
# its own user (libvirt's QEMU).  A switch-wide default comes from the config's
# top-level keys of the same names.
SOCKET_ACCESS_KEYS = (
    Key("socket_owner", str, "user that owns the socket (name or uid)", check=user_check, metavar="USER"),
    Key("socket_group", str, "group of the socket (name or gid)", check=group_check, metavar="GROUP"),
    Key("socket_mode", str, "permission bits of the socket, e.g. 0660", check=mode_check, metavar="MODE"),
)


def queues_key(help: str = "queue pairs") -> Key:
    return Key("queues", int, help, default=1, low=1, high=MAX_QUEUES, metavar="N")


# The MTU a port takes (IPv4's minimum to the largest IP packet); a frame may
# be MTU + 18 bytes: the Ethernet header and one VLAN tag (as Linux bridges allow).
MIN_MTU, MAX_MTU, DEFAULT_MTU = 68, 65535, 1500
MTU_FRAME_OVERHEAD = 18


def mtu_key(help: str, default: int | None = DEFAULT_MTU) -> Key:
    return Key("mtu", int, help, default=default, low=MIN_MTU, high=MAX_MTU, metavar="BYTES")


SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_FORMS = "bytes, or a number with K, M, G or T, e.g. 64G"


def parse_size(value) -> int | None:
    """A size in bytes: a whole number of bytes, or a string with a binary unit
    ("512M", "64G", "1TiB"; K, M, G, T are powers of 1024).  None if neither."""
    if _is_int(value):
        return value
    if isinstance(value, str):
        m = SIZE.match(value)
        if m:
            return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    return None


def size_check(low: int, high: int, between: str) -> Callable[[Any], int]:
    """A Key check for a size from low to high bytes (`between` says so, e.g. "1M to 64T")."""
    def check(value) -> int:
        size = parse_size(value)
        if size is None or not low <= size <= high:
            raise KeyProblem(f"{value!r} must be a size from {between} ({_SIZE_FORMS})")
        return size
    return check


def parse_size_flag(text: str) -> int:
    """A Key's parse_flag for sizes: the range is the daemon's to check."""
    size = parse_size(text)
    if size is None:
        raise KeyProblem(f"{text!r} is not a size ({_SIZE_FORMS})")
    return size


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_of(choices) -> str:
    quoted = [repr(c) for c in choices]
    return " or ".join(quoted) if len(quoted) <= 2 else "one of " + ", ".join(quoted)


def _metavar(key: Key) -> str:
    if key.metavar:
        return key.metavar
    if key.choices:
        return "|".join(str(c) for c in key.choices)
    return key.name.upper()
