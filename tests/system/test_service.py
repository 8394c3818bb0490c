"""vswitchd as a systemd service (deploy/vswitchd.service, installed by `tools/install.sh service`).

The test boots systemd in a container (systemd-nspawn --volatile=yes: this
machine's /usr under a throw-away root, so nothing of the host's /etc or
/var changes), with the unit, its config and this checkout bound in.  A
probe unit inside drives it as an operator would and writes what it saw to
a bound directory: `systemctl start` returns only after READY=1 (Type=notify),
the service is active and answers on its control socket, `systemctl reload`
applies a changed config (a port added, SIGHUP), the journal has one
timestamp per line (journald's, not ours too), and `systemctl stop` ends it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 90

PROBE = """#!/bin/sh
# Runs inside the container as a oneshot unit, then powers it off.
out=/vsresult
exec >"$out/probe.log" 2>&1
ctl() {{ {python} -m vswitch.control.cli --socket /run/vswitch/svc.sock "$@"; }}
systemctl start vswitchd.service; echo "start=$?" >"$out/start"
systemctl is-active vswitchd.service >"$out/active"
systemctl show -p Type -p NotifyAccess -p WatchdogUSec vswitchd.service >"$out/show"
ctl list-ports >"$out/ports-before"
sed -i 's/^ports: \\[\\]$/ports: [{{name: n1, type: "null"}}]/' {config}
cat {config}
systemctl reload vswitchd.service; echo "reload=$?" >"$out/reload"
sleep 1
ctl list-ports >"$out/ports-after"
systemctl stop vswitchd.service; echo "stop=$?" >"$out/stop"
systemctl is-active vswitchd.service >"$out/after-stop"
journalctl -u vswitchd.service --no-pager -o cat >"$out/journal"
touch "$out/done"
systemctl poweroff --no-block
"""

PROBE_UNIT = """[Unit]
Description=vswitch service test probe
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh /vsresult/probe.sh
"""


def test_service_starts_reloads_and_stops_under_systemd(tmp_path, require_tool):
    require_tool("systemd-nspawn", "systemd-container")
    units, config_dir, result = tmp_path / "units", tmp_path / "etc", tmp_path / "result"
    result.mkdir()
    env = dict(os.environ, UNIT_DIR=str(units), CONFIG_DIR=str(config_dir), PYTHON=sys.executable)
    subprocess.run(["bash", str(REPO / "tools/install.sh"), "service"], env=env, check=True, capture_output=True)
    config = config_dir / "vswitchd.yaml"
    config.write_text(yaml.safe_dump({"control_socket": "/run/vswitch/svc.sock", "ports": []},
                                     default_flow_style=None))
    (result / "probe.sh").write_text(PROBE.format(python=sys.executable, config=config))
    (units / "vsprobe.service").write_text(PROBE_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "vsprobe.service").symlink_to("/etc/systemd/system/vsprobe.service")
    python_root = Path(sys.base_prefix)
    argv = ["systemd-nspawn", "--quiet", "--volatile=yes", "--directory=/", "--register=no", "--keep-unit",
            f"--bind-ro={REPO}", f"--bind-ro={python_root}", f"--bind={config_dir}", f"--bind={result}:/vsresult",
            f"--bind-ro={units / 'vswitchd.service'}:/etc/systemd/system/vswitchd.service",
            f"--bind-ro={units / 'vsprobe.service'}:/etc/systemd/system/vsprobe.service",
            f"--bind-ro={wants}:/etc/systemd/system/multi-user.target.wants",
            "--boot", "--", "systemd.unit=multi-user.target", "systemd.firstboot=off"]
    try:
        boot = subprocess.run(argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
        console = boot.stdout + boot.stderr
    except subprocess.TimeoutExpired as exc:
        pass   # subprocess.run killed systemd-nspawn, and the container with it
        console = f"timed out: {exc.stdout}\n{exc.stderr}"
    seen = {p.name: p.read_text() for p in result.iterdir() if p.is_file()}
    report = "\n".join(f"--- {k} ---\n{v}" for k, v in sorted(seen.items())) + f"\n--- console ---\n{console[-4000:]}"
    assert "done" in seen, report
    assert seen["start"].strip() == "start=0", report
    assert seen["active"].strip() == "active", report
    assert "Type=notify" in seen["show"] and "WatchdogUSec=10s" in seen["show"], report
    assert "n1" not in seen["ports-before"] and "n1" in seen["ports-after"], report
    assert seen["reload"].strip() == "reload=0", report
    assert seen["stop"].strip() == "stop=0" and seen["after-stop"].strip() == "inactive", report
    journal = seen["journal"]
    assert "INFO vswitchd: vswitchd" in journal and "reloaded: added n1" in journal, report
    # journald stamps each line; vswitchd must not add a second time of its own.
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", journal, re.M), report
    shutil.rmtree(result, ignore_errors=True)
