"""nanogpt-eval: EleutherAI's lm-evaluation-harness tasks on a run, a checkpoint or GPT-2. See
conf/eval.yaml for every option and docs/evaluation.md for the whole story.

    nanogpt-eval outputs/2026-11-21/10-00-00 tasks=[hellaswag] limit=200   # the run dir may come first
    nanogpt-eval source=gpt2 tasks=[hellaswag,lambada_openai] hardware=gpu

Writes <run dir>/eval/results_<tasks>_<time>.json (lm-eval's results, with the checkpoint's step,
the tasks, the limit and lm-eval's version under "nanogpt") and the table beside it as .md, and
prints the table. The model and its tokenizer load as nanogpt-sample loads them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanogpt.cli import hydra_entrypoint
from nanogpt.config import GPT2_NAMES, EvalConfig, config_dir, to_object
from nanogpt.errors import UserError, user_errors
from nanogpt.evals import harness

log = logging.getLogger("nanogpt")


def check_options(cfg: EvalConfig) -> None:
    if cfg.checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint={cfg.checkpoint!r} must be best or last")
    harness.check_request(cfg.tasks, cfg.limit)
    if cfg.batch_size < 1 or cfg.max_gen_toks < 1:
        raise UserError("batch_size and max_gen_toks must be >= 1")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UserError(f"num_fewshot={cfg.num_fewshot} must be >= 0, or null for the task's default")


def out_dir_for(cfg: EvalConfig) -> Path:
    """out_dir, else <run dir>/eval for a run dir (or beside a checkpoint file: the run dir above
    checkpoints/), else eval/<name> under the cwd (a GPT-2 name, an HF dir, a nanoGPT ckpt.pt)."""
    if cfg.out_dir is not None:
        return Path(cfg.out_dir).expanduser()
    source = Path(cfg.source).expanduser()
    if cfg.source not in GPT2_NAMES and source.is_dir() and (source / "checkpoints").is_dir():
        return source / "eval"
    if source.is_file() and source.parent.name == "checkpoints":
        return source.parent.parent / "eval"
    return Path("eval") / (cfg.source if cfg.source in GPT2_NAMES else source.name or "model")


def evaluate(cfg: EvalConfig) -> tuple[dict, Path]:
    """Run the tasks; returns lm-eval's results dict and the JSON written."""
    check_options(cfg)
    version = harness.require_lm_eval()
    manager = harness.task_manager(cfg.tasks, cfg.tasks_include_path)  # unknown tasks: before any model loads

    from nanogpt import __version__
    from nanogpt.evals.lm import GPTLM
    from nanogpt.parallel import hardware
    from nanogpt.sample import load_model

    hw = hardware.resolve(cfg.hardware)
    model, pretrained, tokenizer = load_model(cfg.source, cfg.checkpoint, cfg.tokenizer, hw.device)
    lm = GPTLM(model, tokenizer, hw.device, cfg.batch_size, hw.autocast, cfg.max_gen_toks)
    results = harness.evaluate(lm, cfg.tasks, manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                               bootstrap_iters=cfg.bootstrap_iters, seed=cfg.seed)
    provenance = {
        "source": cfg.source,
        "weights": pretrained.source,
        "checkpoint": cfg.checkpoint,
        "step": (pretrained.payload or {}).get("step", (pretrained.payload or {}).get("iter_num")),
        "tasks": list(cfg.tasks),
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "tasks_include_path": cfg.tasks_include_path,
        "device": str(hw.device),
        "dtype": str(hw.dtype),
        "batch_size": cfg.batch_size,
        "lm_eval_version": version,
        "nanogpt_version": __version__,
    }
    json_path, md_path = harness.write_results(out_dir_for(cfg), results, provenance)
    print(harness.table(results))
    log.info(f"results: {json_path} (table: {md_path.name})")
    return results, json_path


def source_first(argv: list[str]) -> list[str]:
    """`nanogpt-eval RUN_DIR key=value ...`: a first argument that is neither a flag nor an
    override is the source (Hydra takes only key=value)."""
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        return [f"source={argv[0]}", *argv[1:]]
    return argv


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(to_object(cfg))


_run = hydra_entrypoint(_main)


def main() -> None:
    sys.argv[1:] = source_first(sys.argv[1:])
    _run()


if __name__ == "__main__":
    main()
