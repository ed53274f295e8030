"""nanogpt-gpu-check: one line and exit 0 without a GPU; with `--device cpu`, the same checks through
the CPU, whose report (JSON and Markdown) is checked here: the format a GPU owner sends us."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, assert_one_line_error, require_shakespeare, run_cli
from nanogpt import gpu_check

CHECK_NAMES = ["bench_compile", "bench_eager", "fp16_scaler", "shakespeare", "resume", "kv_cache", "ddp", "fsdp"]
ENV_KEYS = {"date_utc", "host", "python", "nanogpt", "torch", "cuda", "device", "bf16", "sdpa"}


def reports(out: Path) -> list[Path]:
    return sorted(out.iterdir()) if out.is_dir() else []


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `| header |`, as stripped cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    assert lines[start + 1].startswith("| --- |"), markdown
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    result = run_cli("nanogpt.gpu_check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout, result.stdout
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no report dir for nothing checked


def test_an_unknown_check_name_is_a_one_line_error_before_anything_runs(tmp_path):
    result = run_cli("nanogpt.gpu_check", "--device", "cpu", "--skip", "bench_eager,kv_cahce", cwd=tmp_path)
    assert_one_line_error(result, "--skip kv_cahce", "kv_cache")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_out_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = run_cli("nanogpt.gpu_check", "--device", "cpu", "--out", "taken/reports", cwd=tmp_path)
    assert_one_line_error(result, "--out taken/reports", "give a folder you can write to")


def test_a_report_never_overwrites_an_earlier_one(tmp_path):
    first, second = gpu_check.report_dir(tmp_path), gpu_check.report_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One CPU run of every check but compile (inductor's start-up is a minute here), with the
    Shakespeare run asked for an impossible loss drop: that check must FAIL, the others still run."""
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("gpu_check")
    result = run_cli("nanogpt.gpu_check", "--device", "cpu", "--skip", "bench_compile", "--min-loss-drop", "100",
                     "--data-source", str(SHAKESPEARE), "--out", "reports", cwd=cwd)
    [out] = reports(cwd / "reports")
    return result, out


@pytest.mark.slow
def test_cpu_run_reports_each_check_and_a_forced_failure_with_its_error(cpu_report):
    result, out = cpu_report
    assert result.returncode == 1, result.stdout + result.stderr  # a check failed
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "nanogpt-gpu-check/1" and report["passed"] is False
    assert ENV_KEYS <= set(report["environment"]) and report["environment"]["device"] == "cpu"
    assert set(report["environment"]["sdpa"]) == {"flash", "memory_efficient", "math", "cudnn"}
    assert report["environment"]["sdpa"]["math"] == "yes"
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    for c in report["checks"]:
        assert {"name", "title", "status", "seconds"} <= set(c)
        assert set(c) & {"details", "error", "reason"} == {{"PASS": "details", "FAIL": "error", "SKIP": "reason"}[c["status"]]}
    assert report["counts"] == {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}

    assert checks["bench_compile"]["status"] == "SKIP" and checks["bench_compile"]["reason"] == "left out by --skip"
    bench = checks["bench_eager"]["details"]
    assert bench["ms_per_iter"] > 0 and bench["tokens_per_s"] > 0 and 0 < bench["mfu"] <= 1
    # fp16 runs where hardware.resolve lets it run on a CPU, and says why not where it does not
    assert checks["fp16_scaler"]["status"] in ("PASS", "SKIP"), checks["fp16_scaler"]
    failed = checks["shakespeare"]
    assert failed["status"] == "FAIL" and "--min-loss-drop=100" in failed["error"], failed
    # the checks after the failure ran, and passed
    resume = checks["resume"]["details"]
    assert checks["resume"]["status"] == "PASS" and resume["rel_l2_diff"] == 0 and resume["max_abs_diff"] == 0
    assert "(step " in resume["resumed"]
    assert checks["kv_cache"]["status"] == "PASS"
    assert checks["ddp"]["details"]["backend"] == "gloo" and checks["ddp"]["details"]["wrapper"] == "DistributedDataParallel"
    assert checks["fsdp"]["status"] == "PASS" and checks["fsdp"]["details"]["last_loss"] < checks["fsdp"]["details"]["first_loss"]

    # what the terminal shows: one line a check, then where the report is
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:-1]] == [[c["status"], c["name"]] for c in report["checks"]]
    assert "1 check(s) FAILED" in lines[-1] and str(out.name) in lines[-1]


@pytest.mark.slow
def test_cpu_run_writes_the_markdown_tables(cpu_report):
    _, out = cpu_report
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    counts = report["counts"]
    assert markdown.startswith("# nanogpt-gpu-check: cpu\n")
    assert f"FAILED: {counts['PASS']} passed, 1 failed, {counts['SKIP']} skipped" in markdown
    env = dict(table_rows(markdown, "key"))
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    rows = table_rows(markdown, "check")
    assert [(row[0].split(":")[0], row[1]) for row in rows] == [(c["name"], c["status"]) for c in report["checks"]]
    by_name = {row[0].split(":")[0]: row for row in rows}
    assert "--min-loss-drop=100" in by_name["shakespeare"][2]
    assert "ms/iter" in by_name["bench_eager"][2] and "MFU" in by_name["bench_eager"][2]


@pytest.mark.slow
def test_exit_0_when_no_check_fails_and_each_run_gets_its_own_report(tmp_path):
    """Passed and skipped checks only: exit 0. Data that cannot be had skips the Shakespeare run, saying why."""
    skip = ",".join(name for name in CHECK_NAMES if name not in ("kv_cache", "shakespeare"))
    missing = tmp_path / "nowhere" / "input.txt"
    results = [run_cli("nanogpt.gpu_check", "--device", "cpu", "--skip", skip, "--data-source", str(missing),
                       cwd=tmp_path) for _ in range(2)]
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no check failed (1 passed, 7 skipped)" in result.stdout
    runs = reports(tmp_path / "gpu_check")  # the default --out
    assert len(runs) == 2 and all((run / "report.json").is_file() and (run / "report.md").is_file() for run in runs)
    shakespeare = json.loads((runs[0] / "report.json").read_text())["checks"][3]
    assert shakespeare["status"] == "SKIP" and "tiny Shakespeare is not reachable" in shakespeare["reason"]
    assert str(missing) in shakespeare["reason"] and "--data-source" in shakespeare["reason"]
