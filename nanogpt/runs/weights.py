"""Pretrained weights from anywhere a user has them, as (architecture, state dict, tokenizer meta).

`init_from` may be:
  - a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl): downloaded from the HuggingFace hub;
  - a local HuggingFace GPT-2 dir (config.json + model.safetensors or pytorch_model.bin);
  - one of our run dirs or checkpoint files;
  - a nanoGPT ckpt.pt, or the out_dir that holds it (Karpathy's format, for users migrating).
Every state dict goes through `normalize_state_dict`, and into a model through `load_into`.
Everything is read with safetensors or `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from nanogpt.config import Activation, GPT2_NAMES, ModelConfig
from nanogpt.data.userfiles import read_json
from nanogpt.errors import UserError
from nanogpt.runs import checkpoint

log = logging.getLogger(__name__)

GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}

# HF's GPT-2 uses Conv1D layers, whose weights are stored transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class Pretrained:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    data_meta: dict | None  # the tokenizer's meta.json; None: unknown (GPT-2 BPE is assumed)
    source: str  # a description for logs
    payload: dict | None = None  # the whole checkpoint, for ours (optimizer, step, ...)


def gpt2_meta() -> dict:
    return {"encoding": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def locate(init_from: str, which: str = "best") -> Path | str:
    """Where init_from's weights are: a GPT-2 name as it is, else the HF dir or checkpoint file.
    A run dir of ours resolves to its checkpoints/{which}.pt."""
    if init_from in GPT2_NAMES:
        return init_from
    path = Path(init_from).expanduser()
    if not path.exists():
        raise UserError(
            f"init_from={init_from!r} is not a GPT-2 name ({', '.join(GPT2_NAMES)}), a HF dir, a run dir or a "
            f"checkpoint file that exists"
        )
    if path.is_dir() and (path / "ckpt.pt").is_file() and not (path / "checkpoints").is_dir():
        return path / "ckpt.pt"  # a nanoGPT out_dir: what its --init_from=resume reads
    if path.is_dir() and not (path / "config.json").is_file():
        return checkpoint.find_in_run_dir(path, which)
    return path


def peek_model_config(init_from: str, which: str = "best") -> ModelConfig:
    """The architecture of init_from's weights, without downloading or loading them (a checkpoint
    file is memory-mapped, so only its small metadata is read)."""
    where = locate(init_from, which)
    if isinstance(where, str):
        n_layer, n_head, n_embd = GPT2_SHAPES[where]
        return ModelConfig(n_layer, n_head, n_embd, block_size=1024, vocab_size=50257, activation=Activation.gelu_tanh)
    if where.is_dir():
        return _hf_model_config(where)
    return _model_config_of(checkpoint.load_file(where), where)


def load(init_from: str, which: str = "best") -> Pretrained:
    where = locate(init_from, which)
    if isinstance(where, str):
        return load_hf_dir(_download_gpt2(where), source=f"{where} (HuggingFace hub)")
    if where.is_dir():
        return load_hf_dir(where, source=str(where))
    payload = checkpoint.load_verified(where)  # a corrupt file is named, not trained or sampled from
    config = _model_config_of(payload, where)
    state_dict = normalize_state_dict(payload["model"])
    if checkpoint.is_ours(payload):
        return Pretrained(config, state_dict, payload.get("data_meta"), str(where), payload)
    return Pretrained(config, state_dict, nanogpt_meta(payload, where), f"{where} (nanoGPT checkpoint)", payload)


def normalize_state_dict(raw: dict, conv1d: bool = False) -> dict:
    """The one way a state dict from anywhere (ours, nanoGPT's ckpt.pt, HuggingFace's GPT-2) becomes
    our model's keys: every loader goes through here, so a quirk fixed once is fixed for all.

    - `_orig_mod.` (a torch.compile'd model, as nanoGPT saves it) and `module.` (a DDP wrapper) prefixes go;
    - `attn.bias` / `attn.masked_bias` are causal-mask buffers (nanoGPT saves them when PyTorch has no
      flash attention; old HF checkpoints always), not weights: dropped;
    - HF's GPT2Model leaves out the `transformer.` prefix; conv1d: HF's Conv1D stores its weights
      transposed relative to nn.Linear;
    - a tied head is often not saved: it is the token embedding."""
    state_dict = {}
    for key, tensor in raw.items():
        key = re.sub(r"^(_orig_mod\.|module\.)+", "", key)
        if re.search(r"\.attn\.(masked_)?bias$", key):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = f"transformer.{key}"
        if conv1d and key.endswith(_CONV1D):
            tensor = tensor.t().contiguous()
        state_dict[key] = tensor
    if "transformer.wte.weight" in state_dict:
        state_dict.setdefault("lm_head.weight", state_dict["transformer.wte.weight"])
    return state_dict


def load_into(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load weights into model, or say in one line every key and shape that does not fit."""
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict)


