"""The model against nanoGPT's numbers and HF's GPT-2, and loading every kind of weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from nanogpt.config import Activation, ModelConfig
from nanogpt.errors import UserError
from nanogpt.model import GPT, attend
from nanogpt.runs import checkpoint, weights
from nanogpt.runs.preflight import to_train_config


def gpt2_config(name: str) -> ModelConfig:
    return to_train_config(compose("train", [f"model={name}"])).model


@pytest.mark.parametrize(
    "name, total, non_embedding",
    [
        ("gpt2", 124_439_808, 123_653_376),  # nanoGPT: "number of parameters: 123.65M"
        ("gpt2-medium", 354_823_168, 353_774_592),
    ],
)
def test_parameter_counts_match_gpt2(name, total, non_embedding):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(gpt2_config(name))
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == non_embedding


def test_cpu_recipe_model_size():
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65))
    assert model.get_num_params() == 801_664  # nanoGPT prints "number of parameters: 0.80M"


def test_init_is_nanogpt_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=100))
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(model.transformer.h[0].attn.c_attn.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.h[0].mlp.c_proj.weight) == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def test_forward_shapes_loss_and_generation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    x, y = torch.randint(50, (2, 3, 16))
    logits, loss = model(x, y)  # an untrained model is close to uniform: loss ~ ln(vocab)
    assert logits.shape == (3, 16, 50) and loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=0.1)
    logits, loss = model(x)
    assert logits.shape == (3, 1, 50) and loss is None
    model.eval()
    out = model.generate(x[:, :4], max_new_tokens=20, temperature=0.8, top_k=5)  # past block_size: crops
    assert out.shape == (3, 24) and torch.equal(out[:, :4], x[:, :4])
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    assert torch.equal(model.generate(x[:, :4], 10, generator=g1), model.generate(x[:, :4], 10, generator=g2))
    greedy = model.generate(x[:, :4], 5, temperature=0)
    assert torch.equal(greedy, model.generate(x[:, :4], 5, temperature=0))
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_cpu_bfloat16_autocast_attends_in_float32():
    """Under a CPU's bf16 autocast the matmuls run in bf16 but attention in fp32 (its bf16 backward is
    ~3x slower there): the same attention as fp32, and a loss and gradients close to fp32's."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, position="rotary", qk_norm=True)
    model = GPT(config)
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                         v.bfloat16().float(), is_causal=True))

    x, targets = torch.randint(50, (2, 4, 16))
    loss32 = model(x, targets)[1]
    loss32.backward()
    grads32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(x, targets)[1]
    loss16.backward()
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.02)
    for p, g32 in zip(model.parameters(), grads32):
        assert torch.isfinite(p.grad).all() and F.cosine_similarity(p.grad.flatten(), g32.flatten(), dim=0) > 0.95


def test_crop_block_size():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=10))
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 16)
    model(torch.zeros(2, 8, dtype=torch.long))


def tiny_hf_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=300, bos_token_id=299, eos_token_id=299)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model


@pytest.mark.parametrize("hub_layout", [False, True])
def test_gpt2_weights_give_transformers_logits(tmp_path, hub_layout, capsys):
    hf_model = tiny_hf_gpt2(tmp_path)
    if hub_layout:
        # openai-community/gpt2 on the hub: keys without "transformer.", no lm_head (tied), and the
        # old causal-mask buffers h.N.attn.bias saved alongside the weights
        from safetensors.torch import load_file, save_file

        raw = load_file(str(tmp_path / "model.safetensors"))
        hub = {k.removeprefix("transformer."): v for k, v in raw.items() if k != "lm_head.weight"}
        for i in range(2):
            hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        save_file(hub, str(tmp_path / "model.safetensors"))
    pretrained = weights.load(str(tmp_path))
    assert pretrained.model_config.activation == Activation.gelu_tanh
    model = GPT(pretrained.model_config)
    model.load_state_dict(pretrained.state_dict)
    model.eval()
    idx = torch.randint(300, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        theirs = hf_model(idx).logits
    max_diff = (ours - theirs).abs().max().item()
    with capsys.disabled():
        print(f"\n[parity] max |our logits - transformers GPT-2 logits| = {max_diff:.2e} (hub layout: {hub_layout})")
    assert max_diff < 1e-4


def nanogpt_ckpt(tmp_path, compiled_prefix: bool):
    """A file in nanoGPT's ckpt.pt format, as its train.py writes it."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(ModelConfig(**args, activation=Activation.gelu))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    prefix = "_orig_mod." if compiled_prefix else ""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    assert "lm_head.weight" in model.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "model_args": args,
            "iter_num": 250,
            "best_val_loss": torch.tensor(1.4697),
            "config": {"dataset": "shakespeare_char", "batch_size": 64, "learning_rate": 1e-3, "compile": True},
        },
        path,
    )
    return model, path


@pytest.mark.parametrize("compiled_prefix", [False, True])
def test_nanogpt_checkpoint_loads(tmp_path, compiled_prefix):
    original, path = nanogpt_ckpt(tmp_path, compiled_prefix)
    pretrained = weights.load(str(path))
    assert pretrained.model_config.bias is False and pretrained.model_config.vocab_size == 65
    model = GPT(pretrained.model_config)
    model.load_state_dict(pretrained.state_dict)
    x = torch.randint(65, (2, 64))
    assert torch.equal(model(x, x)[0], original(x, x)[0])


def test_our_checkpoint_roundtrip_and_safety(tmp_path):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.save(
        {"model": model.state_dict(), "model_config": checkpoint.model_config_to_dict(model.config),
         "data_meta": {"encoding": "char", "vocab_size": 10}, "step": 3},
        path,
    )
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind
    loaded = weights.load(str(tmp_path / "run"))  # a run dir finds its checkpoint
    assert loaded.model_config == model.config and loaded.data_meta["encoding"] == "char"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "model_args": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        weights.load(str(tmp_path / "evil.pt"))
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        weights.load(str(tmp_path / "truncated.pt"))


def test_model_config_must_match_the_weights():
    loaded = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, activation=Activation.gelu_tanh)
    weights.check_matches(replace_cfg(loaded, block_size=256), loaded, "gpt2")  # cropping is fine
    with pytest.raises(UserError, match="set model.n_layer=12 model.activation=gelu_tanh"):
        weights.check_matches(replace_cfg(loaded, n_layer=4, activation=Activation.gelu), loaded, "gpt2")
    with pytest.raises(UserError, match="set model.n_layer=12 model.block_size=1024 "):  # every field at once
        weights.check_matches(replace_cfg(loaded, n_layer=4, block_size=2048), loaded, "gpt2")


def replace_cfg(c: ModelConfig, **changes) -> ModelConfig:
    from dataclasses import replace

    return replace(c, **changes)
