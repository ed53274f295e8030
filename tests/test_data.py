"""Data preparation, tokenizers and batches, on the real tiny Shakespeare and real tiktoken files.

The exact token counts are those of nanoGPT's data/shakespeare_char/prepare.py and
data/shakespeare/prepare.py on the same input.txt.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose, run_cli
from nanogpt.config import DataConfig, DataFormat
from nanogpt.data import tokenizer as tok
from nanogpt.data.batches import RandomWindows
from nanogpt.data.datasets import ensure_prepared, is_prepared, load_meta, prepare, token_dtype
from nanogpt.errors import ConfigError, UserError

FILES = ("train.bin", "val.bin", "meta.json")


def data_config(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(name="test", source=str(source), dir=str(tmp_path / "data"), **kw)


def read_bin(path, meta) -> np.ndarray:
    return np.fromfile(path, dtype=meta["dtype"])


def leftovers(d) -> list[str]:
    """What a data dir holds besides the (empty, permanent) lock files: one serializes prepares, one
    is held by the runs that read the dir."""
    return sorted(p.name for p in d.iterdir() if p.name not in (".prepare.lock", ".readers.lock")) if d.exists() else []


# ---------------------------------------------------------------------------------------------
# The two Shakespeare datasets, exactly as nanoGPT prepares them


def test_shakespeare_char_matches_nanogpt(tmp_path, shakespeare_path):
    meta = prepare(data_config(tmp_path, shakespeare_path, encoding="char"))
    out = tmp_path / "data"
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["format_version"] == 1 and on_disk["encoding"] == "char" and on_disk["dtype"] == "uint16"
    assert on_disk["format"] == "text" and on_disk["source"] == str(shakespeare_path) and "eot_token" not in on_disk
    assert "T" in on_disk["created"]

    # nanoGPT's own recipe: sorted characters, first 90% of the characters for train
    data = shakespeare_path.read_text()
    chars = sorted(set(data))
    assert on_disk["chars"] == chars
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(data) * 0.9)
    assert np.array_equal(read_bin(out / "train.bin", meta), np.array([stoi[c] for c in data[:n]], dtype=np.uint16))
    assert np.array_equal(read_bin(out / "val.bin", meta), np.array([stoi[c] for c in data[n:]], dtype=np.uint16))
    assert tok.from_meta(meta).decode(read_bin(out / "val.bin", meta)[:50].tolist()) == data[n : n + 50]


def test_shakespeare_gpt2_through_hydra_matches_nanogpt(tmp_path, shakespeare_path, gpt2_tiktoken):
    out = tmp_path / "shakespeare"
    cfg = compose("prepare", ["data=shakespeare", f"data.source={shakespeare_path}", f"data.dir={out}"])
    config = OmegaConf.to_object(cfg)
    assert config.force is False and config.data.encoding == "gpt2"
    meta = prepare(config.data, force=config.force)
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    assert (meta["encoding"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert "chars" not in meta

    import tiktoken

    data = shakespeare_path.read_text()
    n = int(len(data) * 0.9)
    expected = tiktoken.get_encoding("gpt2").encode_ordinary(data[:n])
    assert read_bin(out / "train.bin", meta).tolist() == expected


def test_ensure_prepared_reuses_and_checks_the_existing_dataset(tmp_path, shakespeare_path):
    cfg = data_config(tmp_path, shakespeare_path)
    out = tmp_path / "data"
    assert not is_prepared(out)
    meta = ensure_prepared(cfg)
    stamps = {f: (out / f).stat().st_mtime_ns for f in FILES}
    assert ensure_prepared(cfg) == meta == load_meta(out)
    assert prepare(cfg) == meta  # force=False: nothing is redone
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == stamps

    with pytest.raises(ConfigError, match=r"tokenized with char, but data.encoding=gpt2"):
        ensure_prepared(data_config(tmp_path, shakespeare_path, encoding="gpt2"))

    with open(out / "val.bin", "r+b") as f:  # a truncated copy
        f.truncate(100)
    with pytest.raises(UserError, match=r"val.bin has 100 bytes, not the 111540 uint16 tokens"):
        ensure_prepared(cfg)
    assert prepare(cfg, force=True)["val_tokens"] == 111_540


def test_load_meta_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(UserError, match=r"meta.json does not exist: prepare the dataset first"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 2}')
    with pytest.raises(UserError, match=r"format_version=2, this nanogpt reads 1"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 1, "encoding": "gpt2"}')
    with pytest.raises(UserError, match=r"lacks vocab_size, dtype, train_tokens, val_tokens"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match=r"meta.json is not valid JSON \(.* at line 1, column 2\): re-prepare"):
        load_meta(tmp_path)


def test_dtype_follows_the_vocabulary_size(tmp_path):
    assert token_dtype(65) == token_dtype(50257) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(200019) == "uint32"

    # A char vocabulary of 70,000 characters needs uint32 tokens, end to end.
    chars = [chr(c) for c in range(0x10000, 0x10000 + 70_000)]
    (tmp_path / "wide.txt").write_text("".join(chars) * 2, encoding="utf-8")
    meta = prepare(data_config(tmp_path, tmp_path / "wide.txt"))
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    train = read_bin(tmp_path / "data" / "train.bin", meta)
    assert len(train) == meta["train_tokens"] == int(140_000 * 0.9) and train.max() == 69_999
    x, y = RandomWindows(tmp_path / "data" / "train.bin", meta["dtype"], 64, 4, "cpu", seed=0).next_batch()
    assert x.dtype == torch.int64 and int(x.max()) < 70_000


def test_text_dataset_from_a_glob_of_files(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file, no newline at the end")
    (tmp_path / "notes.md").write_text("not matched")
    cfg = compose("prepare", ["data=text", f"data.source={tmp_path}/*.txt", f"data.dir={tmp_path}/out"])
    meta = prepare(OmegaConf.to_object(cfg).data)

    # sorted order, every file ending in a newline, a blank line between files
    expected = "first file, no newline at the end\n\nsecond file\n"
    assert meta["name"] == "text" and meta["vocab_size"] == len(set(expected))
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    ids = np.concatenate([read_bin(tmp_path / "out" / f"{s}.bin", meta) for s in ("train", "val")])
    assert tok.from_meta(meta).decode(ids.tolist()) == expected


def test_relative_source_is_relative_to_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("to be or not to be\n" * 10)
    monkeypatch.chdir(tmp_path)
    meta = prepare(DataConfig(name="t", source="corpus.txt", dir="rel/data"))
    assert meta["train_tokens"] + meta["val_tokens"] == 190
    assert is_prepared(tmp_path / "rel" / "data")


def test_concurrent_prepares_of_one_dir_tokenize_once(tmp_path, shakespeare_path, caplog):
    """The jobs of a sweep (or the ranks of a run) all ask for the same missing dataset."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = data_config(tmp_path, shakespeare_path)
    with caplog.at_level("INFO", logger="nanogpt.data.datasets"), ThreadPoolExecutor(4) as pool:
        metas = list(pool.map(lambda _: ensure_prepared(cfg), range(4)))
    assert all(m == metas[0] for m in metas) and metas[0]["train_tokens"] == 1_003_854
    assert sum(r.getMessage().startswith("prepared test in") for r in caplog.records) == 1
    assert leftovers(tmp_path / "data") == sorted(FILES)


