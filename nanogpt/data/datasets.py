"""Turn a DataConfig into train.bin, val.bin and meta.json in `data.dir`, as nanoGPT's prepare.py scripts do.

train.bin and val.bin are flat arrays of token ids (uint16, or uint32 for vocabularies over 65,536
tokens) that training memory-maps (nanogpt/data/batches.py). meta.json says how to read and decode them,
and what they were made from:

    format_version  1
    name, source    data.name and data.source
    format          "text", "hf" or "documents"
    encoding        "char" or a tiktoken encoding name
    vocab_size      number of token ids
    chars           encoding=char: the vocabulary, token i is chars[i]
    eot_token       tiktoken: the end-of-text id (format=hf/documents append it after every document)
    dtype           "uint16" or "uint32"
    train_tokens, val_tokens
    val_fraction    data.val_fraction; split_seed too for format=hf/documents, and text_column,
                    train_documents, val_documents for format=documents
    source_files    format=text/documents: each file read, as {path (resolved), size, mtime_ns, sha256},
                    and the url it was downloaded from
    source_abspath  format=text/documents, a local source: data.source made absolute (a glob stays a glob)
    source_sha256   format=text/documents: the content's identity (one file: its SHA-256, as sha256sum prints it)
    hub_files       format=documents from hf://: each file read, as {path, size}
    train_sha256, val_sha256, train_max_id, val_max_id, bins_mtime_ns
                    the identity of each .bin and its largest token id, with the mtimes they were
                    taken at (a .bin with another mtime is scanned again)
    created         ISO 8601 time (UTC)

A cache keyed by content: a prepared dir is used only for the content it was made from. The files
of data.source are compared by path, size and mtime, and where those differ by SHA-256: another
spelling or copy of the same text uses the dir, an edited or other text is refused. A URL source
may carry its content's hash (`URL#sha256=HEX`, as pip's URLs do): the download is checked against
it, and a dir prepared from a local copy with that hash serves the URL without a download.

A dataset is complete only when meta.json exists: every file is written under a temporary name,
and only when all are written is the old meta.json removed, the .bin files renamed into place and
the new meta.json written. So an interrupted prepare never leaves files that `ensure_prepared`
would accept, and keeps the old dataset where it fails before the renames. A run holds a shared
lock on the dir while it reads it (`hold_for_reading`), and a prepare that would rewrite the dir
refuses while one does.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import http.client
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nanogpt.config import DataConfig, DataFormat
from nanogpt.errors import ConfigError, UserError
from nanogpt.data.tokenizer import (
    META_FORMAT_VERSION,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    convert_nanogpt_meta,
    encode_large,
    write_json_atomic,
)
from nanogpt.data import documents
from nanogpt.data.userfiles import decode_utf8, read_bytes, read_chunks, read_json, read_text, sha256

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
REQUIRED_META = ("encoding", "vocab_size", "dtype", "train_tokens", "val_tokens")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_prepared(data_dir: str | os.PathLike) -> bool:
    d = Path(data_dir)
    has_meta = (d / "meta.json").exists() or (d / "meta.pkl").exists()  # meta.pkl: a nanoGPT data dir
    return has_meta and all((d / f"{s}.bin").exists() for s in SPLITS)


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a prepared dataset dir (converted from nanoGPT's meta.pkl if that is all there is)."""
    d = Path(data_dir)
    path = d / "meta.json"
    if not path.exists():
        if (d / "meta.pkl").exists():
            meta = convert_nanogpt_meta(d / "meta.pkl")
        else:
            raise UserError(f"{path} does not exist: prepare the dataset first (nanogpt-prepare data=...)")
    else:
        meta = read_json(path, fix="re-prepare the dataset with nanogpt-prepare force=true")
    if not isinstance(meta, dict) or meta.get("format_version") != META_FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"{path} has format_version={version}, this nanogpt reads {META_FORMAT_VERSION}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: re-prepare the dataset with nanogpt-prepare force=true")
    return meta


def ensure_prepared(cfg: DataConfig) -> dict[str, Any]:
    """The dataset's meta, preparing it first if train.bin, val.bin or meta.json is missing."""
    return prepare(cfg, force=False)


