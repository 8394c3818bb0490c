"""Build and run the fuzzers (fuzz/) under AddressSanitizer and UBSan, and
print what they did.

    python -m tools.fuzz --seconds 20            # each harness 20 s (what CI runs)
    nice -n 10 python -m tools.fuzz --minutes 13 --until-figures  # the long run: the README's figures

Harnesses, run side by side:

  ring        fuzz/ring_fuzz.c      libFuzzer: the ring engine as the PMD drives it,
                                    with a racing guest thread (counts descriptor chains)
  offload     fuzz/offload_fuzz.c   libFuzzer: vs_offload_fit (counts virtio-net headers)
  vhost-user  fuzz/vhost_user_fuzz.py  atheris (else a seeded loop): the vhost-user
                                    message handlers (counts messages)

The C harnesses are compiled with clang -fsanitize=fuzzer,address,undefined
-fno-sanitize-recover=all from the project's own sources (Debian 12: clang
and libclang-rt-14-dev, installed by tools/setup-test-env.sh).  With
--sanitized-python the vhost-user harness also runs against a VSWITCH_SANITIZE=1
build of the fast path, loaded with libasan preloaded (seeded loop: atheris
brings its own sanitizer runtime).

Exit status 0 only if every harness ran to its time limit with no sanitizer
report, no crash and no broken invariant; with --require-figures, also only if
the counts reach the README's figures (10 M chains, 1 M messages, 1 M headers).
A failing input is kept in the work directory; its path is printed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parent.parent
FUZZ_DIR = REPO / "fuzz"
PKG = REPO / "vswitch"

FIGURES = {"ring": ("chains", 10_000_000), "offload": ("headers", 1_000_000),
           "vhost-user": ("messages", 1_000_000)}
C_HARNESSES = {"ring": "ring_fuzz", "offload": "offload_fuzz"}
ENGINE_SOURCES = ["vhost/virtqueue.c", "vhost/packed_ring.c", "vhost/iotlb.c", "vhost/dirty_log.c", "vhost/guestmem.c",
                  "pmd/offload.c"]
CFLAGS = ["-g", "-O1", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-std=gnu11",
          "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", f"-I{PKG}", f"-I{FUZZ_DIR}"]
# Reports that mean a bug, whatever the exit status says.
REPORT_PATTERNS = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                             r"INVARIANT FAILED|ERROR: libFuzzer|Uncaught Python exception|Traceback \(most recent")
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


class FuzzError(Exception):
    pass


@dataclass
class Run:
    name: str
    cmd: list[str]
    env: dict
    stats_file: pathlib.Path
    log_file: pathlib.Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    elapsed: float = 0.0
    returncode: int | None = None
    counts: dict = field(default_factory=dict)
    stopped_at_figure: bool = False
    reports: list[str] = field(default_factory=list)


def find_clang() -> str:
    for name in ("clang", "clang-14"):
        path = shutil.which(name)
        if path:
            return path
    raise FuzzError("clang is not installed; Debian 12: apt-get install clang libclang-rt-14-dev "
                    "(or run tools/setup-test-env.sh)")


def build_c(workdir: pathlib.Path, clang: str) -> dict[str, pathlib.Path]:
    """Compiles each C harness with the engine's sources: the engine with
    coverage for libFuzzer, the harness itself without (its input decoding
    is not what we want the fuzzer to explore)."""
    build = workdir / "build"
    build.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in ENGINE_SOURCES:
        obj = build / (src.replace("/", "_") + ".o")
        _cc([clang, *CFLAGS, "-fsanitize=fuzzer-no-link,address,undefined", "-c", str(PKG / src), "-o", str(obj)])
        objs.append(str(obj))
    out = {}
    for name, stem in C_HARNESSES.items():
        obj = build / f"{stem}.o"
        _cc([clang, *CFLAGS, "-fsanitize=address,undefined", "-c", str(FUZZ_DIR / f"{stem}.c"), "-o", str(obj)])
        exe = build / stem
        _cc([clang, "-fsanitize=fuzzer,address,undefined", str(obj), *objs, "-lpthread", "-o", str(exe)])
        out[name] = exe
    return out


def _cc(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FuzzError(f"compile failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")


def build_sanitized_package(workdir: pathlib.Path) -> pathlib.Path:
    """A copy of the package with the fast path built VSWITCH_SANITIZE=1; returns the directory to import from."""
    root = workdir / "sanitized"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(PKG, root / "vswitch", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, VSWITCH_SANITIZE="1")
    res = subprocess.run([sys.executable, str(root / "vswitch" / "_build.py")], capture_output=True, text=True,
                         env=env, cwd=root)
    if res.returncode != 0:
        raise FuzzError(f"sanitized build failed:\n{res.stdout}{res.stderr}")
    return root


def libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not path or not os.path.exists(path):
        raise FuzzError("gcc's libasan.so was not found (Debian: it comes with gcc)")
    return path


def plan(workdir: pathlib.Path, names: list[str], seconds: int, sanitized_python: bool) -> list[Run]:
    runs = []
    base_env = dict(os.environ, **SANITIZER_ENV)
    exes = build_c(workdir, find_clang()) if any(n in C_HARNESSES for n in names) else {}
    for name in names:
        corpus = workdir / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        artifacts = workdir / "artifacts" / name
        artifacts.mkdir(parents=True, exist_ok=True)
        # Seeds kept in the repository (fuzz/corpus/NAME), each bug found among them, are
        # run first; new inputs go to the work directory's corpus.
        seeds = [str(d) for d in [FUZZ_DIR / "corpus" / name] if d.is_dir()]
        stats = workdir / f"{name}.stats"
        stats.unlink(missing_ok=True)
        env = dict(base_env, FUZZ_STATS_FILE=str(stats))
        if name in C_HARNESSES:
            cmd = [str(exes[name]), f"-max_total_time={seconds}", "-max_len=8192", "-timeout=10",
                   "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus), *seeds]
        else:
            script = str(FUZZ_DIR / "vhost_user_fuzz.py")
            if sanitized_python:
                pkg = build_sanitized_package(workdir)
                env.update(VSWITCH_SANITIZE="1", VSWITCH_FUZZ_PKG=str(pkg), LD_PRELOAD=libasan(),
                           PYTHONMALLOC="malloc")
                cmd = [sys.executable, script, "--engine", "random", "--seconds", str(seconds), *seeds]
            else:
                cmd = [sys.executable, script, f"-max_total_time={seconds}", "-max_len=4096", "-len_control=10",
                       "-timeout=20", f"-artifact_prefix={artifacts}/", str(corpus), *seeds]
        runs.append(Run(name, cmd, env, stats, workdir / f"{name}.log"))
    return runs


def read_counts(path: pathlib.Path) -> dict:
    counts = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                counts[key] = int(value)
    except OSError:
        pass
    return counts


# libFuzzer's exit status when it stops on SIGTERM (-interrupted_exitcode).
INTERRUPTED = 72


def execute(runs: list[Run], deadline_slack: float, until_figures: bool = False) -> None:
    try:
        _execute(runs, deadline_slack, until_figures)
    finally:
        # Interrupted (Ctrl-C, SIGTERM): no harness outlives the tool.
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def _execute(runs: list[Run], deadline_slack: float, until_figures: bool) -> None:
    for run in runs:
        run.started = time.monotonic()
        with open(run.log_file, "wb") as log:
            run.proc = subprocess.Popen(run.cmd, env=run.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + deadline_slack
    while any(run.proc.poll() is None for run in runs) and time.monotonic() < deadline:
        time.sleep(1)
        for run in runs:
            if run.proc.poll() is not None and run.returncode is None:
                run.returncode = run.proc.returncode
                run.elapsed = time.monotonic() - run.started
            elif until_figures and run.proc.poll() is None and not run.stopped_at_figure:
                unit, target = FIGURES[run.name]
                if read_counts(run.stats_file).get(unit, 0) >= target:
                    # Enough for the figures: stop it, leaving the CPU to the others.
                    run.stopped_at_figure = True
                    run.proc.send_signal(signal.SIGTERM)
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
            run.reports.append("did not stop by its deadline (hang?)")
        if run.returncode is None:
            run.returncode = run.proc.returncode
            run.elapsed = time.monotonic() - run.started
        if run.stopped_at_figure and run.returncode in (INTERRUPTED, -signal.SIGTERM, 143):
            run.returncode = 0
        run.counts = read_counts(run.stats_file)
        text = run.log_file.read_text(errors="replace")
        for line in text.splitlines():
            if REPORT_PATTERNS.search(line):
                run.reports.append(line.strip())
        if run.returncode != 0 and not run.reports:
            run.reports.append(f"exited with status {run.returncode}")


def summary(runs: list[Run]) -> tuple[str, bool, bool]:
    lines = []
    ok = figures_ok = True
    for run in runs:
        unit, target = FIGURES[run.name]
        count = run.counts.get(unit, 0)
        rate = count / run.elapsed if run.elapsed else 0
        failed = bool(run.reports) or run.returncode != 0
        ok &= not failed
        figures_ok &= count >= target
        extra = ", ".join(f"{k} {v:,}" for k, v in run.counts.items() if k != unit)
        lines.append(f"{run.name:<11} {count:>13,} {unit:<9} in {run.elapsed:6.1f} s ({rate:,.0f}/s"
                     + (", stopped at its figure" if run.stopped_at_figure else "") + "); "
                     f"sanitizer reports / crashes / broken invariants: {len(run.reports)}"
                     + (f"  [{extra}]" if extra else ""))
        for rep in run.reports[:5]:
            lines.append(f"    {rep}")
        if failed:
            lines.append(f"    log: {run.log_file}")
    return "\n".join(lines), ok, figures_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--seconds", type=int, help="each harness runs this long (default 20)")
    when.add_argument("--minutes", type=float, help="each harness runs this long, side by side")
    parser.add_argument("--only", default="ring,offload,vhost-user", help="comma-separated harnesses")
    parser.add_argument("--workdir", type=pathlib.Path,
                        help="keep builds, corpora, logs and failing inputs here (default: a temporary "
                             "directory, removed unless something failed)")
    parser.add_argument("--sanitized-python", action="store_true",
                        help="run the vhost-user harness against a VSWITCH_SANITIZE=1 build")
    parser.add_argument("--require-figures", action="store_true",
                        help="fail unless the counts reach 10 M chains, 1 M messages, 1 M headers")
    parser.add_argument("--until-figures", action="store_true",
                        help="stop each harness once its count reaches its figure (at most the time given)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the harnesses are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = int(args.minutes * 60) if args.minutes else (args.seconds or 20)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in FIGURES:
            parser.error(f"unknown harness {n!r}; choose from {', '.join(FIGURES)}")
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="vswitch-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    try:
        runs = plan(workdir, names, seconds, args.sanitized_python)
        started = time.monotonic()
        print(f"fuzz: {', '.join(names)} for {seconds} s each, side by side (work directory {workdir})", flush=True)
        execute(runs, deadline_slack=seconds + 120, until_figures=args.until_figures)
        text, ok, figures_ok = summary(runs)
        print(text)
        print(f"fuzz: {'PASS' if ok else 'FAIL'} in {time.monotonic() - started:.0f} s"
              + ("" if figures_ok else "; below the README's figures (10 M chains, 1 M messages, 1 M headers)"))
        if not ok:
            keep = True
            print(f"fuzz: failing inputs and logs kept in {workdir}")
        return 0 if ok and (figures_ok or not args.require_figures) else 1
    except FuzzError as exc:
        print(f"fuzz: {exc}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