# ---------------------------------------------------------------------------------------------
# format=hf, on small datasets saved to disk as OpenWebText would be downloaded

DOCS = [f"Document {i}: {'lorem ipsum ' * (i % 5)}the end.\n" for i in range(20)]


@pytest.mark.parametrize("as_dict", [False, True], ids=["Dataset", "DatasetDict"])
def test_hf_dataset_split_by_document_with_eot(tmp_path, monkeypatch, gpt2_tiktoken, as_dict):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    import tiktoken

    docs = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    saved = datasets.DatasetDict({"train": docs}) if as_dict else docs
    saved.save_to_disk(str(tmp_path / "hf"))
    cfg = data_config(tmp_path, tmp_path / "hf", format=DataFormat.hf, encoding="gpt2", val_fraction=0.25)
    meta = prepare(cfg)

    enc = tiktoken.get_encoding("gpt2")
    expected = docs.train_test_split(test_size=0.25, seed=cfg.split_seed, shuffle=True)  # nanoGPT's split
    for split, part in (("train", expected["train"]), ("val", expected["test"])):
        ids = read_bin(tmp_path / "data" / f"{split}.bin", meta).tolist()
        assert ids == [t for text in part["text"] for t in enc.encode_ordinary(text) + [enc.eot_token]]
        assert meta[f"{split}_tokens"] == len(ids)
    assert meta["format"] == "hf" and meta["split_seed"] == 2357 and meta["eot_token"] == 50256
    assert len(expected["test"]) == 5


