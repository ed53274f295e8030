"""A user's mistake, and how it ends a process: one line on stderr that says what was wrong and
how to fix it, and exit status 2, never a traceback.

`UserError` is the one kind every check raises (a bad config, a missing file, no network);
Hydra's and OmegaConf's own errors are condensed into one line here too.
"""

from __future__ import annotations

import contextlib
import re
import sys


class UserError(Exception):
    """A user mistake (bad config, missing file, no network): one line that says what and how to fix it."""


class ConfigError(UserError):
    """A config value or combination that cannot work: the message names the key."""


def one_line(exc: BaseException) -> str:
    """Condense a Hydra/OmegaConf error into one line: what was wrong, and the hint if there is one.
    What locates the mistake (the override, the character, the key) is kept."""
    from hydra.errors import OverrideParseException

    if isinstance(exc, OverrideParseException):
        return unparsable_override(exc.override)
    parts: list[str] = []
    options: list[str] = []
    # our own errors already say why; Hydra's and OmegaConf's put the reason in their cause
    for e in (exc,) if isinstance(exc, UserError) else (exc, exc.__cause__):
        if e is None:
            continue
        for raw in str(e).splitlines():
            line = raw.strip()
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "provider=")):
                continue
            if line.startswith("Config search path"):
                break
            if raw.startswith("\t"):  # one option of an "Available options in 'group':" list
                options.append(line)
                continue
            line = line if line.endswith((".", ":", "?", "!")) else line + "."
            if line not in parts:
                parts.append(line)
    if options:
        parts[-1] = parts[-1] + " " + ", ".join(options)
    # OmegaConf names the key on a `full_key:` line of its own, which the loop above drops
    key = next((getattr(e, "full_key", None) for e in (exc, exc.__cause__) if getattr(e, "full_key", None)), None)
    if key and parts and not any(key in p for p in parts):
        parts[0] = f"{key}: {parts[0]}"
    misspelled = any(re.search(r"Key '.*' not in '", p) for p in parts)
    if misspelled and not any("--cfg job" in p for p in parts):  # appending the key would not help
        parts = [p for p in parts if not p.startswith("To append to your config")]
        parts.append("Check the spelling; --cfg job lists every key.")
    return " ".join(parts) if parts else exc.__class__.__name__


def unparsable_override(override: str) -> str:
    """Why Hydra's grammar rejects a command-line override, as one line: the override, the
    character it stops at, and the quoting that passes the value as a plain string."""
    from antlr4 import CommonTokenStream, InputStream
    from antlr4.error.ErrorListener import ErrorListener
    from hydra.grammar.gen.OverrideLexer import OverrideLexer
    from hydra.grammar.gen.OverrideParser import OverrideParser

    class FirstError(ErrorListener):
        column: int | None = None
        reason = ""

        def syntaxError(self, recognizer, offending_symbol, line, column, msg, e):
            if self.column is None:
                self.column, self.reason = column, msg

    first = FirstError()
    lexer = OverrideLexer(InputStream(override))
    parser = OverrideParser(CommonTokenStream(lexer))
    for recognizer in (lexer, parser):
        recognizer.removeErrorListeners()
        recognizer.addErrorListener(first)
    parser.override()
    where, at = "", first.column if first.column is not None else len(override)
    if at < len(override):
        where = f" at character {at + 1} ({override[at]!r})"
    elif first.column is not None:
        where = " at its end"
    key, eq, value = override.partition("=")
    if eq and at < len(key):
        fix = "a key is letters, digits and _-./@ (ask for the keys with --cfg job)"
    elif eq and '"' not in value:
        fix = f"quote the value so that it is taken as a plain string: '{key}=\"{value}\"'"
    elif eq and "'" not in value:
        fix = f"quote the value so that it is taken as a plain string: \"{key}='{value}'\""
    else:
        fix = "write it as KEY=VALUE, quoting a value that holds special characters"
    return (f"cannot parse the override {override}{where}: {first.reason or 'not valid override syntax'}; {fix} "
            f"(the grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")


def exit_with_error(exc: BaseException) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Inside a Hydra task or callback: a UserError ends the process with its one line. (Hydra would
    log it with a traceback from a task, and only warn about it from a callback.)"""
    try:
        yield
    except UserError as e:
        exit_with_error(e)
