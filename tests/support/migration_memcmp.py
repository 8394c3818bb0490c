"""Diagnostic: does a pre-copy migration under traffic carry every page of guest memory?

    python3 -m tests.support.migration_memcmp [--net vhost|tap] [--accel tcg] [--memory-kb N]
                                               [--plain-ram] [--runs N]

Each run boots test_migration.py's guest (same kernel, MAC, address, QEMU flags), streams TCP to it and
pings it from a namespace as that test does, migrates it to a second QEMU started with `-S` (so the
destination does not run after the switch-over), saves both QEMUs' guest memory with `pmemsave` and
compares them page by page; then the destination continues, and the run records whether its guest
still answers on the console and whether the TCP stream completed.  One JSON line per run: the
differing pages (count, first addresses, differing bytes per page), QEMU's downtime, the source port's
dirty log, alive, stream_ok.

--net vhost: the guest on a vhost-user port of a vswitchd (ports src and dst), as in the test.
--net tap: QEMU's own virtio-net on a TAP (vhost=off), both QEMUs and a bridge in the namespace; no
           switch at all, the same memory backend (memfd, share=on) unless --plain-ram.
--memory-kb: guest RAM (default: the test's GUEST_MEMORY_KB; 262144 is exactly 256 MiB).
--accel: QEMU's -accel value, e.g. tcg,thread=single.

Needs root (namespaces, TAPs), QEMU and the guest kit (tools/vmkit.py); files go to a temporary
directory that is removed afterwards; everything it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.daemon import Vswitchd
from tests.support.netns import in_ns, python_in_ns
from tests.system.test_migration import (GUEST_IP, GUEST_MAC, GUEST_MEMORY_KB, NS_IP, STREAM_BYTES, STREAM_RATE,
                                         MigratingGuest, Monitor)
from tools import vmkit

PAGE = 4096


class Guest(MigratingGuest):
    def __init__(self, *args, opts: argparse.Namespace, ns: str, tap: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.opts, self.ns, self.tap = opts, ns, tap

    def command_line(self) -> list[str]:
        line = super().command_line()
        line[line.index("-accel") + 1] = self.opts.accel
        line[line.index("-m") + 1] = f"{self.opts.memory_kb}K"
        backend = line.index("-object")
        if self.opts.plain_ram:
            del line[backend:backend + 4]          # -object memory-backend-memfd,... -numa node,memdev=mem
        else:
            line[backend + 1] = re.sub(r"size=\d+K,", f"size={self.opts.memory_kb}K,", line[backend + 1])
        if self.opts.net == "tap":
            chardev = line.index("-chardev")
            del line[chardev:chardev + 2]
            line[line.index("-netdev") + 1] = f"tap,id=n0,ifname={self.tap},script=no,downscript=no,vhost=off"
            line = ["ip", "netns", "exec", self.ns, *line]
        return line


def differing_pages(a: Path, b: Path) -> list[tuple[int, int]]:
    """(page address, differing bytes) for every 4 KiB page that differs."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        addr = 0
        while True:
            pa, pb = fa.read(PAGE), fb.read(PAGE)
            if not pa and not pb:
                return out
            if pa != pb:
                out.append((addr, sum(x != y for x, y in zip(pa, pb)) + abs(len(pa) - len(pb))))
            addr += PAGE


