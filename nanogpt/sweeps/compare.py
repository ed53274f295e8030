"""nanogpt-compare: train experiments one after another, alternating, and compare them on wall-clock.

    nanogpt-compare shakespeare_char_cpu shakespeare_char_modern_cpu --repeats 3
    nanogpt-compare shakespeare_char_cpu shakespeare_char_modern_cpu --readme experiments/README.md
    nanogpt-compare A B --repeats 1 -- data.source=/path/to/input.txt    # overrides for every run

The first experiment is the baseline. Each run is a plain `nanogpt-train experiment=NAME` in its own
process, run dir <out>/NAME/<repeat>, and runs go one at a time (runs that share a machine time
each other), in the order A B, B A, A B, ...: a machine that slows down or speeds up during the
comparison favours neither.

For each experiment it reports the final val loss, steps, tokens, the wall time (median over
repeats, with the range) and its ratio to the baseline's (the median of each repeat's ratio to the
baseline run beside it), and the val loss it had reached by the time the baseline finished: the
question "what does this recipe give in the same wall-clock?". Then, as nanogpt-report does for the
groups of a sweep, each experiment's val loss at equal tokens, FLOPs and seconds of training
(the least any run reached, mean and 95% interval over repeats), its time to the target val loss
(where the experiments set target_val_loss), and the Pareto front of final val loss against cost.
It writes compare.md, compare.png (val loss against time and against tokens) and
compare_budgets.png (mean curves against training time and FLOPs, the Pareto front) to <out>; with
--readme, it also puts the tables and the plots into that markdown file, between the two
`nanogpt-compare` marker lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nanogpt.config import config_dir, register_configs
from nanogpt.errors import UserError, one_line
from nanogpt.runs.preflight import check_hardware, check_optimizer, to_train_config
from nanogpt.runs.runfiles import read_json, read_yaml
from nanogpt.sweeps import plots
from nanogpt.sweeps.curves import RunCurve, points_from, tokens_per_step
from nanogpt.sweeps.report import budget_section, read_metrics

BEGIN = "<!-- nanogpt-compare: begin (everything up to the end marker is rewritten) -->"
END = "<!-- nanogpt-compare: end -->"


@dataclass
class Run:
    experiment: str
    repeat: int
    run_dir: Path
    wall_s: float  # the process, start to exit, as the comparison timed it
    curve: list[tuple[float, int, float]]  # (seconds since training began, step, val loss) of every eval
    tokens_per_step: int
    machine: dict = field(default_factory=dict)
    costs: RunCurve | None = None  # its evals with tokens, FLOPs and training time: the comparisons at equal cost

    @property
    def final_val_loss(self) -> float:
        return self.curve[-1][2]

    @property
    def steps(self) -> int:
        return self.curve[-1][1]

    def val_loss_by(self, seconds: float) -> float | None:
        """The last val loss this run had measured `seconds` into its training (None: none yet)."""
        reached = [loss for t, _, loss in self.curve if t <= seconds]
        return reached[-1] if reached else None


def run_order(experiments: list[str], repeats: int) -> list[tuple[str, int]]:
    """A B, B A, A B, ...: every experiment as often first as last, over pairs of repeats."""
    order = []
    for repeat in range(repeats):
        names = experiments if repeat % 2 == 0 else experiments[::-1]
        order += [(name, repeat) for name in names]
    return order


def check_experiments(experiments: list[str], overrides: list[str]) -> None:
    """Compose and check each run's config now, before hours of runs: a misspelled experiment or
    override is named here, not after the baseline has trained."""
    from hydra import compose, initialize_config_dir

    if len(experiments) < 2:
        raise UserError(f"give at least two experiments to compare (the first is the baseline), got {experiments}")
    if len(set(experiments)) != len(experiments):
        raise UserError(f"an experiment is named twice in {experiments}: name each once, and use --repeats to repeat")
    for override in overrides:
        if override.split("=", 1)[0].lstrip("+~") in ("experiment", "hydra.run.dir"):
            raise UserError(f"{override}: nanogpt-compare sets experiment= and hydra.run.dir= itself; "
                            "name experiments as arguments and the output dir with --out")
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name in experiments:
            try:
                config = to_train_config(compose("train", overrides=[f"experiment={name}", *overrides]))
                check_hardware(config)  # e.g. a GPU recipe on a machine without one
                check_optimizer(config)
            except Exception as e:  # Hydra's composition errors and our checks, each as one line
                raise UserError(f"experiment {name}: {one_line(e)}") from e


def train(name: str, repeat: int, out: Path, overrides: list[str]) -> Run:
    run_dir = out / name / str(repeat)
    command = [sys.executable, "-m", "nanogpt.train", f"experiment={name}", f"hydra.run.dir={run_dir}", *overrides]
    log_path = out / name / f"{repeat}.out"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if result.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{name} (repeat {repeat}) failed with exit status {result.returncode}: {tail[0]} "
                        f"(its output: {log_path})")
    return read_run(name, repeat, run_dir, wall)


def read_run(name: str, repeat: int, run_dir: Path, wall_s: float) -> Run:
    evals, _ = read_metrics(run_dir)
    if not evals:
        raise UserError(f"{run_dir} has no val loss: give its experiment an eval_interval below max_iters")
    config = read_yaml(run_dir / "config.resolved.yaml")
    provenance = read_json(run_dir / "provenance.json")
    per_step = tokens_per_step(config, provenance)
    costs = RunCurve(f"{name} repeat {repeat}", points_from(evals, per_step), target=provenance.get("target"),
                     target_val_loss=config.get("target_val_loss"))
    return Run(name, repeat, run_dir, wall_s, [(e["time"], e["step"], e["val_loss"]) for e in evals],
               per_step, provenance.get("machine", {}), costs)


def summarise(runs: list[Run], experiments: list[str]) -> list[dict]:
    """One row per experiment, the baseline first. Runs are paired by repeat: the runs of one repeat
    ran next to each other, so their ratio is the least disturbed by a machine whose speed drifts."""
    by_name = {name: sorted((r for r in runs if r.experiment == name), key=lambda r: r.repeat) for name in experiments}
    baseline = by_name[experiments[0]]
    rows = []
    for name, mine in by_name.items():
        # each run against the baseline run of its repeat, which ran beside it
        ratios = [r.wall_s / b.wall_s for r, b in zip(mine, baseline)]
        by_baseline_time = [r.val_loss_by(b.curve[-1][0]) for r, b in zip(mine, baseline)]
        rows.append({
            "experiment": name,
            "final_val_loss": statistics.median(r.final_val_loss for r in mine),
            "val_loss_spread": max(r.final_val_loss for r in mine) - min(r.final_val_loss for r in mine),
            "val_loss_at_baseline_time": None if None in by_baseline_time else statistics.median(by_baseline_time),
            "steps": mine[0].steps,
            "tokens": mine[0].steps * mine[0].tokens_per_step,
            "wall_s": statistics.median(r.wall_s for r in mine),
            "wall_s_range": (min(r.wall_s for r in mine), max(r.wall_s for r in mine)),
            "wall_ratio": statistics.median(ratios),
            "wall_ratio_range": (min(ratios), max(ratios)),
            "repeats": len(mine),
        })
    return rows


def describe_machine(machine: dict) -> str:
    if machine.get("gpus"):
        return f"{len(machine['gpus'])}x {machine['gpus'][0]}"
    if machine:
        return f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores, {machine.get('torch_threads', '?')} torch threads"
    return "?"


def at_equal_cost(runs: list[Run], experiments: list[str], image: Path | None = None) -> str:
    """nanogpt-report's comparison at equal cost, with the experiments as its groups and their
    repeats as the runs (all finished); the curves and the Pareto front drawn to image, if given
    and a run logged FLOPs or training time."""
    groups = {name: [r.costs for r in runs if r.experiment == name] for name in experiments}
    text, _ = budget_section(groups, groups)
    if image is not None and plots.budgets(groups, groups, image):
        text += f"\n![val loss against training time and FLOPs, and the Pareto front]({image.name})\n"
    return text


def markdown(rows: list[dict], runs: list[Run], command: str, image: str | None) -> str:
    baseline = rows[0]["experiment"]
    lines = [
        f"| recipe | val loss | val loss by {baseline}'s time | steps | tokens | wall time (s) | vs {baseline} | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    machine = describe_machine(runs[0].machine)
    for row in rows:
        low, high = row["wall_s_range"]
        ratio_low, ratio_high = row["wall_ratio_range"]
        loss = f"{row['final_val_loss']:.4f}" + (f" (±{row['val_loss_spread'] / 2:.4f})" if row["val_loss_spread"] else "")
        by_time = "-" if row["val_loss_at_baseline_time"] is None else f"{row['val_loss_at_baseline_time']:.4f}"
        lines.append(f"| `{row['experiment']}` | {loss} | {by_time} | {row['steps']:,} | {row['tokens']:,} | "
                     f"{row['wall_s']:.1f} ({low:.1f}–{high:.1f}) | {row['wall_ratio']:.3f} ({ratio_low:.3f}–{ratio_high:.3f}) "
                     f"| {machine} |")
    when = datetime.now().strftime("%Y-%m-%d")
    lines += [
        "",
        f"{rows[0]['repeats']} runs of each, alternating (A B, B A, ...), one at a time; measured {when}. "
        "Val loss: the final eval (±: half the spread over repeats, when they differ). "
        f"Wall time: the whole `nanogpt-train` process, median (min–max); vs {baseline}: the median of each "
        f"run's ratio to the {baseline} run beside it. Val loss by {baseline}'s time: the last val loss a run "
        f"had measured by the time the {baseline} run beside it had finished training (its last eval), median.",
        "",
        f"Regenerate: `{command}`",
    ]
    if image:
        lines += ["", f"![val loss against wall-clock time and tokens]({image})"]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], experiments: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(experiments):
        color = f"C{i}"
        for j, run in enumerate(r for r in runs if r.experiment == name):
            seconds, steps, losses = zip(*run.curve)
            label = name if j == 0 else None
            by_time.plot(seconds, losses, color=color, marker=".", alpha=0.8, label=label)
            by_tokens.plot([s * run.tokens_per_step for s in steps], losses, color=color, marker=".", alpha=0.8, label=label)
    baseline_end = statistics.median(r.curve[-1][0] for r in runs if r.experiment == experiments[0])
    by_time.axvline(baseline_end, color="C0", linestyle=":", linewidth=1, label=f"{experiments[0]} ends (median)")
    # the first eval (the untrained model's loss) would squash the part worth looking at
    later = [loss for r in runs for _, _, loss in r.curve[1:]]
    if later:
        top = max(later) + 0.05 * (max(later) - min(later) or 1.0)
        for ax in (by_time, by_tokens):
            ax.set_ylim(min(later) - 0.05 * (top - min(later)), top)
    by_time.set(xlabel="seconds of training", ylabel="val loss", title="val loss against wall-clock (every repeat)")
    by_tokens.set(xlabel="tokens seen", ylabel="val loss", title="val loss against tokens")
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_at_markers(readme: Path) -> tuple[str, str]:
    """readme's text before its begin marker line and after its end marker line."""
    if not readme.is_file():
        raise UserError(f"--readme {readme} does not exist: create it with the two marker lines where the results go")
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise UserError(f"{readme} needs two marker lines, once each and in this order, where the results go: "
                        f"'{BEGIN}' and '{END}'")
    head, rest = text.split(BEGIN)
    return head, rest.split(END)[1]


