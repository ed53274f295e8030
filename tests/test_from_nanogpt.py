"""Coming from nanoGPT: its own checkpoints, its habits on the command line, its numbers.

The fixtures in shared/fixtures/nanogpt/ were written by karpathy/nanoGPT itself (its README says
how): a 2-layer, 64-wide char model on tiny Shakespeare at iter 20 and 30, the losses nanoGPT printed
continuing it, the text its sample.py wrote, and the same checkpoint with the causal-mask buffers
nanoGPT saves when PyTorch has no flash attention.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED, assert_one_line_error, compose, require_shakespeare, run_cli
from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.model import GPT
from nanogpt.runs import from_nanogpt, weights

FIXTURES = SHARED / "fixtures" / "nanogpt"
ITER20, ITER30 = FIXTURES / "char_2x64_iter20.pt", FIXTURES / "char_2x64_iter30.pt"
ATTN_BIAS = FIXTURES / "char_2x64_iter20_attn_bias.pt"
REPO_DOCS = Path(__file__).resolve().parents[1] / "docs" / "from_nanogpt.md"
FAST = ["hardware.peak_flops=1e11"]  # no CPU peak probe: start-up only


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working dir with tiny Shakespeare prepared as data=shakespeare_char, and nanoGPT's out dir
    (its ckpt.pt at iter 20, and its dataset's meta.pkl where nanoGPT's sample.py looks)."""
    if not ITER20.is_file():
        pytest.skip(f"needs nanoGPT's own checkpoints in {FIXTURES} (shared/ is absent)")
    shakespeare = require_shakespeare()
    cwd = tmp_path_factory.mktemp("from_nanogpt")
    (cwd / "out").mkdir()
    shutil.copy(ITER20, cwd / "out" / "ckpt.pt")
    (cwd / "data" / "shakespeare_char").mkdir(parents=True)
    shutil.copy(FIXTURES / "meta.pkl", cwd / "data" / "shakespeare_char" / "meta.pkl")
    data = [f"data.source={shakespeare}", f"data.dir={cwd / 'data' / 'shakespeare_char'}"]
    from nanogpt.data.datasets import ensure_prepared

    ensure_prepared(compose("train", data).data)
    return cwd, data


def printed_losses(text: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"^iter (\d+): loss (\d+\.\d{4})", text, re.M)}


def test_shakespeare_char_is_prepared_with_nanogpts_ids(workspace):
    """nanoGPT's prepare.py: the sorted set of characters, the first 90% for training."""
    cwd, _ = workspace
    from nanogpt.data.tokenizer import meta_from_nanogpt_pickle

    ours = json.loads((cwd / "data" / "shakespeare_char" / "meta.json").read_text())
    theirs = meta_from_nanogpt_pickle(FIXTURES / "meta.pkl")
    assert ours["chars"] == theirs["chars"] and ours["vocab_size"] == 65
    assert (ours["train_tokens"], ours["val_tokens"]) == (1003854, 111540)


