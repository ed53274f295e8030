"""The modern switches of the model (rotary, RMSNorm, QK-norm, ReLU², untied head, zero-init
projections, logit soft-cap, attention scale, split query/key/value): off, the model is exactly
the earlier one; on, each trains, checkpoints and resumes exactly. And generation with the KV cache
equals generation without it."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, require_shakespeare
from nanogpt.config import ModelConfig
from nanogpt.model import GPT
from nanogpt.optim import build_optimizer

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.1, bias=False)


def test_with_every_switch_off_the_model_trains_exactly_as_the_earlier_one():
    from reference.model_before_switches import GPT as EarlierGPT

    config = ModelConfig(**TINY_MODEL)
    torch.manual_seed(0)
    ours = GPT(config)
    torch.manual_seed(0)
    earlier = EarlierGPT(dataclasses.replace(config))
    assert list(ours.state_dict()) == list(earlier.state_dict())
    from nanogpt.config import OptimConfig

    optim_config = OptimConfig(lr=3e-3)
    runs = []
    for model in (ours, earlier):
        optimizer = build_optimizer(model, optim_config, "cpu")
        data = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # dropout masks
        losses = []
        for _ in range(5):
            x = torch.randint(0, 65, (4, 16), generator=data)
            _, loss = model(x, targets=torch.roll(x, -1, dims=1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0] == runs[1]
    for (name, a), b in zip(ours.state_dict().items(), earlier.state_dict().values()):
        assert torch.equal(a, b), name


SWITCHES = ["model.position=rotary", "model.norm=rmsnorm", "model.qk_norm=true", "model.activation=relu2",
            "model.tie_embeddings=false", "model.zero_init_proj=true", "model.logit_softcap=15.0",
            "model.attn_scale=0.35", "model.split_qkv=true"]
FLOAT_SWITCHES = ("logit_softcap", "attn_scale")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require_shakespeare()
    return tmp_path_factory.mktemp("data")


def train_in_process(run_dir, data_dir, overrides: list[str], resume: bool = False) -> dict:
    """nanogpt.train.train() in this process, as nanogpt-train would call it; resume: from run_dir's
    newest checkpoint, as resume=auto does."""
    from conftest import SHAKESPEARE
    from nanogpt.runs.checkpoint import CheckpointDir
    from nanogpt.runs.preflight import check_data_and_vocab, to_train_config
    from nanogpt.train import train

    cfg = compose("train", [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", "hardware=cpu", "model.n_layer=2",
                            "model.n_head=2", "model.n_embd=32", "model.block_size=16", "model.dropout=0.1",
                            "batch_size=4", "eval_interval=3", "eval_iters=1", "optim.warmup_iters=2",
                            "hardware.peak_flops=1e11", *overrides])
    config = to_train_config(cfg)
    resume_from = CheckpointDir(run_dir / "checkpoints").load_latest_good()[0] if resume else None
    run_dir.mkdir(exist_ok=True)
    return train(config, run_dir, check_data_and_vocab(config), OmegaConf.to_container(cfg, resolve=True), resume_from)


@pytest.mark.parametrize("switch", SWITCHES + ["optim=muon", "optim.schedule=wsd"])
def test_each_switch_trains_checkpoints_and_resumes_exactly(tmp_path, data_dir, switch):
    straight = train_in_process(tmp_path / "straight", data_dir, [switch, "max_iters=6"])
    train_in_process(tmp_path / "stopped", data_dir, [switch, "max_iters=3", "optim.decay_iters=6"])
    resumed = train_in_process(tmp_path / "stopped", data_dir, [switch, "max_iters=6", "optim.decay_iters=6"],
                               resume=True)
    assert resumed["step"] == straight["step"] == 6
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    if switch.startswith("model."):
        key, value = switch.removeprefix("model.").split("=")
        assert str(a["model_config"][key]).lower() == value  # the switch is on, and recorded in the checkpoint
    if switch == "optim=muon":  # both optimizers' state went through the checkpoint
        state = b["optimizer"]["state"]
        assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_the_switches_change_the_model():
    """Each switch does something: the same seed gives other logits (or other parameters)."""
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = GPT(ModelConfig(**TINY_MODEL)).eval()
    names = set(base.state_dict())
    base_logits, _ = base(x, targets=x)
    for switch in SWITCHES:
        key, value = switch.removeprefix("model.").split("=")
        value = {"true": True, "false": False}.get(value, value)
        value = float(value) if key in FLOAT_SWITCHES else value
        torch.manual_seed(0)
        model = GPT(ModelConfig(**{**TINY_MODEL, key: value})).eval()
        logits, _ = model(x, targets=x)
        assert set(model.state_dict()) != names or not torch.equal(logits, base_logits), switch


def test_split_qkv_computes_the_same_attention_as_the_fused_matrix():
    """split_qkv changes only how the weights are laid out (and so what Muon sees): with c_attn's
    three blocks copied into c_q, c_k and c_v, the model computes the same logits."""
    fused = GPT(ModelConfig(**{**TINY_MODEL, "bias": True})).eval()
    split = GPT(ModelConfig(**{**TINY_MODEL, "bias": True, "split_qkv": True})).eval()
    state = {}
    for name, tensor in fused.state_dict().items():
        if ".c_attn." in name:
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                state[name.replace(".c_attn.", f".c_{part}.")] = chunk
        else:
            state[name] = tensor
    split.load_state_dict(state)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split(x, targets=x)[0], fused(x, targets=x)[0])


# ---------------------------------------------------------------------------------------------
# generation with the KV cache


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_kv_cache_generates_what_the_full_recompute_does(position, temperature):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY_MODEL, "position": position, "qk_norm": True})).eval()
    prompt = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(1))
    # 30 new tokens: past block_size (16), where the window starts to slide
    outputs = [model.generate(prompt, 30, temperature=temperature, top_k=20, generator=torch.Generator().manual_seed(3),
                              use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(outputs[0], outputs[1])


def test_kv_cache_speedup_at_500_new_tokens():
    """A benchmark: prints the speed-up; asserts only that both paths give the same tokens."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=1024, vocab_size=65, bias=False)).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)
    seconds, outputs = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, 500, temperature=0.0, use_cache=use_cache)
        seconds[use_cache] = time.perf_counter() - start
    assert torch.equal(outputs[True], outputs[False])
    print(f"\n[benchmark] 500 new tokens, 4x128 model on CPU: {seconds[False]:.2f} s without the KV cache, "
          f"{seconds[True]:.2f} s with it: {seconds[False] / seconds[True]:.1f}x faster")


