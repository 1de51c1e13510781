"""How the CLI fails: a known mistake is one line and exit code 2, no traceback unless --debug.

A config that does not validate, a path or object that is not there, no permission, an endpoint
that does not answer, a checkpoint that does not load: each is a known error here. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from segray.config import ConfigError

SET_HELP = "Override a config field: --set train.epochs=3 (repeatable; values parse as YAML)."
_options = {"debug": False}  # set by the global --debug flag (or SEGRAY_DEBUG)


def set_debug(on: bool) -> None:
    _options["debug"] = on


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [ConfigError, ValueError, FileNotFoundError, PermissionError,
                                        IsADirectoryError, NotADirectoryError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        known += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        from aiohttp import ClientConnectionError

        known.append(ClientConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(known)


def error_line(err: BaseException) -> str:
    """The message of a known error, as the CLI prints it (without 'error: ')."""
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, OSError) and getattr(err, "filename", None) and err.strerror:
        what = "not found" if isinstance(err, FileNotFoundError) else err.strerror.lower()
        return f"{err.filename}: {what}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) or isinstance(err, FileNotFoundError) else \
        f"{type(err).__name__}: {text}"


def _fail(err: BaseException) -> None:
    if _options["debug"]:
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
    raise typer.Exit(2) from None


def run_known(fn):
    """``fn()``; a known error (see _known_errors) exits 2 with its one-line message."""
    try:
        return fn()
    except typer.Exit:
        raise
    except _known_errors() as err:
        _fail(err)
