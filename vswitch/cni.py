"""vswitch-cni: a CNI plugin (CNI spec 1.0.0) that puts pods on a running vswitchd.

A runtime (containerd, CRI-O, Multus, Podman) runs it with CNI_COMMAND and the
other CNI_* variables in the environment and the network config on stdin:

    {"cniVersion": "1.0.0", "name": "net1", "type": "vswitch-cni",
     "control_socket": "/run/vswitch/vswitchd.sock", "kind": "tap" | "vhost-user",
     "vlan": 10, "mtu": 1450, "socket_dir": "/run/vswitch/cni",
     "ipam": {"type": "host-local", ...}}

* `kind: tap`: the switch creates a TAP port named CNI_IFNAME inside the pod's
  namespace (the port's `netns` key takes the namespace file CNI_NETNS); the
  IPAM plugin named in `ipam` (found in CNI_PATH) gives the addresses, which
  this plugin sets with `ip` inside the namespace, with the routes.
* `kind: vhost-user`: a server-mode vhost-user port whose socket is
  `<socket_dir>/<first 12 characters of CNI_CONTAINERID>/<CNI_IFNAME>.sock`
  (with `socket_subdir: pod`, `<socket_dir>/<namespace>_<pod name>/...` from
  Kubernetes' CNI_ARGS, a directory the pod can name in its own spec); the
  result's interface carries it in `socketPath`, with the MAC the pod's DPDK
  app should use.  IPAM is optional; its addresses are reported, not set.

The switch port is called `cni` + 12 hex digits of a hash of the container ID
and CNI_IFNAME: unique per attachment, so concurrent ADDs never collide, and
DEL finds it again from the same variables.  Every failure is CNI error JSON
on stdout and a non-zero exit status, after undoing what the command did.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ["1.0.0"]
DEFAULT_CONTROL_SOCKET = "/run/vswitch/vswitchd.sock"
DEFAULT_SOCKET_DIR = "/run/vswitch/cni"
KINDS = ("tap", "vhost-user")

# Error codes: the spec's (section "Error"), then this plugin's own (100 and up).
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
SWITCH_REFUSED = 100       # vswitchd refused the port (its one-line reason is the message)
IPAM_FAILURE = 101         # the IPAM plugin is missing or failed
INTERFACE_FAILURE = 102    # addresses or routes could not be set in the pod's namespace
CHECK_FAILED = 103         # CHECK found the attachment not as ADD left it
INTERNAL_ERROR = 199       # an unexpected exception (a bug here): its type and text are the message

CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
IFNAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,15}$")
K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")   # a DNS subdomain, as pod names are


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def port_name(container_id: str, ifname: str) -> str:
    """The switch port of one attachment: a port name (at most 15 characters, a letter first)."""
    return "cni" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def attachment_mac(container_id: str, ifname: str) -> str:
    """A locally administered unicast MAC for a vhost-user pod, stable across ADD and CHECK."""
    digest = hashlib.sha256(f"mac/{container_id}/{ifname}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


# --- the request: environment and config ---------------------------------------------------------

class Request:
    def __init__(self, env: dict, stdin: bytes):
        self.command = env.get("CNI_COMMAND", "")
        self.raw = stdin
        self.version = CNI_VERSION   # what errors say until the config names its own
        if self.command not in ("ADD", "DEL", "CHECK", "VERSION"):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {self.command!r} is not ADD, DEL, CHECK or VERSION"
                           if self.command else "CNI_COMMAND is not set")
        if self.command == "VERSION":
            return
        try:
            self.config = json.loads(stdin)
        except ValueError as exc:
            raise CniError(DECODING_FAILURE, f"network config is not JSON: {exc}") from None
        if not isinstance(self.config, dict):
            raise CniError(DECODING_FAILURE, "network config must be a JSON object")
        version = self.config.get("cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_VERSIONS)})")
        self.version = version
        self._check_config()
        self._read_env(env)

    def _check_config(self) -> None:
        c = self.config
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise CniError(INVALID_CONFIG, "network config: name: required (a string)")
        self.kind = c.get("kind")
        if self.kind not in KINDS:
            raise CniError(INVALID_CONFIG, f"network config: kind: {self.kind!r} must be one of: {', '.join(KINDS)}")
        self.control_socket = c.get("control_socket", DEFAULT_CONTROL_SOCKET)
        if not isinstance(self.control_socket, str) or not self.control_socket.startswith("/"):
            raise CniError(INVALID_CONFIG, "network config: control_socket: must be an absolute path")
        vlan = c.get("vlan")
        if vlan is None:
            self.vlan = None
        elif isinstance(vlan, int) and not isinstance(vlan, bool) and 1 <= vlan <= 4094:
            self.vlan = {"mode": "access", "tag": vlan}
        elif isinstance(vlan, dict):   # full port settings (trunk, native-...), checked by the switch
            self.vlan = vlan
        else:
            raise CniError(INVALID_CONFIG, f"network config: vlan: {vlan!r} must be a VLAN ID from 1 to 4094 "
                           "or a mapping of vswitch VLAN settings")
        self.mtu = c.get("mtu")
        if self.mtu is not None and (not isinstance(self.mtu, int) or isinstance(self.mtu, bool)):
            raise CniError(INVALID_CONFIG, f"network config: mtu: {self.mtu!r} must be an integer")
        self.ipam = c.get("ipam")
        if self.ipam is not None and not (isinstance(self.ipam, dict) and isinstance(self.ipam.get("type"), str)
                                          and re.fullmatch(r"[A-Za-z0-9_.-]+", self.ipam["type"])):
            raise CniError(INVALID_CONFIG, "network config: ipam: must be a mapping with a plugin name in type")
        if self.kind == "tap" and not self.ipam:
            raise CniError(INVALID_CONFIG, "network config: ipam: required for kind tap "
                           "(e.g. {\"type\": \"host-local\", \"subnet\": \"10.10.0.0/24\"})")
        self.socket_dir = c.get("socket_dir", DEFAULT_SOCKET_DIR)
        if not isinstance(self.socket_dir, str) or not self.socket_dir.startswith("/"):
            raise CniError(INVALID_CONFIG, "network config: socket_dir: must be an absolute path")
        self.socket_subdir = c.get("socket_subdir", "container")
        if self.socket_subdir not in ("container", "pod"):
            raise CniError(INVALID_CONFIG, f"network config: socket_subdir: {self.socket_subdir!r} must be "
                           "container or pod")

    def _read_env(self, env: dict) -> None:
        def need(var: str) -> str:
            value = env.get(var, "")
            if not value:
                raise CniError(INVALID_ENVIRONMENT, f"{var} is not set")
            return value

        self.container_id = need("CNI_CONTAINERID")
        if not CONTAINER_ID.match(self.container_id):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID {self.container_id!r} must be letters, "
                           "digits, '_', '.' or '-'")
        self.ifname = need("CNI_IFNAME")
        if not IFNAME.match(self.ifname):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME {self.ifname!r} is not an interface name "
                           "(1 to 15 letters, digits, '_', '-' or '.')")
        # DEL may come after the namespace is gone, with CNI_NETNS empty: nothing in it needs undoing.
        self.netns = env.get("CNI_NETNS", "") if self.command == "DEL" else need("CNI_NETNS")
        if self.netns and not self.netns.startswith("/"):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {self.netns!r} must be an absolute path")
        self.cni_path = env.get("CNI_PATH", "")
        if self.ipam and not self.cni_path:
            raise CniError(INVALID_ENVIRONMENT, "CNI_PATH is not set (needed to find the IPAM plugin)")
        self.env = env
        self.port = port_name(self.container_id, self.ifname)
        self.args = parse_cni_args(env.get("CNI_ARGS", ""))
        if self.kind == "vhost-user":
            self.socket_path = os.path.join(self.socket_dir, self._socket_subdir(), f"{self.ifname}.sock")

    def _socket_subdir(self) -> str:
        """The per-pod directory of the vhost-user sockets: the container ID's first 12 characters, or
        (socket_subdir: pod) NAMESPACE_NAME from Kubernetes' CNI_ARGS, a name the pod itself knows
        (downward API) and can mount with subPathExpr."""
        if self.socket_subdir == "container":
            return self.container_id[:12]
        names = [self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", "")]
        if not all(K8S_NAME.match(n) for n in names):
            raise CniError(INVALID_ENVIRONMENT, "socket_subdir pod: CNI_ARGS must give K8S_POD_NAMESPACE and "
                           "K8S_POD_NAME (Kubernetes names)")
        return "_".join(names)


def parse_cni_args(text: str) -> dict:
    """CNI_ARGS: "K1=V1;K2=V2" (the spec's only form)."""
    out = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


# --- helpers: the switch, the IPAM plugin, the pod's namespace -------------------------------------

def switch_call(req: Request, command: str, args: dict | None = None):
    from vswitch.control.cli import ControlError, call

    try:
        return call(req.control_socket, command, args, timeout=20.0)
    except ControlError as exc:
        message = str(exc)
        if message.startswith("cannot connect") or message.startswith("cannot talk"):
            raise CniError(TRY_AGAIN_LATER, f"vswitchd unreachable: {message}") from None
        raise CniError(SWITCH_REFUSED, f"vswitchd: {message}") from None


def switch_port(req: Request) -> dict | None:
    """The port's `port/list` entry (name, type, link), or None when the switch has no such port."""
    return next((p for p in switch_call(req, "port/list")["ports"] if p["name"] == req.port), None)


def ipam(req: Request, command: str) -> dict:
    """Runs the IPAM plugin with the same environment and config, as the spec says; its result."""
    kind = req.ipam["type"]
    binary = next((os.path.join(d, kind) for d in req.cni_path.split(":")
                   if d and os.access(os.path.join(d, kind), os.X_OK)), None)
    if binary is None:
        raise CniError(IPAM_FAILURE, f"IPAM plugin {kind!r} not found in CNI_PATH {req.cni_path}",
                       "Debian: apt-get install containernetworking-plugins (installs /usr/lib/cni)")
    env = dict(req.env, CNI_COMMAND=command)
    try:
        proc = subprocess.run([binary], input=req.raw, env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(IPAM_FAILURE, f"IPAM plugin {kind}: {exc}") from None
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        out = None
    if proc.returncode != 0:
        if isinstance(out, dict) and "msg" in out:
            raise CniError(out.get("code") or IPAM_FAILURE, f"IPAM plugin {kind}: {out['msg']}",
                           out.get("details", ""))
        raise CniError(IPAM_FAILURE, f"IPAM plugin {kind} failed ({proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace').strip()}")
    if not isinstance(out, dict):
        raise CniError(IPAM_FAILURE, f"IPAM plugin {kind}: its result is not a JSON object")
    return out


def in_netns(req: Request, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command inside the pod's namespace (by its file: `ip -n` takes only `ip netns` names)."""
    proc = subprocess.run(["nsenter", f"--net={req.netns}", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise CniError(INTERFACE_FAILURE, f"{' '.join(args)} in {req.netns}: {proc.stderr.strip()}")
    return proc


def link_of(req: Request) -> dict | None:
    """The pod interface as `ip -j addr show` gives it, or None when it is not there."""
    proc = in_netns(req, "ip", "-j", "addr", "show", "dev", req.ifname, check=False)
    if proc.returncode != 0:
        return None
    links = json.loads(proc.stdout or "[]")
    return links[0] if links else None


def configure_interface(req: Request, ips: list[dict], routes: list[dict]) -> None:
    """Sets the IPAM result's addresses and routes on the pod's interface."""
    for ip in ips:
        in_netns(req, "ip", "addr", "add", ip["address"], "dev", req.ifname)
    in_netns(req, "ip", "link", "set", "dev", req.ifname, "up")
    for route in routes:
        dst = ipaddress.ip_network(route["dst"], strict=False)
        gateway = route.get("gw") or next(
            (ip["gateway"] for ip in ips if ip.get("gateway")
             and ipaddress.ip_address(ip["gateway"]).version == dst.version), None)
        cmd = ["ip", "route", "add", str(dst)] + (["via", gateway] if gateway else []) + ["dev", req.ifname]
        in_netns(req, *cmd)


# --- the commands ----------------------------------------------------------------------------------

def cmd_add(req: Request) -> dict:
    switch_call(req, "version")   # unreachable: try again later, before anything is allocated
    ipam_result = ipam(req, "ADD") if req.ipam else {}
    ips = [dict(ip, interface=0) for ip in ipam_result.get("ips", [])]
    routes = ipam_result.get("routes", [])
    spec = {"name": req.port}
    if req.kind == "tap":
        spec.update(type="tap", ifname=req.ifname, netns=req.netns)
        if req.mtu:
            spec["mtu"] = req.mtu
    else:
        spec.update(type="vhost-user", path=req.socket_path, mode="server")
    if req.vlan:
        spec["vlan"] = req.vlan
    made_dir = False
    try:
        if req.kind == "vhost-user":
            directory = os.path.dirname(req.socket_path)
            made_dir = not os.path.isdir(directory)
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise CniError(IO_FAILURE, f"cannot make socket directory {directory}: {exc.strerror}") from None
        switch_call(req, "port/add", spec)
        try:
            if req.kind == "tap":
                configure_interface(req, ips, routes)
                link = link_of(req)
                if link is None:
                    raise CniError(INTERFACE_FAILURE, f"interface {req.ifname} vanished from {req.netns}")
                interface = {"name": req.ifname, "mac": link["address"], "sandbox": req.netns}
            else:
                interface = {"name": req.ifname, "mac": attachment_mac(req.container_id, req.ifname),
                             "sandbox": req.netns, "socketPath": req.socket_path}
        except BaseException:
            try:
                _remove_port(req)
            except CniError:
                pass   # the switch went away meanwhile: its port went with it, or DEL will find it
            raise
    except BaseException:
        if made_dir:
            _remove_socket_dir(req)
        if req.ipam:
            try:
                ipam(req, "DEL")
            except CniError:
                pass   # the ADD's own error is the one to report
        raise
    result = {"cniVersion": req.version, "interfaces": [interface], "ips": ips}
    if routes:
        result["routes"] = routes
    dns = ipam_result.get("dns") or req.config.get("dns")
    if dns:
        result["dns"] = dns
    return result


def _remove_port(req: Request) -> None:
    if switch_port(req) is not None:
        switch_call(req, "port/del", {"name": req.port})


def _remove_socket_dir(req: Request) -> None:
    directory = os.path.dirname(req.socket_path)
    try:
        os.unlink(req.socket_path)
    except FileNotFoundError:
        pass
    try:
        os.rmdir(directory)   # only when no other attachment of this pod still has a socket there
    except OSError:
        pass


def cmd_del(req: Request) -> None:
    _remove_port(req)   # the switch deletes a TAP with its port, wherever its namespace is
    if req.kind == "vhost-user":
        _remove_socket_dir(req)
    if req.ipam:
        ipam(req, "DEL")


def cmd_check(req: Request) -> None:
    prev = req.config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "network config: prevResult: required for CHECK")
    port = switch_port(req)
    if port is None:
        raise CniError(CHECK_FAILED, f"switch port {req.port} for {req.ifname} is missing")
    if port.get("type") != req.kind:
        raise CniError(CHECK_FAILED, f"switch port {req.port} is a {port.get('type')} port, not {req.kind}")
    if req.ipam:
        ipam(req, "CHECK")
    if req.kind == "vhost-user":
        if not os.path.exists(req.socket_path):
            raise CniError(CHECK_FAILED, f"vhost-user socket {req.socket_path} is missing")
        return
    if port.get("link") != "up":
        raise CniError(CHECK_FAILED, f"switch port {req.port} link is {port.get('link')}")
    link = link_of(req)
    if link is None:
        raise CniError(CHECK_FAILED, f"interface {req.ifname} is missing from {req.netns}")
    if "UP" not in link.get("flags", []):
        raise CniError(CHECK_FAILED, f"interface {req.ifname} is down")
    have = {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}
    for ip in prev.get("ips", []):
        address = str(ipaddress.ip_interface(ip["address"]))
        if address not in have:
            raise CniError(CHECK_FAILED, f"interface {req.ifname} lacks address {address}")


def run(env: dict, stdin: bytes) -> tuple[int, dict | None]:
    """One plugin invocation: (exit status, JSON for stdout or None)."""
    req = None
    try:
        req = Request(env, stdin)
        if req.command == "VERSION":
            return 0, {"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS}
        if req.command == "ADD":
            return 0, cmd_add(req)
        if req.command == "DEL":
            cmd_del(req)
        else:
            cmd_check(req)
        return 0, None
    except CniError as exc:
        return 1, exc.to_json(req.version if req is not None else _version_of(stdin))
    except Exception as exc:   # still CNI error JSON, so the runtime shows something readable
        error = CniError(INTERNAL_ERROR, f"vswitch-cni internal error: {type(exc).__name__}: {exc}")
        return 1, error.to_json(req.version if req is not None else _version_of(stdin))


def _version_of(stdin: bytes) -> str:
    """The config's cniVersion for an error before it was checked, when it is one we speak."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return CNI_VERSION
    return version if version in SUPPORTED_VERSIONS else CNI_VERSION


def main() -> int:
    if shutil.which("nsenter") is None:
        print(json.dumps({"cniVersion": CNI_VERSION, "code": INVALID_ENVIRONMENT,
                          "msg": "nsenter not found (Debian package util-linux)"}))
        return 1
    stdin = sys.stdin.buffer.read()
    status, out = run(dict(os.environ), stdin)
    if out is not None:
        print(json.dumps(out))
    return status


if __name__ == "__main__":
    sys.exit(main())