# ---------------------------------------------------------------------------------------------
# mistakes


@pytest.mark.parametrize("overrides, fragment", [
    (["model.position=rotary", "model.n_head=4", "model.n_embd=36"], "head size model.n_embd / n_head = 9 is odd"),
    (["model.logit_softcap=-1"], "model.logit_softcap=-1.0 must be positive"),
    (["model.attn_scale=0"], "model.attn_scale=0.0 must be positive"),
])
def test_a_switch_that_cannot_work_is_named(overrides, fragment):
    from nanogpt.errors import ConfigError
    from nanogpt.runs.preflight import to_train_config

    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        to_train_config(compose("train", overrides))


def test_weights_are_loaded_only_into_the_architecture_they_were_trained_with():
    from nanogpt.errors import UserError
    from nanogpt.runs import weights

    trained = ModelConfig(**TINY_MODEL)
    for key, value, expected in [("position", "rotary", "model.position=learned"), ("norm", "rmsnorm", "model.norm=layernorm"),
                                 ("tie_embeddings", False, "model.tie_embeddings=True"), ("qk_norm", True, "model.qk_norm=False"),
                                 ("split_qkv", True, "model.split_qkv=False")]:
        with pytest.raises(UserError, match=expected):
            weights.check_matches(ModelConfig(**{**TINY_MODEL, key: value}), trained, "a run dir")
    # a scale the weights were trained with, or without, is part of what they compute: null is a value here
    scaled = ModelConfig(**{**TINY_MODEL, "attn_scale": 0.35, "logit_softcap": 15.0})
    with pytest.raises(UserError, match=r"set model\.attn_scale=0\.35 model\.logit_softcap=15\.0 "):
        weights.check_matches(trained, scaled, "a run dir")
    with pytest.raises(UserError, match=r"set model\.logit_softcap=null "):
        weights.check_matches(ModelConfig(**{**TINY_MODEL, "logit_softcap": 30.0}), trained, "a run dir")
    weights.check_matches(scaled, scaled, "a run dir")