def write_into(readme: Path, section: str) -> None:
    """Replace what lies between readme's markers with section."""
    head, tail = split_at_markers(readme)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanogpt-compare", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides after -- go to every run, e.g. -- data.source=input.txt")
    parser.add_argument("experiments", nargs="+", help="experiment names (experiments/NAME.yaml); the first is the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each experiment (default: 3)")
    parser.add_argument("--out", type=Path, help="where the run dirs go (default: multirun/compare/DATE_TIME)")
    parser.add_argument("--readme", type=Path, help="a markdown file to put the table and plot into, between its markers")
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = args.out or Path("multirun/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        if args.repeats < 1:
            raise UserError(f"--repeats {args.repeats}: give 1 or more")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty: give a new dir (its runs would be overwritten or mixed in)")
        if args.readme is not None:
            split_at_markers(args.readme)  # the markers are there: fail now, not after the runs
        check_experiments(args.experiments, overrides)
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        order = run_order(args.experiments, args.repeats)
        for i, (name, repeat) in enumerate(order, 1):
            run = train(name, repeat, out, overrides)
            runs.append(run)
            print(f"[{i}/{len(order)}] {name} (repeat {repeat}): val loss {run.final_val_loss:.4f} at step "
                  f"{run.steps:,}, {run.wall_s:.1f} s", flush=True)
        rows = summarise(runs, args.experiments)
        command = " ".join(["nanogpt-compare", *args.experiments, f"--repeats {args.repeats}",
                            *([f"--readme {args.readme}"] if args.readme else []), *(["--", *overrides] if overrides else [])])
        plot(runs, args.experiments, out / "compare.png")
        equal_cost = at_equal_cost(runs, args.experiments, out / "compare_budgets.png")
        (out / "compare.md").write_text(markdown(rows, runs, command, "compare.png") + "\n" + equal_cost)
        if args.readme is not None:
            images = args.readme.parent / "images"
            images.mkdir(exist_ok=True)
            image = images / f"compare_{'_vs_'.join(args.experiments)}.png"
            shutil.copyfile(out / "compare.png", image)
            if (out / "compare_budgets.png").is_file():
                budgets_image = image.with_name(f"{image.stem}_budgets.png")
                shutil.copyfile(out / "compare_budgets.png", budgets_image)
                equal_cost = equal_cost.replace("](compare_budgets.png)",
                                                f"]({budgets_image.relative_to(args.readme.parent)})")
            write_into(args.readme, markdown(rows, runs, command, str(image.relative_to(args.readme.parent)))
                       + "\n" + equal_cost)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((out / "compare.md").read_text(), end="")
    written = [out / name for name in ("compare.md", "compare.png", "compare_budgets.png") if (out / name).is_file()]
    print(f"\nwritten: {', '.join(map(str, written))}" + (f", {args.readme}" if args.readme else ""))


if __name__ == "__main__":
    main()
