"""Run a test body in a forked child process with a deadline.

A C loop that lost its bound (a descriptor chain walked forever, say) would
hang the whole test run; in a child it costs `timeout` seconds and fails the
test with a message that says so.  A crash in C (SIGSEGV, SIGBUS) fails the
one test too, instead of killing pytest.

The child is a fork: it sees the fixtures the parent built (cffi objects,
guest memory) as they were, and shared mappings stay shared.  Whatever the
child changes in private memory is lost, so the body must do its checks
itself; an assertion failing in it is reported with its traceback.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import traceback

import pytest

DEFAULT_TIMEOUT = 20.0


def in_child(timeout: float = DEFAULT_TIMEOUT):
    """Decorator: the test runs in a forked child and fails if it takes longer than `timeout` s."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            run_in_child(functools.partial(fn, *args, **kwargs), timeout, fn.__name__)

        return run

    return decorate


def run_in_child(body, timeout: float = DEFAULT_TIMEOUT, name: str = "test body") -> None:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        status = 0
        try:
            body()
        except BaseException:
            os.write(writer, traceback.format_exc().encode(errors="replace"))
            status = 1
        finally:
            # Skip pytest's and atexit's cleanup: they belong to the parent.
            os._exit(status)
    os.close(writer)
    try:
        ready, _, _ = select.select([reader], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{name} did not finish within {timeout:.0f} s (run in child process {pid}, now "
                        "killed): the code under test loops; has a bound such as the descriptor chain "
                        "budget gone?", pytrace=False)
        report = b""
        while chunk := os.read(reader, 65536):
            report += chunk
    finally:
        os.close(reader)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"{name} crashed the child process {pid} with {sig}", pytrace=False)
    if report or os.WEXITSTATUS(status):
        pytest.fail(f"{name} failed in child process {pid}:\n{report.decode(errors='replace')}", pytrace=False)
