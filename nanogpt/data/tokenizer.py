"""Tokenizers: characters of the data (nanoGPT's shakespeare_char) or a tiktoken BPE (GPT-2's).

A dataset's tokenizer is described by its meta.json (see nanogpt/data/datasets.py), never by a pickle.
nanoGPT's own char datasets ship a pickled `meta.pkl`; `meta_from_nanogpt_pickle` reads one with
an unpickler that can build plain containers only, so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from nanogpt.data.userfiles import read_bytes, read_json
from nanogpt.errors import UserError

log = logging.getLogger(__name__)

META_FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20  # encode_large splits texts into pieces of about this many characters


class Tokenizer(Protocol):
    name: str  # "char" or the tiktoken encoding name
    vocab_size: int
    eot_token: int | None  # the end-of-text token that separates documents, if the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def meta(self) -> dict[str, Any]:
        """The meta.json fields that rebuild this tokenizer with `from_meta`."""
        ...


class CharTokenizer:
    """One token per character; token i is chars[i]."""

    name = "char"
    eot_token = None

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise UserError("a char vocabulary must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise UserError("a char vocabulary lists some character twice")
        if not chars:
            raise UserError("a char vocabulary cannot be empty")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        # Code points sorted, with their token ids, for vectorized encoding of large texts.
        points = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(points)
        self._sorted_points = points[order]
        self._sorted_ids = order.astype(np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in the {self.vocab_size}-character vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` for large texts: numpy instead of a Python loop, uint32 ids."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_points, points)
        pos_clipped = np.minimum(pos, len(self._sorted_points) - 1)
        unknown = self._sorted_points[pos_clipped] != points
        if unknown.any():
            c = chr(int(points[np.argmax(unknown)]))
            raise UserError(f"character {c!r} is not in the {self.vocab_size}-character vocabulary")
        return self._sorted_ids[pos_clipped]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        _check_ids(ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict[str, Any]:
        return {"encoding": "char", "vocab_size": self.vocab_size, "chars": self.chars}


class TiktokenTokenizer:
    """A tiktoken encoding. Text is encoded as ordinary text: "<|endoftext|>" in the data is not special."""

    def __init__(self, encoding_name: str):
        self.name = encoding_name
        self.enc = get_tiktoken_encoding(encoding_name)
        self.vocab_size: int = self.enc.n_vocab
        self.eot_token: int | None = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt may ask for the end-of-text token by name (as nanoGPT's sample.py allows):
        "<|endoftext|>" there is the one special token, e.g. to sample unconditionally."""
        return self.enc.encode(text, allowed_special={"<|endoftext|>"} & self.enc.special_tokens_set)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        _check_ids(ids, self.vocab_size)
        return self.enc.decode(ids)

    def meta(self) -> dict[str, Any]:
        return {"encoding": self.name, "vocab_size": self.vocab_size, "eot_token": self.eot_token}


def _check_ids(ids: list[int], vocab_size: int) -> None:
    """A model whose vocabulary is larger than its tokenizer's (nanoGPT pads GPT-2's 50257 to
    50304) can sample an id the tokenizer has no text for: say so, rather than IndexError/KeyError."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UserError(
            f"token id {bad} is not in the {vocab_size}-token vocabulary of the tokenizer: the model has more token "
            f"ids than its tokenizer (is tokenizer= the one it was trained with?)"
        )


def get_tiktoken_encoding(name: str):
    """tiktoken.get_encoding, with one-line errors for an unknown name and for no network."""
    import tiktoken

    known = tiktoken.list_encoding_names()
    if name not in known:
        raise UserError(f"unknown tokenizer encoding {name!r}: use char or one of {', '.join(known)}")
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; ValueError: a corrupt download
        # requests' messages run to several hundred characters; the class name says enough
        reason = type(e).__name__ if isinstance(e, OSError) else str(e)
        raise UserError(
            f"could not load the tiktoken encoding {name!r} ({reason}): tiktoken downloads its files once, "
            f"so check the network, or set TIKTOKEN_CACHE_DIR to a directory that holds them"
        ) from e


def get_tokenizer(encoding: str, chars: Sequence[str] | None = None) -> Tokenizer:
    """A tokenizer by encoding name; "char" needs its vocabulary."""
    if encoding == "char":
        if chars is None:
            raise UserError("a char tokenizer needs its vocabulary (the 'chars' of meta.json)")
        return CharTokenizer(chars)
    return TiktokenTokenizer(encoding)


def from_meta(meta: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer that a meta.json dict describes, and check it against its vocab_size."""
    encoding = meta.get("encoding")
    if not isinstance(encoding, str):
        raise UserError("meta.json has no 'encoding': it was not written by nanogpt-prepare")
    tok = get_tokenizer(encoding, meta.get("chars"))
    if meta.get("vocab_size") not in (None, tok.vocab_size):
        raise UserError(
            f"meta.json says vocab_size={meta['vocab_size']} but encoding {encoding!r} has {tok.vocab_size} tokens"
        )
    return tok


