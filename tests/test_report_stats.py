"""nanogpt-report's statistics and comparisons at equal cost, on run dirs written here in the shape
a run leaves them (overrides, resolved config, provenance, metrics.jsonl with tokens, FLOPs and
training seconds), so that every figure can be checked against one computed by hand or by scipy.
The real sweeps are in test_report_seeds.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from scipy import stats

from conftest import assert_one_line_error, run_cli
from nanogpt.sweeps.curves import RunCurve, equal_budgets, pareto_front, points_from, target_point, value_at
from nanogpt.sweeps.report import main

TOKENS_PER_STEP = 12 * 64  # batch_size 12 x block_size 64
FLOPS_PER_TOKEN = 1_000_000


def write_run(run_dir: Path, overrides: list[str], losses: list[float], status: str = "done", eval_interval: int = 10,
              seconds_per_step: float = 0.1, flops_per_token: int = FLOPS_PER_TOKEN, budget_fields: bool = True,
              target_val_loss: float | None = None, provenance_target: dict | None = None) -> None:
    """A run dir as nanogpt-train leaves it: losses[i] is the val loss of the eval at step i x eval_interval."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "config.resolved.yaml").write_text(
        f"batch_size: 12\nglobal_batch_size: null\nblock_size: 64\ntarget_val_loss: {json.dumps(target_val_loss)}\n")
    if status == "not started":
        return
    record = {"status": status, "world_size": 1, "batch_size": 12, "grad_accum": 1}
    if status != "running":
        record["wall_seconds"] = 2.0 + seconds_per_step * eval_interval * (len(losses) - 1)
    if status == "done":
        record["ended_by"] = "max_iters"
    if provenance_target is not None:
        record["target"] = provenance_target
    (run_dir / "provenance.json").write_text(json.dumps(record))
    lines = []
    for i, loss in enumerate(losses):
        step = i * eval_interval
        spent = {"tokens": step * TOKENS_PER_STEP, "flops": step * TOKENS_PER_STEP * flops_per_token,
                 "train_seconds": round(step * seconds_per_step, 3)} if budget_fields else {}
        if step:
            lines.append({"step": step, "kind": "train", "loss": loss, "tokens_per_s": TOKENS_PER_STEP / seconds_per_step,
                          **spent, "time": step})
        lines.append({"step": step, "kind": "eval", "train_loss": loss, "val_loss": loss, **spent, "time": step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if status == "done":
        (run_dir / "DONE").write_text("2026-12-01T08:00:00+00:00\n")


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def number(cell: str) -> float | None:
    return float(cell) if cell else None


# three settings x four seeds; the final val losses differ by setting and seed
FINALS = {"1e-3": [2.50, 2.53, 2.47, 2.52], "3e-3": [2.40, 2.44, 2.38, 2.43], "1e-2": [2.49, 2.56, 2.45, 2.52]}


@pytest.fixture
def seeded(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    job = 0
    for lr, finals in FINALS.items():
        for seed, final in enumerate(finals, 1):
            write_run(sweep / str(job), [f"optim.lr={float(lr)}", f"seed={seed}", "max_iters=30"],
                      [4.2, 3.0, final + 0.1, final])
            job += 1
    return sweep


def test_groups_of_seeds_agree_with_scipy(seeded, capsys):
    main([str(seeded), "--baseline", "optim.lr=1e-3"])
    groups = {row["group"]: row for row in read_csv(seeded / "report_groups.csv")}
    assert set(groups) == {"optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.01"}
    base = FINALS["1e-3"]
    for lr, finals in FINALS.items():
        row = groups[f"optim.lr={float(lr)}"]
        assert (row["runs"], row["n"]) == ("4", "4")
        mean, std = sum(finals) / 4, stats.tstd(finals)
        low, high = stats.t.interval(0.95, df=3, loc=mean, scale=stats.sem(finals))
        assert number(row["final_val_loss_mean"]) == pytest.approx(mean)
        assert number(row["final_val_loss_std"]) == pytest.approx(std)
        assert (number(row["final_val_loss_ci_low"]), number(row["final_val_loss_ci_high"])) == pytest.approx((low, high))
        assert number(row["best_val_loss_mean"]) == pytest.approx(mean)  # the curves fall to the end
        assert number(row["diff_vs_baseline"]) == pytest.approx(mean - sum(base) / 4)
        if lr == "1e-3":
            assert row["p_value"] == "" and row["significant"] == ""
        else:
            p = stats.ttest_ind(finals, base, equal_var=False).pvalue
            assert number(row["p_value"]) == pytest.approx(p)
            assert row["significant"] == str(p < 0.05)
    # 3e-3 is better than the baseline beyond noise; 1e-2 is not told apart from it
    assert groups["optim.lr=0.003"]["significant"] == "True" and groups["optim.lr=0.01"]["significant"] == "False"
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| optim.lr=0.01 |"))
    assert row.endswith(" ns |") and "| baseline | - |" in out
    assert (seeded / "report.md").read_text() == out[:len((seeded / "report.md").read_text())]


def test_a_group_of_one_seed_has_no_interval_and_no_p_value(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, (lr, seed, final) in enumerate([("0.001", 1, 2.5), ("0.001", 2, 2.6), ("0.003", 1, 2.4)]):
        write_run(sweep / str(job), [f"optim.lr={lr}", f"seed={seed}"], [4.2, final])
    main([str(sweep), "--baseline", "optim.lr=0.001"])
    out = capsys.readouterr().out
    one = next(line for line in out.splitlines() if line.startswith("| optim.lr=0.003 |"))
    cells = [c.strip() for c in one.strip("|").split("|")]
    assert cells[:6] == ["optim.lr=0.003", "1", "1", "2.4000", "n/a", "n/a"]  # the mean, no std, no interval
    assert cells[-2:] == ["-0.1500", "n/a"]  # the difference, no p-value
    row = {r["group"]: r for r in read_csv(sweep / "report_groups.csv")}["optim.lr=0.003"]
    assert row["final_val_loss_std"] == row["final_val_loss_ci_low"] == row["p_value"] == ""


def test_a_baseline_that_names_no_group_is_one_line_and_writes_nothing(seeded, tmp_path):
    result = run_cli("nanogpt.sweeps.report", str(seeded), "--baseline", "optim.lr=5e-3", cwd=tmp_path)
    line = assert_one_line_error(result, "--baseline optim.lr=5e-3 names no group",
                                 "'optim.lr=0.001', 'optim.lr=0.003', 'optim.lr=0.01'")
    assert line.endswith("give one of them as printed (e.g. --baseline 'optim.lr=0.001'), or overrides that pick one")
    assert not list(seeded.glob("report*"))
    result = run_cli("nanogpt.sweeps.report", str(seeded), "--baseline", "max_iters=30", cwd=tmp_path)
    assert_one_line_error(result, "--baseline max_iters=30 matches 3 groups")
    result = run_cli("nanogpt.sweeps.report", str(seeded), "--baseline", "seed=1", cwd=tmp_path)
    assert_one_line_error(result, "--baseline seed=1 names no group")  # a seed is no setting
    assert not list(seeded.glob("report*"))


def test_a_baseline_is_found_by_its_label_or_by_its_value_as_a_number(seeded, capsys):
    for baseline in ("optim.lr=0.003", "optim.lr=3e-3", "optim.lr=0.0030"):
        main([str(seeded), "--baseline", baseline])
        assert "| optim.lr=0.003 | 4 | 4 |" in capsys.readouterr().out.split("| baseline |")[0].splitlines()[-1]


def test_a_sweep_without_seed_repeats_reports_each_setting_once(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, (lr, final) in enumerate([("0.001", 2.5), ("0.003", 2.4)]):
        write_run(sweep / str(job), [f"optim.lr={lr}", "seed=1"], [4.2, 3.0, final])
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "Runs that differ only by seed" not in out  # no spread to show
    assert "each setting ran once: add seed=1,2,3 to the sweep" in out
    assert "val loss at 15,360 tokens" in out  # the equal-cost comparison holds for one run each


def test_val_loss_at_a_budget_is_linear_between_the_evals_around_it():
    points = [{"step": s, "val_loss": v, "tokens": t} for s, t, v in [(0, 0, 4.0), (10, 1000, 3.0), (20, 2000, 2.0)]]
    assert value_at(points, "tokens", 1000) == 3.0
    assert value_at(points, "tokens", 1250) == pytest.approx(2.75)
    assert value_at(points, "tokens", 0) == 4.0
    assert value_at(points, "tokens", 2001) is None and value_at(points, "tokens", -1) is None
    assert value_at(points, "flops", 10) is None  # not logged


def test_equal_budgets_are_the_least_any_run_reached(tmp_path):
    def run(name, ends, live=True):  # an eval every 10 steps: 1000 tokens, 2 s of training a step
        return RunCurve(name, [{"step": s, "val_loss": 4.0 - s / 10, "tokens": 100 * s, "flops": None,
                                "train_seconds": float(s) * (2 if name == "b1" else 1)} for s in range(0, ends + 1, 10)],
                        live=live)

    groups = {"a": [run("a0", 30), run("a1", 20)], "b": [run("b0", 30), run("b1", 40)], "c": [run("c0", 10, live=False)]}
    tokens, seconds = equal_budgets(groups)  # no FLOPs logged: no FLOPs budget
    assert (tokens.axis, tokens.value, tokens.limited_by) == ("tokens", 2000, "a1")  # the failed c0 sets nothing
    assert tokens.losses["a"].mean == pytest.approx(2.0) and tokens.losses["a"].n == 2
    assert tokens.losses["c"].n == 0
    assert (seconds.value, seconds.limited_by) == (20.0, "a1")
    # b1 took twice as long a step: at 20 s it had done 10 steps, b0 20
    assert seconds.losses["b"].mean == pytest.approx((2.0 + 3.0) / 2)


def test_time_to_target_from_provenance_the_marked_eval_or_the_evals():
    points = points_from([{"step": s, "val_loss": v, "reached_target": s == 20} for s, v in
                          [(0, 4.0), (10, 2.9), (20, 2.4), (30, 2.2)]], tokens_per_step=100)
    assert points[2]["tokens"] == 2000 and points[2]["flops"] is None  # derived from the step; FLOPs unknown
    assert target_point(RunCurve("r", points, target={"step": 20, "tokens": 2000}), None)["step"] == 20
    assert target_point(RunCurve("r", points, target_val_loss=2.5), None)["step"] == 20  # the marked eval
    unmarked = [{**p, "reached_target": False} for p in points]
    assert target_point(RunCurve("r", unmarked, target_val_loss=3.0), None)["step"] == 10
    assert target_point(RunCurve("r", unmarked, target_val_loss=3.0), 2.3)["step"] == 30  # --target wins
    assert target_point(RunCurve("r", unmarked), None) is None  # no target set
    assert target_point(RunCurve("r", unmarked, target_val_loss=1.0), None) is None  # not reached


def test_the_pareto_front_holds_what_nothing_beats_on_both():
    points = {"small": (1.0, 3.0), "medium": (2.0, 2.5), "wasteful": (3.0, 2.6), "large": (4.0, 2.0), "same": (2.0, 2.7)}
    assert pareto_front(points) == ["small", "medium", "large"]


def test_a_half_finished_sweep_is_compared_at_what_its_runs_reached(tmp_path, capsys):
    """Four settings: one finished, one mid-way, one failed early, one not started, plus finished seeds."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", ["model.n_layer=1", "seed=1"], [4.2, 3.0, 2.6, 2.5, 2.4], target_val_loss=2.55)
    write_run(sweep / "1", ["model.n_layer=1", "seed=2"], [4.2, 3.1, 2.7, 2.5, 2.45], target_val_loss=2.55)
    write_run(sweep / "2", ["model.n_layer=2", "seed=1"], [4.2, 2.8, 2.5], status="running", seconds_per_step=0.2,
              flops_per_token=2_000_000, target_val_loss=2.55)
    write_run(sweep / "3", ["model.n_layer=2", "seed=2"], [4.2, 2.9, 2.6, 2.45, 2.3], seconds_per_step=0.2,
              flops_per_token=2_000_000, target_val_loss=2.55, provenance_target={"step": 30, "tokens": 23040,
                                                                                "flops": 4.608e10, "train_seconds": 6.0})
    write_run(sweep / "4", ["model.n_layer=3", "seed=1"], [4.2, 5.0], status="failed", target_val_loss=2.55)
    write_run(sweep / "5", ["model.n_layer=4", "seed=1"], [], status="not started", target_val_loss=2.55)
    main([str(sweep), "--baseline", "model.n_layer=1"])
    out = capsys.readouterr().out
    budgets = {(r["group"], r["measure"]): r for r in read_csv(sweep / "report_budgets.csv")}
    # job 2 got least far: 20 steps = 15,360 tokens, 4 s of training (0.2 s a step), 3.072e10 FLOPs
    assert float(budgets[("model.n_layer=1", "val_loss_at_tokens")]["at"]) == 20 * TOKENS_PER_STEP
    assert "val loss at 15,360 tokens" in out and "15,360 tokens, as far as job 2 got" in out
    assert float(budgets[("model.n_layer=1", "val_loss_at_tokens")]["mean"]) == pytest.approx((2.6 + 2.7) / 2)
    assert float(budgets[("model.n_layer=2", "val_loss_at_tokens")]["mean"]) == pytest.approx((2.5 + 2.6) / 2)
    # at 4 s of training, n_layer=1's runs (0.1 s a step) had done 40 steps
    assert float(budgets[("model.n_layer=1", "val_loss_at_train_seconds")]["mean"]) == pytest.approx((2.4 + 2.45) / 2)
    # job 2's 20 steps at twice the FLOPs a token are what n_layer=1's 40 steps cost
    assert float(budgets[("model.n_layer=1", "val_loss_at_flops")]["at"]) == pytest.approx(20 * TOKENS_PER_STEP * 2e6)
    assert float(budgets[("model.n_layer=1", "val_loss_at_flops")]["mean"]) == pytest.approx((2.4 + 2.45) / 2)
    assert budgets[("model.n_layer=3", "val_loss_at_tokens")]["n"] == "0"  # failed: out of the comparison
    # time to target 2.55: job 0 at step 30, job 1 at step 30; job 2 at step 20 (running), job 3 from its provenance
    assert float(budgets[("model.n_layer=1", "target_step")]["mean"]) == 30
    assert float(budgets[("model.n_layer=2", "target_step")]["mean"]) == 25
    row = next(line for line in out.splitlines() if line.startswith("| model.n_layer=3 | 0 of 1 |"))
    assert row.count("| - ") == 4
    # the final cost: finished runs only. n_layer=1 is the cheaper, n_layer=2 (job 3) the better: both on the front
    assert float(budgets[("model.n_layer=2", "final_flops")]["n"]) == 1
    front = [line.split(" |")[0] for line in out.splitlines() if line.endswith("| FLOPs, s of training |")]
    assert front == ["| model.n_layer=1", "| model.n_layer=2"]
    groups = {r["group"]: r for r in read_csv(sweep / "report_groups.csv")}
    assert (groups["model.n_layer=2"]["runs"], groups["model.n_layer=2"]["n"]) == ("2", "1")
    runs = {r["job"]: r for r in read_csv(sweep / "report.csv")}
    assert [runs[job]["ended_by"] for job in "012345"] == ["max_iters", "max_iters", "", "max_iters", "", ""]
    assert (groups["model.n_layer=4"]["n"], groups["model.n_layer=4"]["final_val_loss_mean"]) == ("0", "")
    for png in ("report.png", "report_budgets.png"):
        assert (sweep / png).read_bytes().startswith(b"\x89PNG")


def test_runs_from_before_budgets_compare_on_tokens_derived_from_the_step(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, lr in enumerate(("0.001", "0.003")):
        write_run(sweep / str(job), [f"optim.lr={lr}"], [4.2, 3.0, 2.5 + job / 10], budget_fields=False)
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "| val loss at 15,360 tokens |" in out and "FLOPs" not in out.split("every run")[0]
    assert not (sweep / "report_budgets.png").exists()  # neither FLOPs nor training time to plot against


def test_a_target_that_is_no_loss_is_one_line(seeded, tmp_path):
    result = run_cli("nanogpt.sweeps.report", str(seeded), "--target", "0", cwd=tmp_path)
    assert_one_line_error(result, "--target 0.0: give a positive val loss, e.g. --target 1.8")
    assert not list(seeded.glob("report*"))


def test_a_target_given_to_the_report_is_read_off_every_run(seeded, capsys):
    main([str(seeded), "--target", "2.555"])  # every run's third eval (step 20) is its final + 0.1, its last (30) the final
    out = capsys.readouterr().out
    assert "Time to target val loss 2.555:" in out
    # 3e-3's finals are all below 2.455: each met it at step 20; 1e-3's only at step 30; of 1e-2's, 2.56 never
    # meets it, 2.45 does at step 20, 2.49 and 2.52 at step 30: a mean of 26.7 steps over 3 of 4
    assert "| optim.lr=0.003 | 4 of 4 | 20 ± 0 |" in out
    assert "| optim.lr=0.001 | 4 of 4 | 30 ± 0 |" in out
    assert "| optim.lr=0.01 | 3 of 4 | 27 ± 14 |" in out


def test_a_one_parameter_sweep_with_seeds_plots_each_settings_mean_and_interval(seeded):
    """The panel against the parameter: a band between each setting's interval bounds (numbers),
    or interval bars (categories), around the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from nanogpt.sweeps import plots
    from nanogpt.sweeps.report import group_runs, group_stats, read_run

    rows = [read_run(job, seeded) for job in sorted(p for p in seeded.iterdir() if p.is_dir())]
    groups = group_runs(rows)
    stats_rows = group_stats(groups, None, "final_val_loss")
    values = {label: float(label.split("=")[1]) for label in groups}
    fig, ax = plt.subplots()
    plots._against_parameter(ax, groups, stats_rows, "optim.lr", values, "final_val_loss")
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    lows = [row["final_val_loss"].ci_low for row in stats_rows]
    highs = [row["final_val_loss"].ci_high for row in stats_rows]
    assert min(ys) == pytest.approx(min(lows)) and max(ys) == pytest.approx(max(highs))
    (means,) = [line for line in ax.get_lines() if line.get_label() == "mean over seeds"]
    assert list(means.get_xdata()) == [0.001, 0.003, 0.01]
    assert list(means.get_ydata()) == pytest.approx([sum(FINALS[lr]) / 4 for lr in ("1e-3", "3e-3", "1e-2")])
    assert ax.get_xscale() == "log"  # a decade apart
    plt.close(fig)
