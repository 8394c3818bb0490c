"""Drive DPDK's dpdk-testpmd as a VM-less guest (virtio-user) or as a reference backend (vhost).

`TestPmd` starts testpmd in interactive mode (`-i`) with commands written to its
stdin and replies read from its stdout. Facts this relies on (see
/work/shared/PEERS.md):

* Over a pipe, testpmd's stdout is fully buffered while its prompt is not, so it
  runs under `stdbuf -oL` to keep replies and prompts in order.
* `--no-pci --in-memory` needs no hugetlbfs mount and no file prefix, leaves
  nothing behind after a SIGKILL, and lets several testpmd processes coexist.
* Two testpmd processes share a two-core machine with `-l 0,1` and opposite
  `--main-lcore` values: each one's forwarding lcore is the other core.
* virtio-user needs `--single-file-segments` (vhost-user allows 8 memory regions).
* virtio-user with `server=1` blocks in accept() during start-up until its peer
  connects; SIGTERM only aborts the current accept, so teardown falls back to
  SIGKILL. `spawn()` and `wait_ready()` are separate so a test can start the
  switch in between.

Every instance is stopped by its PID when it is closed (or garbage collected),
and everything testpmd prints goes to a log file for the test report.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable

PROMPT = "testpmd> "
# Lines testpmd prints before its first prompt when a port could not be used.
STARTUP_FAILURES = ("Start ports failed", "Fail to configure port", "Fail to start port")
TESTPMD = "dpdk-testpmd"


class TestPmdError(RuntimeError):
    """testpmd failed to start, exited, or did not answer in time."""

    # Keep pytest from collecting this class as a test.
    __test__ = False


def _devargs(prefix: str, options: dict) -> str:
    """Render a vdev string; booleans become 0/1 and None means 'leave the default'."""
    parts = [prefix]
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        value = str(value)
        # A comma would silently split the value into a second devarg.
        if "," in value:
            raise ValueError(f"vdev argument {key}={value!r} must not contain a comma")
        parts.append(f"{key}={value}")
    return ",".join(parts)


def virtio_user_vdev(index: int, path: str | os.PathLike, *, mac: str | None = None,
                     queues: int | None = None, queue_size: int | None = None,
                     mrg_rxbuf: bool | None = None, in_order: bool | None = None,
                     packed_vq: bool | None = None, server: bool | None = None,
                     **extra) -> str:
    """A `net_virtio_user<index>` vdev string: a virtio-net guest driver on a vhost-user socket."""
    return _devargs(f"net_virtio_user{index}", dict(
        path=os.fspath(path), mac=mac, queues=queues, queue_size=queue_size,
        mrg_rxbuf=mrg_rxbuf, in_order=in_order, packed_vq=packed_vq, server=server, **extra))


def vhost_vdev(index: int, iface: str | os.PathLike, *, queues: int = 1,
               client: bool | None = None, **extra) -> str:
    """A `net_vhost<index>` vdev string: DPDK's own vhost-user backend on a socket."""
    return _devargs(f"net_vhost{index}", dict(iface=os.fspath(iface), queues=queues,
                                             client=client, **extra))


def af_xdp_vdev(index: int, iface: str, *, queues: int = 1, **extra) -> str:
    """A `net_af_xdp<index>` vdev string: DPDK's AF_XDP driver on a kernel interface's first queues."""
    return _devargs(f"net_af_xdp{index}", dict(iface=iface, start_queue=0, queue_count=queues, **extra))


def _parse_blocks(text: str, header: str, rule: str) -> dict[int, dict[str, int]]:
    """Parse testpmd's per-port statistic blocks into {port: {counter: value}}.

    A block starts with "<header> <port>" followed by a line of `rule`
    characters, and ends at the next such line. Counter names are lowered and
    their dashes become underscores: "RX-missed: 0" -> {"rx_missed": 0}.
    """
    stats: dict[int, dict[str, int]] = {}
    pattern = re.compile(rf"{header}\s+(\d+)\s*{re.escape(rule)}+\s*\n(.*?)\n\s*{re.escape(rule)}{{10,}}", re.S)
    for match in pattern.finditer(text):
        counters = {}
        for name, value in re.findall(r"([A-Za-z][A-Za-z-]*):\s+(\d+)", match.group(2)):
            counters[name.lower().replace("-", "_")] = int(value)
        stats[int(match.group(1))] = counters
    return stats


