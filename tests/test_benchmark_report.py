"""benchmarks/report.py: the README's benchmark table is what benchmarks/results/*.csv give, and the
renderer takes every figure of a row from the latest run that measured it."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "report.py"
FIELDS = [
    "op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "n_runs",
    "hardware", "torch", "triton", "cuda", "bif_fast_version", "git_sha", "timestamp",
]  # fmt: skip
CPU = "x86_64 x2 cpu, 1 threads"


def _load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


report = _load_report()
Key, Row = report.Key, report.Row


def _write_csv(
    path: Path, runs: list[tuple[str, str, str, list[tuple[str, str, str, str, float, str]]]], dtype: str = "float32"
) -> None:
    """runs: (timestamp, git_sha, hardware, [(provider, mode, shape, metric, p50, unit), ...]), in file order."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for ts, sha, hardware, rows in runs:
            for provider, mode, shape, metric, p50, unit in rows:
                w.writerow({
                    "op": path.stem, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype,
                    "metric": metric, "unit": unit, "p50": p50, "p20": p50, "p80": p50, "n_runs": 3,
                    "hardware": hardware, "torch": "2.13.0+cpu", "triton": "", "cuda": "",
                    "bif_fast_version": "0.1.0", "git_sha": sha, "timestamp": ts,
                })  # fmt: skip


TOY = Row(
    op="toy", dtype="float32",
    what="toy step, {threads}",
    bif_fast="{t:time}, {m:mem}",
    baseline="torch: {bt:time}",
    ratio="{bt/t:x} faster; {t/ft:pct} over the floor",
    measures={
        "t": Key("bif_fast", "fwd", "n=1"), "m": Key("bif_fast", "fwd", "n=1", "peak_mem_above_base"),
        "bt": Key("torch", "fwd", "n=1"), "ft": Key("floor", "fwd", "n=1"),
    },
)  # fmt: skip


def _cells(results: Path, row: Row = TOY) -> list[str]:
    return report.render_row(row, report.load_runs(results))


# --- the README itself ----------------------------------------------------------------------------------


def test_readme_table_matches_the_results_csvs():
    diff = report.check(ROOT / "README.md", ROOT / "benchmarks" / "results")
    assert not diff, "README's benchmark table is stale; run `python benchmarks/report.py --write`:\n" + "\n".join(diff)


def test_every_row_is_backed_by_the_committed_csvs():
    table = report.render(ROOT / "benchmarks" / "results")
    assert report.MISSING not in table, table
    assert table.count("\n| ") == len(report.ROWS) + 1  # the separator line and one line per row


def test_check_command_runs_without_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['report.py', '--check']\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'report.py imported torch'\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches" in out.stdout


# --- the renderer on synthetic CSVs ---------------------------------------------------------------------


def test_latest_run_by_timestamp_not_file_order(tmp_path):
    _write_csv(tmp_path / "toy.csv", [
        ("2026-01-02T00:00:00+00:00", "bbbbbbb", CPU, [
            ("bif_fast", "fwd", "n=1", "time", 1.0, "s"), ("bif_fast", "fwd", "n=1", "peak_mem_above_base", 55.4, "MB"),
            ("torch", "fwd", "n=1", "time", 5.0, "s"), ("floor", "fwd", "n=1", "time", 0.8, "s"),
        ]),
        ("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [  # older, although written later in the file
            ("bif_fast", "fwd", "n=1", "time", 2.0, "s"), ("bif_fast", "fwd", "n=1", "peak_mem_above_base", 9.0, "MB"),
            ("torch", "fwd", "n=1", "time", 8.0, "s"), ("floor", "fwd", "n=1", "time", 1.0, "s"),
        ]),
    ])  # fmt: skip
    assert _cells(tmp_path) == [
        "toy step, 1 thread",
        "1.00 s, +55 MB",
        "torch: 5.00 s",
        "5.0× faster; +25.0% over the floor",
        "`bbbbbbb`",
    ]


def test_ratio_never_mixes_runs(tmp_path):
    _write_csv(tmp_path / "toy.csv", [
        ("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [
            ("bif_fast", "fwd", "n=1", "time", 2.0, "s"), ("torch", "fwd", "n=1", "time", 8.0, "s"),
            ("floor", "fwd", "n=1", "time", 1.0, "s"),
        ]),
        ("2026-01-02T00:00:00+00:00", "bbbbbbb", CPU, [("bif_fast", "fwd", "n=1", "time", 500.0, "ms")]),
    ])  # fmt: skip
    # The latest run measured bif_fast alone: its time is shown, and nothing is divided by the older
    # run's torch (8 s / 0.5 s) or floor; the missing figures read n/a instead of raising.
    assert _cells(tmp_path) == [
        "toy step, 1 thread",
        "500 ms, n/a",
        "torch: n/a",
        "n/a faster; n/a over the floor",
        "`bbbbbbb`",
    ]