def wait_migrated(mon: Monitor, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        info = mon.command("info migrate")
        status = re.search(r"Migration status: (\S+)", info).group(1)
        if status in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def one_run(opts: argparse.Namespace, run: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vs-memcmp-"))
    ns = f"vsmc-{os.getpid()}-{run}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    res: dict = {"run": run, "net": opts.net, "accel": opts.accel, "memory_kb": opts.memory_kb,
                 "plain_ram": opts.plain_ram}
    try:
        with contextlib.ExitStack() as stack:
            switch = None
            if opts.net == "vhost":
                ports = [{"name": "src", "type": "vhost-user", "path": str(tmp / "src.sock")},
                         {"name": "dst", "type": "vhost-user", "path": str(tmp / "dst.sock")},
                         {"name": "host", "type": "tap", "ifname": "vsmc0", "netns": ns}]
                switch = stack.enter_context(Vswitchd(tmp, ports=ports))
                in_ns(ns, "ip", "addr", "add", f"{NS_IP}/24", "dev", "vsmc0")
            else:
                for cmd in (["ip", "link", "add", "br0", "type", "bridge"],
                            ["ip", "tuntap", "add", "mode", "tap", "tapS"], ["ip", "tuntap", "add", "mode", "tap", "tapD"],
                            ["ip", "link", "set", "tapS", "master", "br0"], ["ip", "link", "set", "tapD", "master", "br0"],
                            ["ip", "link", "set", "tapS", "up"], ["ip", "link", "set", "tapD", "up"],
                            ["ip", "link", "set", "br0", "up"], ["ip", "addr", "add", f"{NS_IP}/24", "dev", "br0"]):
                    in_ns(ns, *cmd)
            common = dict(ip=f"{GUEST_IP}/24", mac=GUEST_MAC, log_dir=tmp, kit_dir=vmkit.cache_dir(),
                          device_options="guest_announce=off", opts=opts, ns=ns)
            source = Guest("vm-src", tmp / "src.sock", **common, tap="tapS",
                           qemu_args=["-monitor", f"unix:{tmp / 'src.mon'},server=on,wait=off"])
            destination = Guest("vm-dst", tmp / "dst.sock", **common, tap="tapD", qemu_args=[
                "-monitor", f"unix:{tmp / 'dst.mon'},server=on,wait=off",
                "-incoming", f"unix:{tmp / 'migrate.sock'}", "-S"])
            stack.enter_context(source)
            source.wait_ready(180)
            stack.enter_context(destination)
            for _ in range(30):
                if in_ns(ns, "ping", "-c", "1", "-W", "1", GUEST_IP, check=False).returncode == 0:
                    break
            else:
                raise RuntimeError("the guest never answered a ping")
            source.run("stty clocal -hupcl; nc -l -p 5001 </dev/null >/tmp/in & sleep 0")
            time.sleep(0.5)
            pinger = python_in_ns(ns, "-m", "tests.support.migration_traffic", "ping", GUEST_IP, "10")
            sender = python_in_ns(ns, "-m", "tests.support.migration_traffic", "send", GUEST_IP, "5001",
                                  str(STREAM_BYTES), str(STREAM_RATE))
            try:
                time.sleep(1.5)
                src_mon = Monitor(tmp / "src.mon")
                src_mon.command("migrate_set_parameter max-bandwidth 4G")
                src_mon.command(f"migrate -d unix:{tmp / 'migrate.sock'}")
                info = wait_migrated(src_mon)
                res["status"] = re.search(r"Migration status: (\S+)", info).group(1)
                downtime = re.search(r"downtime: (\d+) ms", info)
                res["downtime_ms"] = int(downtime.group(1)) if downtime else None
                source.gone()
                destination.took_over()
                if switch:
                    res["src_dirty_log"] = switch.port("src")["vhost"]["dirty_log"]
                dst_mon = Monitor(tmp / "dst.mon")
                deadline = time.monotonic() + 30
                while "inmigrate" in dst_mon.command("info status") and time.monotonic() < deadline:
                    time.sleep(0.1)
                size = opts.memory_kb * 1024
                src_mon.command(f'pmemsave 0 {size} "{tmp / "src.mem"}"')
                dst_mon.command(f'pmemsave 0 {size} "{tmp / "dst.mem"}"')
                diff = differing_pages(tmp / "src.mem", tmp / "dst.mem")
                res["differing_pages"] = len(diff)
                res["first"] = [[hex(a), n] for a, n in diff[:20]]
                (tmp / "src.mem").unlink()
                (tmp / "dst.mem").unlink()
                dst_mon.command("cont")
                try:
                    destination.run("echo alive", timeout=30)
                    res["alive"] = True
                except (OSError, vmkit.VmkitError) as exc:
                    res["alive"] = False
                    res["why"] = str(exc).splitlines()[-1][-200:]
                try:
                    sender.communicate(timeout=40)
                    res["stream_ok"] = sender.returncode == 0
                except subprocess.TimeoutExpired:
                    res["stream_ok"] = False
            finally:
                for proc in (sender, pinger):
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=("vhost", "tap"), default="vhost")
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--memory-kb", type=int, default=GUEST_MEMORY_KB)
    parser.add_argument("--plain-ram", action="store_true", help="no memfd backend (--net tap only)")
    parser.add_argument("--runs", type=int, default=1)
    opts = parser.parse_args()
    if opts.plain_ram and opts.net != "tap":
        parser.error("--plain-ram needs --net tap (vhost-user needs shared guest memory)")
    for run in range(opts.runs):
        print(json.dumps(one_run(opts, run)), flush=True)


if __name__ == "__main__":
    main()
