"""format=documents: a corpus of documents into train.bin and val.bin, streamed, resumable, in
bounded memory.

The corpus is parquet or jsonl files, local (a file or a glob) or on the HuggingFace hub
(`hf://datasets/OWNER/NAME/PATH_GLOB`, read through huggingface_hub's HfFileSystem, so nothing is
downloaded whole). Documents are read in order (files sorted, rows in order; parquet one row
group of one column at a time), cut into chunks of `data.chunk_documents` documents, and
each chunk is tokenized in a pool of worker processes (tiktoken's `encode_ordinary_batch`, the
end-of-text token after every document, as nanoGPT's openwebtext/prepare.py does). Results are
appended in order to `.train.bin.partial` and `.val.bin.partial`.

Validation split: document i (its index in reading order, counting from 0) goes to val when a
hash of (split_seed, i) falls below val_fraction (`is_val`). Deterministic, independent of chunk
size, worker count and restarts, and needs no count of the corpus up front.

Resumable: after each chunk is written (and fsynced), `.progress.json` records the documents
consumed and the tokens of each split. A prepare killed at any point continues, when started
again with the same data options, from the last recorded chunk: each .partial file is truncated
to its recorded size and the consumed documents are skipped (whole parquet files and row groups
by their footers' row counts, without reading them). Other data options start over.

Memory: at most 2 x workers chunks are in flight (read, being tokenized, or waiting to be
written), whatever the corpus size; a parquet file is read one row group at a time.

The caller (nanogpt/data/datasets.py) holds the dir's locks, names the files and writes
meta.json last, so a partly prepared dir is never a dataset.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nanogpt.errors import UserError

log = logging.getLogger(__name__)

PROGRESS = ".progress.json"
PARTIAL = ".{split}.bin.partial"
SUFFIXES = (".parquet", ".jsonl")
HUB_PREFIX = "hf://"
PARQUET_BATCH_ROWS = 1024  # rows of a row group turned into Python strings at a time
HF_EXTRA = "pip install 'nanogpt[hf]'"


def is_hub(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


@dataclass(frozen=True)
class DocFile:
    """One file of the corpus: a local path or a hub path (without hf://), and its size in bytes."""

    path: str
    size: int
    hub: bool

    @property
    def kind(self) -> str:
        return "parquet" if self.path.endswith(".parquet") else "jsonl"

    @property
    def name(self) -> str:
        return HUB_PREFIX + self.path if self.hub else self.path

    def open(self):
        if self.hub:
            return _hub_fs().open(self.path, "rb")
        return open(self.path, "rb")


def _hub_fs():
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise UserError(f"data.source=hf://... needs the hf extra: {HF_EXTRA}") from None
    return HfFileSystem()


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"parquet files need the hf extra: {HF_EXTRA}") from None
    return pq


def hub_files(source: str) -> list[DocFile]:
    """The files a hub glob names (hf://datasets/OWNER/NAME/PATH_GLOB), sorted, with their sizes."""
    fs = _hub_fs()
    pattern = source[len(HUB_PREFIX):]
    try:
        found = fs.glob(pattern, detail=True)
    except (OSError, ValueError) as e:  # not found, no network, bad repo id
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"could not list data.source={source} ({reason}): check the path and the network") from e
    files = [DocFile(p, int(info.get("size") or 0), True) for p, info in sorted(found.items())
             if info.get("type") == "file"]
    if not files:
        raise UserError(f"data.source={source} matches no files on the hub")
    return files


def local_files(paths: list[Path]) -> list[DocFile]:
    return [DocFile(str(p), p.stat().st_size, False) for p in paths]


def check_files(source: str, files: list[DocFile]) -> None:
    """Every file is parquet or jsonl, by its name."""
    other = [f.name for f in files if not f.path.endswith(SUFFIXES)]
    if other:
        raise UserError(
            f"data.source={source} includes {other[0]}{f' and {len(other) - 1} more' if len(other) > 1 else ''}, "
            f"neither .parquet nor .jsonl: data.format=documents reads those two (a plain text: data.format=text)"
        )


