"""The RNG streams of training belong to the model, the data and the optimizer: nothing that
measures, logs or saves may draw from them, or a run would train differently depending on
whether it was measured, logged or saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose, require_shakespeare

TINY_DROPOUT = ["hardware=cpu", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                "model.dropout=0.1", "batch_size=4", "max_iters=4", "eval_interval=2", "eval_iters=2", "log_interval=1"]
LOSSES = ("step", "kind", "loss", "lr", "grad_norm", "train_loss", "val_loss")


def streams() -> list:
    """Every stream rng.capture saves for an exact resume, as plain values that compare with ==."""
    from nanogpt.runs import rng

    state = rng.capture("cpu")
    numpy = state["numpy"]
    return [state["python"], numpy["key"].tolist(), numpy["pos"], numpy["has_gauss"], numpy["gauss"],
            state["torch"].tolist()]


def train_in_process(workspace: Path, name: str, *overrides: str) -> list[dict]:
    """train() on a tiny model with dropout; returns its logged losses (no timings)."""
    from omegaconf import OmegaConf

    from nanogpt.runs.preflight import check_data_and_vocab, to_train_config
    from nanogpt.train import train

    cfg = compose("train", [f"data.source={require_shakespeare()}", f"data.dir={workspace / 'data'}",
                            *TINY_DROPOUT, *overrides])
    config = to_train_config(cfg)
    run_dir = workspace / name
    run_dir.mkdir()
    train(config, run_dir, check_data_and_vocab(config), OmegaConf.to_container(cfg, resolve=True))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in LOSSES} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A workspace with the data prepared, and the losses of a run given its peak FLOP/s, logging to
    metrics.jsonl only and saving checkpoints."""
    workspace = tmp_path_factory.mktemp("rng")
    losses = train_in_process(workspace, "reference", "hardware.peak_flops=1e11")
    assert any(r["kind"] == "train" for r in losses) and any(r["kind"] == "eval" for r in losses)
    return workspace, losses


@pytest.mark.parametrize("variant", [
    ["hardware.peak_flops=null"],  # the CPU peak is measured with a matmul of random operands
    ["save_checkpoints=false"],
    pytest.param(["logger=wandb", "logger.mode=offline"], marks=pytest.mark.slow),  # wandb's start takes seconds
], ids=["measured-peak-flops", "no-checkpoints", "wandb"])
def test_measuring_logging_and_saving_leave_training_alone(reference, variant):
    workspace, losses = reference
    name = "variant-" + "-".join(v.replace("=", "_") for v in variant)
    assert train_in_process(workspace, name, "hardware.peak_flops=1e11", *variant) == losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_peak_flops_probe_draws_from_no_stream_of_training(dtype):
    from nanogpt.parallel.hardware import measure_peak_flops

    torch.manual_seed(3)
    before = streams()
    assert measure_peak_flops("cpu", dtype, trials=1, seconds=0.01) > 0
    assert streams() == before


def test_wandb_draws_from_no_stream_of_training(tmp_path):
    from nanogpt.config import LoggerConfig
    from nanogpt.runs.metrics import Metrics

    torch.manual_seed(3)
    before = streams()
    metrics = Metrics(tmp_path, LoggerConfig(wandb=True, mode="offline"), {"seed": 3})
    metrics.log(1, "train", loss=1.0)
    metrics.close()
    assert streams() == before