@pytest.mark.slow
def test_hf_dataset_tokenized_in_worker_processes(tmp_path, gpt2_tiktoken):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    docs = [f"doc {i} " + "word " * (i % 50) for i in range(3000)]  # enough documents for 2 processes
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    cfg = data_config(tmp_path, tmp_path / "hf", format=DataFormat.hf, encoding="gpt2", val_fraction=0.01,
                      num_threads=2)
    meta = prepare(cfg)
    gpt2 = tok.TiktokenTokenizer("gpt2")
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(gpt2.encode(d)) + 1 for d in docs)
    val = read_bin(tmp_path / "data" / "val.bin", meta)
    assert (val == 50256).sum() == 30 and val[-1] == 50256


def test_hf_dataset_errors(tmp_path, gpt2_tiktoken):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    datasets.Dataset.from_dict({"body": ["no text column"] * 4}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"has no 'text' column, only \['body'\]"):
        prepare(data_config(tmp_path, tmp_path / "hf", format=DataFormat.hf, encoding="gpt2"))
    with pytest.raises(ConfigError, match="data.format=hf needs a tiktoken encoding"):
        prepare(data_config(tmp_path, tmp_path / "hf", format=DataFormat.hf, encoding="char"))
    assert not is_prepared(tmp_path / "data")


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_chunked_encoding_equals_whole_text_on_shakespeare(shakespeare_path, gpt2_tiktoken):
    text = shakespeare_path.read_text()
    gpt2 = tok.TiktokenTokenizer("gpt2")
    cuts = tok.split_points(text, 20_000)
    assert len(cuts) > 40
    whole = np.asarray(gpt2.encode(text), dtype=np.uint32)
    assert np.array_equal(tok.encode_large(gpt2, text, num_threads=2, chunk_chars=20_000), whole)
    assert np.array_equal(tok.encode_large(gpt2, text, num_threads=2), whole)  # one chunk: one call

    chars = tok.CharTokenizer.from_text(text)
    assert tok.encode_large(chars, text).tolist() == chars.encode(text)


def test_chunked_encoding_is_exact_on_tricky_whitespace(gpt2_tiktoken):
    gpt2 = tok.TiktokenTokenizer("gpt2")
    # a naive cut inside "\n\n" changes the tokens: "\n\n" is one GPT-2 token
    assert gpt2.encode("a\n") + gpt2.encode("\n b") != gpt2.encode("a\n\n b")

    rng = random.Random(0)
    pieces = ["word", "Word", "it's", "42", "3.14", ".", ",", "!?", " ", "  ", "\t", "\n", "\n\n", "\n ", " \n",
              "\r\n", "\u00a0", "\u3000", "é", "日本", "<|endoftext|>", "   \n\n  "]
    text = "".join(rng.choice(pieces) for _ in range(20_000)) + "  \n \n"
    cuts = tok.split_points(text, 50)
    assert len(cuts) > 100
    for c in cuts:  # each cut follows a lone newline between two non-space characters
        assert text[c - 1] == "\n" and not text[c - 2].isspace() and not text[c].isspace()
    assert tok.encode_large(gpt2, text, num_threads=2, chunk_chars=50).tolist() == gpt2.encode(text)

    assert tok.split_points("x" * 1000, 50) == []  # no safe cut: one chunk
    assert tok.split_points("ab\ncd\nef", 2) == [3, 6]


