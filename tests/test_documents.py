"""data.format=documents (nanogpt/data/documents.py): parquet and jsonl corpora, local or hf://,
tokenized in worker processes into the same tokens as one process gives; a killed prepare
continues to byte-identical files; every mistake in the corpus is one line before anything is written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from conftest import REPO, TINY, assert_one_line_error, require_shakespeare, run_cli
from nanogpt.config import DataConfig, DataFormat
from nanogpt.data import documents
from nanogpt.data.datasets import is_prepared, prepare
from nanogpt.errors import UserError

pq = pytest.importorskip("pyarrow.parquet", reason="the hf extra installs pyarrow (pip install -e '.[hf]')")
pa = pytest.importorskip("pyarrow", reason="the hf extra installs pyarrow (pip install -e '.[hf]')")


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 5-60 consecutive tiny Shakespeare lines, from random places; a few empty or
    non-ASCII ones, as a real corpus has."""
    lines = require_shakespeare().read_text().split("\n")
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        start = rng.randrange(len(lines) - 60)
        docs.append("\n".join(lines[start:start + rng.randrange(5, 60)]))
    docs[3] = ""
    docs[7] = "Ünïcödé — <|endoftext|> is text here, not a special token"
    return docs


def write_parquet(path, docs, row_group_size=700, **extra_columns):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs, **extra_columns}), path,
                   row_group_size=row_group_size)


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, key: doc}) + "\n")


def one_process_tokens(docs, seed=2357, fraction=0.01) -> dict[str, np.ndarray]:
    """The reference: every document encoded on its own in this process, end-of-text after each,
    split by the documented rule (documents.is_val)."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    val = documents.is_val(np.arange(len(docs)), seed, fraction)
    out = {"train": [], "val": []}
    for doc, held_out in zip(docs, val):
        out["val" if held_out else "train"] += enc.encode_ordinary(doc) + [enc.eot_token]
    return {k: np.asarray(v, dtype=np.uint16) for k, v in out.items()}


def config(tmp_path, source, name="out", **kw) -> DataConfig:
    base = dict(name="docs", source=str(source), dir=str(tmp_path / name), format=DataFormat.documents,
                encoding="gpt2", val_fraction=0.01, num_threads=2, chunk_documents=256)
    return DataConfig(**{**base, **kw})


def bins(d) -> dict[str, bytes]:
    return {s: (d / f"{s}.bin").read_bytes() for s in ("train", "val")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~2.4M GPT-2 tokens in 12,000 documents, as parquet (several row groups), and the tokens one process gives."""
    require_shakespeare()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken_cache"))
    d = tmp_path_factory.mktemp("corpus")
    docs = make_documents(12_000)
    write_parquet(d / "corpus.parquet", docs)
    return d, docs, one_process_tokens(docs)


