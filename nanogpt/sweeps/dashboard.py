"""nanogpt-dashboard: serve optuna-dashboard over a search's study, given the search's sweep dir.

    nanogpt-dashboard multirun/2026-12-01/10-00-00               # http://127.0.0.1:8080/dashboard/studies/0
    nanogpt-dashboard multirun/2026-12-01/10-00-00 --port 8081
    nanogpt-dashboard multirun/2026-12-01/10-00-00 --port 0      # any free port: the printed address says which

The study is where the search put it (docs/search.md): the sweep dir's `study.journal`, or the
database that search.storage named, read from the sweep dir's `multirun.yaml` (a relative sqlite
path is taken from the dir the search ran in, as the search took it). The page follows a search
that is still running: the dashboard reads the trials again when the ones it holds are over 2 s
old (more for studies of hundreds of trials).

It listens on 127.0.0.1 unless --host says otherwise. optuna-dashboard has no login and its page
can change the study (notes, marking trials), so reach it from another machine through ssh's port
forwarding rather than --host 0.0.0.0 on a shared network.

optuna-dashboard's own CLI also opens the journal file directly (`optuna-dashboard
<sweep dir>/study.journal`: a path that is a file is taken as a journal, anything else as a
database URL); this command adds finding the storage from the sweep dir, the study's address, and
one-line errors. Optuna is imported only after the arguments are read: --help stays quick.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nanogpt.errors import UserError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

INSTALL = "pip install 'nanogpt[search]'"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """A bad argument is one line, as every other mistake (argparse prints the usage too)."""
        raise UserError(f"{message} (nanogpt-dashboard --help shows the arguments)")


def find_storage(sweep_dir: Path) -> tuple[str, bool]:
    """Where the sweep dir's study lives: (a journal file's path, False) or (a database URL, True).
    The URL is search.storage from multirun.yaml, with a relative sqlite path made absolute."""
    from nanogpt.sweeps.search import JOURNAL

    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a dir: give a search's sweep dir (multirun/DATE/TIME, which holds "
                        f"{JOURNAL} or a multirun.yaml naming search.storage)")
    recorded = sweep_dir / "multirun.yaml"
    if recorded.is_file():
        from omegaconf import OmegaConf

        from nanogpt.runs.runfiles import read_yaml

        config = read_yaml(recorded, fix="it is the sweep's record, written by nanogpt-train --multirun")
        if not OmegaConf.select(config, "search.space"):
            raise UserError(f"{sweep_dir} is the dir of a grid sweep (its multirun.yaml has no search.space), which has "
                            f"no study: nanogpt-report {sweep_dir} tabulates its runs")
        url = OmegaConf.select(config, "search.storage")
        if url is not None:
            return absolute_sqlite(str(url), Path(str(OmegaConf.select(config, "hydra.runtime.cwd") or ".")),
                                   recorded), True
    journal = sweep_dir / JOURNAL
    if not journal.is_file():
        why = "its multirun.yaml names no search.storage" if recorded.is_file() else "it has no multirun.yaml"
        raise UserError(f"{sweep_dir} holds no study: no {JOURNAL} (a search writes it there when it starts), and "
                        f"{why}: give the sweep dir of nanogpt-train --multirun search=NAME")
    return str(journal), False


def absolute_sqlite(url: str, cwd: Path, recorded: Path) -> str:
    """A sqlite URL with its file as an absolute path (taken from cwd, the dir the search ran in),
    which must exist: sqlite would make an empty database for a path that does not. Other URLs as
    they are."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"search.storage={url} in {recorded} is not a database URL (sqlite:///PATH, "
                        f"postgresql://...)") from None
    if not parsed.drivername.startswith("sqlite"):
        return url
    if parsed.database in (None, "", ":memory:"):
        raise UserError(f"search.storage={url} in {recorded} is an in-memory database, which ended with the search")
    path = cwd / parsed.database  # an absolute database path stays as it is
    if not path.is_file():
        raise UserError(f"search.storage={url} in {recorded} names {path}, which does not exist: was it moved? "
                        f"Give its new place with optuna-dashboard sqlite:///NEW/PATH")
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def open_storage(where: str, is_url: bool) -> "BaseStorage":
    """The storage, opened to read what is there (a database's tables are never made here)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        if is_url:
            return RDBStorage(where, skip_compatibility_check=True, skip_table_creation=True)
        return JournalStorage(JournalFileBackend(where))  # reads the whole journal: a damaged one fails here
    except ImportError as e:  # a database driver that is not installed (psycopg2, pymysql, ...)
        raise UserError(f"{shown(where, is_url)} needs the {e.name} package: pip install {e.name}") from None
    except Exception as e:  # Optuna's and SQLAlchemy's errors for a file or database it cannot read
        if not is_url:
            raise UserError(f"{where} is not an Optuna journal that can be read ({_first_line(e)}): restore it from "
                            f"a copy") from None
        raise UserError(f"cannot read the study from {shown(where, is_url)}: {_first_line(e)}") from None


def study_id(storage: "BaseStorage", where: str, is_url: bool) -> int:
    """The id of the search's study (named search.STUDY_NAME) in the storage."""
    from nanogpt.sweeps.search import STUDY_NAME

    try:
        return storage.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        raise UserError(f"{shown(where, is_url)} holds no study named {STUDY_NAME!r}: is it a search's storage?") from None
    except Exception as e:  # a database without Optuna's tables, or one that does not answer
        raise UserError(f"cannot read the study from {shown(where, is_url)}: {_first_line(e)}") from None


