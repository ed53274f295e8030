"""nanogpt-sample: generate text from a trained model. See conf/sample.yaml for every option."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from nanogpt.cli import hydra_entrypoint
from nanogpt.config import SampleConfig, config_dir, to_object
from nanogpt.data.userfiles import read_text
from nanogpt.errors import UserError, user_errors

log = logging.getLogger("nanogpt")


def read_prompt(cfg: SampleConfig) -> str:
    """The prompt: prompt_file's text, prompt=FILE:path's (nanoGPT's way, `--start=FILE:prompt.txt`),
    or prompt itself."""
    if cfg.prompt_file is None and not cfg.prompt.startswith("FILE:"):
        return cfg.prompt
    key, name = ("prompt_file", cfg.prompt_file) if cfg.prompt_file is not None else ("prompt", cfg.prompt[5:])
    spelled = f"{key}={cfg.prompt_file if key == 'prompt_file' else cfg.prompt}"
    return read_text(name, spelled, fix="give an existing file, or use prompt=TEXT")


def check_options(cfg: SampleConfig) -> None:
    if cfg.checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint={cfg.checkpoint!r} must be best or last")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0:
        raise UserError("num_samples must be >= 1, max_new_tokens >= 0 and temperature >= 0")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be >= 1, or null for no cut-off")


def load_tokenizer(spec: str | None, pretrained):
    """The tokenizer of the weights: from the tokenizer option, or the one the weights came with
    (our checkpoints carry their dataset's meta; a nanoGPT ckpt.pt its dataset's meta.pkl, see
    weights.nanogpt_meta); GPT-2 BPE when nothing says otherwise (as nanoGPT's sample.py assumes)."""
    from nanogpt.data import tokenizer as tok

    if spec is not None:
        return tok.load(spec)
    if pretrained.data_meta is not None:
        return tok.from_meta(pretrained.data_meta)
    log.info("tokenizer: no meta found with the checkpoint, assuming GPT-2 BPE (set tokenizer=... otherwise)")
    return tok.load("gpt2")


def load_model(init_from: str, checkpoint: str, tokenizer_spec: str | None, device: str):
    """(model in eval mode on device, its Pretrained, its tokenizer) from init_from (a run dir,
    checkpoint, nanoGPT ckpt.pt, GPT-2 name or HF dir), which checkpoint of a run dir (best | last)
    and a tokenizer (None: the weights' own): the one way nanogpt-sample and nanogpt-eval load
    what they run."""
    from nanogpt.model import GPT
    from nanogpt.runs import weights

    pretrained = weights.load(init_from, which=checkpoint)
    model = GPT(pretrained.model_config)
    weights.load_into(model, pretrained.state_dict, pretrained.source)
    model.eval().to(device)
    tokenizer = load_tokenizer(tokenizer_spec, pretrained)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
            f"set tokenizer= to the one the model was trained with"
        )
    return model, pretrained, tokenizer


def sample(cfg: SampleConfig) -> list[str]:
    import torch

    from nanogpt.parallel import hardware

    check_options(cfg)
    prompt = read_prompt(cfg)
    hw = hardware.resolve(cfg.hardware)
    # nanoGPT's sample.py order, so that the same seed writes the same text: seed, build the model
    # (its init draws from the RNG, before the weights replace it), load, then draw every token from
    # the global RNG. The KV cache draws the same tokens (tests/test_from_nanogpt.py checks both).
    torch.manual_seed(cfg.seed)
    model, _, tokenizer = load_model(cfg.init_from, cfg.checkpoint, cfg.tokenizer, hw.device)
    ids = getattr(tokenizer, "encode_prompt", tokenizer.encode)(prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization: give at least one character")
    x = torch.tensor(ids, dtype=torch.long, device=hw.device)[None, :]
    samples = []
    with torch.no_grad(), hw.autocast():
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               use_cache=cfg.kv_cache)
            samples.append(tokenizer.decode(y[0].tolist()))
    return samples


@hydra.main(config_path=str(config_dir()), config_name="sample", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        config: SampleConfig = to_object(cfg)
        for text in sample(config):
            print(text)
            print("---------------")


main = hydra_entrypoint(_main, nanogpt_script="sample")

if __name__ == "__main__":
    main()
