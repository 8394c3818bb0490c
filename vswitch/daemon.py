"""vswitchd: load the config, build the switch, serve the control socket.

One asyncio loop runs the whole control plane (vhost-user sockets, control
socket, housekeeping); the PMD threads run the packet loop in C.
SIGTERM and SIGINT shut down cleanly: ports are removed (guests see the
link go down), sockets are unlinked, the PMD threads are joined.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import signal
import sys

from vswitch import __version__, service
from vswitch.config import ConfigError, load, save
from vswitch.fib import FibError
from vswitch.pmd.cpu_wake import CpuResumeLatency
from vswitch.reload import reload, summary
from vswitch.control.server import ControlServer
from vswitch.switch import Switch, SwitchError

log = logging.getLogger("vswitchd")

DEFAULT_CONFIG = "configs/default.yaml"
# The runtime directory of the default config; created like OVS creates its own.
RUN_DIR = "/run/vswitch"
# Beside the control socket: the PMD CPUs' resume latencies before this switch set them (vswitch/pmd/cpu_wake.py).
CPU_WAKE_STATE_SUFFIX = ".cpu-resume-latency.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vswitchd", description="vswitch daemon")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config file (default {DEFAULT_CONFIG})")
    p.add_argument("--control-socket", help="control socket path (overrides the config and $VSWITCH_SOCKET)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--persist", action="store_true",
                   help="write every change made over the control socket back to the config file")
    p.add_argument("--version", action="version", version=f"vswitchd {__version__}")
    return p.parse_args(argv)


def make_run_dir(path: str, port_defaults: dict) -> None:
    """Creates the runtime directory 0750 root, and lets the hypervisor's user
    reach the sockets in it: the switch-wide socket_group gets the directory's
    group, a socket_owner alone gets the right to traverse it (o+x)."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    group, owner = port_defaults.get("socket_group"), port_defaults.get("socket_owner")
    if group is not None:
        os.chown(path, -1, group if isinstance(group, int) else grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o750)
    elif owner is not None:
        os.chmod(path, 0o751)


async def reload_config(switch: Switch, path: str, started_with) -> dict:
    """SIGHUP and `vswitchctl reload`: applies the config file's differences (vswitch/reload.py).
    An invalid file changes nothing; its problems are logged and raised."""
    service.notify("RELOADING=1", "STATUS=reloading")
    try:
        result = await reload(switch, path, started_with)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, nothing changed: %s", problem)
        raise
    finally:
        service.notify("READY=1", f"STATUS=running: {len(switch.ports)} ports")
    (log.warning if result["errors"] else log.info)("%s", summary(result))
    return result


async def reload_on_signal(switch: Switch) -> None:
    try:
        await switch.reload()
    except ConfigError:
        pass   # logged, nothing changed


async def run(args) -> int:
    if os.geteuid() == 0:
        # Before the config is read: its sockets' directory must exist to validate.
        make_run_dir(RUN_DIR, {})
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vswitchd: {problem}", file=sys.stderr)
        return 2
    if os.geteuid() == 0:
        make_run_dir(RUN_DIR, cfg.port_defaults)
    control_path = args.control_socket or os.environ.get("VSWITCH_SOCKET") or cfg.control_socket

    if cfg.pmd_cpu_resume_latency_us is None:
        return await serve(args, cfg, control_path)
    cpu_wake = CpuResumeLatency(cfg.pmd_cpus, cfg.pmd_cpu_resume_latency_us, control_path + CPU_WAKE_STATE_SUFFIX)
    cpu_wake.hold()
    try:
        return await serve(args, cfg, control_path)
    finally:
        cpu_wake.release()


async def serve(args, cfg, control_path: str) -> int:
    """Runs the switch on `cfg` until SIGTERM or SIGINT; the exit status."""
    switch = Switch(cfg)
    switch.start()
    control = ControlServer(switch, control_path, cfg.control_group)
    metrics = None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        for spec in cfg.ports:
            await switch.add_port(spec)
        for entry in cfg.fdb_static:
            switch.fdb_add_static(entry["mac"], entry["port"], entry.get("vlan", 0))
        if cfg.mirrors:
            switch.set_mirrors(cfg.mirrors)
        await control.start()
        if cfg.metrics_listen:
            from vswitch.metrics import MetricsServer
            metrics = MetricsServer(switch, cfg.metrics_listen)
            await metrics.start()
    except (SwitchError, FibError, OSError) as exc:
        print(f"vswitchd: {exc}", file=sys.stderr)
        await control.stop()
        await switch.stop()
        return 1
    if args.persist or cfg.persist:
        switch.config.persist = cfg.persist
        switch.on_change = lambda: save(args.config, switch.config)
        log.info("persisting changes to %s", args.config)
    switch.reload = lambda: reload_config(switch, args.config, cfg)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_on_signal(switch)))
    watchdog = None
    interval = service.watchdog_interval()
    if interval:
        watchdog = loop.create_task(service.keep_watchdog_fed(interval))
    log.info("vswitchd %s running: %d ports, config %s", __version__, len(switch.ports), args.config)
    service.notify("READY=1", f"STATUS=running: {len(switch.ports)} ports", f"MAINPID={os.getpid()}")
    await stopping.wait()
    service.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    log.info("shutting down")
    switch.on_change = None  # shutting down removes ports; that is not a user's change
    if metrics is not None:
        await metrics.stop()
    await control.stop()
    await switch.stop()
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format=service.log_format())
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