def test_times_in_different_units_divide_correctly(tmp_path):
    _write_csv(tmp_path / "toy.csv", [
        ("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [
            ("bif_fast", "fwd", "n=1", "time", 2.466, "ms"), ("torch", "fwd", "n=1", "time", 0.010647, "s"),
            ("floor", "fwd", "n=1", "time", 2.3, "ms"),
        ]),
    ])  # fmt: skip
    cells = _cells(tmp_path)
    assert cells[1:4] == ["2.47 ms, n/a", "torch: 10.6 ms", "4.3× faster; +7.2% over the floor"]


def test_no_run_at_all_renders_a_row_of_markers(tmp_path):
    _write_csv(
        tmp_path / "other.csv", [("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [("x", "y", "z", "time", 1, "s")])]
    )
    assert _cells(tmp_path) == ["toy step, n/a", "n/a, n/a", "torch: n/a", "n/a faster; n/a over the floor", "n/a"]


def test_hardware_filter_keeps_gpu_runs_out_of_a_cpu_row(tmp_path):
    _write_csv(tmp_path / "toy.csv", [
        ("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [
            ("bif_fast", "fwd", "n=1", "time", 2.0, "s"), ("torch", "fwd", "n=1", "time", 4.0, "s"),
        ]),
        ("2026-01-02T00:00:00+00:00", "bbbbbbb", "NVIDIA H200", [
            ("bif_fast", "fwd", "n=1", "time", 0.001, "s"), ("torch", "fwd", "n=1", "time", 0.01, "s"),
        ]),
    ])  # fmt: skip
    assert _cells(tmp_path)[2:] == ["torch: 4.00 s", "2.0× faster; n/a over the floor", "`aaaaaaa`"]
    gpu = dataclasses.replace(TOY, hardware="H200")
    assert _cells(tmp_path, gpu) == [
        "toy step, NVIDIA H200",
        "1.00 ms, n/a",
        "torch: 10.0 ms",
        "10.0× faster; n/a over the floor",
        "`bbbbbbb`",
    ]


def test_tuple_measures_give_a_range_of_pairwise_ratios(tmp_path):
    shapes = ("a", "b", "c")
    _write_csv(tmp_path / "toy.csv", [
        ("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU,
         [("batched", "fwd", s, "time", t, "s") for s, t in zip(shapes, (1.0, 2.0, 1.0), strict=True)]
         + [("serial", "fwd", s, "time", t, "s") for s, t in zip(shapes, (1.23, 3.0, 1.3), strict=True)]),
    ])  # fmt: skip
    row = Row(
        op="toy", dtype="float32", what="w", bif_fast="–", baseline="serial", ratio="{o/b:x}",
        measures={
            "b": tuple(Key("batched", "fwd", s) for s in shapes),
            "o": tuple(Key("serial", "fwd", s) for s in shapes),
        },
    )  # fmt: skip
    # 1.23, 1.5, 1.3: min and max of the pairs, not of the numerators over the denominators (3.0 / 1.0).
    assert _cells(tmp_path, row)[3] == "1.2–1.5×"
    _write_csv(
        tmp_path / "toy.csv", [("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [("batched", "fwd", "a", "time", 1, "s")])]
    )
    assert _cells(tmp_path, row)[3] == "n/a"  # one pair missing: no partial range


def test_formats():
    assert report._format((48.17560193700001,), "time") == "48.2 s"
    assert report._format((1234.5,), "time") == "1,234 s"
    assert report._format((7366.79,), "mem") == "+7,367 MB"
    assert report._format((1.19,), "mem") == "+1.2 MB"
    assert report._format((117.07,), "x") == "117×"
    assert report._format((0.9729,), "pct") == "-2.7%"
    assert report._format((1.06e-7,), "sci") == "1.1e-07"
    with pytest.raises(ValueError, match="unknown format"):
        report._format((1.0,), "bogus")


def test_write_then_check_round_trip(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    _write_csv(results / "running_cov.csv", [("2026-01-01T00:00:00+00:00", "aaaaaaa", CPU, [
        ("bif_fast", "stream", report.COV, "time", 2.0, "s"),
        ("devinterp-style", "stream", report.COV, "time", 40.0, "s"),
    ])], dtype="float64")  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\n## Benchmarks\n\nprose\n\n{report.BEGIN}\n| old | table |\n{report.END}\n\n## Next\n"
    )
    args = ["--readme", str(readme), "--results", str(results)]

    assert report.main([*args, "--check"]) == 1
    assert "-| old | table |" in capsys.readouterr().out

    assert report.main([*args, "--write"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\n## Benchmarks\n\nprose\n\n" + report.BEGIN + "\n| what |")
    assert text.endswith(report.NOTE + "\n" + report.END + "\n\n## Next\n")
    assert "| 2.00 s, n/a | devinterp-style store + `torch.cov`: 40.0 s, n/a | 20.0× faster, n/a less memory |" in text
    assert report.extract(text) == report.render(results)
    assert report.main([*args, "--check"]) == 0

    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="BEGIN BENCHMARK TABLE"):
        report.main([*args, "--check"])
