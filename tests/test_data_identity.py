"""A data dir is a cache keyed by content: what it was made from is recorded by content and checked
on every use; its tokens are checked against its vocabulary; a prepare never rewrites it under a
live run; and every file a user names is read through one checked reader.

The commands run as a user runs them (real Hydra, real files, real tiny Shakespeare)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, assert_one_line_error, compose, run_cli
from nanogpt.config import DataConfig
from nanogpt.data import tokenizer as tok
from nanogpt.data.datasets import ensure_prepared, load_meta, prepare, scan_bin
from nanogpt.errors import ConfigError, UserError

FILES = ("train.bin", "val.bin", "meta.json")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def snapshot(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in FILES}


def text_of(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    return "".join(" ".join(rng.choice(words, 8)) + "\n" for _ in range(n))


# ---------------------------------------------------------------------------------------------
# Case 10: a cache keyed by spelling


def test_shared_data_cache_never_gives_one_project_anothers_tokens(tmp_path):
    """NANOGPT_DATA shared by two projects, each with its own input.txt: B is refused in one line
    (nothing changes), never trained on A's tokens; a copy of A's text in B is the same data."""
    cache, a, b = tmp_path / "cache", tmp_path / "A", tmp_path / "B"
    for project, seed in ((a, 0), (b, 1)):
        project.mkdir()
        (project / "input.txt").write_text(text_of(300, seed))
    env = {"NANOGPT_DATA": str(cache)}
    args = ("data=text", "data.source=input.txt")
    r = run_cli("nanogpt.prepare", *args, cwd=a, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    before = snapshot(cache / "text")

    r = run_cli("nanogpt.prepare", *args, cwd=b, env=env, timeout=120)
    assert_one_line_error(r, f"data.dir={cache}/text holds the tokens of data.source={a / 'input.txt'}",
                          "other data than data.source=input.txt", f"give data.source={a / 'input.txt'}",
                          "give another data.dir")
    assert snapshot(cache / "text") == before

    (b / "input.txt").write_bytes((a / "input.txt").read_bytes())  # the same text, another file
    r = run_cli("nanogpt.prepare", *args, cwd=b, env=env, timeout=120)
    assert r.returncode == 0 and "already prepared" in r.stdout, r.stderr
    assert snapshot(cache / "text") == before


def test_spellings_of_one_file_are_one_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.txt").write_text(text_of(200, 0))
    meta = prepare(DataConfig(name="t", source="input.txt", dir="d"))
    assert meta["source_files"][0]["path"] == str(tmp_path / "input.txt")  # resolved
    for spelling in ("./input.txt", str(tmp_path / "input.txt"), f"{tmp_path}/../{tmp_path.name}/input.txt"):
        assert ensure_prepared(DataConfig(name="t", source=spelling, dir="d"))["train_sha256"] == meta["train_sha256"]


def test_an_edited_source_is_detected_not_reported_already_prepared(tmp_path):
    src = tmp_path / "input.txt"
    lines = text_of(300, 0).splitlines(keepends=True)
    src.write_text("".join(lines))
    args = ("data=text", f"data.source={src}", f"data.dir={tmp_path / 'd'}")
    assert run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120).returncode == 0

    os.utime(src, ns=(1, 1))  # touched, not changed: still the same data (its new mtime is remembered)
    r = run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "already prepared" in r.stdout, r.stderr
    before = snapshot(tmp_path / "d")
    assert json.loads(before["meta.json"])["source_files"][0]["mtime_ns"] == 1

    lines[0], lines[1] = lines[1], lines[0]  # two lines swapped: the same size
    src.write_text("".join(lines))
    r = run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120)
    assert_one_line_error(r, f"data.source={src} changed since it was prepared into data.dir={tmp_path / 'd'}",
                          "prepare it again", "force=true")
    assert snapshot(tmp_path / "d") == before
    r = run_cli("nanogpt.prepare", *args, "force=true", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "d")
    assert meta["source_sha256"] != json.loads(before["meta.json"])["source_sha256"]


def test_offline_a_dir_prepared_from_a_local_copy_serves_the_default_source(tmp_path, shakespeare_path):
    """conf/data/shakespeare_char.yaml's URL names its content (#sha256=): a dir prepared from a
    local copy of it is that data, so commands without data.source= use it with no download. A
    copy that differs is refused with the fix that works: the data.source it was prepared from."""
    data = tmp_path / "sc"
    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.source={shakespeare_path}", f"data.dir={data}",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_meta(data)["source_sha256"] == SHAKESPEARE_SHA256
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # any download fails
    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.dir={data}", cwd=tmp_path, env=offline, timeout=120)
    assert r.returncode == 0 and "already prepared" in r.stdout, r.stderr

    edited = tmp_path / "my_input.txt"
    edited.write_text(shakespeare_path.read_text().replace("Citizen", "Burgher"))
    other = tmp_path / "other"
    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.source={edited}", f"data.dir={other}",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    r = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.dir={other}", cwd=tmp_path, env=offline, timeout=120)
    assert_one_line_error(r, f"holds the tokens of data.source={edited}", f"give data.source={edited}")


def test_a_url_source_is_checked_against_its_sha256(tmp_path, monkeypatch):
    import nanogpt.data.datasets

    def fake_download(url, dest, timeout=60.0):  # the internet, the one thing mocked
        assert url == "https://example.org/t.txt"  # the #fragment is not sent
        dest.write_text(text_of(200, 0))

    monkeypatch.setattr(nanogpt.data.datasets, "download", fake_download)
    cfg = DataConfig(name="t", source="https://example.org/t.txt", dir=str(tmp_path / "d"))
    meta = prepare(cfg)
    assert meta["source_files"][0]["url"] == "https://example.org/t.txt"
    good = DataConfig(name="t", source=f"{cfg.source}#sha256={meta['source_sha256']}", dir=cfg.dir)
    assert ensure_prepared(good)["train_sha256"] == meta["train_sha256"]
    with pytest.raises(ConfigError, match="other data than data.source=https://example.org/t.txt#sha256=0000"):
        ensure_prepared(DataConfig(name="t", source=f"{cfg.source}#sha256={'0' * 64}", dir=cfg.dir))
    with pytest.raises(UserError, match=f"downloaded with SHA-256 {meta['source_sha256']}, not the {'0' * 64}"):
        prepare(DataConfig(name="t", source=f"{cfg.source}#sha256={'0' * 64}", dir=str(tmp_path / "e")))
    with pytest.raises(ConfigError, match="must be sha256=<the 64 hex digits"):
        prepare(DataConfig(name="t", source=f"{cfg.source}#md5=abc", dir=str(tmp_path / "e")))


# ---------------------------------------------------------------------------------------------
# Checkpoints: a continued run trains on the tokens it started on


@pytest.mark.slow
def test_resume_refuses_changed_data_of_the_same_size(tmp_path):
    src = tmp_path / "input.txt"
    lines = text_of(2000, 0).splitlines(keepends=True)
    src.write_text("".join(lines))
    data_args = ["data=text", f"data.source={src}", f"data.dir={tmp_path / 'd'}"]
    args = [*data_args, *TINY, "eval_interval=2", "hydra.run.dir=run"]
    r = run_cli("nanogpt.train", *args, "max_iters=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines[0], lines[1] = lines[1], lines[0]
    src.write_text("".join(lines))
    assert run_cli("nanogpt.prepare", *data_args, "force=true", cwd=tmp_path, timeout=120).returncode == 0
    provenance = (tmp_path / "run" / "provenance.json").read_bytes()
    r = run_cli("nanogpt.train", *args, "max_iters=4", cwd=tmp_path)
    assert_one_line_error(r, "the dataset differs from the one the run trained on (train_sha256:",
                          "point data.dir/data.source at the run's dataset")
    assert (tmp_path / "run" / "provenance.json").read_bytes() == provenance  # still "done", no start recorded
    assert not (tmp_path / "run" / ".hydra" / "resume-1").exists()  # refused before Hydra wrote this start


@pytest.mark.slow
def test_init_from_weights_with_a_smaller_vocabulary_is_refused_before_the_run_dir(tmp_path, shakespeare_path):
    (tmp_path / "small.txt").write_text(text_of(500, 0))  # 16 characters
    r = run_cli("nanogpt.train", "data=text", "data.source=small.txt", f"data.dir={tmp_path / 'small'}", *TINY,
                "max_iters=2", "eval_interval=2", "hydra.run.dir=small_run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("nanogpt.train", "init_from=small_run", f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'sc'}",
                *TINY, "max_iters=2", "hydra.run.dir=big_run", cwd=tmp_path)
    assert_one_line_error(r, "data=shakespeare_char has 65 tokens but init_from=small_run only 16")
    assert not (tmp_path / "big_run").exists()


# ---------------------------------------------------------------------------------------------
# A prepare never rewrites a dir under a live run


def test_prepare_refuses_while_a_run_reads_the_dir(tmp_path, shakespeare_path):
    data = tmp_path / "d"
    args = ("data=shakespeare_char", f"data.source={shakespeare_path}", f"data.dir={data}", "force=true")
    assert run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120).returncode == 0
    before = snapshot(data)
    killed = data / f".reader.{socket.gethostname()}.4194303"  # left by a run killed with SIGKILL
    killed.write_text("pid 4194303 on this host")
    # what check_data_and_vocab does in every run (preflight), in a process that stays alive
    reader = subprocess.Popen(
        [sys.executable, "-c", f"from nanogpt.data.datasets import hold_for_reading; hold_for_reading({str(data)!r}); "
                               f"print('reading', flush=True); import sys; sys.stdin.read()"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        r = run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120)
        assert_one_line_error(r, f"data.dir={data} is being read by a live run (pid {reader.pid} on ",
                              "wait until the run ends, or prepare into another data.dir")
        assert "4194303" not in r.stderr  # a dead run's note is not a reader
        assert snapshot(data) == before
    finally:
        reader.communicate("", timeout=30)
    assert list(data.glob(".reader.*")) == [killed]  # its note goes with it
    assert run_cli("nanogpt.prepare", *args, cwd=tmp_path, timeout=120).returncode == 0
    assert not killed.exists()  # a prepare that holds the dir clears the notes of killed runs


def test_every_run_holds_its_data_dir(tmp_path, shakespeare_path):
    from nanogpt.data import datasets as data_module
    from nanogpt.runs.preflight import check_data_and_vocab, to_train_config

    config = to_train_config(compose("train", [f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'd'}"]))
    check_data_and_vocab(config)
    assert (tmp_path / "d").resolve() in data_module._reading


# ---------------------------------------------------------------------------------------------
# Case 11: token ids beyond the vocabulary


def write_nanogpt_dir(d: Path, vocab: int, top_id: int) -> None:
    """A data dir as nanoGPT's prepare.py writes one (meta.pkl, uint16 bins), with bins that hold
    ids up to top_id whatever the vocabulary says."""
    d.mkdir(parents=True)
    chars = [chr(ord("a") + i) for i in range(vocab)]
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    ids = np.random.default_rng(0).integers(0, vocab, 5000).astype(np.uint16)
    ids[1234] = top_id
    ids.tofile(d / "train.bin")
    ids[:1000].tofile(d / "val.bin")


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_run_dir(tmp_path):
    write_nanogpt_dir(tmp_path / "d", vocab=10, top_id=64)
    r = run_cli("nanogpt.train", f"data.dir={tmp_path / 'd'}", *TINY, "max_iters=2", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(r, f"{tmp_path / 'd' / 'train.bin'} holds token id 64, the vocabulary has 10",
                          "meta.pkl", "the tokens and the vocabulary come from different datasets")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_the_token_scan_runs_once_per_file_version(tmp_path, shakespeare_path, monkeypatch):
    import nanogpt.data.datasets

    write_nanogpt_dir(tmp_path / "n", vocab=10, top_id=9)
    cfg = DataConfig(name="n", source="unused", dir=str(tmp_path / "n"))
    assert ensure_prepared(cfg)["train_max_id"] == 9  # scanned, and remembered in meta.json
    scans = []
    monkeypatch.setattr(nanogpt.data.datasets, "scan_bin", lambda *a: scans.append(a) or scan_bin(*a))
    ensure_prepared(cfg)
    assert scans == []

    # our own dir: recorded at prepare; a .bin replaced afterwards is found and named
    meta = prepare(DataConfig(name="s", source=str(shakespeare_path), dir=str(tmp_path / "s")))
    assert (meta["train_max_id"], meta["val_max_id"]) == (64, 64)
    scans.clear()  # prepare scans what it writes, once
    ensure_prepared(DataConfig(name="s", source=str(shakespeare_path), dir=str(tmp_path / "s")))
    assert scans == []
    val = tmp_path / "s" / "val.bin"
    ids = np.fromfile(val, dtype=np.uint16)
    ids[0] = 99
    ids.tofile(val)
    with pytest.raises(UserError, match=r"val.bin is not the file meta.json describes"):
        ensure_prepared(DataConfig(name="s", source=str(shakespeare_path), dir=str(tmp_path / "s")))


def test_sampled_ids_beyond_the_tokenizer_are_one_line(gpt2_tiktoken):
    """A model with more token ids than its tokenizer (nanoGPT pads GPT-2's 50257 to 50304) may sample one."""
    with pytest.raises(UserError, match=r"token id 8 is not in the 8-token vocabulary of the tokenizer"):
        tok.CharTokenizer.from_text("hello world").decode([0, 8])
    with pytest.raises(UserError, match=r"token id 50300 is not in the 50257-token vocabulary"):
        tok.TiktokenTokenizer("gpt2").decode([464, 50300])


# ---------------------------------------------------------------------------------------------
# Case 12: a user file that is not UTF-8


def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path):
    (tmp_path / "p.txt").write_bytes("ROMEO: caf\u00e9".encode("latin-1"))
    r = run_cli("nanogpt.sample", "init_from=gpt2", "prompt_file=p.txt", cwd=tmp_path, timeout=120)
    assert_one_line_error(r, "prompt_file=p.txt", f"({tmp_path / 'p.txt'})",
                          "is not UTF-8 text (unexpected end of data: byte 0xe9 at offset 10, line 1, column 11)",
                          "save it as UTF-8")