def prepare(cfg: DataConfig, force: bool = False) -> dict[str, Any]:
    """Write train.bin, val.bin and meta.json into cfg.dir and return the meta.

    If the dataset is already there, it is only checked against cfg, unless `force`.
    """
    fmt = _check_config(cfg)
    out = Path(cfg.dir)
    if not force and is_prepared(out):
        return _use_existing(cfg, out)
    # format=documents: the corpus is listed and its text column checked before anything is written
    corpus = _documents_corpus(cfg) if fmt == DataFormat.documents else None
    new_dirs = _missing_dirs(out)
    try:
        with _one_at_a_time(out):
            if not force and is_prepared(out):  # another process prepared it while we waited
                return _use_existing(cfg, out)
            return _prepare_locked(cfg, fmt, out, force, corpus)
    except BaseException:
        if new_dirs:  # a failed first prepare (bad source, no network) leaves no trace on disk
            for lock in (".prepare.lock", READERS_LOCK):
                (out / lock).unlink(missing_ok=True)
            for d in new_dirs:
                try:
                    d.rmdir()
                except OSError:  # not empty: something else lives there now
                    break
        raise


def _missing_dirs(path: Path) -> list[Path]:
    """The dirs that creating `path` will add, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _use_existing(cfg: DataConfig, out: Path) -> dict[str, Any]:
    meta = load_meta(out)
    _check_existing(meta, cfg)
    meta = _check_bins(meta, out)
    _check_source(meta, cfg, out)
    log.debug("using the dataset prepared in %s", out)  # training names the data dir in its summary
    return meta


@contextlib.contextmanager
def _one_at_a_time(out: Path, wait: bool = True) -> Iterator[bool]:
    """Serialize prepares of one data dir across processes (ranks, the jobs of a sweep), so the
    first prepares it and the others then find it ready, instead of all writing at once. Yields
    whether it holds the lock: with wait=False, False if another process does."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".prepare.lock", "a")
    except OSError as e:
        raise UserError(f"cannot write to data.dir={out} ({e.strerror})") from e
    try:
        import fcntl
    except ImportError:  # Windows: no flock; prepare before launching parallel jobs there
        with lock:
            yield True
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.info("waiting for another process that is preparing %s", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield True  # closing the file releases the lock


# ---------------------------------------------------------------------------------------------
# Runs that read a data dir, and prepares that would rewrite it

READERS_LOCK = ".readers.lock"
_reading: dict[Path, Any] = {}  # data dir -> the lock file this process holds shared while it reads it


def hold_for_reading(data_dir: str | os.PathLike) -> None:
    """Mark data_dir as read by this process until it exits, so that a prepare that would rewrite it
    (nanogpt-prepare force=true) refuses instead of changing the tokens under a live run. The lock
    is an flock, so a killed run holds nothing; a note beside it names the reader for the refusal.
    A dir that cannot be written (a read-only copy) cannot be rewritten either: nothing to hold."""
    out = Path(data_dir).resolve()
    if out in _reading:
        return
    try:
        import fcntl

        lock = open(out / READERS_LOCK, "a")
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a prepare is writing the dir: its tokens are not data yet
        log.info("waiting for the prepare that is writing %s", out)
        fcntl.flock(lock, fcntl.LOCK_SH)
    _reading[out] = lock
    host, pid = socket.gethostname(), os.getpid()
    note = out / f".reader.{host}.{pid}"
    with contextlib.suppress(OSError):  # the run's working dir, not its command line: that may hold secrets
        note.write_text(f"pid {pid} on {host} since {time.strftime('%Y-%m-%d %H:%M:%S')}, in {os.getcwd()}\n")
        atexit.register(note.unlink, missing_ok=True)


@contextlib.contextmanager
def _no_readers(out: Path) -> Iterator[None]:
    """Hold the readers' lock exclusively while the dir is rewritten; refuse if a run reads it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / READERS_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notes = []
            for path in sorted(out.glob(".reader.*")):
                if _is_stale(path.name):
                    continue
                with contextlib.suppress(UserError):  # gone meanwhile: its run ended
                    notes.append(read_text(path).strip())
            raise UserError(
                f"data.dir={out} is being read by a live run ({'; '.join(notes) or 'a process without a note'}): "
                f"preparing it again now would change that run's data; wait until the run ends, or prepare into "
                f"another data.dir"
            ) from None
        for stale in out.glob(".reader.*"):  # every reader is gone: their notes are left by killed runs
            stale.unlink(missing_ok=True)
        yield


def _is_stale(note_name: str) -> bool:
    """A reader's note (.reader.HOST.PID) left by a killed run on this host; another host's are kept."""
    host, _, pid = note_name.removeprefix(".reader.").rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def _prepare_locked(cfg: DataConfig, fmt: DataFormat, out: Path, force: bool, corpus=None) -> dict[str, Any]:
    staged: dict[str, Path] = {}  # final name -> temporary file (format=documents: its resumable .partial file)

    def stage(name: str) -> Path:
        staged[name] = out / f".{name}.{os.getpid()}.tmp"
        return staged[name]

    try:
        with _no_readers(out):
            source: dict[str, Any] = {}
            if fmt == DataFormat.text:
                tok, counts, source = _prepare_text(cfg, out, stage, redownload=force)
            elif fmt == DataFormat.documents:
                tok, counts, source = _prepare_documents(cfg, out, staged, corpus, restart=force)
            else:
                tok, counts = _prepare_hf(cfg, stage)
            dtype = token_dtype(tok.vocab_size)
            meta: dict[str, Any] = {
                "format_version": META_FORMAT_VERSION,
                "name": cfg.name,
                "source": cfg.source,
                "format": fmt.value,
                **tok.meta(),
                "dtype": dtype,
                "train_tokens": counts["train"],
                "val_tokens": counts["val"],
                "val_fraction": cfg.val_fraction,
                **({"split_seed": cfg.split_seed} if fmt != DataFormat.text else {}),
                **source,
            }
            for split in SPLITS:
                meta[f"{split}_sha256"], meta[f"{split}_max_id"] = scan_bin(staged[f"{split}.bin"], dtype)
            # Only now, with every new file written, does the old dataset go: meta.json first, so
            # that until the new one is in place the dir is no dataset (a crash here leaves a dir
            # that is prepared again, never old meta with new tokens). The renames take moments,
            # and no run reads the dir meanwhile (_no_readers).
            (out / "meta.json").unlink(missing_ok=True)
            for split in SPLITS:
                os.replace(staged[f"{split}.bin"], out / f"{split}.bin")
            meta["bins_mtime_ns"] = {split: (out / f"{split}.bin").stat().st_mtime_ns for split in SPLITS}
            meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_json_atomic(out / "meta.json", meta)
            (out / documents.PROGRESS).unlink(missing_ok=True)  # format=documents: nothing left to continue
    except OSError as e:
        raise UserError(f"could not write the dataset to data.dir={cfg.dir} ({e})") from e
    finally:
        for tmp in staged.values():
            if tmp.name.endswith(".tmp"):  # a .partial file is kept: a prepare started again continues it
                tmp.unlink(missing_ok=True)
    log.info(
        "prepared %s in %s: vocab %d, train %d tokens, val %d tokens",
        cfg.name, out, meta["vocab_size"], meta["train_tokens"], meta["val_tokens"],
    )
    return meta


def _check_config(cfg: DataConfig) -> DataFormat:
    try:
        fmt = DataFormat(cfg.format)
    except ValueError:
        raise ConfigError(f"data.format={cfg.format!r} is not known: use text or hf") from None
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1")
    if cfg.num_threads < 1:
        raise ConfigError(f"data.num_threads={cfg.num_threads} must be at least 1")
    if not str(cfg.source).strip():
        raise ConfigError("data.source is empty: give a URL, a file, a glob or (data.format=hf) a dataset")
    if fmt in (DataFormat.hf, DataFormat.documents) and cfg.encoding == "char":
        raise ConfigError(f"data.format={fmt.value} needs a tiktoken encoding (e.g. data.encoding=gpt2), not char")
    if fmt == DataFormat.documents:
        if not str(cfg.text_column).strip():
            raise ConfigError("data.text_column is empty: name the parquet column or jsonl key that holds the text")
        if cfg.chunk_documents < 1:
            raise ConfigError(f"data.chunk_documents={cfg.chunk_documents} must be at least 1")
    split_url(cfg.source)  # a malformed #sha256= fails here, before any download
    return fmt


def _check_existing(meta: dict[str, Any], cfg: DataConfig) -> None:
    """A prepared dir must fit the config that asks for it: another tokenizer would break the model."""
    if meta["encoding"] != cfg.encoding:
        raise ConfigError(
            f"data.dir={cfg.dir} holds data tokenized with {meta['encoding']}, but data.encoding={cfg.encoding}: "
            f"point data.dir elsewhere, or re-prepare it (nanogpt-prepare ... force=true)"
        )
    # The same data.dir with another split would silently train on the old data (the source: _check_source).
    asked: dict[str, Any] = {"val_fraction": cfg.val_fraction}
    if meta.get("format") in (DataFormat.hf.value, DataFormat.documents.value):
        asked["split_seed"] = cfg.split_seed
    if meta.get("format") == DataFormat.documents.value:
        asked["text_column"] = cfg.text_column
    for key, value in asked.items():
        if key in meta and meta[key] != value and "converted_from" not in meta:
            raise ConfigError(
                f"data.dir={cfg.dir} was prepared with data.{key}={meta[key]}, not {value}: point data.dir "
                f"elsewhere, or re-prepare it (nanogpt-prepare ... force=true)"
            )


# ---------------------------------------------------------------------------------------------
# What a prepared dir was made from, by content


def check_same_data(then: dict[str, Any], now: dict[str, Any]) -> None:
    """A continued run trains on the tokens it started on (`then`: the data meta its checkpoint
    holds): the same counts and vocabulary, and where the checkpoint records them, the same bytes,
    which a source edited and prepared again (lines swapped, the same size) does not give."""
    keys = ["vocab_size", "train_tokens", "val_tokens", "encoding"]
    keys += [k for k in ("train_sha256", "val_sha256") if k in then]  # older checkpoints lack them
    for key in keys:
        if then.get(key) != now.get(key):
            raise UserError(
                f"the dataset differs from the one the run trained on ({key}: {then.get(key)} then, "
                f"{now.get(key)} now): point data.dir/data.source at the run's dataset"
            )


def content_sha256(file_hashes: list[str]) -> str:
    """The identity of a source's content: one file's SHA-256 (what sha256sum prints, and what a
    URL's #sha256= gives), or for several files the SHA-256 of their hashes in reading order."""
    if len(file_hashes) == 1:
        return file_hashes[0]
    return hashlib.sha256("\n".join(file_hashes).encode()).hexdigest()


def content_identity(files: list[dict[str, Any]], local_source: str | None) -> dict[str, Any]:
    """What a prepared dir was made from, by content (meta.json's source_files, source_sha256 and,
    for a local source, source_abspath): the files' records (each with its sha256) as given."""
    identity = {"source_files": files, "source_sha256": content_sha256([f["sha256"] for f in files])}
    if local_source is not None:
        identity["source_abspath"] = os.path.abspath(os.path.expanduser(local_source))
    return identity


def scan_bin(path: Path, dtype: str) -> tuple[str, int]:
    """The SHA-256 of a token file and its largest token id (-1 if empty), in one vectorised pass
    (about 2 s per GB on a 2-core CPU, the hash most of it; see docs/data.md)."""
    h, top = hashlib.sha256(), -1
    fix = "prepare the dataset again (nanogpt-prepare ... force=true)"
    for chunk in read_chunks(path, fix=fix, size=1 << 26):  # a multiple of every itemsize
        h.update(chunk)
        ids = np.frombuffer(chunk, dtype=dtype)
        if ids.size:
            top = max(top, int(ids.max()))
    return h.hexdigest(), top


def _check_bins(meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """The .bin files are the ones meta.json describes, and hold no token id beyond its vocabulary
    (a nanoGPT dir's meta.pkl may come from another dataset than its bins). A file is scanned when
    its mtime is not the recorded one: once for a dir copied or made by nanoGPT, as the result is
    remembered in meta.json where the dir can be written."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    stamps = dict(meta.get("bins_mtime_ns") or {})
    scanned = False
    for split in SPLITS:
        path = out / f"{split}.bin"
        stat = path.stat()
        if stat.st_size != meta[f"{split}_tokens"] * itemsize:
            raise UserError(
                f"{path} has {stat.st_size} bytes, not the {meta[f'{split}_tokens']} {meta['dtype']} tokens "
                f"that meta.json promises: re-prepare it (nanogpt-prepare ... force=true)"
            )
        if stamps.get(split) == stat.st_mtime_ns and f"{split}_max_id" in meta:
            continue
        sha, top = scan_bin(path, meta["dtype"])
        if meta.get(f"{split}_sha256") not in (None, sha) and "converted_from" not in meta:
            raise UserError(
                f"{path} is not the file meta.json describes: it changed after it was prepared on {meta.get('created')}; "
                f"prepare the dataset again (nanogpt-prepare ... force=true)"
            )
        meta = {**meta, f"{split}_sha256": sha, f"{split}_max_id": top}
        stamps[split] = stat.st_mtime_ns
        scanned = True
    if scanned:
        meta["bins_mtime_ns"] = stamps
        _remember(meta, out)
    vocab = meta["vocab_size"]
    for split in SPLITS:
        if meta[f"{split}_max_id"] >= vocab:
            described_by = "meta.pkl" if "converted_from" in meta else "meta.json"
            raise UserError(
                f"{out / f'{split}.bin'} holds token id {meta[f'{split}_max_id']}, the vocabulary has {vocab} "
                f"({out / described_by}): the tokens and the vocabulary come from different datasets; prepare "
                f"the dir again from its text"
            )
    return meta


def _remember(meta: dict[str, Any], out: Path) -> None:
    """Save what a check learned (mtimes, scans) into meta.json, so the next start need not learn it
    again. Only while no prepare runs, and only over the same dataset; a read-only dir is fine."""
    with contextlib.suppress(OSError, UserError), _one_at_a_time(out, wait=False) as locked:
        if locked and read_json(out / "meta.json").get("created") == meta.get("created"):
            write_json_atomic(out / "meta.json", meta)


def split_url(source: str) -> tuple[str | None, str | None]:
    """(url, expected SHA-256 or None) of a URL source, as pip reads `URL#sha256=HEX`; (None, None)
    for anything else."""
    if not source.startswith(("http://", "https://")):
        return None, None
    url, _, fragment = source.partition("#")
    if not fragment:
        return url, None
    digest = fragment.removeprefix("sha256=").lower()
    if not fragment.startswith("sha256=") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(
            f"data.source={source}: a URL's #part must be sha256=<the 64 hex digits of its content's SHA-256>"
        )
    return url, digest


def _check_source(meta: dict[str, Any], cfg: DataConfig, out: Path) -> None:
    """The dir was made from the content data.source names now (see the module's docstring)."""
    recorded = meta.get("source_files")
    if "converted_from" in meta:  # a nanoGPT dir: what its text was is not known
        return
    if not recorded:  # format=hf, or a dir prepared before nanogpt recorded its sources: the spelling is all there is
        if meta.get("source") not in (None, cfg.source):
            raise _other_source(meta, cfg)
        return
    url, expected = split_url(cfg.source)
    if url is not None:  # no download just to compare: the URL, or the content's hash it names
        if expected is not None and meta.get("source_sha256") != expected:
            raise _other_source(meta, cfg)
        if expected is None and not any(f.get("url") == url for f in recorded):
            raise _other_source(meta, cfg)
        return
    # The same spelling from another working dir is another source; a path or glob is compared absolute.
    same_source = meta.get("source_abspath") == os.path.abspath(os.path.expanduser(cfg.source))
    try:
        paths = [p.resolve() for p in _local_paths(cfg.source)]
    except UserError:
        if not same_source:
            raise
        log.warning("data.source=%s is not here: using the tokens prepared from it in %s", cfg.source, out)
        return
    same_paths = [str(p) for p in paths] == [f["path"] for f in recorded]
    stats = [p.stat() for p in paths]
    if same_paths and all((s.st_size, s.st_mtime_ns) == (f["size"], f["mtime_ns"]) for s, f in zip(stats, recorded)):
        return
    hashes = [sha256(p, f"data.source={cfg.source}") for p in paths]
    if content_sha256(hashes) == meta.get("source_sha256"):  # another spelling, a copy, or touched
        if same_paths:
            files = [{**f, "mtime_ns": s.st_mtime_ns} for f, s in zip(recorded, stats)]
            _remember({**meta, "source_files": files}, out)
        return
    if same_paths or same_source:
        changed = [str(p) for p, h, f in zip(paths, hashes, recorded) if h != f["sha256"]] or [cfg.source]
        raise UserError(
            f"data.source={cfg.source} changed since it was prepared into data.dir={cfg.dir} on {meta.get('created')} "
            f"({', '.join(changed)} differs): prepare it again (nanogpt-prepare with this command's data options "
            f"and force=true)"
        )
    raise _other_source(meta, cfg)


def _other_source(meta: dict[str, Any], cfg: DataConfig) -> ConfigError:
    files = meta.get("source_files") or []
    # what to write to use those tokens: the file's absolute path works from any working dir
    was = files[0]["path"] if len(files) == 1 and "url" not in files[0] else meta.get("source")
    digest = f" (sha256 {meta['source_sha256'][:12]}...)" if meta.get("source_sha256") else ""
    return ConfigError(
        f"data.dir={cfg.dir} holds the tokens of data.source={was}{digest}, other data than data.source={cfg.source}: "
        f"to train on those tokens give data.source={was}; for this data give another data.dir, or prepare this "
        f"one again with force=true (replacing those tokens)"
    )


# ---------------------------------------------------------------------------------------------
# format=text: one text, split by its tail like nanoGPT's shakespeare prepare.py scripts


def _prepare_text(
    cfg: DataConfig, out: Path, stage: Callable[[str], Path], redownload: bool
) -> tuple[Tokenizer, dict[str, int], dict[str, Any]]:
    # A bad encoding name should fail before a download, so tiktoken goes first.
    tok: Tokenizer | None = None if cfg.encoding == "char" else TiktokenTokenizer(cfg.encoding)
    text, source = read_text_source(cfg.source, out, redownload=redownload)
    if tok is None:
        tok = CharTokenizer.from_text(text)
    n_train = int(len(text) * (1 - cfg.val_fraction))
    if n_train == 0 or n_train == len(text):
        raise UserError(
            f"data.source={cfg.source} holds {len(text)} characters: too few to split into train and val "
            f"with data.val_fraction={cfg.val_fraction}"
        )
    # Each split is encoded on its own, as nanoGPT does, so a BPE token never spans the cut.
    counts = {}
    for split, part in (("train", text[:n_train]), ("val", text[n_train:])):
        ids = encode_large(tok, part, num_threads=cfg.num_threads)
        ids.astype(token_dtype(tok.vocab_size)).tofile(stage(f"{split}.bin"))
        counts[split] = len(ids)
    return tok, counts, source


def read_text_source(source: str, download_dir: Path, redownload: bool = False) -> tuple[str, dict[str, Any]]:
    """The text behind data.source, and what it was read from (meta.json's source_files and
    source_sha256): a URL (downloaded to download_dir/input.txt once, and checked against its
    #sha256= if it has one), a file, or a glob.

    A glob's files are read in sorted order and joined with a blank line between them (each file
    ending in a newline); a single file is used exactly as it is.
    """
    url, expected = split_url(source)
    if url is not None:
        dest = download_dir / "input.txt"
        if redownload or not dest.exists() or (expected is not None and sha256(dest) != expected):
            download(url, dest)
        else:
            log.info("using %s, downloaded earlier from %s", dest, url)
        paths = [dest]
    else:
        paths = _local_paths(source)
    texts, files = [], []
    for path in paths:
        stat = path.stat()  # before reading: a file changed meanwhile then differs from the record
        data = read_bytes(path, f"data.source={source}")
        files.append({"path": str(path.resolve()), "size": len(data), "mtime_ns": stat.st_mtime_ns,
                      "sha256": hashlib.sha256(data).hexdigest(), **({"url": url} if url else {})})
        texts.append(decode_utf8(data, path, f"data.source={source}"))
        del data
    identity = content_identity(files, None if url else source)
    if expected is not None and identity["source_sha256"] != expected:
        raise UserError(
            f"{url} downloaded with SHA-256 {identity['source_sha256']}, not the {expected} that data.source names: "
            f"the file changed upstream or the download is corrupt; try again, or set data.source to a local copy"
        )
    if len(texts) == 1:
        text = texts[0]
    else:
        log.info("read %d files matching %s", len(paths), source)
        text = "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)
    if not text:
        raise UserError(f"data.source={source} is empty: point it at a text with at least a few thousand characters")
    return text, identity


def _local_paths(source: str) -> list[Path]:
    path = Path(source).expanduser()  # relative to the current directory
    if path.is_file():
        return [path]
    if path.is_dir():
        raise UserError(f"data.source={source} is a directory: give a file, or a glob such as '{source}/*.txt'")
    if any(c in source for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"data.source={source} matches no files (relative to {Path.cwd()})")
        return matches
    raise UserError(f"data.source={source} does not exist (relative to {Path.cwd()}): give a URL, a file or a glob")


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Download url to dest through a temp file, so dest is either whole or absent."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=None
            ) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and tmp.stat().st_size != total:
                raise http.client.IncompleteRead(b"", total - tmp.stat().st_size)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise UserError(
            f"could not download {url} (HTTP {e.code} {e.reason}): check the URL, or set data.source to a local copy"
        ) from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download {url} ({reason}): check the network, or set data.source to a local copy"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# format=documents: parquet/jsonl files of documents, streamed into token files (nanogpt/data/documents.py)


def _documents_corpus(cfg: DataConfig) -> tuple[list[documents.DocFile], int | None]:
    """The corpus's files and, where their footers say it, its number of documents; every check
    that can fail on the user's input (no files, other files, no text column, no documents) fails here."""
    if documents.is_hub(cfg.source):
        files = documents.hub_files(cfg.source)
    else:
        files = documents.local_files(_local_paths(cfg.source))
    total = documents.check_corpus(cfg.source, files, cfg.text_column)
    return files, total


def _prepare_documents(
    cfg: DataConfig, out: Path, staged: dict[str, Path], corpus, restart: bool = False
) -> tuple[Tokenizer, dict[str, int], dict[str, Any]]:
    tok = TiktokenTokenizer(cfg.encoding)
    files, total = corpus
    records = [documents.file_record(f) for f in files]
    identity = {
        "format_version": META_FORMAT_VERSION, "source": cfg.source, "files": records, "encoding": cfg.encoding,
        "text_column": cfg.text_column, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
    }
    workers = documents.workers_for(cfg.num_threads)
    progress = documents.tokenize_documents(
        source=cfg.source, files=files, out=out, identity=identity, text_column=cfg.text_column,
        encoding=cfg.encoding, dtype=token_dtype(tok.vocab_size), val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed, chunk_documents=cfg.chunk_documents, workers=workers,
        total_documents=total, name=cfg.name, restart=restart,
    )
    for split in SPLITS:
        staged[f"{split}.bin"] = documents.partial_path(out, split)
    if progress.documents == 0:
        raise UserError(f"data.source={cfg.source} holds no documents")
    if progress.train_tokens == 0 or progress.val_tokens == 0:
        raise UserError(
            f"data.source={cfg.source} holds {progress.documents} documents: too few to hold out "
            f"data.val_fraction={cfg.val_fraction} of them and train on the rest (give more, or another val_fraction)"
        )
    source: dict[str, Any] = {
        "text_column": cfg.text_column,
        "train_documents": progress.train_documents,
        "val_documents": progress.val_documents,
    }
    if documents.is_hub(cfg.source):
        source["hub_files"] = records
    else:  # the content's identity, as for format=text: one more read of the files, at the end
        for record in records:
            record["sha256"] = sha256(record["path"], f"data.source={cfg.source}")
        source.update(content_identity(records, cfg.source))
    return tok, {"train": progress.train_tokens, "val": progress.val_tokens}, source


# ---------------------------------------------------------------------------------------------
# format=hf: a dataset of documents, split by document like nanoGPT's openwebtext/prepare.py


def _prepare_hf(cfg: DataConfig, stage: Callable[[str], Path]) -> tuple[Tokenizer, dict[str, int]]:
    try:
        import datasets
    except ImportError:
        raise UserError("data.format=hf needs the hf extra: pip install 'nanogpt[hf]'") from None

    tok = TiktokenTokenizer(cfg.encoding)
    docs = _load_hf_documents(datasets, cfg)
    try:
        split = docs.train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed, shuffle=True)
    except ValueError as e:
        raise UserError(
            f"cannot split the {len(docs)} documents of data.source={cfg.source} with "
            f"data.val_fraction={cfg.val_fraction} ({e})"
        ) from e
    split["val"] = split.pop("test")
    tokenized = split.map(
        _tokenize_documents,
        batched=True,
        remove_columns=docs.column_names,
        fn_kwargs={"encoding_name": cfg.encoding},
        num_proc=_num_proc(len(docs), cfg.num_threads),
        desc=f"tokenizing ({cfg.encoding})",
    )
    dtype = token_dtype(tok.vocab_size)
    counts = {s: _write_documents(tokenized[s], stage(f"{s}.bin"), dtype, desc=f"writing {s}.bin") for s in SPLITS}
    return tok, counts


def _num_proc(n_docs: int, num_threads: int) -> int | None:
    # Worker processes cost seconds to start: only worth it for thousands of documents.
    n = min(num_threads, n_docs // 1000)
    return n if n > 1 else None


def _load_hf_documents(datasets, cfg: DataConfig):
    """The documents of data.source: a dir written by save_to_disk, else anything load_dataset takes
    (a hub id, or a local dir of json/csv/parquet/txt files). Of a DatasetDict, its 'train' split."""
    source = cfg.source
    local = Path(source).expanduser()
    saved = local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists())
    # Not-found and network errors are OSErrors; DatasetsError (datasets >= 2.15) adds unreadable files.
    datasets_error = getattr(getattr(datasets, "exceptions", None), "DatasetsError", OSError)
    try:
        if saved:
            docs = datasets.load_from_disk(str(local))
        else:
            docs = datasets.load_dataset(source, num_proc=cfg.num_threads if cfg.num_threads > 1 else None)
    except (OSError, ValueError, datasets_error) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(
            f"could not load the dataset data.source={source} ({type(e).__name__}: {reason}): "
            f"check the name or path, and the network"
        ) from e
    if isinstance(docs, datasets.DatasetDict):
        if "train" in docs:
            docs = docs["train"]
        elif len(docs) == 1:
            docs = next(iter(docs.values()))
        else:
            raise UserError(f"data.source={source} has the splits {sorted(docs)} but none named 'train'")
    if "text" not in docs.column_names:
        raise UserError(f"data.source={source} has no 'text' column, only {docs.column_names}")
    return docs


def _tokenize_documents(batch: dict[str, list], encoding_name: str) -> dict[str, list]:
    # Runs in datasets' worker processes; tiktoken caches the encoding per process.
    import tiktoken

    enc = tiktoken.get_encoding(encoding_name)
    ids = [enc.encode_ordinary(text) + [enc.eot_token] for text in batch["text"]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def _write_documents(dset, path: Path, dtype: str, desc: str) -> int:
    """Concatenate the 'ids' of every document into a flat token file; returns the token count."""
    from tqdm import tqdm

    total = int(dset.with_format("numpy", columns=["len"])[:]["len"].sum())
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=(total,))
    num_shards = min(1024, len(dset))  # write in slices that fit in memory
    pos = 0
    for i in tqdm(range(num_shards), desc=desc, disable=None):
        shard = dset.shard(num_shards=num_shards, index=i, contiguous=True).with_format("numpy", columns=["ids"])
        ids = np.concatenate(list(shard[:]["ids"]))
        arr[pos : pos + len(ids)] = ids
        pos += len(ids)
    arr.flush()
    del arr
    return total
