"""The generator's testpmd options in tools/bench.py: its mbuf cache, set for
every system alike, and --generator-args, passed on unchanged after the
benchmark's own options so that they can override them."""

from __future__ import annotations

import pytest

from tools import bench


def app_args(generator) -> list[str]:
    return generator.argv[generator.argv.index("--") + 1:]


def test_the_generator_runs_with_dpdks_largest_mbuf_cache(tmp_path):
    # testpmd's default (250) spills into the pool's shared ring when the middle box keeps up.
    generator = bench.Generator([tmp_path / "a.sock", tmp_path / "b.sock"], False, tmp_path, 0, 1)
    assert "--mbcache=512" in app_args(generator)
    assert bench.parse_args([]).generator_args == []


def test_generator_args_come_after_the_benchmarks_own(tmp_path):
    args = bench.parse_args(["--generator-args", "--mbcache=250 --txfreet=224"])
    assert args.generator_args == ["--mbcache=250", "--txfreet=224"]
    generator = bench.Generator([tmp_path / "a.sock", tmp_path / "b.sock"], False, tmp_path, 0, 1,
                                extra_args=args.generator_args)
    app = app_args(generator)
    # testpmd takes the last --mbcache it is given: the user's.
    assert app.index("--mbcache=512") < app.index("--mbcache=250") < app.index("--txfreet=224")
    # The JSON records GEN_TUNING_ARGS followed by the user's: a run of the argv as it is.
    recorded = [*bench.GEN_TUNING_ARGS, *args.generator_args]
    start = app.index(recorded[0])
    assert app[start:start + len(recorded)] == recorded


def test_unbalanced_quotes_in_generator_args_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--generator-args", "--eth-peer='0"])
    assert "--generator-args" in capsys.readouterr().err
