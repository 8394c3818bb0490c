"""QEMU guest kit: a tiny Linux guest that talks to the switch over vhost-user.

The kit has two halves.

* ``build()`` makes a guest kernel and initramfs, cached in a directory
  (``$VSWITCH_VMKIT_DIR``, default ``/var/cache/vswitch/vmkit``). The kernel
  is Debian 12's own (``apt-get download`` of the package that
  ``linux-image-amd64`` depends on, unpacked with ``dpkg-deb -x``); the
  initramfs holds static busybox, the virtio-net modules from that same
  package, the host's ``/usr/bin/iperf3`` with every shared library ``ldd``
  lists for it (and the dynamic loader) at the same paths, and an ``/init``
  script. A stamp file records a hash of every input (init script, module
  list, package versions, the SHA-256 of each copied host file), so a second
  build is a no-op and a changed input rebuilds.

* ``Guest`` boots that kernel in ``qemu-system-x86_64`` with one
  virtio-net-pci device on a vhost-user socket, waits for the init script's
  ready marker on the serial console, and runs shell commands there
  (``run``, ``ping``). Every QEMU it starts is stopped by PID, and all serial
  output goes to a log file for debugging.

The QEMU flags follow the facts recorded in ``shared/PEERS.md``: TCG (nested
KVM hangs here), ``pci=nomsi`` (virtio-net over vhost-user hangs in MSI-X
setup under TCG), and guest memory in a shared memfd so the vhost-user
back end can map it.

CLI::

    python -m tools.vmkit build [--force]     # build or refresh the cache
    python -m tools.vmkit boot --socket S [--qemu-server] [--ip 10.200.0.1/24]
                                              # boot one guest, shell on stdio
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Bump when the layout of the cache or the way it is built changes, so old
# caches are rebuilt rather than trusted.
KIT_FORMAT = 2

DEFAULT_CACHE_DIR = "/var/cache/vswitch/vmkit"
CACHE_DIR_ENV = "VSWITCH_VMKIT_DIR"

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Dynamically linked host programs copied into the guest together with their
# shared libraries (same paths as on the host, so the ELF interpreter path and
# the loader's default search directories just work). (path, Debian package).
GUEST_PROGRAMS = [("/usr/bin/iperf3", "iperf3")]

# Load order matters: each module needs the symbols of the ones before it.
VIRTIO_NET_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
]

# Linux 802.1Q VLAN devices (`ip link add link eth0 name eth0.10 type vlan id 10`),
# for a kit built with extra_modules=VLAN_MODULES; in load order.
VLAN_MODULES = ["llc", "stp", "garp", "mrp", "8021q"]

READY_MARKER = "VSWITCH-GUEST-READY"
ERROR_MARKER = "VSWITCH-GUEST-ERROR"

# The guest's /init. It runs as PID 1 under busybox's sh. Kernel messages
# stay on the console during boot (they land in the log file), then are
# silenced so they do not interleave with command output.
INIT_SCRIPT = r"""#!/bin/busybox sh
# vswitch test guest: set up eth0 from the kernel command line, then hand
# the serial console to an interactive shell.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts

fail() {
    echo "VSWITCH-GUEST-ERROR $*"
    # Keep a shell so the failure can be inspected from the console.
    exec setsid cttyhack sh
}

for module in @MODULES@; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done

VS_NAME=guest VS_IP= VS_MAC= VS_MTU= VS_IFACE=eth0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vs.name=*) VS_NAME="${arg#vs.name=}" ;;
        vs.ip=*) VS_IP="${arg#vs.ip=}" ;;
        vs.mac=*) VS_MAC="${arg#vs.mac=}" ;;
        vs.mtu=*) VS_MTU="${arg#vs.mtu=}" ;;
    esac
done
hostname "$VS_NAME"

# The PCI device is probed asynchronously after insmod returns.
tries=0
while [ ! -e "/sys/class/net/$VS_IFACE" ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 100 ] && fail "no $VS_IFACE after 10 s"
    sleep 0.1
done

