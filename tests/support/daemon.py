"""Run vswitchd as a subprocess for a test, and talk to it with vswitchctl."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]


class Vswitchd:
    """A vswitchd on a config written from `ports`; a context manager.

    >>> with Vswitchd(tmp_path, ports=[{"name": "vm1", "type": "vhost-user", "path": ...}]) as d:
    ...     d.ctl("show")

    A daemon a test leaves running (an assertion failed before its stop)
    is stopped after the test by tests/conftest.py, from `started`.
    """

    started: set["Vswitchd"] = set()

    def __init__(self, tmp_path, ports: list[dict], fdb: dict | None = None, extra: dict | None = None,
                 log_level: str = "debug"):
        self.dir = pathlib.Path(tmp_path)
        self.control_socket = str(self.dir / "vswitchd.sock")
        self.config_path = self.dir / "vswitchd.yaml"
        self.log_path = self.dir / "vswitchd.log"
        self.config = {"control_socket": self.control_socket, "ports": ports}
        if fdb:
            self.config["fdb"] = fdb
        if extra:
            self.config.update(extra)
        self.log_level = log_level
        self.extra_args: list[str] = []
        # False: start() runs on the file as the test wrote it (comments and all).
        self.write_config = True
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Vswitchd":
        if self.write_config:
            self.config_path.write_text(yaml.safe_dump(self.config))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vswitch.daemon", "--config", str(self.config_path),
             "--log-level", self.log_level, *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        Vswitchd.started.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vswitchd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.control_socket):
                try:
                    self.ctl("version")
                    return self
                except subprocess.CalledProcessError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"vswitchd did not become ready in {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        Vswitchd.started.discard(self)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL by PID, as a crash would end it: no cleanup runs.  start() may follow."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        Vswitchd.started.discard(self)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctl_raw(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vswitch.control.cli", "--socket", self.control_socket,
                               *args], capture_output=True, text=True, timeout=30, check=check, cwd=REPO)

    def ctl(self, *args: str):
        """Runs `vswitchctl --json ARGS` and returns the parsed result."""
        out = self.ctl_raw("--json", *args, check=True)
        return json.loads(out.stdout)

    def port(self, name: str) -> dict:
        return self.ctl("show", name)["ports"][0]

    def connect_guests(self, names: list[str], queues: int = 1, rx_buffers: int = 32, timeout: float = 5.0):
        """In-process front-ends on these vhost-user ports (server mode), handshaken, with receive
        buffers posted on every queue; returns them once the switch reports every link up."""
        from tests.support.frontend import VhostUserFrontend

        paths = {p["name"]: p["path"] for p in self.config["ports"] if "path" in p}
        guests = []
        for name in names:
            fe = VhostUserFrontend(paths[name], queues=queues).connect()
            fe.handshake()
            for q in range(queues):
                fe.post_rx(q, rx_buffers)
            guests.append(fe)
        deadline = time.monotonic() + timeout
        while any(self.port(name)["link"] != "up" for name in names):
            if time.monotonic() > deadline:
                raise AssertionError(f"links of {names} not up within {timeout} s:\n{self.log()[-2000:]}")
            time.sleep(0.02)
        return guests

    def __enter__(self):
        # `with d.start():` and `with d:` both mean one daemon.
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