def parse_fwd_stats(text: str) -> dict[int, dict[str, int]]:
    """Parse `stop` / `show fwd stats all`: {port: {rx_packets, rx_dropped, tx_packets, tx_dropped, ...}}."""
    return _parse_blocks(text, "Forward statistics for port", "-")


def parse_port_stats(text: str) -> dict[int, dict[str, int]]:
    """Parse `show port stats all`: {port: {rx_packets, rx_missed, rx_errors, tx_packets, tx_errors, ...}}."""
    return _parse_blocks(text, "NIC statistics for port", "#")


def hugepages_free() -> int:
    """Free hugepages of the default size, from /proc/meminfo (0 if the line is missing)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


class TestPmd:
    """One interactive dpdk-testpmd process.

    Use as a context manager (spawn + wait for the prompt on entry, quit or
    kill on exit), or call spawn()/wait_ready()/close() yourself.
    """

    __test__ = False

    def __init__(self, vdevs: Iterable[str], args: Iterable[str] = (), *,
                 log_path: str | os.PathLike, main_lcore: int = 1, lcores: str = "0,1",
                 total_num_mbufs: int | None = 16384, eal_args: Iterable[str] = (),
                 start_timeout: float = 30.0, netns: str | None = None):
        self.vdevs = list(vdevs)
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        eal = ["-l", lcores, "--main-lcore", str(main_lcore), "--no-pci", "--in-memory",
               # vhost-user allows 8 memory regions; one segment per memseg list keeps under it.
               "--single-file-segments", *eal_args]
        for vdev in self.vdevs:
            eal += ["--vdev", vdev]
        app = ["-i", *args]
        if total_num_mbufs is not None:
            # The default pool (~150k mbufs, ~340 MB) would use up hugepages that
            # two or three concurrent testpmd processes need; a loop test needs few.
            app.append(f"--total-num-mbufs={total_num_mbufs}")
        self.argv = ["stdbuf", "-oL", TESTPMD, *eal, "--", *app]
        if netns:
            # For net_af_xdp / net_af_packet ports on an interface in that
            # namespace; `ip netns exec` execs, so the PID stays testpmd's.
            self.argv = ["ip", "netns", "exec", netns, *self.argv]
        self.proc: subprocess.Popen | None = None
        self._out = ""          # Everything testpmd printed so far.
        self._mark = 0          # Start of the output no reply has consumed yet.
        self._eof = False
        self._ready = False
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log = None

    # -- life cycle ---------------------------------------------------------

    def spawn(self) -> "TestPmd":
        """Start the process without waiting for its prompt."""
        if shutil.which(TESTPMD) is None or shutil.which("stdbuf") is None:
            raise TestPmdError(f"{TESTPMD} or stdbuf not found: install dpdk-dev and coreutils "
                               "(run tools/setup-test-env.sh as root)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1, errors="replace")
        self._log.write("$ " + " ".join(self.argv) + "\n")
        # A session of its own keeps terminal signals (Ctrl-C on pytest) from racing our teardown.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"testpmd-{self.proc.pid}",
                                        daemon=True)
        self._reader.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> "TestPmd":
        """Wait for the first prompt; on failure the process is killed and the log tail raised."""
        try:
            startup = self._wait_prompt(self.start_timeout if timeout is None else timeout, "start-up")
            self._ready = True
            # testpmd reaches its prompt even when a port failed to configure or start.
            for failure in STARTUP_FAILURES:
                if failure in startup:
                    raise TestPmdError(f"testpmd start-up: {failure!r}\n{self.tail()}")
            # A vdev that fails to probe (e.g. no socket at its path) is only
            # a log line and testpmd carries on without it: count the ports.
            summary = self.cmd("show port summary all")
            found = re.search(r"Number of available ports:\s*(\d+)", summary)
            if found is None or int(found.group(1)) != len(self.vdevs):
                raise TestPmdError(f"testpmd started with {found and found.group(1)} of "
                                   f"{len(self.vdevs)} ports\n{self.tail()}")
        except TestPmdError:
            self._ready = False
            self.kill()
            raise
        return self

    def __enter__(self) -> "TestPmd":
        self.spawn()
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A forgotten instance must not leave a busy-polling process behind.
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def quit(self, timeout: float = 15.0) -> int:
        """Ask testpmd to quit and wait for it; returns its exit status."""
        assert self.proc is not None
        if self.alive():
            self._write("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise TestPmdError(f"testpmd did not exit within {timeout}s of 'quit'\n{self.tail()}")
        return self.proc.returncode

    def close(self) -> None:
        """Stop the process by whatever it takes: quit if it answers, then SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        if self.alive() and self._ready:
            try:
                self.quit(timeout=10)
            except (TestPmdError, OSError):
                pass
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL by PID (e.g. blocked in accept() with server=1) and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self._log and not self._log.closed:
            self._log.write(f"\n[testpmd pid {self.proc.pid} exited with {self.proc.returncode}]\n")
            self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    # -- commands -----------------------------------------------------------

    def cmd(self, text: str, timeout: float = 10.0) -> str:
        """Run one command; returns what testpmd printed before its next prompt (without the echo)."""
        self._write(text)
        reply = self._wait_prompt(timeout, repr(text))
        # testpmd echoes the command line it read; drop it.
        first, _, rest = reply.partition("\n")
        return rest if first.strip() == text.strip() else reply

    def start(self, tx_first: int | None = None) -> str:
        """Start forwarding; with tx_first, first send that many bursts on every port to seed a loop."""
        reply = self.cmd("start" if tx_first is None else f"start tx_first {tx_first}")
        if "forwarding not started" in reply or "Not all ports were started" in reply:
            raise TestPmdError(f"testpmd did not start forwarding: {reply.strip()}\n{self.tail()}")
        return reply

    def stop(self, timeout: float = 15.0) -> dict[int, dict[str, int]]:
        """Stop forwarding; returns the forwarding statistics per port."""
        return parse_fwd_stats(self.cmd("stop", timeout))

    def fwd_stats(self) -> dict[int, dict[str, int]]:
        return parse_fwd_stats(self.cmd("show fwd stats all"))

    def port_stats(self) -> dict[int, dict[str, int]]:
        """NIC counters per port: rx_packets, rx_missed, rx_errors, rx_nombuf, tx_packets, tx_errors, ..."""
        return parse_port_stats(self.cmd("show port stats all"))

    def clear_port_stats(self) -> None:
        self.cmd("clear port stats all")

    def output(self) -> str:
        """Everything testpmd printed so far."""
        with self._cond:
            return self._out

    def tail(self, lines: int = 40) -> str:
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(self.output().splitlines()[-lines:])

    # -- plumbing -----------------------------------------------------------

    def _write(self, text: str) -> None:
        if not self.alive():
            raise TestPmdError(f"testpmd is not running (exit status "
                               f"{None if self.proc is None else self.proc.returncode})\n{self.tail()}")
        self._log.write(f"\n[test -> testpmd] {text}\n")
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def _wait_prompt(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                at = self._out.find(PROMPT, self._mark)
                if at >= 0:
                    reply = self._out[self._mark:at]
                    self._mark = at + len(PROMPT)
                    return reply
                if self._eof:
                    status = self.proc.wait(5)
                    raise TestPmdError(f"testpmd exited (status {status}) waiting for {what}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestPmdError(f"testpmd gave no prompt within {timeout}s for {what}\n{self.tail()}")
                self._cond.wait(left)

    def _read_loop(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = chunk.decode(errors="replace")
            if text and not self._log.closed:
                self._log.write(text)
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._out += text
                self._cond.notify_all()
