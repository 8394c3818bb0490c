"""How fast a sleeping PMD's CPU may be woken: its per-CPU PM QoS.

A PMD that sleeps when idle (the default) wakes on a guest's kick or a
kernel port's fd.  When nothing else runs on its CPU, the kernel meanwhile
puts that CPU in an idle state; leaving a deep one (a C-state on bare metal,
a halt that exits to the hypervisor in a VM) can take longer than the
switch's whole round trip.  `pmd.cpu_resume_latency_us` asks the kernel to
use only idle states that the PMD CPUs leave within that many microseconds
(0: none but polling), through the CPU's own PM QoS attribute,
/sys/devices/system/cpu/cpuN/power/pm_qos_resume_latency_us, as DPDK's
`rte_power_qos_set_cpu_resume_latency` does.  The CPU stays free for other
work, unlike a PMD that never sleeps (`pmd.sleep: false`), but an idle one
spends power, and in a VM host time, polling.

The values found before are put back when the switch stops.  They are also
kept in a state file until then, so that a switch killed before it could put
them back (SIGKILL) restores the true originals at its next stop, not its
own leftovers.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

SYSFS_CPU = "/sys/devices/system/cpu"
# The kernel's spelling of "no idle state but polling" (a write of 0 would mean "no constraint").
STRICT = "n/a"


def attribute(cpu: int, root: str = SYSFS_CPU) -> str:
    return os.path.join(root, f"cpu{cpu}", "power", "pm_qos_resume_latency_us")


def read_bound(cpu: int, root: str = SYSFS_CPU) -> str:
    """The CPU's bound as the kernel shows it ("0": none; "n/a": polling only); OSError if it has none."""
    with open(attribute(cpu, root)) as f:
        return f.read().strip()


def current(cpu: int, root: str = SYSFS_CPU) -> str | None:
    """As read_bound, or None if the CPU has no bound to show (for pmd-stats)."""
    try:
        return read_bound(cpu, root)
    except OSError:
        return None


def kernel_value(us: int) -> str:
    """What to write for a bound of `us` microseconds."""
    return STRICT if us == 0 else str(us)


class CpuResumeLatency:
    """Holds the PMD CPUs' resume latency at `us` from hold() to release()."""

    def __init__(self, cpus: list[int], us: int, state_path: str, root: str = SYSFS_CPU):
        self.cpus = list(cpus)
        self.us = us
        self.state_path = state_path
        self.root = root
        self.originals: dict[int, str] = {}

    def hold(self) -> None:
        """Sets every PMD CPU's bound; a CPU whose attribute cannot be written
        is logged in one line and left as it was (the switch runs without it)."""
        left = self._left_by_an_earlier_run()
        for cpu, value in left.items():
            if cpu not in self.cpus:    # the config changed since that run: this switch will not hold it
                self._write(cpu, value)
        for cpu in self.cpus:
            path = attribute(cpu, self.root)
            try:
                original = left.get(cpu, read_bound(cpu, self.root))
                with open(path, "w") as f:
                    f.write(kernel_value(self.us))
            except OSError as exc:
                log.warning("pmd.cpu_resume_latency_us: cannot set CPU %d's %s: %s", cpu, path, exc.strerror)
                continue
            self.originals[cpu] = original
        self._save()
        if self.originals:
            log.info("PMD CPUs %s: idle states that take over %d us to leave are off while the switch runs",
                     ",".join(map(str, sorted(self.originals))), self.us)

    def release(self) -> None:
        """Puts back what hold() found, then forgets the state file."""
        for cpu, value in self.originals.items():
            self._write(cpu, value)
        self.originals = {}
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass

    def _write(self, cpu: int, value: str) -> None:
        """Puts a value found before back."""
        try:
            with open(attribute(cpu, self.root), "w") as f:
                f.write(value)
        except OSError as exc:
            log.warning("pmd.cpu_resume_latency_us: cannot restore CPU %d to %s: %s", cpu, value, exc.strerror)

    def _left_by_an_earlier_run(self) -> dict[int, str]:
        """The originals a switch killed before release() wrote down, if any."""
        try:
            with open(self.state_path) as f:
                data = json.load(f)
            return {int(cpu): str(value) for cpu, value in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("pmd.cpu_resume_latency_us: ignoring unreadable %s: %s", self.state_path, exc)
            return {}

    def _save(self) -> None:
        tmp = self.state_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({str(cpu): value for cpu, value in self.originals.items()}, f)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.warning("pmd.cpu_resume_latency_us: cannot keep the CPUs' values in %s (%s): "
                        "a switch killed now leaves them set", self.state_path, exc.strerror)