# --- case 16: resume= continues a nanoGPT run ---------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_a_nanogpt_checkpoint_with_nanogpts_own_losses(workspace):
    """nanoGPT's --init_from=resume from iter 20 printed resume_iter20_to_30.log. Its "iter N" is the
    loss of the step it takes at iter_num N, which is step N+1 here (we count the steps done), so
    ours runs to 31. The losses are float32 on CPU, printed to 4 decimals: they match exactly. The
    weights nanoGPT saved at iter 30 match ours at step 30 to float32 rounding (the fixture was
    made on another CPU, whose kernels may round the last bits differently)."""
    cwd, data = workspace
    result = run_cli("nanogpt.train", f"resume={ITER20}", "max_iters=31", *data, *FAST, "hydra.run.dir=cont", cwd=cwd)
    assert result.returncode == 0, result.stderr
    theirs = printed_losses((FIXTURES / "resume_iter20_to_30.log").read_text())
    ours = printed_losses(result.stdout)
    assert sorted(theirs) == list(range(20, 31))
    assert {n - 1: loss for n, loss in ours.items()} == theirs
    assert "step 30: train loss 3.7553, val loss 3.7603" in result.stdout  # nanoGPT's best_val_loss at 30: 3.7603

    saved = torch.load(cwd / "cont" / "checkpoints" / "step-00000030.pt", weights_only=True)
    nanogpt30 = torch.load(ITER30, weights_only=True)
    for key, tensor in nanogpt30["model"].items():
        torch.testing.assert_close(saved["model"][key], tensor, rtol=0, atol=1e-6)
    for i, state in nanogpt30["optimizer"]["state"].items():
        assert float(saved["optimizer"]["state"][i]["step"]) == float(state["step"]) == 30
        torch.testing.assert_close(saved["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-6)

    # a fresh run dir of ours that records what it continues; nanoGPT's config kept, mapped to ours
    config = json.loads(saved["config"])
    assert Path(config["resume"]).resolve() == ITER20.resolve() and config["seed"] == 1337  # paths compared as files
    assert config["model"]["n_layer"] == 2 and config["model"]["n_embd"] == 64 and config["model"]["bias"] is False
    assert config["optim"]["decay_iters"] == 5000 and config["optim"]["beta2"] == 0.99 and config["eval_iters"] == 5
    provenance = json.loads((cwd / "cont" / "provenance.json").read_text())
    assert Path(provenance["continues"]["checkpoint"]).resolve() == ITER20.resolve()
    assert provenance["continues"]["step"] == 20


@pytest.mark.slow
def test_resume_of_a_nanogpt_out_dir_then_of_our_own_checkpoint(workspace):
    """resume=<out_dir> reads its ckpt.pt; the same command run again in the same dir (a requeued
    job) continues from the run dir's own checkpoint, not from nanoGPT's again."""
    cwd, data = workspace
    theirs = printed_losses((FIXTURES / "resume_iter20_to_30.log").read_text())
    first = run_cli("nanogpt.train", "resume=out", "max_iters=22", *data, *FAST, "hydra.run.dir=again", cwd=cwd)
    assert first.returncode == 0, first.stderr
    assert printed_losses(first.stdout) == {21: theirs[20], 22: theirs[21]}
    second = run_cli("nanogpt.train", "resume=out", "max_iters=24", *data, *FAST, "hydra.run.dir=again", cwd=cwd)
    assert second.returncode == 0, second.stderr
    assert "checkpoints/last.pt (step 22)" in second.stdout and sorted(printed_losses(second.stdout)) == [23, 24]
    provenance = json.loads((cwd / "again" / "provenance.json").read_text())
    assert provenance["continues"]["step"] == 20 and provenance["resumes"][0]["from_step"] == 22


def test_resume_of_a_nanogpt_run_keeps_its_config(workspace):
    cwd, data = workspace
    changed = run_cli("nanogpt.train", f"resume={ITER20}", "model.n_layer=4", *data, "hydra.run.dir=changed", cwd=cwd)
    assert_one_line_error(changed, "model.n_layer=4 would change", "which has model.n_layer=2")
    from nanogpt.runs import checkpoint

    checkpoint.save({"model": {}, "step": 1}, cwd / "ours" / "checkpoints" / "last.pt")
    ours = run_cli("nanogpt.train", "resume=ours/checkpoints/last.pt", *data, cwd=cwd)
    assert_one_line_error(ours, "is a checkpoint file of ours", "(resume=ours)")
    assert not (cwd / "changed").exists()


def test_init_from_a_nanogpt_checkpoint_is_weights_only(workspace):
    """init_from= takes the weights and starts a new run: step 0, warmup from the start, a fresh
    AdamW. (Its first batch is the one nanoGPT's resume draws first: the same seed and model.) The
    checkpoint is the one with nanoGPT's causal-mask buffers, which load too (case 17)."""
    cwd, data = workspace
    args = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "max_iters=2", "eval_interval=2", "eval_iters=1"]
    result = run_cli("nanogpt.train", f"init_from={ATTN_BIAS}", *args, *data, *FAST, "hydra.run.dir=weights", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "iter 1: loss 3.9183, lr 9.90e-06" in result.stdout and "iter 21" not in result.stdout
    assert "continues" not in json.loads((cwd / "weights" / "provenance.json").read_text())


# --- case 17: one normalisation of foreign state dicts --------------------------------------------------


def test_causal_mask_buffers_and_wrapper_prefixes_are_normalised_away():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=5, bias=True))
    saved = {f"_orig_mod.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    saved["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    saved["module.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state_dict = weights.normalize_state_dict(saved)
    assert "transformer.h.0.attn.c_attn.bias" in state_dict  # a Linear's bias is a weight: kept
    weights.load_into(GPT(model.config), state_dict, "test")

    del state_dict["transformer.h.0.mlp.c_fc.weight"]
    state_dict["transformer.h.9.mlp.c_fc.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"do not fit the model: missing transformer\.h\.0\.mlp\.c_fc\.weight; "
                                        r"unexpected transformer\.h\.9\.mlp\.c_fc\.weight$"):
        weights.load_into(GPT(model.config), state_dict, "test")


def test_a_checkpoint_with_attn_bias_buffers_samples_as_the_one_without(workspace):
    from nanogpt.config import SampleConfig
    from nanogpt.sample import sample

    cwd, _ = workspace
    options = dict(prompt="ROMEO:", num_samples=1, max_new_tokens=30, tokenizer=str(FIXTURES / "meta.pkl"))
    assert sample(SampleConfig(init_from=str(ATTN_BIAS), **options)) == sample(SampleConfig(init_from=str(ITER20), **options))


def test_a_state_dict_that_does_not_fit_is_one_line(workspace, tmp_path):
    cwd, _ = workspace
    payload = torch.load(ITER20, weights_only=True)
    del payload["model"]["transformer.h.1.attn.c_proj.weight"]
    torch.save(payload, tmp_path / "ckpt.pt")
    result = run_cli("nanogpt.sample", f"init_from={tmp_path}", cwd=cwd)
    assert_one_line_error(result, "do not fit the model: missing transformer.h.1.attn.c_proj.weight")


# --- case 18: nanoGPT habits ---------------------------------------------------------------------------


def test_a_dashed_flag_gets_the_override_that_works(tmp_path):
    result = run_cli("nanogpt.train", "--max_iters=100", cwd=tmp_path)
    assert_one_line_error(result, "use max_iters=100 (Hydra overrides have no dashes)")
    renamed = run_cli("nanogpt.train", "--compile=False", cwd=tmp_path)
    assert_one_line_error(renamed, "use hardware.compile=false (Hydra overrides have no dashes")
    config_file = run_cli("nanogpt.train", "config/train_shakespeare_char.py", cwd=tmp_path)
    assert_one_line_error(config_file, "experiment=shakespeare_char")
    assert list(tmp_path.iterdir()) == []


def test_nanogpt_keys_get_the_spelling_that_works_here(tmp_path):
    result = run_cli("nanogpt.train", "compile=False", cwd=tmp_path)
    assert_one_line_error(result, "compile=False is nanoGPT's key: here it is hardware.compile=false")
    sample = run_cli("nanogpt.sample", "init_from=resume", "out_dir=out-shakespeare-char", cwd=tmp_path)
    assert_one_line_error(sample, "init_from=resume is nanoGPT's key: here it is init_from=<out_dir>")
    assert list(tmp_path.iterdir()) == []


# a value of the right type for each of nanoGPT's keys that is not a number
VALUES = {"device": "cpu", "dtype": "float32", "dataset": "shakespeare", "out_dir": "out", "bias": "True",
          "compile": "False", "eval_only": "False", "real_data": "True", "profile": "True", "start": "hello",
          "wandb_project": "p", "wandb_run_name": "r", "backend": "gloo", "init_from": "scratch"}


@pytest.mark.parametrize("script", ["train", "sample", "bench"])
def test_every_nanogpt_key_is_answered_with_a_spelling_that_composes(script):
    """Each key of nanoGPT's train.py, sample.py and bench.py: either ours too, or refused with the
    override that does it here, and that override composes (real Hydra). Overrides that do not
    conflict are composed together, the others (key=value rows: logger=wandb, logger=none) alone."""
    import dataclasses

    schema = {f.name for f in dataclasses.fields(from_nanogpt.SCHEMAS[script])}
    together, alone = [], []
    for row in (row for row in from_nanogpt.KEYS if script in row.scripts.split()):
        key, _, value = row.nanogpt.partition("=")
        value = value or VALUES.get(key, "1")
        spelled = from_nanogpt.override_for(row, value)
        if key in schema and "=" not in row.nanogpt:
            together.append(f"{key}={value}")  # ours too
        else:
            with pytest.raises(UserError, match=re.escape(f"{key}={value} is nanoGPT's key")):
                from_nanogpt.check_argv([f"{key}={value}"], script)
        if row.ours is None or "<" in spelled or spelled.startswith("hydra."):
            continue  # nothing to set, a placeholder to fill in (<out_dir>), or Hydra's own key
        (alone.append(spelled.split()) if "=" in row.nanogpt or key == "dataset" else together.extend(spelled.split()))
    required = ["init_from=x"] if script == "sample" else []  # nanogpt-sample's one mandatory key
    together = list(dict.fromkeys(together))  # block_size=1 and model.block_size=1, seed=1 twice, ...
    for overrides in [together, *alone]:
        compose(script, overrides + ([] if any(o.startswith("init_from=") for o in overrides) else required))


def test_the_docs_map_every_nanogpt_key():
    text = REPO_DOCS.read_text()
    rows = {line.split(" | ")[0] + " | " + line.split(" | ")[2] for line in text.splitlines() if line.startswith("| `--")}
    for row in from_nanogpt.KEYS:
        theirs = row.nanogpt if "=" in row.nanogpt else f"{row.nanogpt}=V"
        ours = "(nothing)" if row.ours is None else f"`{row.ours.replace('{v}', 'V')}`"
        assert f"| `--{theirs}` | {ours}" in rows, row
    for name, experiment in from_nanogpt.CONFIG_FILES.items():
        assert f"config/{name}.py" in text and f"experiment={experiment}" in text


@pytest.mark.slow
def test_init_from_a_nanogpt_out_dir_and_an_architecture_mismatch_in_one_try(workspace):
    cwd, data = workspace
    mismatch = run_cli("nanogpt.train", "init_from=out", "model=shakespeare_char", *data, "hydra.run.dir=mis", cwd=cwd)
    assert_one_line_error(mismatch, "set model.n_layer=2 model.n_head=4 model.n_embd=64 model.block_size=64")
    assert not (cwd / "mis").exists()
    sampled = run_cli("nanogpt.sample", "init_from=out", "prompt=ROMEO:", "num_samples=1", "max_new_tokens=5", cwd=cwd)
    assert sampled.returncode == 0 and sampled.stdout.startswith("ROMEO:"), sampled.stderr


# --- case 19: same seed, same text ---------------------------------------------------------------------


def test_same_seed_same_text_as_nanogpts_sample_py(workspace):
    """nanoGPT's sample.py --seed=1337 --num_samples=2 --max_new_tokens=100 --start="ROMEO:" (its
    temperature 0.8 and top_k 200 are our defaults too), with the prompt read from a file as its
    FILE: does. nanoGPT's sample.py keeps no KV cache: ours draws the same tokens with it and without."""
    from nanogpt.config import SampleConfig
    from nanogpt.sample import sample

    cwd, _ = workspace
    printed = (FIXTURES / "sample_iter30_seed1337.txt").read_text()
    theirs = printed.split("Loading meta from data/shakespeare_char/meta.pkl...\n", 1)[1]
    (cwd / "prompt.txt").write_text("ROMEO:")
    result = run_cli("nanogpt.sample", f"init_from={ITER30}", "prompt=FILE:prompt.txt", "seed=1337", "num_samples=2",
                     "max_new_tokens=100", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == theirs
    uncached = sample(SampleConfig(init_from=str(ITER30), prompt="ROMEO:", num_samples=2, max_new_tokens=100,
                                   kv_cache=False))
    assert "".join(f"{text}\n---------------\n" for text in uncached) == theirs