def shown(where: str, is_url: bool) -> str:
    """The storage as it is safe to print: a database URL without its password."""
    if not is_url:
        return where
    from sqlalchemy.engine import make_url

    return make_url(where).render_as_string(hide_password=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def trial_counts(storage: "BaseStorage", study: int) -> str:
    """'20 trials (14 complete, 5 pruned, 1 running)', the states in the order they first occur."""
    counts: dict[str, int] = {}
    trials = storage.get_all_trials(study, deepcopy=False)
    for trial in trials:
        state = "failed" if trial.state.name == "FAIL" else trial.state.name.lower()
        counts[state] = counts.get(state, 0) + 1
    detail = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"{len(trials)} trial{'s' * (len(trials) != 1)}" + (f" ({detail})" if detail else "")


def listen(app, host: str, port: int):
    """A threaded WSGI server bound to host:port (the browser asks for several files at once), as
    optuna-dashboard's own CLI serves; silent per request. A port in use or a host that is not this
    machine's is one line."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # Ctrl-C does not wait for a browser's open connection
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args) -> None:  # a line per request would bury the address
            pass

    try:
        return make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another dashboard?): pick another with --port, "
                            f"or --port 0 for any free one") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} on {host} is reserved for root: pick one above 1023 with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}: --host is an address of this machine "
                        f"(127.0.0.1, or 0.0.0.0 for all)") from None


def address(host: str, port: int, study: int) -> str:
    """The page to open: the study's own (the dashboard's start page lists the studies)."""
    if host in ("0.0.0.0", "::", ""):  # every address of this machine: name it
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/dashboard/studies/{study}"


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="nanogpt-dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a search's sweep dir (nanogpt-train --multirun search=NAME)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default: 127.0.0.1, this machine only; see ssh -L in "
                             "docs/search.md to reach it from yours)")
    parser.add_argument("--port", type=int, default=8080, help="the port (default: 8080; 0: any free port)")
    try:
        args = parser.parse_args(argv)
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port {args.port} is not a port: give one from 1024 to 65535, or 0 for any free one")
        where, is_url = find_storage(args.sweep_dir)
        try:
            import optuna_dashboard
        except ImportError:
            raise UserError(f"nanogpt-dashboard serves optuna-dashboard, which is not installed: {INSTALL}") from None
        storage = open_storage(where, is_url)
        study = study_id(storage, where, is_url)
        counts = trial_counts(storage, study)
        server = listen(optuna_dashboard.wsgi(storage), args.host, args.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    port = server.server_port  # the one it got, for --port 0
    print(f"study: {shown(where, is_url)}: {counts}")
    print(f"dashboard: {address(args.host, port, study)}")
    if args.host in ("127.0.0.1", "localhost", "::1"):
        print(f"from another machine: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}, then open the same "
              f"address there")
    print("Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
