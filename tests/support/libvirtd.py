"""A private libvirtd for a test, and a vmkit guest run by it as a libvirt domain.

`PrivateLibvirtd` runs Debian's `libvirtd` as root, as the system daemon would
(so it starts QEMU as `libvirt-qemu`, with its DAC security driver), but in a
mount namespace of its own: a directory of the test is bind-mounted over each of
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
/var/cache/libvirt, so the machine's libvirt configuration, state and any system
libvirtd are neither used nor touched. The private qemu.conf sets

* `security_driver = "none"`: no AppArmor/SELinux confinement (the profiles of
  libvirt-daemon-system would not allow the test's paths); the DAC driver
  (QEMU's user and group) stays on, which is what the switch's socket keys serve;
* `stdio_handler = "file"`: QEMU's log goes to a file, no virtlogd needed;
* `cgroup_controllers = [ ]`: no cgroups, which a machine without systemd (a
  container) may not let libvirtd manage.

virsh reaches it on `qemu+unix:///system?socket=...`. `stop()` destroys and
undefines every domain, stops the daemon and any QEMU it left by PID, and
removes the mount points it had to create.

`LibvirtGuest` is a `vmkit.Guest` whose QEMU libvirt starts from domain XML;
its serial console is a UNIX socket the test listens on (libvirt's `<serial
type='unix'>` in connect mode, so no boot output is lost before the test
connects), and `run`/`ping`/`wait_ready` work as for a guest vmkit starts.
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from tools import vmkit

# Debian's libvirt-daemon-system creates this user and group and its QEMU driver runs guests as them.
QEMU_USER = "libvirt-qemu"
QEMU_GROUP = "libvirt-qemu"

# The directories a privileged libvirtd uses, each replaced by one of the test's own.
PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}

LIBVIRTD_CONF = """\
# Only root reaches this private daemon's socket, without authentication.
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""

QEMU_CONF = """\
# QEMU runs as Debian's libvirt-qemu:libvirt-qemu (the defaults, not set here).
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
"""


class LibvirtError(RuntimeError):
    """libvirtd or virsh failed; the message holds the command's error and the daemon's log."""


