"""Fixture bodies shared by the vhost-user unit tests that start several back-ends.

Each test module keeps its own fixture (its harness class, socket names and
front-end defaults differ) and delegates to these with `yield from`, so that the
bookkeeping (one socket per server, everything stopped or closed at the end)
is written once.
"""

from __future__ import annotations

from tests.support.frontend import VhostUserFrontend


def harness_factory(harness_cls, loop_thread, tmp_path, default_name: str | None = None):
    """Yields make(name=None, start=True, **kw): a harness_cls(loop_thread, tmp_path / name, **kw),
    started unless start=False; without a name, default_name or else a new vhostN.sock per call.
    All are stopped after the test."""
    made = []

    def make(name: str | None = None, start: bool = True, **kw):
        h = harness_cls(loop_thread, tmp_path / (name or default_name or f"vhost{len(made)}.sock"), **kw)
        if start:
            h.start()
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()


def frontend_factory(uva_offset, **defaults):
    """Yields make(path, **kw): a connected front-end (defaults overridden by kw); all are closed after the test."""
    made = []

    def make(path, **kw):
        fe = VhostUserFrontend(path, uva_offset=uva_offset, **{**defaults, **kw})
        made.append(fe)
        return fe.connect()
    yield make
    for fe in made:
        fe.close()
