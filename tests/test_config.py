"""Every group option and every experiment composes and validates; mistakes fail with one line."""

from __future__ import annotations

import re
import time

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose, run_cli
from nanogpt.config import TrainConfig
from nanogpt.errors import ConfigError
from nanogpt.runs.preflight import to_train_config

GROUPS = ["model", "data", "optim", "hardware", "logger"]
OPTIONS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml")) for g in GROUPS}
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
# data=text and data=documents need the user's source; give them one so that they validate on their own
REQUIRED = {"data=text": ["data.source=corpus.txt"], "data=documents": ["data.source=corpus.parquet"]}
# pairs that cannot work together: Muon orthogonalises whole matrices, FSDP2 shards them
INCOMPATIBLE = {frozenset(["optim=muon", "hardware=fsdp"])}


def test_groups_and_experiments_exist():
    assert OPTIONS["model"] == ["cpu_char", "gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl", "shakespeare_char"]
    assert OPTIONS["data"] == ["documents", "fineweb_edu", "openwebtext", "shakespeare", "shakespeare_char", "text"]
    assert set(OPTIONS["hardware"]) == {"auto", "cpu", "gpu", "mps", "ddp", "fsdp", "multinode"}
    assert set(OPTIONS["logger"]) == {"none", "wandb", "tensorboard", "mlflow"}
    assert set(EXPERIMENTS) >= {
        "shakespeare_char", "shakespeare_char_cpu", "gpt2_124m", "finetune_shakespeare",
        "eval_gpt2", "eval_gpt2_medium", "eval_gpt2_large", "eval_gpt2_xl",
    }


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in OPTIONS[g]])
def test_every_group_option_composes_and_validates(override):
    cfg = compose("train", [override, *REQUIRED.get(override, [])])
    config = to_train_config(cfg)
    assert isinstance(config, TrainConfig)


