"""What counts as a user mistake on the command line, and how ``ctprep`` and ``ctgen`` report it.

A user mistake (a missing input file, an unreadable or invalid config, an unknown config key, an
empty prompt, a malformed prompts file, a bad option value, a missing optional package) ends the
command with one line on stderr, ``<prog>: error: <what is wrong>``, and exit status 2, as
argparse does for a bad option. Anything else is a bug and keeps its traceback. ``CTGEN_DEBUG=1``
(or ``--debug``) shows the traceback of a user mistake too.

Which exceptions are user mistakes (:data:`USER_ERRORS`):

* :class:`UserError`, raised by the command-line layer for what it checks itself;
* ``ValueError`` and its subclasses: in both packages it is *the* type for "a value you gave is
  wrong" (unknown config keys from ``config_from_dict`` and ``TrainConfig.from_dict``, a bad
  window, an unknown preset, ``VolumeError`` for an unusable volume), and the type the parsers of
  input files raise (``json.JSONDecodeError``, ``UnicodeDecodeError``, pyarrow's ``ArrowInvalid``);
* ``yaml.YAMLError`` (a config that is not YAML);
* the ``OSError``\\ s that name a path the user gave: not found, not a folder, a folder, no permission, a file
  where an output folder is to be made;
* :class:`MissingExtra`, an optional package (an extra of pyproject.toml) that is not installed.

Not user mistakes, so shown with a traceback: ``TypeError``, ``KeyError``, ``IndexError``,
``AttributeError``, ``RuntimeError`` (torch's shape and device errors), ``AssertionError``, any
other ``OSError`` (a full disk, a broken pipe), ... A ``ValueError`` that a library raises because
our code called it wrongly reads as one line too; it names the problem, and ``CTGEN_DEBUG=1``
gives the traceback to report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import yaml

#: Set to 1 (or pass ``--debug``) to see the traceback of a user mistake as well.
DEBUG_ENV = "CTGEN_DEBUG"
#: The exit status of a user mistake (argparse's for a bad option).
EXIT_USAGE = 2


class UserError(ValueError):
    """A mistake in what the user gave (a path, an option, a config value); the message is the whole report."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, yaml.YAMLError, MissingExtra,
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
)

_OS_ERROR_WORDS = {FileNotFoundError: "No such file or directory", NotADirectoryError: "Not a directory",
                   IsADirectoryError: "Is a directory", PermissionError: "Permission denied"}


def debug_requested(argv_flag: bool = False) -> bool:
    """``--debug`` was given or ``CTGEN_DEBUG`` is set to something other than empty/0."""
    return argv_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(err: BaseException) -> str:
    """The one-line message of a user mistake."""
    if isinstance(err, FileExistsError) and err.filename is not None:
        text = f"{err.filename} is a file, where a folder is to be made"  # mkdir of an output folder
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"  # e.g. "No such file or directory: prompts.txt"
    elif isinstance(err, OSError) and len(str(err).split()) == 1:  # a bare path (pandas, pyarrow)
        text = f"{_OS_ERROR_WORDS.get(type(err), type(err).__name__)}: {err}"
    elif isinstance(err, json.JSONDecodeError):
        text = f"malformed JSON: {err}"
    elif isinstance(err, yaml.YAMLError):
        text = f"malformed YAML: {err}"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text ({err.reason} at byte {err.start})"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line: YAML and pandas messages span several


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (safetensors, torch and transformers give pages), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_reporting_errors(prog: str, func: Callable[[], int | None], debug: bool = False) -> int:
    """``func()``'s exit status; a user mistake becomes ``<prog>: error: ...`` on stderr and status 2.

    ``SystemExit`` with a message (``raise SystemExit("...")``, as some sub-command parsers do) is
    reported the same way; argparse's own exits (an int status, its usage already printed) pass.
    """
    try:
        status = func()
    except SystemExit as stop:
        if not isinstance(stop.code, str) or debug_requested(debug):
            raise
        return _report(prog, stop.code)
    except USER_ERRORS as err:
        if debug_requested(debug):
            raise
        return _report(prog, describe(err))
    return 0 if status is None else status


def _report(prog: str, message: str) -> int:
    # straight to stderr, as argparse reports a bad option: this is the command's answer, not a log record
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return EXIT_USAGE


def read_text(path: str | os.PathLike) -> str:
    """A user's text file, as UTF-8 (a leading byte-order mark dropped); one that is not text is named (``not UTF-8
    text`` alone named no file)."""
    try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) is not text, and hid a CSV's first column name
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON", mapping: bool = True):
    """A user's JSON file (a mapping, unless ``mapping`` is False), named with what is wrong with it."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid {what}: {err}") from None
    if mapping and not isinstance(value, dict):
        raise UserError(f"{path} is not valid {what}: expected an object, got {type(value).__name__}")
    return value


def seed_int(text: str) -> int:
    """An argparse ``type``: a seed in [0, 2**63), so that ``seed + k`` for every sample stays a valid torch seed (an
    overflow failed only after the models had loaded)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"not a seed (an integer from 0 to 2**63 - 1): {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1, else argparse's one-line error naming the option."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def existing_file(text: str) -> str:
    """An argparse ``type``: a path to an existing file, else argparse's one-line error naming it."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def split_global_flags(argv: list[str], flags: set[str]) -> tuple[set[str], list[str]]:
    """The global ``flags`` given before the sub-command, and the command line without them.

    Pass-through sub-commands (their own parsers) get everything after their name untouched.
    """
    given, i = set(), 0
    while i < len(argv) and argv[i] in flags:
        given.add(argv[i])
        i += 1
    return given, argv[i:]