def load(spec: str) -> Tokenizer:
    """A tokenizer from a meta.json, a nanoGPT meta.pkl, a dataset dir holding either, or a tiktoken name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("meta.json", "meta.pkl"):
            if (path / name).is_file():
                return load(str(path / name))
        raise UserError(f"tokenizer={spec}: the directory holds neither meta.json nor meta.pkl")
    if path.suffix == ".pkl":
        if not path.is_file():
            raise UserError(f"tokenizer={spec} does not exist")
        return from_meta(meta_from_nanogpt_pickle(path))
    if path.suffix == ".json":
        meta = read_json(path, f"tokenizer={spec}")
        if not isinstance(meta, dict):
            raise UserError(f"tokenizer={spec} is not a meta.json written by nanogpt-prepare")
        return from_meta(meta)
    if spec == "char":
        raise UserError("tokenizer=char needs its vocabulary: give the dataset's meta.json or data dir instead")
    return TiktokenTokenizer(spec)


# ---------------------------------------------------------------------------------------------
# Encoding large texts


def _is_space(c: str) -> bool:
    # str.isspace is a superset of the regex \s that tiktoken's patterns use, so it can only
    # cost us split points, never make a wrong one.
    return c.isspace()


def split_points(text: str, chunk_chars: int) -> list[int]:
    """Offsets where `text` can be cut into pieces of at least `chunk_chars` characters such that
    encoding the pieces separately gives exactly the tokens of encoding the whole.

    A cut goes right after a lone "\\n" between two non-space characters ("end.\\nFirst"). Every
    tiktoken pattern (GPT-2's `'s|...| ?\\p{L}+|...|\\s+(?!\\S)|\\s+`, cl100k's, o200k's) ends a
    pre-token there: no token that starts at a non-space can swallow a newline and continue past it,
    and a newline followed by a non-space is a token of its own (or the tail of a punctuation
    token). BPE merges never cross pre-tokens, so the pieces encode independently. Inside a run of
    whitespace ("\\n\\n", "\\n ", "  ") there is no such guarantee: `\\s+(?!\\S)` leaves the last
    space for the next word, so a cut there changes the tokens.
    """
    points = []
    start = 0
    n = len(text)
    while start + chunk_chars < n:
        i = start + chunk_chars - 1  # a cut after text[i]
        while True:
            i = text.find("\n", i)
            if i == -1 or i + 1 >= n:
                return points
            if i > 0 and not _is_space(text[i - 1]) and not _is_space(text[i + 1]):
                break
            i += 1
        start = i + 1
        points.append(start)
    return points


def encode_large(
    tokenizer: Tokenizer,
    text: str,
    num_threads: int = 8,
    progress: bool = True,
    chunk_chars: int = CHUNK_CHARS,
) -> np.ndarray:
    """Encode a large text into a uint32 array, identical to `tokenizer.encode(text)`.

    tiktoken releases the GIL while it encodes, so pieces cut at safe points (`split_points`)
    encode in parallel threads.
    """
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode_array(text)
    cuts = split_points(text, chunk_chars)
    if not cuts:
        return np.asarray(tokenizer.encode(text), dtype=np.uint32)
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]

    from tqdm import tqdm

    def encode_piece(piece: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(piece), dtype=np.uint32)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool, tqdm(
        total=len(text), unit="char", unit_scale=True, desc=f"tokenizing ({tokenizer.name})",
        disable=None if progress else True,
    ) as bar:
        arrays = []
        for piece, ids in zip(pieces, pool.map(encode_piece, pieces)):  # map keeps the order
            arrays.append(ids)
            bar.update(len(piece))
    return np.concatenate(arrays)


# ---------------------------------------------------------------------------------------------
# nanoGPT's meta.pkl


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers only: any class or function is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        raise UserError(f"{self._path} is not a plain nanoGPT meta.pkl: nanogpt refuses to unpickle {module}.{name}")


def meta_from_nanogpt_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read nanoGPT's char-level meta.pkl ({'vocab_size', 'itos', 'stoi'}) safely into our meta dict.

    Token counts are filled in from train.bin/val.bin beside it when they exist (nanoGPT writes
    uint16 tokens).
    """
    path = Path(path)
    data = read_bytes(path)
    try:
        raw = _PlainDataUnpickler(io.BytesIO(data), path).load()
    except (EOFError, pickle.UnpicklingError, ValueError, IndexError) as e:  # what a damaged pickle raises
        raise UserError(f"could not read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("itos"), dict):
        raise UserError(f"{path} is not a nanoGPT char meta.pkl: it has no 'itos' dict")
    itos = raw["itos"]
    vocab_size = raw.get("vocab_size", len(itos))
    if sorted(itos) != list(range(vocab_size)) or not all(isinstance(c, str) and len(c) == 1 for c in itos.values()):
        raise UserError(f"{path}: 'itos' must map 0..vocab_size-1 to single characters")
    tok = CharTokenizer([itos[i] for i in range(vocab_size)])
    meta: dict[str, Any] = {
        "format_version": META_FORMAT_VERSION,
        "name": path.parent.name,
        "source": str(path),
        "converted_from": "nanoGPT meta.pkl",  # its text source and split are unknown
        **tok.meta(),
        "dtype": "uint16",
    }
    for split in ("train", "val"):
        bin_path = path.parent / f"{split}.bin"
        if bin_path.exists():
            meta[f"{split}_tokens"] = bin_path.stat().st_size // 2
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return meta


def convert_nanogpt_meta(pkl_path: str | os.PathLike) -> dict[str, Any]:
    """The meta dict of a nanoGPT meta.pkl, also saved as meta.json beside it where possible.

    An existing meta.json with the same vocabulary is kept as is (and returned); one with a
    different vocabulary is an error, never overwritten. A read-only directory is fine: the dict is
    returned, and nothing is written.
    """
    pkl_path = Path(pkl_path)
    meta = meta_from_nanogpt_pickle(pkl_path)
    json_path = pkl_path.parent / "meta.json"
    if json_path.exists():
        existing = read_json(json_path, fix=f"remove it, and it is rebuilt from {pkl_path}")
        same = isinstance(existing, dict) and existing.get("encoding") == "char" and existing.get("chars") == meta["chars"]
        if not same:
            raise UserError(f"{json_path} describes a different vocabulary than {pkl_path}: remove one of them")
        return existing
    try:
        write_json_atomic(json_path, meta)
    except OSError as e:
        log.warning("could not write %s (%s): using %s without saving it as JSON", json_path, e.strerror, pkl_path)
    return meta


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
