"""Downstream evaluation through EleutherAI's lm-evaluation-harness (docs/evaluation.md).

Our GPT answers lm-eval's three requests as lm-eval's own HuggingFace backend (HFLM) does, on the
same randomly initialised GPT-2 saved with save_pretrained; nanogpt-eval writes a run's results;
eval_tasks=[...] logs task scores during training, into metrics.jsonl and the sweep report. The
tasks are small lm-eval YAML tasks over local JSONL files that the tests write: nothing comes from
the internet (TRANSFORMERS_OFFLINE, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHAKESPEARE, TIKTOKEN_CACHE, assert_one_line_error, report_rows, require_shakespeare, run_cli

OFFLINE = {"TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)

pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval (pip install 'nanogpt[eval]')")

# GPT-2's BPE files, as tiktoken caches them (named by the sha1 of their URL): the same vocabulary
# for HF's tokenizer and for tiktoken
ENCODER_JSON = TIKTOKEN_CACHE / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"
VOCAB_BPE = TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"

CHOICE_DOCS = [
    {"query": "the sun rises in the", "choices": [" east", " west", " sea"], "label": 0},
    {"query": "a cat says", "choices": [" meow", " moo"], "label": 0},
    {"query": "two and two make", "choices": [" four", " five", " three"], "label": 1},
    {"query": "water is", "choices": [" wet", " dry"], "label": 0},
]
TEXT_DOCS = [{"text": "the king is dead. long live the king."}, {"text": "to be or not to be, that is the question."}]
QA_DOCS = [{"question": "question: what colour is the sky?\nanswer:", "answer": " blue"},
           {"question": "question: how many legs has a dog?\nanswer:", "answer": " four"}]


def write_tasks(where):
    """Three lm-eval tasks on local files, one per request type: multiple choice (loglikelihood),
    perplexity (loglikelihood_rolling) and a generation with a stop string (generate_until)."""
    where.mkdir(parents=True, exist_ok=True)
    for name, docs in (("choice", CHOICE_DOCS), ("text", TEXT_DOCS), ("qa", QA_DOCS)):
        (where / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def task(name: str, data: str, body: str) -> None:
        (where / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {where / data}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")

    task("tinychoice", "choice.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{query}}"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n'
         '  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n'
         '  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n')
    task("tinytext", "text.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
    task("tinyqa", "qa.jsonl", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
         'metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n')
    return where


# --- our LM against lm-eval's HuggingFace backend, on the same random GPT-2 ---


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory):
    """(HFLM on a random transformers GPT2LMHeadModel, our GPTLM on the same weights loaded from
    its save_pretrained dir as nanogpt-eval loads them). The full GPT-2 vocabulary, so that HF's
    tokenizer and tiktoken read the same BPE files; a 64-token context, so that long requests
    are truncated and rolled."""
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
    pytest.importorskip("accelerate", reason="the dev extra installs accelerate (lm-eval's HFLM needs it)")
    if not ENCODER_JSON.is_file():
        pytest.skip(f"needs tiktoken's GPT-2 files in {TIKTOKEN_CACHE} (shared/ is absent)")
    import torch
    from lm_eval.models.huggingface import HFLM

    from nanogpt.evals.lm import GPTLM
    from nanogpt.sample import load_model

    hf_dir = tmp_path_factory.mktemp("gpt2-random")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(hf_dir)
    hf_tokenizer = transformers.GPT2TokenizerFast(vocab=str(ENCODER_JSON), merges=str(VOCAB_BPE))
    theirs = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=4, device="cpu")
    model, _, tokenizer = load_model(str(hf_dir), "best", None, "cpu")
    ours = GPTLM(model, tokenizer, "cpu", batch_size=3)  # another batching: the numbers must not depend on it
    return theirs, ours


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # ~110 tokens: past the 64-token context


def test_loglikelihoods_equal_lm_eval_hf_backend(both_backends, capsys):
    theirs, ours = both_backends
    greedy = theirs.generate_until(instances("generate_until", [("Once upon a time", {"until": ["zzz"],
                                                                                       "max_gen_toks": 3})]))[0]
    requests = instances("loglikelihood", [
        ("The cat sat on the", " mat"), ("Hello,", " world and more"), ("A question: ", "an answer."),
        (LONG, " end of it"),  # the context cut from the left to fit the 64 positions
        ("", "Empty context here"),  # the end-of-text token stands in for the context
        ("Once upon a time", greedy),  # what greedy decoding writes: is_greedy
    ])
    expected, got = theirs.loglikelihood(requests), ours.loglikelihood(requests)
    diff = max(abs(a[0] - b[0]) for a, b in zip(expected, got))
    assert diff < 1e-4, (expected, got)
    assert [g for _, g in got] == [g for _, g in expected] == [False] * 5 + [True]

    rolling = instances("loglikelihood_rolling", [("short text.",), (LONG,), (LONG + " and then some more words",)])
    expected_r, got_r = theirs.loglikelihood_rolling(rolling), ours.loglikelihood_rolling(rolling)
    diff_r = max(abs(a - b) for a, b in zip(expected_r, got_r))
    assert diff_r < 1e-4, (expected_r, got_r)
    with capsys.disabled():
        print(f"\n[lm-eval parity] max |ours - HFLM|: loglikelihood {diff:.1e}, loglikelihood_rolling {diff_r:.1e}")


def test_generate_until_writes_what_hf_greedy_writes_up_to_the_stop_string(both_backends):
    theirs, ours = both_backends
    free = ours.generate_until(instances("generate_until", [("Once upon a time", {"until": ["zzz"], "max_gen_toks": 10})]))[0]
    assert len(ours.tok_encode(free)) == 10  # no stop string seen: max_gen_toks tokens
    stop = free.split()[2]  # a word it writes: the text ends before it
    requests = instances("generate_until", [
        ("Once upon a time", {"until": [stop], "max_gen_toks": 10, "do_sample": False}),
        ("The answer is", {"until": ["\n"], "max_gen_toks": 5}),
    ])
    got = ours.generate_until(requests)
    assert got == theirs.generate_until(requests)
    assert got[0] == free[: free.index(stop)] and stop not in got[0]


# --- nanogpt-eval on a trained run, and the tasks during training ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model trained 4 steps with eval_tasks=[tinychoice] at every evaluation (steps 0,
    2, 4), and the same run without eval_tasks."""
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("eval-run")
    tasks = write_tasks(cwd / "tasks")
    common = [f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", "model.n_layer=1", "model.n_embd=32",
              "model.n_head=2", "model.block_size=64", "max_iters=4", "eval_interval=2", "eval_iters=1",
              "optim.warmup_iters=0", "batch_size=4", "hardware=cpu", "hardware.peak_flops=1e11"]
    runs = cwd / "runs"
    with_tasks = run_cli("nanogpt.train", *common, "eval_tasks=[tinychoice]", f"eval_tasks_include_path={tasks}",
                         "eval_tasks_limit=3", f"hydra.run.dir={runs / 'with_tasks'}", cwd=cwd)
    assert with_tasks.returncode == 0, with_tasks.stderr[-3000:]
    without = run_cli("nanogpt.train", *common, f"hydra.run.dir={runs / 'without'}", cwd=cwd)
    assert without.returncode == 0, without.stderr[-3000:]
    return cwd, tasks, runs