def test_every_user_file_reader_names_the_file_and_byte(tmp_path):
    bad = "caf\u00e9".encode("latin-1")
    # data.source: the offset is the file's, also past the first block a text-mode read decodes
    (tmp_path / "big.txt").write_bytes(b"abc\n" * 100_000 + bad)
    with pytest.raises(UserError, match=r"data.source=.*big.txt is not UTF-8 text \(unexpected end of data: byte "
                                        r"0xe9 at offset 400003, line 100001, column 4\)"):
        prepare(DataConfig(name="t", source=str(tmp_path / "big.txt"), dir=str(tmp_path / "d")))
    # tokenizer=meta.json, and a data dir's meta.json
    (tmp_path / "meta.json").write_bytes(b'{"encoding": "' + bad + b'"}')
    with pytest.raises(UserError, match=r"tokenizer=.*meta.json is not UTF-8 text \(.*: byte 0xe9 at offset 17, "):
        tok.load(str(tmp_path / "meta.json"))
    with pytest.raises(UserError, match=r"meta.json is not UTF-8 text \(.*: byte 0xe9 at offset 17, line 1, column 18\): save it as UTF-8"):
        load_meta(tmp_path)
    # a meta.pkl that is not a pickle
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x05garbage")
    with pytest.raises(UserError, match=r"could not read .*meta.pkl"):
        tok.load(str(tmp_path / "meta.pkl"))
    # a local HF GPT-2 dir's config.json
    from nanogpt.runs import weights

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_bytes(b"{" + bad)
    with pytest.raises(UserError, match=r"config.json is not UTF-8 text \(.*: byte 0xe9 at offset 4, "):
        weights._hf_model_config(tmp_path / "hf")


def test_user_files_are_read_only_through_the_checked_reader():
    """The kind: no module reads a user-named file by itself. Reads of the files the project
    writes and reads back (run dirs, checkpoints) are another reader's."""
    users = ["sample.py", "data/tokenizer.py", "data/datasets.py", "runs/weights.py"]  # the modules that read files users name
    for name in users:
        source = (REPO / "nanogpt" / name).read_text()
        for call in (".read_text(", ".read_bytes(", "json.load(", "json.loads(", "open(path", "yaml.", "np.fromfile("):
            assert call not in source, f"nanogpt/{name} reads a file with {call} instead of nanogpt.data.userfiles"