ip link set lo up
[ -n "$VS_MAC" ] && { ip link set "$VS_IFACE" address "$VS_MAC" || fail "set mac $VS_MAC"; }
[ -n "$VS_MTU" ] && { ip link set "$VS_IFACE" mtu "$VS_MTU" || fail "set mtu $VS_MTU"; }
[ -n "$VS_IP" ] && { ip addr add "$VS_IP" dev "$VS_IFACE" || fail "add address $VS_IP"; }
ip link set "$VS_IFACE" up || fail "link up $VS_IFACE"

echo 1 > /proc/sys/kernel/printk
export PS1='# ' HOME=/ TERM=dumb
# Without echo, busybox's line editor falls back to a plain line read: no
# echoed input and no terminal queries in the output the test parses.
stty -echo
echo "VSWITCH-GUEST-READY name=$VS_NAME ip=$VS_IP mac=$(cat /sys/class/net/$VS_IFACE/address) queues=$(ls -d /sys/class/net/$VS_IFACE/queues/rx-* | wc -l)"
# The console ignores the modem lines (clocal): a carrier the serial port
# reports dropped (seen under a loaded host, and across a migration) must
# not hang up the shell.  setsid + cttyhack give the shell a controlling tty,
# so ^C reaches a hung command instead of being ignored.  PID 1 must never
# exit (the kernel panics), so a shell that ends anyway is started again.
stty clocal -hupcl
while true; do
    setsid cttyhack sh
    echo "VSWITCH-GUEST-SHELL-RESTARTED"
done
""".replace("@MODULES@", " ".join(VIRTIO_NET_MODULES))


class VmkitError(RuntimeError):
    """The kit could not be built or a guest misbehaved; the message says why."""


# --------------------------------------------------------------------------
# Building the kernel + initramfs cache
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory holding the built kernel and initramfs."""
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR))


def kernel_path(directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / "vmlinuz"


def initramfs_path(directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / "initramfs.gz"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    """Runs a build step and returns its stdout; a failure names the command."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise VmkitError(f"{cmd[0]} not found; on Debian install it with apt-get ({exc})") from exc
    if done.returncode != 0:
        raise VmkitError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def kernel_package_name() -> str:
    """The versioned kernel package behind the linux-image-amd64 metapackage."""
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise VmkitError(
        f"apt-cache depends {KERNEL_METAPACKAGE} names no kernel package; run apt-get update"
    )


def candidate_version(package: str) -> str:
    """The version apt would download for a package."""
    out = _run(["apt-cache", "policy", package])
    match = re.search(r"Candidate:\s*(\S+)", out)
    if not match or match.group(1) == "(none)":
        raise VmkitError(f"apt has no candidate for {package}; run apt-get update")
    return match.group(1)


def _download_and_extract(package: str, workdir: Path) -> Path:
    """apt-get downloads one .deb and unpacks it; returns the unpacked tree."""
    download_dir = workdir / f"{package}.download"
    download_dir.mkdir()
    _run(["apt-get", "download", package], cwd=download_dir)
    debs = list(download_dir.glob("*.deb"))
    if len(debs) != 1:
        raise VmkitError(f"apt-get download {package} left {len(debs)} .deb files")
    tree = workdir / f"{package}.tree"
    _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
    return tree


def _find_module(tree: Path, name: str) -> Path:
    """Finds name.ko (or .ko.xz/.ko.zst) under lib/modules of an unpacked kernel."""
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        found = sorted(tree.glob(f"lib/modules/*/kernel/**/{name}{suffix}"))
        if found:
            return found[0]
    raise VmkitError(f"kernel package has no module {name}")


def _module_bytes(path: Path) -> bytes:
    """A module's plain ELF bytes; busybox insmod does not decompress."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return _run_bytes(["zstd", "-dc", str(path)])
    return data


def _run_bytes(cmd: list[str]) -> bytes:
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise VmkitError(f"{' '.join(cmd)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def _busybox_binary(workdir: Path, version: str) -> Path:
    """The static busybox: the installed one if it is busybox-static's, else downloaded."""
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", BUSYBOX_PACKAGE], capture_output=True, text=True
    )
    if installed.returncode == 0 and installed.stdout.strip() == version and Path("/bin/busybox").exists():
        return Path("/bin/busybox")
    return _download_and_extract(BUSYBOX_PACKAGE, workdir) / "bin" / "busybox"


def _ldd_paths(program: str) -> list[str]:
    """The absolute paths of the shared objects ldd lists for a program, loader included."""
    paths = []
    for line in _run(["ldd", program]).splitlines():
        line = line.strip()
        if "not found" in line:
            raise VmkitError(f"ldd {program}: a library is missing: {line}")
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)";
        # linux-vdso.so.1 has no file.
        match = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)$", line)
        if match:
            paths.append(match.group(1))
    return paths