def test_char_tokenizer():
    t = tok.CharTokenizer.from_text("hello world")
    assert t.vocab_size == 8 and t.chars == sorted(set("hello world")) and t.eot_token is None
    assert t.decode(t.encode("low")) == "low"
    with pytest.raises(UserError, match=r"character 'z' is not in the 8-character vocabulary"):
        t.encode("zoo")
    with pytest.raises(UserError, match=r"character 'z' is not in"):
        t.encode_array("hello zoo")
    with pytest.raises(UserError, match="twice"):
        tok.CharTokenizer(["a", "a"])
    assert tok.from_meta(t.meta()).chars == t.chars
    with pytest.raises(UserError, match="vocab_size=9"):
        tok.from_meta({**t.meta(), "vocab_size": 9})


def test_tiktoken_tokenizer_and_errors(tmp_path, monkeypatch, gpt2_tiktoken):
    t = tok.load("gpt2")
    assert (t.name, t.vocab_size, t.eot_token) == ("gpt2", 50257, 50256)
    # ordinary text: the special token's spelling is encoded as plain text, never as eot
    assert 50256 not in t.encode("<|endoftext|>") and t.decode(t.encode("Hi <|endoftext|>")) == "Hi <|endoftext|>"
    with pytest.raises(UserError, match=r"unknown tokenizer encoding 'gpt3'.*cl100k_base"):
        tok.TiktokenTokenizer("gpt3")

    # no network: an empty cache and a proxy that refuses connections (a real failed request)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match=r"could not load the tiktoken encoding 'cl100k_base'.*TIKTOKEN_CACHE_DIR"):
        tok.TiktokenTokenizer("cl100k_base")


# ---------------------------------------------------------------------------------------------
# nanoGPT's meta.pkl, read without executing anything


def write_nanogpt_char_dir(d, text="hello world\n"):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "meta.pkl", "wb") as f:  # what nanoGPT's data/shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    ids[:9].tofile(d / "train.bin")
    ids[9:].tofile(d / "val.bin")
    return chars


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_nanogpt_meta_pkl_is_converted(tmp_path):
    chars = write_nanogpt_char_dir(tmp_path / "nanogpt")
    meta = tok.meta_from_nanogpt_pickle(tmp_path / "nanogpt" / "meta.pkl")
    assert (meta["encoding"], meta["chars"], meta["vocab_size"], meta["dtype"]) == ("char", chars, len(chars), "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (9, 3)

    # a nanoGPT data dir works as a prepared dataset; its meta.json is written on first use
    cfg = DataConfig(name="nanogpt", source="unused", dir=str(tmp_path / "nanogpt"))
    assert is_prepared(cfg.dir) and ensure_prepared(cfg)["chars"] == chars
    assert json.loads((tmp_path / "nanogpt" / "meta.json").read_text())["chars"] == chars
    assert tok.convert_nanogpt_meta(tmp_path / "nanogpt" / "meta.pkl")["chars"] == chars  # kept as it is
    assert tok.load(str(tmp_path / "nanogpt")).decode([0, 1]) == "".join(chars[:2])
    assert tok.load(str(tmp_path / "nanogpt" / "meta.pkl")).chars == chars
    assert tok.load(str(tmp_path / "nanogpt" / "meta.json")).chars == chars

    # a meta.json for another vocabulary is never overwritten
    (tmp_path / "nanogpt" / "meta.json").write_text(json.dumps({"format_version": 1, "encoding": "gpt2"}))
    with pytest.raises(UserError, match="different vocabulary"):
        tok.convert_nanogpt_meta(tmp_path / "nanogpt" / "meta.pkl")


def test_nanogpt_meta_pkl_in_a_read_only_dir(tmp_path, monkeypatch):
    """A meta.pkl on a read-only filesystem still loads; nothing is written. Root (as here and in
    CI) writes through chmod, so the write fails the way a read-only mount makes it fail."""
    import errno

    chars = write_nanogpt_char_dir(tmp_path / "ro")

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tok, "write_json_atomic", read_only)
    assert tok.convert_nanogpt_meta(tmp_path / "ro" / "meta.pkl")["chars"] == chars
    assert not (tmp_path / "ro" / "meta.json").exists()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (os.system, "posix.system" if os.name == "posix" else "nt.system"),
        (Evil(), "posix.system" if os.name == "posix" else "nt.system"),
        ({"vocab_size": 1, "itos": __import__("collections").OrderedDict({0: "a"})}, "collections.OrderedDict"),
        ({"itos": {0: "a"}, "extra": DataConfig(name="x", source="y", dir="z")}, "nanogpt.config.DataConfig"),
    ],
    ids=["function", "reduce-to-os.system", "OrderedDict", "class-instance"],
)
def test_meta_pkl_with_any_global_is_refused(tmp_path, monkeypatch, payload, refused):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match=rf"refuses to unpickle {refused}"):
        tok.meta_from_nanogpt_pickle(tmp_path / "meta.pkl")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def counting_bin(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def test_random_windows_are_shifted_windows_of_the_file(counting_bin):
    windows = RandomWindows(counting_bin, "uint16", block_size=16, batch_size=8, device="cpu", seed=1)
    assert windows.num_tokens == 1000
    for _ in range(20):
        x, y = windows.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # consecutive tokens, and y is x shifted by one
        assert torch.equal(x, x[:, :1] + torch.arange(16))
        assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_random_windows_are_seeded_independent_and_resumable(counting_bin):
    def make(seed):
        return RandomWindows(counting_bin, "uint16", block_size=8, batch_size=4, device="cpu", seed=seed)

    a, b = make(7), make(7)
    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    assert all(torch.equal(a.next_batch()[0], b.next_batch()[0]) for _ in range(5))
    assert torch.equal(torch.rand(3), expected_global)  # the global RNG is untouched
    assert not torch.equal(make(8).next_batch()[0], make(7).next_batch()[0])

    # draw 3, save, draw 2; a fresh object restored from the save draws the same 2
    stream = make(3)
    for _ in range(3):
        stream.next_batch()
    state = stream.state_dict()
    after = [stream.next_batch() for _ in range(2)]
    restored = make(12345)
    restored.load_state_dict(state)
    for x, y in after:
        rx, ry = restored.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)

    # the state survives a checkpoint round trip with weights_only loading
    buf = __import__("io").BytesIO()
    torch.save(make(3).state_dict(), buf)
    buf.seek(0)
    again = make(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.next_batch()[0], make(3).next_batch()[0])