# ---------------------------------------------------------------------------------------------
# optimizers and schedules


def test_muon_updates_the_blocks_matrices_and_adamw_the_rest_each_with_its_lr():
    from nanogpt.config import OptimConfig
    from nanogpt.optim import set_learning_rate

    model = GPT(ModelConfig(**{**TINY_MODEL, "tie_embeddings": False}))
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, embed_lr=0.1, head_lr=0.004, scalar_lr=None,
                      schedule="constant", warmup_iters=0)
    optimizer = build_optimizer(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    set_learning_rate(optimizer, 0, cfg)
    lrs = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs["transformer.wte.weight"] == lrs["transformer.wpe.weight"] == pytest.approx(0.1)
    assert lrs["lm_head.weight"] == pytest.approx(0.004)
    assert lrs["transformer.ln_f.weight"] == pytest.approx(1e-3)
    assert lrs["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.02)
    assert len(lrs) == len(list(model.parameters()))  # every parameter, once


def test_with_split_qkv_muon_sees_query_key_and_value_as_three_matrices():
    from nanogpt.config import OptimConfig

    model = GPT(ModelConfig(**{**TINY_MODEL, "split_qkv": True}))
    optimizer = build_optimizer(model, OptimConfig(name="muon", schedule="wsd"), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = {names[id(p)]: tuple(p.shape) for g in optimizer.muon.param_groups for p in g["params"]}
    for part in "qkv":
        assert shapes[f"transformer.h.0.attn.c_{part}.weight"] == (32, 32)
    assert not any("c_attn" in name for name in shapes)


def test_warmup_stable_decay_schedule():
    from nanogpt.config import OptimConfig
    from nanogpt.optim import learning_rate

    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_iters=10, decay_iters=100, cooldown_fraction=0.2)
    assert learning_rate(0, cfg) == pytest.approx(1 / 11)  # warmup
    assert learning_rate(10, cfg) == learning_rate(79, cfg) == 1.0  # stable
    assert learning_rate(90, cfg) == pytest.approx(0.55)  # halfway down the cooldown
    assert learning_rate(100, cfg) == pytest.approx(0.1) and learning_rate(150, cfg) == 0.1


def test_muon_with_fsdp_is_refused():
    from nanogpt.errors import ConfigError
    from nanogpt.runs.preflight import to_train_config

    with pytest.raises(ConfigError, match="optim=muon orthogonalises whole matrices"):
        to_train_config(compose("train", ["optim=muon", "hardware=fsdp"]))


@pytest.mark.slow
def test_an_ablation_of_three_switches_runs_through_the_sweep_and_its_report(tmp_path):
    from conftest import SHAKESPEARE, TINY, report_rows, run_cli

    require_shakespeare()
    result = run_cli("nanogpt.train", "--multirun", "sweep=switches", "max_iters=4", "eval_interval=2", *TINY,
                     f"data.source={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = list((tmp_path / "multirun").glob("*/*"))
    report = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = report_rows(report.stdout)
    assert len(rows) == 8 and all(cells[2] == "done" for cells in rows)
    combinations = {tuple(sorted(cells[1].split())) for cells in rows}
    assert len(combinations) == 8  # every combination of the three switches, one row each


def test_muon_on_a_torch_without_it_is_named_before_the_run(monkeypatch):
    from nanogpt.errors import ConfigError
    from nanogpt.runs.preflight import check_optimizer, to_train_config

    monkeypatch.delattr(torch.optim, "Muon")  # what PyTorch before 2.9 lacks
    with pytest.raises(ConfigError, match=r"optim=muon needs PyTorch >= 2\.9"):
        check_optimizer(to_train_config(compose("train", ["optim=muon"])))
