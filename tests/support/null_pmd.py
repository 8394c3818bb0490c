"""Two null ports and a PMD over them, driven from the test's thread (vs_pmd_poll_once).

Shared by the unit tests that measure or count what the PMD does between two
null ports (test_pmd_profile.py, test_multicore.py); the caller sets each
port's generator.
"""

from __future__ import annotations

from tests.unit.test_port_ops import NullPort, Pmd


def two_null_ports(closing, polled: int = 2) -> tuple[NullPort, NullPort, Pmd]:
    """Null ports 0 and 1, both live, and a PMD (no thread) over a new MAC table that
    polls the first `polled` of them; closing() closes them all after the test."""
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    pmd = Pmd([a.port, b.port], [(p.port, 0) for p in (a, b)[:polled]])
    closing(pmd)
    return a, b, pmd
