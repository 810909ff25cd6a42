"""The ``patternc`` command line (SPEC §5): ``check | fmt | compile | show | analyze | run``.

Each subcommand lives in its own module (``patternc/cli/<name>.py``) exposing
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Exit codes are ``patternc.ExitCode``: 0 success, 1 problems in the input or a failed
property, 2 usage / unreadable file / internal error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import ExitCode

SUBCOMMANDS = ("check", "fmt", "compile", "show", "analyze", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patternc",
        description="patternc: compile, check, run and analyse sparse-attention patterns.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"patternc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    _finish_help(sub)
    return parser


def _finish_help(sub) -> None:
    """Every subcommand's ``--help`` opens with a plain-text description: its one-line help
    when it has none of its own, and never the reST markup (double backticks) of the
    docstrings some descriptions are taken from."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        text = p.description or helps.get(name)
        if text:
            text = text.replace("``", "")
            p.description = text[0].upper() + text[1:]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    from . import common

    common.verdict(reset=True)
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            common.start_capture(records)
            code = args.func(args)
            if not getattr(args, "json", False):
                common.emit_diagnostics([], False)  # warnings no command printed itself
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = ExitCode.USAGE
    except BrokenPipeError:  # the reader stopped early: the verdict reached so far, not a plain 0
        code = common.verdict()
    except OSError as e:  # the output itself could not be written (a full disk, /dev/full)
        print(f"error: cannot write the output: {e.strerror or e}", file=sys.stderr)
        code = ExitCode.USAGE
    except Exception as e:  # internal error: never a bare traceback, but say how to report it
        import traceback

        print(f"error[P900]: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("help: this is a bug in patternc; rerun with PATTERNC_DEBUG=1 for the traceback", file=sys.stderr)
        import os

        if os.environ.get("PATTERNC_DEBUG"):
            traceback.print_exc()
        code = ExitCode.USAGE
    return int(code)


def entry() -> None:  # pragma: no cover
    sys.exit(main())
