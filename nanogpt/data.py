"""Turn a DataConfig into train.bin, val.bin and meta.json in `data.dir`, as nanoGPT's prepare.py scripts do.

train.bin and val.bin are flat arrays of token ids (uint16, or uint32 for vocabularies over 65,536
tokens) that training memory-maps (nanogpt/batches.py). meta.json says how to read and decode them:

    format_version  1
    name, source    data.name and data.source
    format          "text" or "hf"
    encoding        "char" or a tiktoken encoding name
    vocab_size      number of token ids
    chars           encoding=char: the vocabulary, token i is chars[i]
    eot_token       tiktoken: the end-of-text id (format=hf appends it after every document)
    dtype           "uint16" or "uint32"
    train_tokens, val_tokens
    val_fraction    data.val_fraction; split_seed too for format=hf
    created         ISO 8601 time (UTC)

A dataset is complete only when meta.json exists: it is written last, and removed first when a
dataset is re-prepared, and every file is written under a temporary name and renamed into place.
So an interrupted prepare never leaves files that `ensure_prepared` would accept.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nanogpt.config import ConfigError, DataConfig, DataFormat, UserError
from nanogpt.tokenizer import (
    META_FORMAT_VERSION,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    convert_nanogpt_meta,
    encode_large,
    write_json_atomic,
)

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
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(
                f"could not read {path} ({e}): re-prepare the dataset with nanogpt-prepare force=true"
            ) from e
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
    new_dirs = _missing_dirs(out)
    try:
        with _one_at_a_time(out):
            if not force and is_prepared(out):  # another process prepared it while we waited
                return _use_existing(cfg, out)
            return _prepare_locked(cfg, fmt, out, force)
    except BaseException:
        if new_dirs:  # a failed first prepare (bad source, no network) leaves no trace on disk
            (out / ".prepare.lock").unlink(missing_ok=True)
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
    _check_existing(meta, cfg, out)
    log.debug("using the dataset prepared in %s", out)  # training names the data dir in its summary
    return meta


@contextlib.contextmanager
def _one_at_a_time(out: Path) -> Iterator[None]:
    """Serialize prepares of one data dir across processes (ranks, the jobs of a sweep), so the
    first prepares it and the others then find it ready, instead of all writing at once."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".prepare.lock", "a")
    except OSError as e:
        raise UserError(f"cannot write to data.dir={out} ({e.strerror})") from e
    try:
        import fcntl
    except ImportError:  # Windows: no flock; prepare before launching parallel jobs there
        with lock:
            yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _prepare_locked(cfg: DataConfig, fmt: DataFormat, out: Path, force: bool) -> dict[str, Any]:
    staged: dict[str, Path] = {}  # final name -> temporary file

    def stage(name: str) -> Path:
        # Only once the first file is ready to write: a bad source or encoding leaves an existing
        # dataset (and the disk) as it was. meta.json goes first, so that from here on the stale
        # or half-replaced .bin files are never taken for a dataset.
        if not staged:
            for old in ("meta.json", "train.bin", "val.bin"):
                (out / old).unlink(missing_ok=True)
        staged[name] = out / f".{name}.{os.getpid()}.tmp"
        return staged[name]

    try:
        if fmt == DataFormat.text:
            tok, counts = _prepare_text(cfg, out, stage, redownload=force)
        else:
            tok, counts = _prepare_hf(cfg, stage)
        meta: dict[str, Any] = {
            "format_version": META_FORMAT_VERSION,
            "name": cfg.name,
            "source": cfg.source,
            "format": fmt.value,
            **tok.meta(),
            "dtype": token_dtype(tok.vocab_size),
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "val_fraction": cfg.val_fraction,
            **({"split_seed": cfg.split_seed} if fmt == DataFormat.hf else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for split in SPLITS:
            os.replace(staged[f"{split}.bin"], out / f"{split}.bin")
        write_json_atomic(out / "meta.json", meta)
    except OSError as e:
        raise UserError(f"could not write the dataset to data.dir={cfg.dir} ({e})") from e
    finally:
        for tmp in staged.values():
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
    if fmt == DataFormat.hf and cfg.encoding == "char":
        raise ConfigError("data.format=hf needs a tiktoken encoding (e.g. data.encoding=gpt2), not char")
    return fmt


def _check_existing(meta: dict[str, Any], cfg: DataConfig, out: Path) -> None:
    """A prepared dir must fit the config that asks for it: another tokenizer would break the model."""
    if meta["encoding"] != cfg.encoding:
        raise ConfigError(
            f"data.dir={cfg.dir} holds data tokenized with {meta['encoding']}, but data.encoding={cfg.encoding}: "
            f"point data.dir elsewhere, or re-prepare it (nanogpt-prepare ... force=true)"
        )
    # The same data.dir with another source or split would silently train on the old data.
    asked = {"source": cfg.source, "val_fraction": cfg.val_fraction}
    if meta.get("format") == DataFormat.hf.value:
        asked["split_seed"] = cfg.split_seed
    for key, value in asked.items():
        if key in meta and meta[key] != value and "converted_from" not in meta:
            raise ConfigError(
                f"data.dir={cfg.dir} was prepared with data.{key}={meta[key]}, not {value}: point data.dir "
                f"elsewhere, or re-prepare it (nanogpt-prepare ... force=true)"
            )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        size = (out / f"{split}.bin").stat().st_size
        if size != meta[f"{split}_tokens"] * itemsize:
            raise UserError(
                f"{out / f'{split}.bin'} has {size} bytes, not the {meta[f'{split}_tokens']} {meta['dtype']} tokens "
                f"that meta.json promises: re-prepare it (nanogpt-prepare ... force=true)"
            )


# ---------------------------------------------------------------------------------------------
# format=text: one text, split by its tail like nanoGPT's shakespeare prepare.py scripts


def _prepare_text(
    cfg: DataConfig, out: Path, stage: Callable[[str], Path], redownload: bool
) -> tuple[Tokenizer, dict[str, int]]:
    # A bad encoding name should fail before a download, so tiktoken goes first.
    tok: Tokenizer | None = None if cfg.encoding == "char" else TiktokenTokenizer(cfg.encoding)
    text = read_text_source(cfg.source, out, redownload=redownload)
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
    return tok, counts


def read_text_source(source: str, download_dir: Path, redownload: bool = False) -> str:
    """The text behind data.source: a URL (downloaded to download_dir/input.txt once), a file, or a glob.

    A glob's files are read in sorted order and joined with a blank line between them (each file
    ending in a newline); a single file is used exactly as it is.
    """
    if source.startswith(("http://", "https://")):
        dest = download_dir / "input.txt"
        if redownload or not dest.exists():
            download(source, dest)
        else:
            log.info("using %s, downloaded earlier from %s", dest, source)
        paths = [dest]
    else:
        paths = _local_paths(source)
    texts = [_read_utf8(p, source) for p in paths]
    if len(texts) == 1:
        text = texts[0]
    else:
        log.info("read %d files matching %s", len(paths), source)
        text = "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)
    if not text:
        raise UserError(f"data.source={source} is empty: point it at a text with at least a few thousand characters")
    return text


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


def _read_utf8(path: Path, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # text mode turns \r\n into \n, as nanoGPT's open() does
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} (data.source={source}) is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except OSError as e:
        raise UserError(f"could not read {path} (data.source={source}): {e.strerror}") from e


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