@pytest.mark.slow
def test_every_option_composes_with_every_other():
    """One option of each group against all options of every other group (pairwise coverage).
    The ~185 configs are composed in one Hydra initialization, the schemas registered once (as an
    entrypoint does): conftest.compose() repeats both per call, most of a composition's time."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nanogpt.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for g1 in GROUPS:
            for o1 in OPTIONS[g1]:
                for g2 in GROUPS:
                    if g2 <= g1:
                        continue
                    for o2 in OPTIONS[g2]:
                        overrides = [f"{g1}={o1}", f"{g2}={o2}"]
                        overrides += [x for o in overrides for x in REQUIRED.get(o, [])]
                        if frozenset(overrides) in INCOMPATIBLE:  # refused with its reason (tests/test_switches.py)
                            with pytest.raises(ConfigError):
                                to_train_config(hydra_compose("train", overrides))
                            continue
                        to_train_config(hydra_compose("train", overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    config = to_train_config(compose("train", [f"experiment={experiment}"]))
    assert config.max_iters >= 0


def test_default_is_the_cpu_recipe():
    default = OmegaConf.to_container(compose("train"), resolve=True)
    recipe = OmegaConf.to_container(compose("train", ["experiment=shakespeare_char_cpu"]), resolve=True)
    assert recipe.pop("hardware") == {"device": "cpu", "dtype": "float32", "compile": False, "deterministic": None, "tf32": False,
                                      "peak_flops": None, "nproc_per_node": 1, "nnodes": 1, "backend": None,
                                      "fsdp": False, "cpus_per_process": 4}
    default.pop("hardware")
    assert default == recipe
    # nanoGPT README: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    #                 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20 --log_interval=1
    assert (recipe["model"]["n_layer"], recipe["model"]["n_head"], recipe["model"]["n_embd"]) == (4, 4, 128)
    assert (recipe["block_size"], recipe["batch_size"], recipe["max_iters"]) == (64, 12, 2000)
    assert recipe["optim"]["decay_iters"] == 2000 and recipe["model"]["dropout"] == 0.0
    assert (recipe["eval_iters"], recipe["log_interval"], recipe["eval_interval"]) == (20, 1, 250)


def test_experiment_values_match_nanogpt():
    gpt2 = to_train_config(compose("train", ["experiment=gpt2_124m"]))
    assert (gpt2.model.vocab_size, gpt2.model.bias, gpt2.batch_size, gpt2.global_batch_size) == (50304, False, 12, 480)
    assert (gpt2.optim.lr, gpt2.optim.min_lr, gpt2.optim.warmup_iters, gpt2.max_iters) == (6e-4, 6e-5, 2000, 600000)
    char = to_train_config(compose("train", ["experiment=shakespeare_char"]))
    assert (char.model.n_layer, char.model.n_embd, char.block_size, char.batch_size) == (6, 384, 256, 64)
    assert (char.model.dropout, char.optim.beta2, char.max_iters, char.eval_iters) == (0.2, 0.99, 5000, 200)
    ft = to_train_config(compose("train", ["experiment=finetune_shakespeare"]))
    assert (ft.init_from, ft.model.n_layer, ft.batch_size, ft.global_batch_size, ft.max_iters) == ("gpt2-xl", 48, 1, 32, 20)
    assert ft.optim.schedule == "constant" and ft.optim.lr == 3e-5 and ft.data.encoding == "gpt2"
    ev = to_train_config(compose("train", ["experiment=eval_gpt2_medium"]))
    assert ev.eval_only and ev.init_from == "gpt2-medium" and ev.model.n_layer == 24 and ev.eval_iters == 500


def test_constant_schedule_ignores_min_lr():
    config = to_train_config(compose("train", ["experiment=finetune_shakespeare", "optim.lr=1e-5"]))
    assert config.optim.lr == 1e-5 and config.optim.min_lr > config.optim.lr


def test_command_line_overrides_the_experiment():
    config = to_train_config(compose("train", ["experiment=shakespeare_char", "optim.lr=3e-4", "model.n_layer=2"]))
    assert config.optim.lr == 3e-4 and config.model.n_layer == 2 and config.model.n_embd == 384


def test_sample_prepare_and_bench_configs_compose():
    compose("sample", ["init_from=gpt2"])
    from nanogpt.config import EvalConfig, to_object

    evaluation = to_object(compose("eval", ["source=gpt2", "tasks=[hellaswag,lambada_openai]", "limit=10"]))
    assert isinstance(evaluation, EvalConfig) and evaluation.tasks == ["hellaswag", "lambada_openai"]
    compose("prepare", ["data=shakespeare"])
    bench = compose("bench", ["bench.steps=3", "experiment=shakespeare_char"])
    assert bench.bench.steps == 3 and bench.model.n_layer == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_embd=130"], "model.n_embd=130 is not divisible by model.n_head=4"),
        (["block_size=128"], "block_size=128 exceeds model.block_size=64"),
        (["optim.min_lr=1"], "optim.min_lr=1.0 must be between 0 and optim.lr=0.001"),
        (["optim.beta2=1.5"], "optim.beta2=1.5 must be in [0, 1)"),
        (["optim.eps=-1"], "optim.eps=-1.0 must be positive"),
        (["batch_size=0"], "batch_size=0 must be at least 1"),
        (["data=text"], "data.source is required"),
        (["optim.warmup_iters=-1"], "optim.warmup_iters, optim.grad_clip and optim.weight_decay must be >= 0"),
    ],
)
def test_cross_field_rules_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_train_config(compose("train", overrides))


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=gpt3"], "Could not find 'model/gpt3'. Available options in 'model': cpu_char, gpt2"),
        (["experiment=nope"], "Could not find 'experiment/nope'"),
        (["optim.lrr=1e-3"], "Key 'lrr' not in 'OptimConfig'"),
        (["optim.lr=fast"], "Value 'fast' of type 'str' could not be converted to Float"),
        (["model.n_embd=130"], "model.n_embd=130 is not divisible by model.n_head=4"),
        (["hardware.device=tpu"], "Invalid value 'tpu', expected one of [auto, cpu, cuda, mps]"),
        (["+optim.lrr=1e-3"], "optim.lrr is not a config key"),
        (["init_from=/no/such/ckpt.pt"], "init_from='/no/such/ckpt.pt' is not a GPT-2 name"),
        (["init_from=gpt2"], "set model.n_layer=12 model.n_head=12 model.n_embd=768"),
        (["hardware=gpu"], "hardware.device=cuda but no CUDA GPU is visible"),
    ],
)
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, args, message):
    result = run_cli("nanogpt.train", *args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/ dir, no data dir


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, caplog):
    """Where the CPU has native bf16 (this one has avx512_bf16), nothing is said; a CPU without it,
    which cannot run here, is faked through torch's probes."""
    import torch

    from nanogpt.config import HardwareConfig
    from nanogpt.parallel import hardware

    cpu_bf16 = HardwareConfig(device="cpu", dtype="bfloat16")
    with caplog.at_level("WARNING", logger="nanogpt.parallel.hardware"):
        assert hardware.resolve(cpu_bf16).dtype == torch.bfloat16
        assert hardware.resolve(HardwareConfig(device="cpu", dtype="float32")).dtype == torch.float32
        if hardware.x86_has_native_bf16():
            assert caplog.messages == []
        caplog.clear()
        monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        hardware._warn_emulated.cache_clear()
        hardware.resolve(cpu_bf16)
        hardware.resolve(cpu_bf16)  # said once, not on each resolve
    assert caplog.messages == [
        "hardware.dtype=bfloat16 on an x86 CPU without native bf16 (avx512_bf16 or AMX): its matmuls are emulated, "
        "usually slower than float32; set hardware.dtype=float32"]


def test_cfg_job_is_fast_and_shows_every_knob(tmp_path, capsys):
    start = time.perf_counter()
    result = run_cli("nanogpt.train", "--cfg", "job", cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    shown = OmegaConf.create(result.stdout)
    schema = OmegaConf.structured(TrainConfig)
    for key in ("model", "data", "optim", "hardware", "logger"):
        assert set(shown[key].keys()) == set(schema[key].keys()), key
    assert "torch" not in result.stderr
    with capsys.disabled():
        print(f"\n[benchmark] nanogpt-train --cfg job answered in {elapsed:.2f} s (process start included)")
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.argv=['nanogpt-train','--cfg','job'];"
        "import nanogpt.train as t\ntry: t.main()\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