def guest_program_files() -> dict[str, Path]:
    """{path in the guest: host file} for GUEST_PROGRAMS that are installed, with their libraries.

    A program that is not installed is left out (its tests then say how to
    install it); its absence is part of the stamp, so installing it later
    rebuilds the kit. Symlinks are resolved: the guest gets plain files.
    """
    files: dict[str, Path] = {}
    for program, _package in GUEST_PROGRAMS:
        if not Path(program).exists():
            continue
        for path in [program, *_ldd_paths(program)]:
            files[path] = Path(path).resolve()
    return dict(sorted(files.items()))


def _guest_programs_stamp(files: dict[str, Path]) -> dict:
    """Package versions and SHA-256 of every host file copied into the initramfs."""
    versions = {}
    for program, package in GUEST_PROGRAMS:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        versions[package] = done.stdout.strip() if done.returncode == 0 and program in files else None
    hashes = {path: hashlib.sha256(source.read_bytes()).hexdigest() for path, source in files.items()}
    return {"versions": versions, "files": hashes}


class _NewcArchive:
    """Writes a cpio archive in the kernel's "newc" format.

    Written here rather than with the cpio tool so the archive can contain
    /dev/console (the kernel opens it for init's stdio before devtmpfs is
    mounted) without needing root to mknod, and so builds are reproducible
    (fixed owners and timestamps).
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = itertools.count(1)

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b"\0"
        fields = [
            next(self._inode), mode, 0, 0,      # ino, mode, uid, gid
            1, 0, len(data),                    # nlink, mtime, filesize
            0, 0, rdev[0], rdev[1],             # dev major/minor, rdev major/minor
            len(name_bytes), 0,                 # namesize, check
        ]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_bytes)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def _pack_initramfs(busybox: bytes, modules: dict[str, bytes], host_files: dict[str, bytes] | None = None) -> bytes:
    archive = _NewcArchive()
    directories = ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "root"]
    # Parents of the copied host files, each once, parents before children.
    for path in sorted(host_files or {}):
        parts = path.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in directories:
                directories.append(parent)
    for directory in directories:
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, mode=0o666)
    archive.file("bin/busybox", busybox, mode=0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT_SCRIPT.encode(), mode=0o755)
    for name, data in modules.items():
        archive.file(f"lib/modules/{name}.ko", data)
    # Sorted so the archive does not depend on discovery order.
    for path, data in sorted((host_files or {}).items()):
        archive.file(path.strip("/"), data, mode=0o755)
    # mtime=0 keeps the gzip output identical for identical inputs.
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def _init_sha256() -> str:
    return hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()


def _inputs_stamp(kernel_package: str, kernel_version: str, busybox_version: str, programs: dict,
                  extra_modules: tuple = ()) -> dict:
    """Everything the built files depend on; a change in any of it rebuilds."""
    # Only when asked for: a kit without extra modules keeps the stamp it always had.
    extra = {"extra_modules": list(extra_modules)} if extra_modules else {}
    return {
        **extra,
        "kit_format": KIT_FORMAT,
        "init_sha256": _init_sha256(),
        "modules": VIRTIO_NET_MODULES,
        "kernel_package": kernel_package,
        "kernel_version": kernel_version,
        "busybox_version": busybox_version,
        "guest_programs": programs,
    }


def _read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def build(directory: Path | None = None, force: bool = False, log=print,
          extra_modules: tuple = ()) -> tuple[Path, Path]:
    """Builds the kernel + initramfs if missing or stale; returns their paths.

    extra_modules (e.g. VLAN_MODULES) go into the initramfs's /lib/modules
    too, not loaded by /init: a test insmods them.  Give such a kit its own
    directory, as the default one is shared by every test.

    Safe to call from parallel test workers: a lock file serialises builds and
    files are renamed into place only when complete.
    """
    directory = Path(directory or cache_dir())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = _read_stamp(directory)
        complete = have is not None and kernel_path(directory).exists() and initramfs_path(directory).exists()
        host_files = guest_program_files()
        programs = _guest_programs_stamp(host_files)
        try:
            kernel_package = kernel_package_name()
            wanted = _inputs_stamp(
                kernel_package, candidate_version(kernel_package), candidate_version(BUSYBOX_PACKAGE), programs,
                tuple(extra_modules),
            )
        except VmkitError as exc:
            # Without apt's package lists (offline, no apt-get update) a cache
            # built from this same kit is still good: only package updates are missed.
            ours = (have and have.get("kit_format") == KIT_FORMAT and have.get("init_sha256") == _init_sha256()
                    and have.get("guest_programs") == programs
                    and have.get("extra_modules", []) == list(extra_modules))
            if complete and ours and not force:
                log(f"vmkit: cannot check package versions ({exc}); using the cache in {directory}")
                return kernel_path(directory), initramfs_path(directory)
            raise
        if not force and complete and have == wanted:
            return kernel_path(directory), initramfs_path(directory)

        log(f"vmkit: building guest kernel+initramfs from {kernel_package} {wanted['kernel_version']} in {directory}")
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
            workdir = Path(tmp)
            kernel_tree = _download_and_extract(kernel_package, workdir)
            vmlinuz = sorted(kernel_tree.glob("boot/vmlinuz-*"))
            if not vmlinuz:
                raise VmkitError(f"{kernel_package} has no boot/vmlinuz-*")
            modules = {name: _module_bytes(_find_module(kernel_tree, name))
                       for name in (*VIRTIO_NET_MODULES, *extra_modules)}
            busybox = _busybox_binary(workdir, wanted["busybox_version"]).read_bytes()
            # Read once: the stamp's hashes were taken from these same files
            # and a mismatch now (a package upgraded mid-build) must not be stamped.
            copied = {path: source.read_bytes() for path, source in host_files.items()}
            if {path: hashlib.sha256(data).hexdigest() for path, data in copied.items()} != programs["files"]:
                raise VmkitError("host files for the guest changed during the build; run it again")
            initramfs = _pack_initramfs(busybox, modules, copied)

            shutil.copyfile(vmlinuz[0], workdir / "vmlinuz")
            (workdir / "initramfs.gz").write_bytes(initramfs)
            # The stamp goes last: a crash mid-build leaves a mismatch, not a lie.
            (directory / "stamp.json").unlink(missing_ok=True)
            os.replace(workdir / "vmlinuz", kernel_path(directory))
            os.replace(workdir / "initramfs.gz", initramfs_path(directory))
            (directory / "stamp.json").write_text(json.dumps(wanted, indent=2) + "\n")
        log(f"vmkit: built {kernel_path(directory)} and {initramfs_path(directory)}")
        return kernel_path(directory), initramfs_path(directory)


# TCG runs each vCPU in a host thread; more than this only slows a 2-core host down.
MAX_VCPUS = 4


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None when it is not installed."""
    return shutil.which("qemu-system-x86_64")


