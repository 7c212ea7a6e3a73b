"""bench/compare.py's choice of overhead runs and bench/results_md.py's page from rows."""

from __future__ import annotations

from typing import Any

import pytest

from fovea.bench import compare
from fovea.bench.results_md import render
from fovea.worker import cpu_threads


@pytest.mark.parametrize(("cpus", "expected"), [(1, [0]), (2, [0, 1]), (3, [0]), (16, [0])])
def test_auto_overhead_runs_add_a_free_cpu_only_where_auto_takes_every_cpu(
    cpus: int, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: cpus)
    assert compare.overhead_threads("auto") == expected


def test_explicit_and_no_overhead_runs() -> None:
    assert compare.overhead_threads("none") == []
    assert compare.overhead_threads("0,1,3") == [0, 1, 3]
    with pytest.raises(ValueError):
        compare.overhead_threads("1,-2")


def test_bad_overhead_threads_is_a_one_line_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.parse_args(["--overhead-threads", "two"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(": error: --overhead-threads: 'auto', 'none' or counts >= 0, got 'two'")


def test_results_page_lists_overhead_runs_after_the_ratios() -> None:
    overhead = [
        {"cpu_threads": 2, "requested_threads": 0, "bare_step_ms": 16.454,
         "server_itl_ms": 19.84, "ratio": 1.215, "ratios": [1.192, 1.2]},
        {"cpu_threads": 1, "requested_threads": 1, "bare_step_ms": 22.45,
         "server_itl_ms": 24.04, "ratio": 1.075, "ratios": [1.065]},
    ]  # fmt: skip
    page = render([], {"default": {"W1_tok_s": 1.5}}, "cpu", "2026-12-04", overhead)
    tail = page.split("## Ratios (same run)\n\n")[1].splitlines()
    assert tail == [
        "| mode | ratio | value |",
        "|---|---|---:|",
        "| default | W1 output tok/s, Fovea / vLLM (target ≥ 1.2) | 1.500 |",
        "",
        "## Process overhead (Fovea, `bench/step_overhead.py`)",
        "",
        "A decode step of 16 streams inside the server (inter-token latency) against the bare",
        "model step of the same batch, in interleaved pairs; target ≤ 1.10.",
        "",
        "| compute threads | bare step ms | server inter-token ms | ratio | pairs |",
        "|---|---:|---:|---:|---|",
        "| 2 (auto) | 16.45 | 19.84 | 1.215 | 1.192, 1.200 |",
        "| 1 | 22.45 | 24.04 | 1.075 | 1.065 |",
    ]
    assert "Process overhead" not in render([], {}, "cpu", "2026-12-04")


def test_rewriting_the_page_keeps_the_hand_measured_sections(tmp_path: Any) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text("# old tables\n\n## Structured output\n\nhand numbers\n")
    compare.write_results(str(page), [], {}, "float32", [])
    text = page.read_text()
    assert "old tables" not in text
    assert text.endswith("\n## Structured output\n\nhand numbers\n")
    assert compare.kept_sections(str(tmp_path / "missing.md")) == ""