class PrivateLibvirtd:
    """libvirtd in its own mount namespace with its config, state and logs under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.socket_path = self.root / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket_path}"
        self.log_path = self.root / "libvirtd.log"
        self.process: subprocess.Popen | None = None
        self._created_mount_points: list[Path] = []
        self._log = None

    def start(self, timeout: float = 30.0) -> "PrivateLibvirtd":
        for name in PRIVATE_DIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        # A bind mount needs a mount point; one made here is removed again in stop().
        for target in PRIVATE_DIRS.values():
            if not os.path.isdir(target):
                os.makedirs(target)
                self._created_mount_points.append(Path(target))
        script = "".join(f"mount --bind {self.root / name} {target} && "
                         for name, target in PRIVATE_DIRS.items())
        script += f"exec libvirtd --pid-file {self.root / 'libvirtd.pid'}"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=vmkit._die_with_parent, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise LibvirtError(f"libvirtd exited with {self.process.returncode}:\n{self.log()}")
            if self.socket_path.exists() and self.virsh("version", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer on {self.socket_path} in {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        done = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def qemu_pid(self, domain: str) -> int | None:
        """The PID libvirt recorded for a running domain's QEMU, or None."""
        try:
            return int((self.root / "run" / "qemu" / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Destroys and undefines every domain, stops libvirtd and any QEMU left, removes mount points."""
        try:
            if self.process is not None and self.process.poll() is None:
                listed = self.virsh("list", "--all", "--name", check=False, timeout=30)
                for domain in listed.stdout.split():
                    self.virsh("destroy", domain, check=False, timeout=30)
                    self.virsh("undefine", domain, check=False, timeout=30)
        finally:
            # A QEMU the daemon could not destroy is stopped by the PID it recorded.
            for pid_file in (self.root / "run" / "qemu").glob("*.pid"):
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            if self.process is not None:
                if self.process.poll() is None:
                    self.process.terminate()
                    try:
                        self.process.wait(15)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait(5)
                self.process = None
            if self._log:
                self._log.close()
                self._log = None
            # The namespace, and the bind mounts with it, went with the daemon.
            for mount_point in reversed(self._created_mount_points):
                try:
                    mount_point.rmdir()
                except OSError:
                    pass
            self._created_mount_points = []

    def __enter__(self) -> "PrivateLibvirtd":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()


class _Console:
    """Stands in for vmkit.Guest's QEMU process: the serial console is a connected UNIX socket.

    poll() says the guest is gone once the console's stream has ended (QEMU exited).
    """

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.stdin = self
        self.stdout = self
        self.pid = None
        self.returncode: int | None = None

    def fileno(self) -> int:
        return self.connection.fileno()

    def write(self, data: bytes) -> None:
        self.connection.sendall(data)

    def flush(self) -> None:
        pass

    def poll(self) -> int | None:
        return self.returncode

    def close(self) -> None:
        pass


class LibvirtGuest(vmkit.Guest):
    """A vmkit guest that libvirt runs as the domain `name` with a `<interface type='vhostuser'>`.

    `qemu_server=False` is libvirt's `mode='client'` (the switch's port listens),
    `qemu_server=True` its `mode='server'` (QEMU listens, the switch connects).
    The kernel and initramfs are copied into `files_dir`, which libvirt-qemu must
    be able to read; the console socket is made there too.
    """

    def __init__(self, name: str, socket_path: Path, libvirtd: PrivateLibvirtd, files_dir: Path, **kwargs) -> None:
        super().__init__(name, socket_path, **kwargs)
        self.libvirtd = libvirtd
        self.files_dir = Path(files_dir)
        self.console_path = self.files_dir / f"{name}.console"
        self._console: _Console | None = None
        self._listener: socket.socket | None = None

    def domain_xml(self) -> str:
        kit = self.kit_dir or vmkit.cache_dir()
        kernel, initrd = self.files_dir / "vmlinuz", self.files_dir / "initramfs.gz"
        for source, copy in ((vmkit.kernel_path(kit), kernel), (vmkit.initramfs_path(kit), initrd)):
            shutil.copyfile(source, copy)
            os.chmod(copy, 0o644)
        cmdline = f"console=ttyS0 pci=nomsi panic=-1 loglevel=4 vs.name={self.name} vs.ip={self.ip} vs.mac={self.mac}"
        mode = "server" if self.qemu_server else "client"
        return f"""<domain type='qemu'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{self.memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <cpu mode='maximum'/>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(vmkit.qemu_binary() or "/usr/bin/qemu-system-x86_64")}</emulator>
    <interface type='vhostuser'>
      <mac address={quoteattr(self.mac)}/>
      <source type='unix' path={quoteattr(str(self.socket_path))} mode='{mode}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='unix'>
      <source mode='connect' path={quoteattr(str(self.console_path))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def start(self) -> "LibvirtGuest":
        if self.process is not None:
            raise vmkit.VmkitError(f"guest {self.name} already started")
        xml_path = self.files_dir / f"{self.name}.xml"
        xml_path.write_text(self.domain_xml())
        # The console listens before QEMU starts, so QEMU (as libvirt-qemu) connects at once.
        self.console_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.console_path))
        os.chown(self.console_path, 0, grp.getgrnam(QEMU_GROUP).gr_gid)
        os.chmod(self.console_path, 0o660)
        self._listener.listen(1)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} virsh define {xml_path}; start {self.name}\n".encode())
        with self._output_lock:
            self._output = ""
        self.libvirtd.virsh("define", str(xml_path))
        # In mode='server' QEMU waits for the switch to connect before it runs the guest; start returns after.
        self.libvirtd.virsh("start", self.name)
        self._listener.settimeout(30)
        connection, _ = self._listener.accept()
        connection.settimeout(None)
        self._console = _Console(connection)
        self.process = self._console
        self._reader = threading.Thread(target=self._read_console, name=f"console-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read_console(self) -> None:
        self._read_output()
        # End of stream: QEMU has gone (powered off or destroyed).
        if self._console:
            self._console.returncode = 0
        with self._output_lock:
            self._output_lock.notify_all()

    def qemu_pid(self) -> int | None:
        return self.libvirtd.qemu_pid(self.name)

    def stop(self, timeout: float = 10.0) -> None:
        """Destroys and undefines the domain (QEMU is libvirt's), closes the console."""
        try:
            self.libvirtd.virsh("destroy", self.name, check=False, timeout=30)
            self.libvirtd.virsh("undefine", self.name, check=False, timeout=30)
        finally:
            if self._console:
                try:
                    self._console.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._reader:
                self._reader.join(5)
            if self._console:
                self._console.connection.close()
                self._console = None
            if self._listener:
                self._listener.close()
                self._listener = None
            self.console_path.unlink(missing_ok=True)
            if self._log_file:
                self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} destroyed\n".encode())
                self._log_file.close()
                self._log_file = None
            self.process = None
            self._reader = None
            self._booted = False