def test_parquet_in_worker_processes_gives_the_tokens_of_one_process(tmp_path, corpus, gpt2_tiktoken):
    d, docs, expected = corpus
    meta = prepare(config(tmp_path, d / "corpus.parquet"))
    got = bins(tmp_path / "out")
    for split in ("train", "val"):
        assert got[split] == expected[split].tobytes(), split
    assert meta["train_tokens"] + meta["val_tokens"] > 2_000_000
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert 0.005 < meta["val_documents"] / len(docs) < 0.02  # ~val_fraction of the documents, held out whole
    assert meta["format"] == "documents" and meta["text_column"] == "text" and meta["source_files"][0]["sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".prepare.lock", ".readers.lock", "meta.json", "train.bin", "val.bin"]  # no .partial or .progress.json left
    again = prepare(config(tmp_path, d / "corpus.parquet"))  # a cache like any data dir: used, not redone
    assert again["created"] == meta["created"]


def test_jsonl_and_a_glob_of_mixed_files_give_the_same_tokens(tmp_path, corpus, gpt2_tiktoken):
    d, docs, expected = corpus
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", docs[:5000])
    (src / "a.jsonl").write_text((src / "a.jsonl").read_text().replace("\n", "\n\n", 3))  # blank lines: no documents
    write_parquet(src / "b.parquet", docs[5000:9000], row_group_size=333)
    write_jsonl(src / "c.jsonl", docs[9000:])
    prepare(config(tmp_path, src / "*", chunk_documents=1000))
    assert bins(tmp_path / "out") == {s: expected[s].tobytes() for s in ("train", "val")}
    write_jsonl(tmp_path / "all.jsonl", docs)
    prepare(config(tmp_path, tmp_path / "all.jsonl", name="one", num_threads=1))  # one process, no pool
    assert bins(tmp_path / "one") == bins(tmp_path / "out")


def test_killed_prepare_continues_to_byte_identical_files(tmp_path, corpus, gpt2_tiktoken):
    """A real nanogpt-prepare, SIGKILLed (with its workers) once its progress shows some chunks, is
    no dataset; started again it says it continues, and ends with the files of an uninterrupted one."""
    d, docs, expected = corpus
    out = tmp_path / "out"
    args = ["data=documents", f"data.source={d / 'corpus.parquet'}", f"data.dir={out}", "data.val_fraction=0.01",
            "data.num_threads=2", "data.chunk_documents=64"]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt.prepare", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = 0
    deadline = time.monotonic() + 120
    while chunks < 20 and proc.poll() is None and time.monotonic() < deadline:
        try:
            chunks = json.loads((out / documents.PROGRESS).read_text())["progress"]["chunks"]
        except (OSError, ValueError):  # not there yet, or read mid-rename
            pass
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its pool, as the OOM killer or scancel would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the prepare ended before it could be killed: give it more documents"
    progress = json.loads((out / documents.PROGRESS).read_text())["progress"]
    assert 0 < progress["documents"] < len(docs)
    assert not is_prepared(out) and not (out / "meta.json").exists()
    with open(out / ".train.bin.partial", "ab") as f:  # what a kill mid-chunk leaves beyond the record
        f.write(b"\x01\x02" * 1000)

    result = run_cli("nanogpt.prepare", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    assert f"continuing the interrupted preparation in {out} after {progress['documents']:,} documents" in said
    assert bins(out) == {s: expected[s].tobytes() for s in ("train", "val")}
    assert not (out / documents.PROGRESS).exists() and not list(out.glob("*.partial"))


_encode_chunk = documents.encode_chunk


def _encode_or_die(job):
    """A worker that dies (as the OOM killer leaves it) at the chunk starting at document 768."""
    if job[0] == 768:
        os._exit(9)
    return _encode_chunk(job)


def test_a_worker_that_dies_is_one_line_and_the_prepare_continues(tmp_path, corpus, gpt2_tiktoken, monkeypatch):
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the dying worker is patched in before the pool forks")
    d, docs, expected = corpus
    cfg = config(tmp_path, d / "corpus.parquet")
    monkeypatch.setattr(documents, "encode_chunk", _encode_or_die)  # the workers are forked: they see it
    with pytest.raises(UserError, match="a tokenizer worker process of docs died .*: prepare again to continue"):
        prepare(cfg)
    assert not is_prepared(cfg.dir)
    monkeypatch.undo()
    prepare(cfg)
    assert bins(tmp_path / "out") == {s: expected[s].tobytes() for s in ("train", "val")}


def test_force_starts_an_interrupted_preparation_over(tmp_path, corpus, gpt2_tiktoken, monkeypatch, caplog):
    """force=true means prepare again: a matching interrupted preparation is not continued (its
    .partial tokens, spoiled here, would otherwise stay)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the dying worker is patched in before the pool forks")
    d, _, expected = corpus
    cfg = config(tmp_path, d / "corpus.parquet")
    monkeypatch.setattr(documents, "encode_chunk", _encode_or_die)
    with pytest.raises(UserError):
        prepare(cfg)
    monkeypatch.undo()
    partial = tmp_path / "out" / ".train.bin.partial"
    assert partial.stat().st_size > 0
    partial.write_bytes(b"\0" * partial.stat().st_size)  # what a continued prepare would keep
    with caplog.at_level("INFO", logger="nanogpt"):
        prepare(cfg, force=True)
    assert "starting over" in caplog.text and "force=true starts over" in caplog.text
    assert bins(tmp_path / "out") == {s: expected[s].tobytes() for s in ("train", "val")}


def test_other_data_options_start_over_instead_of_continuing(tmp_path, corpus, gpt2_tiktoken):
    d, docs, _ = corpus
    cfg = config(tmp_path, d / "corpus.parquet")
    out = tmp_path / "out"
    out.mkdir()
    identity = {"source": "something else"}
    documents._save_progress(out, identity, documents.Progress(documents=500, chunks=2, train_tokens=10))
    (out / ".train.bin.partial").write_bytes(b"\0" * 20)
    prepare(replace(cfg, split_seed=1))
    assert bins(out) == {s: a.tobytes() for s, a in one_process_tokens(docs, seed=1).items()}


def test_hub_source_goes_through_the_hub_filesystem(tmp_path, corpus, gpt2_tiktoken, monkeypatch):
    """hf://datasets/... lists and reads files through huggingface_hub's HfFileSystem; offline,
    a local fsspec filesystem stands in for the hub (the only mock: the internet)."""
    from fsspec.implementations.local import LocalFileSystem

    d, docs, expected = corpus
    monkeypatch.setattr(documents, "_hub_fs", LocalFileSystem)
    source = f"hf://{d}/*.parquet"
    meta = prepare(config(tmp_path, source))
    assert bins(tmp_path / "out") == {s: expected[s].tobytes() for s in ("train", "val")}
    assert meta["hub_files"] == [{"path": f"hf://{d}/corpus.parquet", "size": (d / "corpus.parquet").stat().st_size}]
    assert "source_files" not in meta
    assert prepare(config(tmp_path, source))["created"] == meta["created"]  # used again by its spelling


def test_a_run_trains_on_a_prepared_parquet_corpus(tmp_path, corpus, gpt2_tiktoken):
    d, _, _ = corpus
    result = run_cli("nanogpt.train", "data=documents", f"data.source={d / 'corpus.parquet'}",
                     f"data.dir={tmp_path / 'data'}", "data.num_threads=2", *TINY, "max_iters=3", "eval_interval=3",
                     "hydra.run.dir=outputs/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert is_prepared(tmp_path / "data")
    metrics = [json.loads(line) for line in (tmp_path / "outputs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m or "val/loss" in m for m in metrics), metrics[-1]


# ---------------------------------------------------------------------------------------------
# Mistakes: one line each, before anything is written


def test_no_text_column_names_the_columns_and_the_key(tmp_path, gpt2_tiktoken):
    write_parquet(tmp_path / "c.parquet", ["a b c"] * 10)
    pq.write_table(pa.table({"id": [1, 2], "content": ["x", "y"]}), tmp_path / "c.parquet")
    result = run_cli("nanogpt.prepare", "data=documents", "data.source=c.parquet", "data.dir=prepared", cwd=tmp_path)
    assert_one_line_error(result, "c.parquet has no column 'text', its columns are id, content",
                          "set data.text_column=")
    assert not (tmp_path / "prepared").exists()


def test_jsonl_without_the_key_is_one_line(tmp_path, gpt2_tiktoken):
    write_jsonl(tmp_path / "c.jsonl", ["doc one", "doc two"], key="body")
    result = run_cli("nanogpt.prepare", "data=documents", "data.source=c.jsonl", "data.dir=prepared", cwd=tmp_path)
    assert_one_line_error(result, "c.jsonl line 1 has no key 'text' (it has id, body)", "data.text_column=")
    assert not (tmp_path / "prepared").exists()


def test_corpus_mistakes_are_one_line_each(tmp_path, gpt2_tiktoken):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    write_parquet(tmp_path / "empty.parquet", [])
    (tmp_path / "notes.txt").write_text("plain text\n")
    write_jsonl(tmp_path / "late.jsonl", ["ok"] * 5)
    with open(tmp_path / "late.jsonl", "a") as f:
        f.write('{"body": "no text key on line 6"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    write_parquet(tmp_path / "ints.parquet", ["x"], text=[1])  # "text" holds integers
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 but not really parquet")
    cases = {
        "empty.jsonl": "holds no documents",
        "empty.parquet": "holds no documents (its parquet files have 0 rows)",
        "nowhere/*.parquet": "matches no files",
        "*.txt": "notes.txt, neither .parquet nor .jsonl",
        "late.jsonl": "late.jsonl line 6 has no key 'text' (it has body)",
        "bad.jsonl": "bad.jsonl line 2 is not JSON",
        "ints.parquet": "ints.parquet holds int64, not text",
        "broken.parquet": "broken.parquet as parquet (",
    }
    for source, fragment in cases.items():
        out = f"out_{source.replace('*', 'x').replace('/', '_')}"
        with pytest.raises(UserError) as caught:
            prepare(config(tmp_path, tmp_path / source, name=out))
        message = str(caught.value)
        assert fragment in message and "\n" not in message, (source, message)
        if source not in ("late.jsonl", "bad.jsonl"):  # past the first document, a mistake shows once reading gets there
            assert not (tmp_path / out).exists(), source
    few = tmp_path / "few.jsonl"
    write_jsonl(few, ["one document", "two"])
    with pytest.raises(UserError, match="holds 2 documents: too few to hold out"):
        prepare(config(tmp_path, few, name="few"))


def test_documents_need_a_tiktoken_encoding_and_sane_options(tmp_path):
    from nanogpt.errors import ConfigError

    for kw, fragment in [({"encoding": "char"}, "needs a tiktoken encoding"),
                         ({"text_column": " "}, "data.text_column is empty"),
                         ({"chunk_documents": 0}, "data.chunk_documents=0 must be at least 1")]:
        with pytest.raises(ConfigError, match=fragment):
            prepare(config(tmp_path, tmp_path / "x.jsonl", **kw))
    assert not (tmp_path / "out").exists()


def test_the_split_is_deterministic_and_near_the_fraction():
    index = np.arange(200_000)
    val = documents.is_val(index, 2357, 0.01)
    assert np.array_equal(val, documents.is_val(index, 2357, 0.01))
    assert 0.009 < val.mean() < 0.011
    assert not np.array_equal(val, documents.is_val(index, 1, 0.01))
    assert np.array_equal(documents.is_val(index[1000:1500], 2357, 0.01), val[1000:1500])  # by index, not by chunk


def test_skipping_consumed_documents_lands_on_the_next_one(tmp_path):
    """A continued prepare skips what an earlier one consumed: whole files and row groups by their
    counts, the rest row by row (a last row group smaller than the skip included)."""
    docs = [f"document {i}" for i in range(2_050)]
    write_parquet(tmp_path / "a.parquet", docs[:1_000], row_group_size=300)  # groups of 300, 300, 300, 100
    write_jsonl(tmp_path / "b.jsonl", docs[1_000:1_500])
    write_parquet(tmp_path / "c.parquet", docs[1_500:], row_group_size=1_000)
    files = documents.local_files(sorted(tmp_path.iterdir()))
    for skip in (0, 1, 250, 299, 300, 301, 899, 900, 950, 999, 1_000, 1_001, 1_499, 1_500, 1_777, 2_049, 2_050):
        assert list(documents.iter_documents(files, "text", skip, "src")) == docs[skip:], skip


@pytest.mark.slow
def test_prepare_benchmark_prints_its_figures(tmp_path, gpt2_tiktoken, capsys):
    """tests/benchmarks/prepare_documents.py at a small size: throughput against the nanoGPT-style
    preparation, and peak memory at 1x and 2x the corpus, printed (never asserted: a shared CPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "tests" / "benchmarks" / "prepare_documents.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--sizes-mb", "5", "10", "--work-dir", str(tmp_path)])
    with capsys.disabled():
        print("\n" + capsys.readouterr().out)
    assert rows["5MB nanogpt-prepare (documents)"]["tokens"] == rows["5MB nanoGPT prepare.py style"]["tokens"]