def evals(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


@pytest.mark.slow  # shares a fixture that trains two tiny runs (~25 s)
def test_tasks_during_training_join_the_eval_records_and_leave_training_as_it_was(trained):
    _, _, runs = trained
    records = evals(runs / "with_tasks")
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        assert 0.0 <= r["tinychoice/acc"] <= 1.0 and 0.0 <= r["tinychoice/acc_norm"] <= 1.0, r
    # lm-eval seeds the global generators; they are put back: training draws the same batches
    assert [r["val_loss"] for r in records] == [r["val_loss"] for r in evals(runs / "without")]


@pytest.mark.slow  # shares a fixture that trains two tiny runs (~25 s)
def test_the_report_shows_the_task_scores_as_columns(trained):
    cwd, _, runs = trained
    result = run_cli("nanogpt.sweeps.report", str(runs), cwd=cwd)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| job "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[-2:] == ["eval/tinychoice/acc", "eval/tinychoice/acc_norm"]
    rows = {row[0]: row for row in report_rows(result.stdout)}
    final = evals(runs / "with_tasks")[-1]
    assert float(rows["with_tasks"][-2]) == pytest.approx(final["tinychoice/acc"], abs=1e-4)
    assert rows["without"][-2:] == ["-", "-"]


@pytest.mark.slow  # shares a fixture that trains two tiny runs (~25 s)
def test_nanogpt_eval_on_a_run_dir_writes_results_and_table(trained):
    cwd, tasks, runs = trained
    run_dir = runs / "with_tasks"
    result = run_cli("nanogpt.evaluate", str(run_dir), "tasks=[tinychoice,tinytext,tinyqa]", "limit=2",
                     f"tasks_include_path={tasks}", "checkpoint=last", "hardware=cpu", "bootstrap_iters=0", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = (run_dir / "eval").glob("results_*.json")
    results = json.loads(json_path.read_text())
    assert set(results["results"]) == {"tinychoice", "tinytext", "tinyqa"}
    assert 0.0 <= results["results"]["tinychoice"]["acc,none"] <= 1.0
    assert results["results"]["tinytext"]["word_perplexity,none"] > 1.0
    assert results["results"]["tinyqa"]["exact_match,none"] in (0.0, 0.5, 1.0)
    ours = results["nanogpt"]
    assert ours["step"] == 4 and ours["limit"] == 2 and ours["tasks"] == ["tinychoice", "tinytext", "tinyqa"]
    assert ours["lm_eval_version"] == __import__("lm_eval").__version__
    table = json_path.with_suffix(".md").read_text()
    assert "tinychoice" in table and "word_perplexity" in table and table.strip() in result.stdout


# --- user mistakes: one line, exit status 2, before any model is loaded ---


@pytest.mark.slow  # lm-eval indexes its thousands of task configs (~10 s) to know the names
def test_an_unknown_task_is_one_line_naming_the_close_match(tmp_path):
    result = run_cli("nanogpt.evaluate", "gpt2", "tasks=[hellaswg]", cwd=tmp_path)
    line = assert_one_line_error(result, "lm-eval knows no task hellaswg", "did you mean hellaswag", "tasks_include_path=DIR")
    assert "eval_tasks_include_path" not in line
    # in training, before the run dir exists, naming training's own key
    result = run_cli("nanogpt.train", "eval_tasks=[hellaswg]", "max_iters=1", cwd=tmp_path)
    assert_one_line_error(result, "lm-eval knows no task hellaswg", "eval_tasks_include_path=DIR")
    assert not (tmp_path / "outputs").exists()


def test_a_limit_below_one_is_one_line(tmp_path):
    result = run_cli("nanogpt.evaluate", "source=gpt2", "tasks=[hellaswag]", "limit=0", cwd=tmp_path)
    assert_one_line_error(result, "limit=0 must be a positive number")
    result = run_cli("nanogpt.train", "eval_tasks=[hellaswag]", "eval_tasks_limit=-1", "max_iters=1", cwd=tmp_path)
    assert_one_line_error(result, "eval_tasks_limit=-1 must be a positive number")


def test_without_lm_eval_one_line_names_the_extra(tmp_path):
    # lm_eval made unimportable, as in an install without the eval extra
    code = ("import sys; sys.modules['lm_eval'] = None; sys.argv = ['nanogpt-eval', 'gpt2', 'tasks=[hellaswag]']\n"
            "from nanogpt.evaluate import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line_error(result, "pip install 'nanogpt[eval]'")