def test_random_windows_need_more_tokens_than_block_size(tmp_path):
    np.arange(8, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(UserError) as e:
        RandomWindows(tmp_path / "val.bin", "uint16", block_size=8, batch_size=2, device="cpu", seed=0)
    assert str(e.value) == "val.bin holds 8 tokens, fewer than block_size+1 = 9: lower block_size or use more data"
    x, y = RandomWindows(tmp_path / "val.bin", "uint16", block_size=7, batch_size=2, device="cpu", seed=0).next_batch()
    assert x[0].tolist() == list(range(7)) and y[0].tolist() == list(range(1, 8))  # the one window there is


# ---------------------------------------------------------------------------------------------
# Clear errors, and nothing half-written


def test_missing_empty_and_odd_sources(tmp_path):
    with pytest.raises(UserError, match=r"data.source=.*nope.txt does not exist"):
        prepare(data_config(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"data.source=.*\*.txt matches no files"):
        prepare(data_config(tmp_path, tmp_path / "*.txt"))
    with pytest.raises(UserError, match=r"is a directory: give a file, or a glob"):
        prepare(data_config(tmp_path, tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"data.source=.*empty.txt is empty"):
        prepare(data_config(tmp_path, tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(UserError, match=r"holds 1 characters: too few to split"):
        prepare(data_config(tmp_path, tmp_path / "one.txt"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"data.source=.*latin1.txt is not UTF-8 text \(unexpected end of data: byte 0xe9 at offset 3"):
        prepare(data_config(tmp_path, tmp_path / "latin1.txt"))
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.5 must be between 0 and 1"):
        prepare(data_config(tmp_path, tmp_path / "one.txt", val_fraction=1.5))
    assert leftovers(tmp_path / "data") == []


def test_unreachable_url_is_a_user_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError) as e:
        prepare(data_config(tmp_path, "http://127.0.0.1:9/x"))
    message = str(e.value)
    assert message.startswith("could not download http://127.0.0.1:9/x (")
    assert message.endswith("check the network, or set data.source to a local copy")
    assert leftovers(tmp_path / "data") == []


def test_interrupted_prepare_leaves_no_dataset(tmp_path, shakespeare_path, monkeypatch):
    """A prepare that fails keeps the old dataset whole until every new file is written; one that
    dies while it swaps them in leaves no dataset, never old meta beside new tokens."""
    import nanogpt.data.datasets

    cfg = data_config(tmp_path, shakespeare_path)
    out = tmp_path / "data"
    prepare(cfg)
    before = {f: (out / f).read_bytes() for f in FILES}
    # a re-prepare that fails before writing (here: a typo in the source) keeps the dataset
    with pytest.raises(UserError, match="does not exist"):
        prepare(data_config(tmp_path, tmp_path / "typo.txt"), force=True)
    assert is_prepared(out) and ensure_prepared(cfg)["val_tokens"] == 111_540

    real_encode = nanogpt.data.datasets.encode_large
    calls = []

    def interrupted_on_val(tokenizer, text, **kw):  # Ctrl-C after train.bin is written
        calls.append(len(text))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(tokenizer, text, **kw)

    monkeypatch.setattr(nanogpt.data.datasets, "encode_large", interrupted_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, force=True)
    assert {f: (out / f).read_bytes() for f in FILES} == before  # no temp files, the old dataset untouched
    monkeypatch.undo()

    real_replace = os.replace

    def interrupted_between_renames(src, dst):
        if str(dst).endswith("val.bin"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(nanogpt.data.datasets.os, "replace", interrupted_between_renames)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, force=True)
    monkeypatch.undo()
    assert leftovers(out) == ["train.bin", "val.bin"] and not is_prepared(out)  # no meta.json: no dataset
    assert ensure_prepared(cfg)["train_tokens"] == 1_003_854


# ---------------------------------------------------------------------------------------------
# The nanogpt-prepare command


def test_prepare_cli_end_to_end(tmp_path, shakespeare_path):
    out = tmp_path / "sc"
    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.source={shakespeare_path}", f"data.dir={out}",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all((out / f).is_file() for f in FILES)
    assert "vocab 65 (char)" in r.stdout and "train 1,003,854 tokens" in r.stdout and "val   111,540 tokens" in r.stdout
    assert leftovers(tmp_path) == ["sc"]  # no outputs/ or .hydra/ of Hydra's

    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.source={shakespeare_path}", f"data.dir={out}",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "already prepared" in r.stdout


def test_prepare_cli_user_error_is_one_line(tmp_path):
    r = run_cli("nanogpt.prepare", "data=text", f"data.source={tmp_path}/missing.txt", f"data.dir={tmp_path}/d",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.source=") and "missing.txt does not exist" in lines[0]
    assert leftovers(tmp_path) == []  # not even the data dir it would have created

    r = run_cli("nanogpt.prepare", "data=text", cwd=tmp_path, timeout=120)  # conf/data/text.yaml: source: ???
    assert r.returncode == 2 and r.stderr.startswith("error: data.source is required") and r.stderr.count("\n") == 1


def test_prepare_module_imports_no_heavy_libraries():
    heavy = ("torch", "tiktoken", "datasets", "numpy")
    code = f"import sys, nanogpt.prepare; print([m for m in {heavy} if m in sys.modules])"
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_prepared_dir_is_not_reused_for_other_data(tmp_path, shakespeare_path):
    """The same data.dir asked for another source or split is an error, not the old data."""
    cfg = DataConfig(name="s", source=str(shakespeare_path), dir=str(tmp_path / "d"), encoding="char")
    prepare(cfg)
    other = tmp_path / "other.txt"
    other.write_text("some other text\n" * 100)
    for changed in (replace(cfg, val_fraction=0.2), replace(cfg, source=str(other))):
        with pytest.raises(ConfigError, match="(was prepared with data.val_fraction=|holds the tokens of data.source=).*force=true"):
            ensure_prepared(changed)
    assert prepare(replace(cfg, val_fraction=0.2), force=True)["val_tokens"] == 223079


def test_prompts_may_name_the_end_of_text_token(gpt2_tiktoken):
    gpt2 = tok.TiktokenTokenizer("gpt2")
    assert gpt2.encode_prompt("<|endoftext|>") == [50256]  # as nanoGPT's sample.py
    assert len(gpt2.encode("<|endoftext|>")) > 1  # data is never special