def check_fits(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """A UserError naming the missing and unexpected keys and the wrong shapes, all in one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} is {tuple(state_dict[k].shape)} there and {tuple(v.shape)} here"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    problems = ([f"missing {some(missing)}"] if missing else []) + ([f"unexpected {some(unexpected)}"] if unexpected
                                                                     else []) + shapes[:4]
    if problems:
        raise UserError(f"the weights of {source} do not fit the model: {'; '.join(problems)}")


def nanogpt_meta(payload: dict, path: Path) -> dict | None:
    """The char vocabulary of a nanoGPT ckpt.pt: its dataset's meta.pkl (or the meta.json made from
    it), beside the checkpoint or in data/<dataset>/ (where nanoGPT's sample.py looks). None: not
    found (nanoGPT then assumes GPT-2 BPE)."""
    from nanogpt.data import tokenizer

    dataset = (payload.get("config") or {}).get("dataset") if isinstance(payload.get("config"), dict) else None
    dirs = [path.parent] + ([Path("data") / dataset] if dataset else [])
    for candidate in (d / name for d in dirs for name in ("meta.json", "meta.pkl")):
        if candidate.is_file():
            log.debug(f"tokenizer: {candidate}")
            return tokenizer.load(str(candidate)).meta()
    return None


def _model_config_of(payload: dict, path: Path) -> ModelConfig:
    if checkpoint.is_ours(payload):
        return checkpoint.model_config_from_dict(payload["model_config"])
    if isinstance(payload, dict) and "model_args" in payload and "model" in payload:
        # Karpathy's nanoGPT ckpt.pt: {'model', 'model_args', 'optimizer', 'iter_num', ...}; exact GELU
        args = payload["model_args"]
        return ModelConfig(
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            block_size=args["block_size"],
            vocab_size=args["vocab_size"],
            dropout=float(args.get("dropout", 0.0)),
            bias=bool(args.get("bias", True)),
            activation=Activation.gelu,
        )
    raise UserError(f"{path} is neither our checkpoint nor a nanoGPT ckpt.pt (no 'format' or 'model_args' key)")


def _download_gpt2(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UserError(f"init_from={name} downloads from the HuggingFace hub: pip install 'nanogpt[hf]'") from e
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:
        raise UserError(
            f"could not download {name} from the HuggingFace hub ({e.__class__.__name__}): check the network, "
            f"or point init_from at a local copy (a dir with config.json and model.safetensors)"
        ) from e


def _hf_model_config(path: Path) -> ModelConfig:
    try:
        hf = read_json(path / "config.json")  # a user's file: not UTF-8 or not JSON is one line naming it
        shape = {k: hf[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / 'config.json'} is not a GPT-2 config ({e.__class__.__name__}: {e})") from e
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path} holds a {hf.get('model_type')!r} model; only GPT-2 checkpoints load")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"{path}: activation_function={activation!r} is not supported (gelu_new or gelu)")
    return ModelConfig(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        block_size=shape["n_positions"],
        vocab_size=shape["vocab_size"],
        dropout=0.0,
        bias=True,
        activation=Activation.gelu if activation == "gelu" else Activation.gelu_tanh,
    )


def load_hf_dir(path: Path, source: str) -> Pretrained:
    """A transformers GPT2LMHeadModel saved with save_pretrained (or downloaded from the hub)."""
    config = _hf_model_config(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path} has config.json but neither model.safetensors nor pytorch_model.bin")

    state_dict = normalize_state_dict(raw, conv1d=True)
    return Pretrained(config, state_dict, gpt2_meta(), source)


# what the weights fix: a model built with other values would not load them, or not compute what they learned
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "activation", "position", "norm", "qk_norm",
                "tie_embeddings", "split_qkv")
# what the weights were trained to compute with, where null is a value ("off", "SDPA's default"), not "unset"
SCALE_FIELDS = ("attn_scale", "logit_softcap")


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def _override(key: str, value) -> str:
    return f"model.{key}={'null' if value is None else _plain(value)}"


def check_matches(configured: ModelConfig, loaded: ModelConfig, init_from: str) -> None:
    """The model group must describe the weights being loaded: name every field that differs at
    once, as the overrides that fix it. A smaller block_size is fine (the position table is cropped)."""
    wrong = [
        _override(k, getattr(loaded, k))
        for k in SHAPE_FIELDS
        if getattr(configured, k) is not None and _plain(getattr(configured, k)) != _plain(getattr(loaded, k))
    ] + [_override(k, getattr(loaded, k)) for k in SCALE_FIELDS if getattr(configured, k) != getattr(loaded, k)]
    if configured.block_size > loaded.block_size:
        wrong.append(f"model.block_size={loaded.block_size}")
    if wrong:
        raise UserError(
            f"the model config does not match the weights of init_from={init_from}: set {' '.join(wrong)}"
            f" (or pick the matching model= option; a model.block_size below {loaded.block_size} crops the weights'"
            f" positions)"
        )


def check_tokenizer(pretrained: Pretrained, data_meta: dict, init_from: str, data_name: str) -> None:
    """The data must be tokenized the way the weights were trained: same encoding, and for a char
    vocabulary the same characters in the same order (else every id would mean another char)."""
    if pretrained.model_config.vocab_size < data_meta["vocab_size"]:
        raise UserError(
            f"data={data_name} has {data_meta['vocab_size']} tokens but init_from={init_from} only "
            f"{pretrained.model_config.vocab_size}: train on data with the tokenizer of those weights"
        )
    theirs = pretrained.data_meta
    if theirs is None:
        log.warning(f"init_from={init_from} does not record its tokenizer: make sure data={data_name} uses it")
        return
    if theirs.get("encoding") != data_meta.get("encoding") or theirs.get("chars") != data_meta.get("chars"):
        what = "characters" if data_meta.get("encoding") == "char" else "tokenizer"
        raise UserError(
            f"init_from={init_from} was trained with another {what} ({theirs.get('encoding')}) than "
            f"data={data_name} ({data_meta.get('encoding')}): train on data with the same tokenizer"
        )
