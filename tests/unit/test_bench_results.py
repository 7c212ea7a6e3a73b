"""bench/compare.py's choice of overhead runs and bench/results_md.py's page from rows."""

from __future__ import annotations

from typing import Any

import pytest

from fovea.bench import compare
from fovea.bench.image_workloads import serial_work_s
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


def _row(system: str, workload: str, req_s: float, ttft: float, mb: float) -> dict[str, Any]:
    ms = {"p50": ttft, "p90": ttft * 2, "p99": ttft * 3, "mean": ttft}
    return {
        "system": system, "mode": "default", "workload": workload, "num_prompts": 8,
        "completed": 8, "duration_s": 8 / req_s, "request_throughput": round(req_s, 3), "output_tokens_per_s": req_s * 64, "ttft_ms": ms,
        "itl_ms": ms, "e2e_ms": ms, "memory": {"peak_total_mb": mb, "processes": []},
        "startup_s": 1.0, "errors": 0, "encoder_runs": 3 if system == "fovea" else None,
        "image_fetches": 9,
    }  # fmt: skip


def test_rewriting_the_page_replaces_only_what_the_run_measured(tmp_path: Any) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text(
        "# old tables\n\n## Image workloads\n\nold images\n\n## Structured output\n\nhand\n"
    )
    text_rows = [_row("fovea", "W1", 2.0, 100, 1000), _row("vllm", "W1", 1.0, 200, 2000)]
    compare.write_results(str(page), text_rows, ["default"], "float32", [], "")
    text = page.read_text()
    assert "old tables" not in text and "| fovea | default | W1 | 128.0 | 100 | 200 |" in text
    assert text.endswith("\n## Image workloads\n\nold images\n\n## Structured output\n\nhand\n")

    image_rows = [
        _row("fovea", "W4", 0.02456, 300, 900), _row("vllm", "W4", 0.02445, 600, 1800),
        _row("fovea", "W5", 1.2, 30, 900), _row("vllm", "W5", 0.7, 400, 1800),
    ]  # fmt: skip
    compare.write_results(str(page), image_rows, ["default"], "float32", [], "/m/qwen")
    head, images, kept = compare.split_page(page.read_text())
    assert "| fovea | default | W1 | 128.0 |" in head and kept == "\n## Structured output\n\nhand\n"
    assert "old images" not in images and "- model: /m/qwen" in images
    assert (
        "| fovea | default | W4 | 8 | 0.0246 | 1.6 | 300 | 600 | 300 | 900 | 3 | 9 | 0 |" in images
    )
    assert (
        "| vllm | default | W5 | 8 | 0.7000 | 44.8 | 400 | 800 | 400 | 1800 | - | 9 | 0 |" in images
    )
    # From completed / duration_s: the rounded request_throughput would give 0.025 / 0.024.
    assert "| default | W4 requests/s, Fovea / vLLM (target ≥ 1.2) | 1.004 |" in images
    assert "| default | W4 TTFT p50, Fovea / vLLM (target ≤ 1) | 0.500 |" in images
    assert "| default | W5 TTFT p50 / W4 TTFT p50, Fovea (target ≤ 0.15) | 0.100 |" in images
    assert compare.split_page("") == ("", "", "")


def test_w2_beside_w4_rows_go_to_the_image_section_with_their_ratio(tmp_path: Any) -> None:
    page = tmp_path / "RESULTS.md"
    rows = [
        _row("fovea", "W2vlm", 1.0, 80, 900), _row("fovea", "W2+W4", 1.0, 100, 950),
        _row("vllm", "W2vlm", 1.0, 90, 1800), _row("vllm", "W2+W4", 1.0, 270, 1900),
    ]  # fmt: skip
    assert compare.image_ratios(rows, ["default"]) == {
        "default": {"W2_beside_W4_ttft_fovea": 1.25, "W2_beside_W4_ttft_vllm": 3.0}
    }
    compare.write_results(str(page), rows, ["default"], "float32", [], "/m/qwen")
    head, images, _ = compare.split_page(page.read_text())
    assert head == "" and "| fovea | default | W2+W4 | 8 |" in images
    assert (
        "| default | W2 TTFT p50 beside W4 / alone, Fovea (target: no growth) | 1.250 |" in images
    )


def test_w2_beside_w4_needs_the_vlm_and_serves_images(tmp_path: Any) -> None:
    assert compare.images_per_request("W2+W4") == 1
    with pytest.raises(SystemExit) as e:
        compare.main(["--systems", "fovea", "--workloads", "W2+W4", "--model", str(tmp_path)])
    assert "W2+W4 need --vlm-model" in str(e.value)


def test_hf_rows_are_picked_as_hf_for_the_floor_ratios() -> None:
    rows = [_row("fovea", "W4", 0.05, 300, 900), _row("vllm", "W4", 0.04, 600, 1800)]
    rows.append(_row("hf-transformers-generate (cpu, float32)", "W4", 0.02, 900, 3000))
    assert compare.image_ratios(rows, ["default"])["default"].get("W4_req_s_over_hf") is None
    rows[-1] |= {"peer": "hf", "mode": "-"}
    assert compare.image_ratios(rows, ["default"])["default"]["W4_req_s_over_hf"] == 2.5


def test_w4_over_its_serial_work_adds_w4ones_ttfts_and_the_last_decodes() -> None:
    """8 requests of W4one at a mean TTFT of 20 s are 160 s; 63 steps at W4's inter-token p50
    of 200 ms are 12.6 s; W4 took 8 / 0.04 = 200 s: 200 / 172.6."""
    w4 = _row("fovea", "W4", 0.04, 200, 900) | {"output_len": 64}
    w4["itl_ms"] = {"p50": 200.0}
    one = _row("fovea", "W4one", 0.01, 20_000, 900)
    assert serial_work_s(w4, one) == pytest.approx(172.6)
    ratios = compare.image_ratios([w4, one], ["default"])["default"]
    assert ratios == {"W4_over_serial_work_fovea": 1.159}
    assert compare.WORKLOADS["W4one"][-2:] == ["--concurrency", "1"]  # argparse: the last wins
    assert compare.images_per_request("W4one") == 1