# --------------------------------------------------------------------------
# Running a guest
# --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the QEMU child before exec: if the test runner dies, so does QEMU.

    Only async-signal-safe work happens here (one prctl call), which is what
    makes preexec_fn acceptable even with reader threads running. The kernel
    sends the signal when the *thread* that started QEMU exits, so call
    Guest.start() from a thread that outlives the guest (normally the main one).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Guest:
    """One QEMU guest with a virtio-net NIC on a vhost-user socket.

    ``qemu_server=False`` (default): the switch owns the socket (its port is in
    server mode) and QEMU connects to it, so the switch must listen first.
    ``qemu_server=True``: QEMU creates and listens on the socket
    (``server=on,wait=off``) and the switch port must be in client mode.
    Even with ``wait=off`` QEMU's vhost-user netdev holds the boot until the
    switch has connected, so ``wait_ready`` only succeeds once it has.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        name: str,
        socket_path: str | os.PathLike,
        *,
        ip: str,
        mac: str,
        qemu_server: bool = False,
        queues: int = 1,
        log_dir: str | os.PathLike | None = None,
        memory_mb: int = 256,
        kit_dir: str | os.PathLike | None = None,
        extra_cmdline: str = "",
        device_options: str = "",
        run_as: str | None = None,
        packed: bool = False,
        qemu_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.packed = packed  # virtio-net-pci packed=on: the guest's driver asks for packed rings
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > 107:
            raise VmkitError(f"socket path too long for AF_UNIX (max 107 bytes): {self.socket_path}")
        self.ip = ip if "/" in ip else f"{ip}/24"
        self.mac = mac
        self.qemu_server = qemu_server
        self.queues = queues
        self.memory_mb = memory_mb
        self.kit_dir = Path(kit_dir) if kit_dir else None
        self.extra_cmdline = extra_cmdline
        # More virtio-net-pci properties, e.g. "packed=on" or "host_mtu=9000".
        self.device_options = device_options
        # A user to run QEMU as (as libvirt runs it as libvirt-qemu), or None for ours.
        self.run_as = run_as
        # More QEMU arguments, before the NIC's: e.g. a machine type and a vIOMMU device.
        self.qemu_args = tuple(qemu_args)
        log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir())
        self.log_path = log_dir / f"qemu-{name}.log"
        self.process: subprocess.Popen | None = None
        self._output = ""  # all serial output so far, "\r" removed
        self._output_lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log_file = None
        self._marker_ids = itertools.count(1)
        self._booted = False  # the shell is up, so "poweroff -f" can be typed

    @property
    def address(self) -> str:
        """The guest's IPv4 address without the prefix length."""
        return self.ip.split("/")[0]

    # ---- lifecycle -------------------------------------------------------

    def command_line(self) -> list[str]:
        """The full QEMU command line for this guest."""
        qemu = qemu_binary()
        if not qemu:
            raise VmkitError("qemu-system-x86_64 not found; install it with: apt-get install qemu-system-x86")
        kit = self.kit_dir or cache_dir()
        cmdline = " ".join(
            part
            for part in (
                "console=ttyS0 pci=nomsi panic=-1 loglevel=4",
                f"vs.name={self.name} vs.ip={self.ip} vs.mac={self.mac}",
                self.extra_cmdline,
            )
            if part
        )
        chardev = f"socket,id=c0,path={self.socket_path}"
        if self.qemu_server:
            chardev += ",server=on,wait=off"
        else:
            # If the switch restarts, QEMU dials again once a second.
            chardev += ",reconnect=1"
        netdev = "vhost-user,id=n0,chardev=c0"
        device = f"virtio-net-pci,netdev=n0,mac={self.mac},romfile="
        if self.packed:
            device += ",packed=on"
        if self.queues > 1:
            netdev += f",queues={self.queues}"
            # One vector per rx and tx queue, plus config and control queue.
            device += f",mq=on,vectors={2 * self.queues + 2}"
        if self.device_options:
            device += f",{self.device_options}"
        return [
            qemu,
            "-name", self.name,
            "-accel", "tcg",
            "-cpu", "max",
            "-m", f"{self.memory_mb}M",
            # One vCPU per queue pair: virtio-net uses as many queue pairs as
            # there are vCPUs (and busybox has no ethtool -L to ask for more).
            "-smp", str(min(self.queues, MAX_VCPUS)),
            "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
            "-numa", "node,memdev=mem",
            "-nographic", "-serial", "stdio", "-nodefaults", "-no-reboot", "-no-user-config",
            "-kernel", str(kernel_path(kit)),
            "-initrd", str(initramfs_path(kit)),
            "-append", cmdline,
            *self.qemu_args,
            "-chardev", chardev,
            "-netdev", netdev,
            "-device", device,
        ]

    def start(self) -> "Guest":
        """Starts QEMU; returns at once (use wait_ready to wait for the boot)."""
        if self.process is not None:
            raise VmkitError(f"guest {self.name} already started")
        kit = self.kit_dir or cache_dir()
        if not kernel_path(kit).exists() or not initramfs_path(kit).exists():
            build(kit)
        argv = self.command_line()
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        with self._output_lock:
            self._output = ""
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            # Ctrl-C on the test runner must not kill QEMU before stop() powers it off.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, name=f"qemu-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read_output(self) -> None:
        """Copies QEMU's serial output to the log file and the in-memory buffer."""
        assert self.process and self.process.stdout
        fd = self.process.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            if self._log_file:
                self._log_file.write(chunk)
            with self._output_lock:
                self._output += chunk.decode(errors="replace").replace("\r", "")
                self._output_lock.notify_all()
        with self._output_lock:
            self._output_lock.notify_all()

    def _wait_for(self, pattern: re.Pattern, start: int, timeout: float, what: str) -> re.Match:
        """Waits until pattern appears in the output at or after offset start."""
        deadline = time.monotonic() + timeout
        with self._output_lock:
            while True:
                match = pattern.search(self._output, start)
                if match:
                    return match
                if self.process is None or self.process.poll() is not None:
                    raise VmkitError(f"guest {self.name}: QEMU exited while waiting for {what}{self._tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VmkitError(f"guest {self.name}: timed out after {timeout:.0f} s waiting for {what}{self._tail()}")
                self._output_lock.wait(min(remaining, 0.5))

    def _tail(self, lines: int = 25) -> str:
        text = "\n".join(self._output.splitlines()[-lines:])
        return f"\n--- last lines of {self.log_path} ---\n{text}"

    @property
    def output(self) -> str:
        """All serial output since the last start()."""
        with self._output_lock:
            return self._output

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Waits for the init script's ready line; returns it. Fails on a guest error."""
        # Not anchored: terminal escapes from the boot can precede the marker.
        pattern = re.compile(rf"({READY_MARKER}|{ERROR_MARKER})[^\n]*")
        match = self._wait_for(pattern, 0, timeout, READY_MARKER)
        if match.group(1) == ERROR_MARKER:
            raise VmkitError(f"guest {self.name} failed to boot: {match.group(0)}{self._tail()}")
        self._booted = True
        return match.group(0)

    def stop(self, timeout: float = 10.0) -> None:
        """Powers the guest off; if it does not go, terminates then kills QEMU by PID."""
        process = self.process
        if process is None:
            return
        try:
            # Without a shell to type into (still booting, or QEMU still
            # waiting for the switch to connect) go straight to SIGTERM.
            if process.poll() is None and not (self._booted and self._power_off(timeout)):
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        finally:
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            if self._reader:
                self._reader.join(5)
            if process.stdout:
                process.stdout.close()
            if self._log_file:
                self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} stopped, exit code {process.returncode}\n".encode())
                self._log_file.close()
                self._log_file = None
            # A QEMU-owned listening socket would otherwise linger after a kill.
            if self.qemu_server:
                try:
                    self.socket_path.unlink()
                except FileNotFoundError:
                    pass
            self.process = None
            self._reader = None
            self._booted = False

    def _power_off(self, timeout: float) -> bool:
        """Types "poweroff -f" on the console; True if QEMU exited within timeout."""
        try:
            # -no-reboot turns the guest's power-off into a QEMU exit.
            self._write("\npoweroff -f\n")
            self.process.wait(timeout)
            return True
        except (OSError, subprocess.TimeoutExpired):
            return False

    def __enter__(self) -> "Guest":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- console commands -----------------------------------------------

    def _write(self, text: str) -> None:
        assert self.process and self.process.stdin
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str:
        """Runs a shell command on the guest's serial console; returns its output.

        The command is wrapped in begin/end markers. Each marker is printed
        from two pieces ("printf %s_%s A B") so that, should the console echo
        what we type, the echo holds "A B" and only the real output "A_B".
        Output not ending in a newline runs into the end marker's line and is
        kept. With check=True a non-zero exit status raises VmkitError.

        Start a program that outlives the command in a subshell, "(cmd &)",
        not as a job of the console shell ("cmd &"): busybox ash 1.35 reading
        a line with echo off (the plain read this console uses) exits when one
        of its jobs ends meanwhile, and a command typed at that moment is lost
        (reproduced with the host's busybox under a pty; "(cmd &)" survives).
        PID 1 reaps the subshell's orphan.
        """
        marker_id = f"{os.getpid()}x{next(self._marker_ids)}"
        with self._output_lock:
            start = len(self._output)
        self._write(
            f"printf '%s_%s\\n' VSBEGIN {marker_id}; {command}; "
            f"printf '%s_%s rc=%d\\n' VSEND {marker_id} $?\n"
        )
        begin = self._wait_for(re.compile(rf"VSBEGIN_{marker_id}\n"), start, timeout, f"start of {command!r}")
        try:
            end = self._wait_for(
                re.compile(rf"VSEND_{marker_id} rc=(\d+)\n"), begin.end(), timeout, f"end of {command!r}"
            )
        except VmkitError:
            # Interrupt the hung command so the console is usable afterwards.
            if self.process and self.process.poll() is None:
                self._write("\x03\n")
            raise
        with self._output_lock:
            text = self._output[begin.end() : end.start()]
        status = int(end.group(1))
        if check and status != 0:
            raise VmkitError(f"guest {self.name}: {command!r} exited {status}:\n{text}")
        return text

    def ping(self, ip: str, count: int = 5, interval: float = 0.2, timeout: float | None = None) -> tuple[int, int]:
        """Pings an address from the guest; returns (sent, received)."""
        ip = ip.split("/")[0]
        # -W bounds the wait for the last reply; the outer timeout adds slack for TCG.
        out = self.run(f"ping -c {count} -i {interval} -W 2 {ip}", timeout=timeout or (count * (interval + 1) + 30), check=False)
        match = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
        if not match:
            raise VmkitError(f"guest {self.name}: unexpected ping output:\n{out}")
        return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmkit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help=f"cache directory (default ${CACHE_DIR_ENV} or {DEFAULT_CACHE_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build or refresh the guest kernel + initramfs")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    commands.add_parser("path", help="print the kernel and initramfs paths")
    boot = commands.add_parser("boot", help="boot one guest with its console on this terminal")
    boot.add_argument("--socket", required=True, help="vhost-user socket path")
    boot.add_argument("--qemu-server", action="store_true", help="QEMU listens; the switch connects")
    boot.add_argument("--ip", default="10.200.0.1/24")
    boot.add_argument("--mac", default="52:54:00:c8:00:01")
    boot.add_argument("--queues", type=int, default=1)
    boot.add_argument("--name", default="vm1")
    args = parser.parse_args(argv)
    directory = Path(args.dir) if args.dir else None

    try:
        if args.command == "build":
            kernel, initramfs = build(directory, force=args.force)
            print(kernel)
            print(initramfs)
        elif args.command == "path":
            print(kernel_path(directory))
            print(initramfs_path(directory))
        elif args.command == "boot":
            build(directory)
            guest = Guest(
                args.name, args.socket, ip=args.ip, mac=args.mac, qemu_server=args.qemu_server,
                queues=args.queues, kit_dir=directory,
            )
            # Interactive use: QEMU inherits this terminal instead of pipes.
            os.execv(guest.command_line()[0], guest.command_line())
    except VmkitError as exc:
        print(f"vmkit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