def check_corpus(source: str, files: list[DocFile], text_column: str) -> int | None:
    """Before anything is written: the text column is there (in the first file), and there is at
    least one document. Returns the number of documents when the files say it (parquet footers),
    else None."""
    check_files(source, files)
    first = files[0]
    if first.kind == "parquet":
        with _reading(first, source):
            with first.open() as fh:
                schema = _pyarrow_parquet().ParquetFile(fh).schema_arrow
        _check_column(source, first, text_column, schema)
        total = parquet_rows(files, source) if all(f.kind == "parquet" for f in files) else None
        if total == 0:
            raise UserError(f"data.source={source} holds no documents (its parquet files have 0 rows)")
        return total
    for _ in iter_documents(files, text_column, skip=0, source=source):  # jsonl: the first document has the key
        return None
    raise UserError(f"data.source={source} holds no documents ({len(files)} file(s), every one empty)")


def _check_column(source: str, f: DocFile, text_column: str, schema) -> None:
    """The parquet file's schema (pyarrow) has text_column, of strings."""
    import pyarrow as pa

    if text_column not in schema.names:
        raise UserError(
            f"data.source={source}: {f.name} has no column {text_column!r}, its columns are "
            f"{', '.join(schema.names) or '(none)'}: set data.text_column=<the one that holds the text>"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise UserError(f"data.source={source}: column {text_column!r} of {f.name} holds {kind}, not text: "
                        f"set data.text_column to the column that holds the text")


def parquet_rows(files: list[DocFile], source: str) -> int:
    """The documents of parquet files, from their footers."""
    pq = _pyarrow_parquet()
    total = 0
    for f in files:
        with _reading(f, source), f.open() as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


@contextlib.contextmanager
def _reading(f: DocFile, source: str) -> Iterator[None]:
    """A file that cannot be read (gone, no network, not parquet) is one line naming it."""
    try:
        yield
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        fix = "check the network, then prepare again (it continues where it stopped)" if f.hub else "check the file"
        raise UserError(f"data.source={source}: could not read {f.name} as {f.kind} ({reason}): {fix}") from e


def iter_documents(files: list[DocFile], text_column: str, skip: int, source: str) -> Iterator[str]:
    """The text of every document, in order, after the first `skip` documents. A null text is an
    empty document; a jsonl file's blank lines are no documents."""
    for f in files:
        with _reading(f, source):
            if f.kind == "parquet":
                skip = yield from _parquet_documents(f, text_column, skip, source)
            else:
                skip = yield from _jsonl_documents(f, text_column, skip, source)


def _parquet_documents(f: DocFile, text_column: str, skip: int, source: str) -> Iterator[str]:
    pq = _pyarrow_parquet()
    with f.open() as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata
        if skip >= meta.num_rows:  # consumed by an earlier run: not even opened past its footer
            return skip - meta.num_rows
        _check_column(source, f, text_column, pf.schema_arrow)
        first = 0  # a leading run of row groups consumed by an earlier run is skipped unread
        while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
            skip -= meta.row_group(first).num_rows
            first += 1
        # One row group at a time (read_row_group): memory stays flat however long the file, which
        # iter_batches over a whole file does not (measured: +1 MB of RSS per MB read, pyarrow 25).
        for g in range(first, meta.num_row_groups):
            table = pf.read_row_group(g, columns=[text_column]).slice(skip)
            skip = 0
            for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
                yield from ("" if text is None else text for text in batch.column(0).to_pylist())
            del table
    return 0


def _jsonl_documents(f: DocFile, text_column: str, skip: int, source: str) -> Iterator[str]:
    with f.open() as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            where = f"data.source={source}: {f.name} line {line_no}"
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{where} is not JSON ({e}): each line must be one JSON object") from None
            if not isinstance(doc, dict) or text_column not in doc:
                keys = ", ".join(doc) if isinstance(doc, dict) else f"a {type(doc).__name__}, not an object"
                raise UserError(f"{where} has no key {text_column!r} (it has {keys or 'no keys'}): "
                                f"set data.text_column=<the key that holds the text>")
            text = doc[text_column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{where}: {text_column!r} holds a {type(text).__name__}, not text")
            yield text or ""
    return skip


# ---------------------------------------------------------------------------------------------
# The split, and the tokenizing workers


def is_val(index: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which documents (by index in reading order) are held out: splitmix64 of (seed, index),
    as a fraction of 2**64, below `fraction`. A bool array of index's shape."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


_encodings: dict[str, Any] = {}  # per worker process: tiktoken's encoding, loaded once


def encode_chunk(job: tuple[int, list[str], str, int, float, str]) -> tuple[bytes, bytes]:
    """(first document's index, texts, encoding, split_seed, val_fraction, dtype) -> the tokens of
    the chunk's train documents and of its val documents, each document followed by end-of-text,
    as the bytes of a `dtype` array. Runs in the worker processes."""
    start, texts, encoding, seed, fraction, dtype = job
    enc = _encodings.get(encoding)
    if enc is None:
        import tiktoken

        enc = _encodings[encoding] = tiktoken.get_encoding(encoding)
    ids = enc.encode_ordinary_batch(texts, num_threads=1)  # one thread: the pool is the parallelism
    val = is_val(np.arange(start, start + len(texts)), seed, fraction)
    eot = [enc.eot_token]
    out = []
    for held_out in (False, True):
        flat = list(itertools.chain.from_iterable(x + eot for x, v in zip(ids, val) if v == held_out))
        out.append(np.asarray(flat, dtype=dtype).tobytes())
    return out[0], out[1]


def workers_for(num_threads: int) -> int:
    """data.num_threads, at most the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(num_threads, cpus))


# ---------------------------------------------------------------------------------------------
# Resumable preparation


@dataclass
class Progress:
    documents: int = 0  # consumed, from the start of the corpus
    chunks: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_documents: int = 0
    val_documents: int = 0


def partial_path(out: Path, split: str) -> Path:
    return out / PARTIAL.format(split=split)


def _load_progress(out: Path, identity: dict[str, Any], itemsize: int,
                   restart: bool = False) -> tuple[Progress, str | None]:
    """The progress to continue from, and why an earlier one is not continued (None: none there)."""
    path = out / PROGRESS
    if not path.exists():
        return Progress(), None
    if restart:
        return Progress(), "force=true starts over"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        progress = Progress(**saved["progress"])
    except (OSError, ValueError, KeyError, TypeError):
        return Progress(), f"its {PROGRESS} is unreadable"
    if saved.get("identity") != identity:
        return Progress(), "it was of other data or data options"
    for split in ("train", "val"):
        size = partial_path(out, split).stat().st_size if partial_path(out, split).exists() else -1
        if size < getattr(progress, f"{split}_tokens") * itemsize:
            return Progress(), f"its {partial_path(out, split).name} is shorter than recorded"
    return progress, None


def _save_progress(out: Path, identity: dict[str, Any], progress: Progress) -> None:
    from nanogpt.data.tokenizer import write_json_atomic

    write_json_atomic(out / PROGRESS, {"identity": identity, "progress": progress.__dict__})


def tokenize_documents(
    *,
    source: str,
    files: list[DocFile],
    out: Path,
    identity: dict[str, Any],
    text_column: str,
    encoding: str,
    dtype: str,
    val_fraction: float,
    split_seed: int,
    chunk_documents: int,
    workers: int,
    total_documents: int | None,
    name: str,
    restart: bool = False,
) -> Progress:
    """Append the tokens of every document not yet consumed to the .partial files in `out`,
    continuing an earlier run's progress where `identity` (the data options and the files) is the
    same, unless `restart` (force=true). Returns the final progress; the .partial files then hold
    the whole splits."""
    from tqdm import tqdm

    itemsize = np.dtype(dtype).itemsize
    progress, refused = _load_progress(out, identity, itemsize, restart)
    if progress.chunks:
        log.info(
            "%s: continuing the interrupted preparation in %s after %s documents (%s train and %s val tokens, "
            "%d chunks) done earlier", name, out, f"{progress.documents:,}", f"{progress.train_tokens:,}",
            f"{progress.val_tokens:,}", progress.chunks,
        )
    elif refused:
        log.info("%s: starting over in %s: an interrupted preparation is there, but %s", name, out, refused)
    if not progress.chunks:
        _save_progress(out, identity, progress)  # before the .partial files: they belong to this identity
    bins = {}
    with contextlib.ExitStack() as stack:
        for split in ("train", "val"):
            path = partial_path(out, split)
            f = stack.enter_context(open(path, "r+b" if progress.chunks else "wb"))
            f.truncate(getattr(progress, f"{split}_tokens") * itemsize)  # drop what a killed run wrote after its record
            f.seek(0, os.SEEK_END)
            bins[split] = f
        docs = iter_documents(files, text_column, skip=progress.documents, source=source)
        bar = stack.enter_context(tqdm(total=total_documents, initial=progress.documents, unit="doc",
                                       unit_scale=True, desc=f"tokenizing {name} ({encoding})", disable=None))

        def jobs() -> Iterator[tuple]:
            start = progress.documents
            while texts := list(itertools.islice(docs, chunk_documents)):
                yield start, texts, encoding, split_seed, val_fraction, dtype
                start += len(texts)

        def write(job: tuple, result: tuple[bytes, bytes]) -> None:
            n = len(job[1])
            n_val = int(is_val(np.arange(job[0], job[0] + n), split_seed, val_fraction).sum())
            for split, data in zip(("train", "val"), result):
                bins[split].write(data)
                bins[split].flush()
                os.fsync(bins[split].fileno())  # the record below never claims tokens a power loss could lose
                setattr(progress, f"{split}_tokens", getattr(progress, f"{split}_tokens") + len(data) // itemsize)
            progress.documents += n
            progress.chunks += 1
            progress.val_documents += n_val
            progress.train_documents += n - n_val
            _save_progress(out, identity, progress)
            bar.update(n)
            bar.set_postfix_str(f"{progress.train_tokens + progress.val_tokens:,} tokens", refresh=False)

        if workers == 1:
            for job in jobs():
                write(job, encode_chunk(job))
            return progress
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # The main process reads; at most 2 x workers chunks are read and not yet written, so memory
        # is bounded whatever the corpus size. Results are written in order (a deque of futures).
        # A process pool, not multiprocessing.Pool: a worker that dies (the OOM killer) breaks the
        # pool with an error instead of leaving its chunk's result to be waited for forever.
        pool = ProcessPoolExecutor(workers)
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        pending: collections.deque = collections.deque()
        try:
            for job in jobs():
                pending.append((job, pool.submit(encode_chunk, job)))
                if len(pending) >= 2 * workers:
                    job0, future = pending.popleft()
                    write(job0, future.result())
            while pending:
                job0, future = pending.popleft()
                write(job0, future.result())
        except KeyboardInterrupt:
            log.warning("%s: interrupted after %s documents; prepare again with the same data options to continue",
                        name, f"{progress.documents:,}")
            raise
        except BrokenProcessPool:
            raise UserError(
                f"a tokenizer worker process of {name} died (killed, or out of memory): prepare again to continue "
                f"after the {progress.documents:,} documents done (or give fewer data.num_threads or data.chunk_documents)"
            ) from None
    return progress


def file_record(f: DocFile) -> dict[str, Any]:
    """What a file is, for the progress identity and meta.json: path and size, and for a local
    file its mtime; its SHA-256 is added by the caller."""
    if f.hub:
        return {"path": f.name, "size": f.size}
    stat = os.stat(f.path)
    return {"path": str(Path(f.path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

