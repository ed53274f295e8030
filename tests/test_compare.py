"""nanogpt-compare: real runs of two experiments, alternating, one at a time; the table and plot it
writes agree with what each run logged; and the mistakes it refuses before any run starts."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, require_shakespeare, run_cli
from nanogpt.sweeps.compare import BEGIN, END, Run, run_order, summarise

A, B = "shakespeare_char_cpu", "shakespeare_char_modern_cpu"
README = f"# Results\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n"


def small(cwd: Path) -> list[str]:
    """Overrides for every run: a few steps of both recipes on the real tiny Shakespeare."""
    return ["--", "max_iters=6", "eval_interval=3", "eval_iters=2", f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}"]


def started(run_dir: Path) -> datetime:
    return datetime.fromisoformat(json.loads((run_dir / "provenance.json").read_text())["start_time"])


def test_runs_alternate_so_that_each_experiment_goes_first_as_often_as_last():
    assert run_order(["a", "b"], 4) == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert run_order(["a", "b", "c"], 2) == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1)]


def test_each_run_is_measured_against_the_baseline_run_beside_it():
    def run(name, repeat, wall, curve):
        return Run(name, repeat, Path(name), wall, curve, tokens_per_step=100)

    runs = [
        run("base", 0, 100.0, [(0.0, 0, 4.0), (90.0, 2000, 1.9)]),
        run("new", 0, 80.0, [(0.0, 0, 4.0), (50.0, 300, 1.7), (85.0, 600, 1.6)]),
        # the machine slowed down for repeat 1: both runs took twice as long
        run("new", 1, 160.0, [(0.0, 0, 4.0), (100.0, 300, 1.7), (170.0, 600, 1.6)]),
        run("base", 1, 200.0, [(0.0, 0, 4.0), (180.0, 2000, 1.9)]),
    ]
    base, new = summarise(runs, ["base", "new"])
    assert base["wall_ratio"] == 1.0 and base["val_loss_at_baseline_time"] == 1.9
    assert new["wall_ratio"] == pytest.approx(0.8) and new["wall_ratio_range"] == pytest.approx((0.8, 0.8))
    assert new["val_loss_at_baseline_time"] == 1.6  # both repeats had their last eval in by the baseline's end
    assert (new["steps"], new["tokens"], new["repeats"]) == (600, 60_000, 2)
    assert new["wall_s"] == 120.0 and new["wall_s_range"] == (80.0, 160.0)
    assert runs[1].val_loss_by(60.0) == 1.7 and runs[1].val_loss_by(-1.0) is None


@pytest.mark.slow
def test_two_experiments_alternate_and_the_table_and_readme_agree_with_the_runs(tmp_path):
    require_shakespeare()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    result = run_cli("nanogpt.sweeps.compare", A, B, "--repeats", "2", "--out", "cmp", "--readme", str(readme),
                     *small(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "cmp"
    runs = {(name, r): out / name / str(r) for name in (A, B) for r in (0, 1)}
    assert all((run_dir / "DONE").is_file() for run_dir in runs.values())
    # one at a time, in the order A B, B A
    starts = [started(runs[key]) for key in [(A, 0), (B, 0), (B, 1), (A, 1)]]
    assert starts == sorted(starts)
    # the table's val loss is what each run logged last; the runs of one recipe are identical
    for name in (A, B):
        finals = {json.loads(line)["val_loss"] for r in (0, 1)
                  for line in (runs[(name, r)] / "metrics.jsonl").read_text().splitlines()[-1:]}
        (final,) = finals
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| `{name}`"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{final:.4f}" and cells[3] == "6"
        assert cells[4] == f"{6 * 12 * (64 if name == A else 128):,}"  # steps x batch x context
    assert "| 1.000 (1.000–1.000) |" in result.stdout  # the baseline against itself
    # the README: the section between the markers is the table, the rest is kept as it was
    text = readme.read_text()
    assert text.startswith("# Results\n\nbefore\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "old table" not in text and f"| `{B}` |" in text
    assert f"nanogpt-compare {A} {B} --repeats 2 --readme {readme}" in text
    image = tmp_path / "images" / f"compare_{A}_vs_{B}.png"
    assert image.stat().st_size > 10_000 and f"](images/{image.name})" in text
    assert (out / "compare.png").is_file() and (out / "compare.md").is_file()


@pytest.mark.parametrize("args, message", [
    ([A, "shakespeare_char_modrn_cpu"], "experiment shakespeare_char_modrn_cpu: "),
    ([A], "give at least two experiments"),
    ([A, A], "named twice"),
    ([A, B, "--repeats", "0"], "--repeats 0: give 1 or more"),
    ([A, B, "--", "optim.lrr=1"], "experiment shakespeare_char_cpu: Could not override 'optim.lrr'"),
    ([A, B, "--", "experiment=gpt2_124m"], "sets experiment= and hydra.run.dir= itself"),
    ([A, B, "--", "hardware=gpu"], "experiment shakespeare_char_cpu: "),
    ([A, B, "--readme", "missing.md"], "missing.md does not exist"),
    ([A, B, "--readme", "plain.md"], "needs two marker lines"),
    ([A, B, "--out", "full"], "--out full is not empty"),
])
def test_mistakes_are_named_in_one_line_before_any_run(tmp_path, args, message):
    (tmp_path / "plain.md").write_text("# no markers\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run_cli("nanogpt.sweeps.compare", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "multirun").exists()  # nothing ran, no run dir was made
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "plain.md").read_text() == "# no markers\n"


def test_the_experiments_are_compared_at_equal_cost_as_the_report_compares_groups(tmp_path):
    """The report's comparison, with the experiments as groups and their repeats as runs: the
    base recipe's val loss at the tokens, FLOPs and training seconds the new one reached, read off
    between its evals; time to the experiments' target_val_loss; and the Pareto front."""
    from nanogpt.sweeps.compare import at_equal_cost
    from nanogpt.sweeps.curves import RunCurve, points_from

    def run(name, repeat, losses, seconds_per_step, flops_per_token, target_val_loss=2.5):
        evals = [{"step": 100 * i, "val_loss": loss, "tokens": 100 * i * 1000, "flops": 100 * i * 1000 * flops_per_token,
                  "train_seconds": 100 * i * seconds_per_step} for i, loss in enumerate(losses)]
        return Run(name, repeat, tmp_path / name / str(repeat), 0.0, [], 1000,
                   costs=RunCurve(f"{name} repeat {repeat}", points_from(evals, 1000), target_val_loss=target_val_loss))

    runs = [run("base", 0, [4.0, 3.0, 2.6, 2.4], 0.1, 10), run("base", 1, [4.0, 3.2, 2.8, 2.6], 0.1, 10),
            run("new", 0, [4.0, 2.6, 2.3], 0.3, 20), run("new", 1, [4.0, 2.8, 2.5], 0.3, 20)]
    text = at_equal_cost(runs, ["base", "new"], tmp_path / "compare_budgets.png")
    lines = text.splitlines()
    # new got least far in tokens (200 steps: 200,000) and training time (200 x 0.3 s), base in FLOPs
    # (300 steps x 100,000 tokens... 3e6 at 10 FLOPs a token, where new, at 20, had done 150 steps)
    assert lines[0] == ("| group | runs | val loss at 200,000 tokens | val loss at 3e+06 FLOPs | val loss at 30.0 s of "
                        "training | FLOPs (final) | s of training (final) | Pareto front |")
    base = [c.strip() for c in lines[2].strip("|").split("|")]
    new = [c.strip() for c in lines[3].strip("|").split("|")]
    # two repeats 0.2 apart: half the interval is t(0.975, 1) x 0.2 / 2 = 1.2706
    assert base[:5] == ["base", "2", "2.7000 ± 1.2706", "2.5000 ± 1.2706", "2.5000 ± 1.2706"]
    assert new[:5] == ["new", "2", "2.4000 ± 1.2706", "2.5500 ± 1.2706", "2.7000 ± 1.2706"]
    assert base[-1] == "FLOPs, s of training" and new[-1] == "FLOPs, s of training"  # cheaper vs better
    # time to target 2.5: base's repeat 0 at step 300, repeat 1 never; new's repeats at 200 and 200
    assert "| base | 1 of 2 | 300 ± n/a |" in text and "| new | 2 of 2 | 200 ± 0 |" in text
    assert (tmp_path / "compare_budgets.png").read_bytes().startswith(b"\x89PNG")
    assert text.rstrip().endswith("](compare_budgets.png)")
