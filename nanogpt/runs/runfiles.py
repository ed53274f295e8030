"""The files a run writes: read back defensively (one reader for all of them), and a write that
the disk refuses said in one line.

A run dir outlives the process that wrote it: it is copied, synced, half-written by a kill, edited
by hand, or hit by a failing disk. Whatever the project reads back from it (provenance.json,
checksums.json, metrics.jsonl, config.resolved.yaml, .hydra/*.yaml, multirun.yaml, meta.json) goes
through these readers, so that a damaged file ends in one line naming the file, what is wrong with
it and what to do (a UserError), never in a traceback from deep inside json or yaml.

No torch here: the report and the planning before a run read run files too.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path

from nanogpt.errors import UserError

DEFAULT_FIX = "restore it from a copy, or move it aside"
# what a disk says when it refuses a write: full, over quota, read-only, not ours to write, failing
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class RunFileError(UserError):
    """A file the project wrote cannot be read back: it is named, with what to do."""


def _fail(path: Path, what: str, fix: str) -> RunFileError:
    return RunFileError(f"{path} {what}: {fix}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def read_json(path: str | Path, fix: str = DEFAULT_FIX, missing_ok: bool = False) -> dict | None:
    """The JSON object in path. None when it is missing and missing_ok; else a RunFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise _fail(path, "does not exist", fix) from None
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})", fix) from e
    try:
        value = json.loads(data)  # bytes: json detects the encoding; a non-UTF-8 byte is a ValueError
    except ValueError as e:
        raise _fail(path, f"is not valid JSON ({_first_line(e)})", fix) from e
    if not isinstance(value, dict):
        raise _fail(path, f"holds a JSON {type(value).__name__}, not an object", fix)
    return value


def read_jsonl(path: str | Path, fix: str = DEFAULT_FIX) -> list[dict]:
    """The JSON objects of a JSON-lines file, one a line (none when it is missing). A last line
    without its newline that does not parse was cut short by a kill, or is being written: it is
    left out. Any other line that is not a JSON object is a RunFileError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})", fix) from e
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            if number == len(lines):  # no newline after it: cut short
                break
            raise _fail(path, f"line {number} is not JSON ({_first_line(e)})", fix) from e
        if not isinstance(value, dict):
            raise _fail(path, f"line {number} holds a JSON {type(value).__name__}, not an object", fix)
        records.append(value)
    return records


def read_yaml(path: str | Path, fix: str = DEFAULT_FIX, kind: str = "mapping"):
    """The YAML file as an OmegaConf node: a DictConfig (kind="mapping") or a ListConfig
    (kind="list"). Anything else, or YAML that does not parse, is a RunFileError naming it."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _fail(path, "does not exist", fix) from None
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})", fix) from e
    except UnicodeDecodeError as e:
        raise _fail(path, f"is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})", fix) from e
    try:
        node = OmegaConf.create(text) if text.strip() else None
    except Exception as e:  # yaml's scanner and parser errors, OmegaConf's own; all mean "not our YAML"
        raise _fail(path, f"is not valid YAML ({_first_line(e)})", fix) from e
    wanted = DictConfig if kind == "mapping" else ListConfig
    if not isinstance(node, wanted):
        found = "nothing" if node is None else ("a list" if isinstance(node, ListConfig) else "a mapping")
        raise _fail(path, f"holds {found}, not a {kind}", fix)
    return node


def write_error(path: str | Path, e: OSError, run_dir: str | Path | None = None) -> UserError:
    """A failed write to a run file (disk full, quota, read-only, permissions), as one line."""
    fix = "free disk space or fix the permissions"
    if run_dir is not None:
        fix += f", then continue with resume={run_dir}"
    return RunFileError(f"could not write {path} ({e.strerror or e}): {fix}")


def drop_failing_log_files(logger: logging.Logger | None = None) -> None:
    """Make a log file that the disk refuses to write (full, read-only) leave the logger with one
    warning on stderr, instead of logging's traceback for every line after it. The run goes on
    logging to the console; the write that stops it (a checkpoint, metrics.jsonl) says what to do."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = lambda record, handler=handler: _drop(logger, handler)


def _drop(logger: logging.Logger, handler: logging.FileHandler) -> None:
    error = sys.exc_info()[1]
    logger.removeHandler(handler)
    why = getattr(error, "strerror", None) or error
    print(f"warning: could not write {handler.baseFilename} ({why}): the log goes on on the console only",
          file=sys.stderr)
