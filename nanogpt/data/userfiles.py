"""One checked reader for every file a user names: prompt_file, the files of data.source, a data
dir's meta.json and nanoGPT meta.pkl, tokenizer=, a local HF GPT-2 dir's config.json.

What is wrong in such a file is the user's to fix, so it is one line (a UserError) that names the
file as the user gave it and says where: the byte that is not UTF-8 and its offset in the file,
the line and column of JSON that does not parse. Never a traceback.

    read_text(path, "prompt_file=p.txt")      UTF-8, newlines as Python's open() gives them
    read_json(path, "tokenizer=meta.json")    read_text, then JSON
    read_bytes(path, "meta.pkl")              the bytes, with the same errors for a missing file
    read_chunks(path, "train.bin")            a large file's bytes, a piece at a time
    sha256(path, "data.source=input.txt")     the file's SHA-256 (read_chunks)

No torch or numpy here: sample and prepare read user files before either is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from nanogpt.errors import UserError


def _name(path: Path, what: str | None) -> str:
    """The file as the user named it (the option), and where that is when it says otherwise."""
    where = str(path.absolute())
    if what is None:
        return where
    return what if where in what else f"{what} ({where})"


def _fail(path: Path, what: str | None, problem: str, fix: str | None) -> UserError:
    return UserError(f"{_name(path, what)} {problem}" + (f": {fix}" if fix else ""))


def read_bytes(path: str | os.PathLike, what: str | None = None, fix: str | None = None) -> bytes:
    """The bytes of a file the user named; `what` is how they named it (e.g. "prompt_file=p.txt"),
    `fix` what to do when it cannot be read (appended to the error)."""
    path = Path(path).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, what, "does not exist", fix) from None
    except IsADirectoryError:
        raise _fail(path, what, "is a directory, not a file", fix) from None
    except OSError as e:
        raise _fail(path, what, f"cannot be read ({e.strerror or e})", fix) from None


def read_chunks(path: str | os.PathLike, what: str | None = None, fix: str | None = None,
                size: int = 1 << 24) -> Iterator[bytes]:
    """The bytes of a large file the user named, `size` at a time, with read_bytes' errors."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(size):
                yield chunk
    except FileNotFoundError:
        raise _fail(path, what, "does not exist", fix) from None
    except OSError as e:
        raise _fail(path, what, f"cannot be read ({e.strerror or e})", fix) from None


def sha256(path: str | os.PathLike, what: str | None = None, fix: str | None = None) -> str:
    """The SHA-256 of a file the user named (what sha256sum prints)."""
    h = hashlib.sha256()
    for chunk in read_chunks(path, what, fix):
        h.update(chunk)
    return h.hexdigest()


def decode_utf8(data: bytes, path: str | os.PathLike, what: str | None = None) -> str:
    """UTF-8 text with \\r\\n and \\r turned into \\n (as open() in text mode does, and nanoGPT reads
    its input.txt). Decoded whole, so an error's offset is the byte's offset in the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _fail(
            Path(path), what,
            f"is not UTF-8 text ({e.reason}: byte 0x{data[e.start]:02x} at offset {e.start}, line {line}, "
            f"column {column})",
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)",
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text(path: str | os.PathLike, what: str | None = None, fix: str | None = None) -> str:
    """The UTF-8 text of a file the user named (see read_bytes and decode_utf8)."""
    return decode_utf8(read_bytes(path, what, fix), path, what)


def read_json(path: str | os.PathLike, what: str | None = None, fix: str | None = None) -> Any:
    """The JSON value in a file the user named."""
    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except ValueError as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise _fail(Path(path).expanduser(), what, f"is not valid JSON ({msg}{where})", fix) from None
