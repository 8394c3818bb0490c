"""Hotplug under load: a third port comes and goes 50 times while DPDK testpmd
loops traffic through two others, and those two lose nothing."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.system.test_testpmd import Setup, check_guest, check_switch, connect_guest, print_logs
from vswitch.control.cli import call

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

CYCLES = 50


def test_add_and_remove_a_port_50_times_under_traffic(tmp_path):
    setup = Setup(tmp_path, {})
    guest = setup.guest()
    switch = None
    try:
        with Vswitchd(tmp_path, ports=setup.ports, log_level="info") as switch:
            connect_guest(setup, switch, guest)
            guest.start(tx_first=2)
            time.sleep(0.5)
            done, errors = [], []

            def churn():
                try:
                    for i in range(CYCLES):
                        call(switch.control_socket, "port/add",
                             {"name": "vm3", "type": "vhost-user", "path": str(tmp_path / "vm3.sock")})
                        time.sleep(0.02)
                        call(switch.control_socket, "port/del", {"name": "vm3"})
                        done.append(i)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)

            t = threading.Thread(target=churn)
            t.start()
            t.join(120)
            assert not errors and len(done) == CYCLES
            fwd = guest.stop()
            nic = guest.port_stats()
            check_guest(fwd, nic)
            check_switch(setup, switch, nic)
            log = switch.log()
            assert log.count("port 'vm3' added") == CYCLES and log.count("port 'vm3' removed") == CYCLES
            assert guest.quit() == 0
    finally:
        print_logs(setup, switch)
        setup.close()


def test_reload_20_times_under_traffic(tmp_path):
    """The config file gains and loses a third port 20 times, each change applied with a reload,
    while testpmd loops frames through the two ports the file never changes: they lose nothing."""
    import yaml

    setup = Setup(tmp_path, {})
    guest = setup.guest()
    switch = None
    try:
        with Vswitchd(tmp_path, ports=setup.ports, log_level="info") as switch:
            connect_guest(setup, switch, guest)
            guest.start(tx_first=2)
            time.sleep(0.5)
            base = yaml.safe_load(switch.config_path.read_text())
            third = {"name": "vm3", "type": "vhost-user", "path": str(tmp_path / "vm3.sock")}
            for i in range(20):
                ports = setup.ports + ([third] if i % 2 == 0 else [])
                switch.config_path.write_text(yaml.safe_dump({**base, "ports": ports}))
                result = call(switch.control_socket, "config/reload", {})
                assert result["errors"] == [] and result["unchanged"] == 2, result
            fwd = guest.stop()
            nic = guest.port_stats()
            check_guest(fwd, nic)
            check_switch(setup, switch, nic)
            log = switch.log()
            assert log.count("port 'vm3' added") == 10 and log.count("port 'vm3' removed") == 10
            assert guest.quit() == 0
    finally:
        print_logs(setup, switch)
        setup.close()
