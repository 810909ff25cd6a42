"""``patternc fmt [--check | --diff] FILE... | -e EXPR``: the canonical layout, comments kept.

Rewrites each FILE in place (atomically: a temporary file in the same folder, then
``os.replace``; an unchanged file is not touched). ``-e EXPR`` and ``-`` (standard input)
print the formatted text on stdout. ``--check`` writes nothing and exits 1 when some file
would change; ``--diff`` prints a unified diff instead of writing. Exit codes: 0 done or
already formatted, 1 a syntax error or (with ``--check``) a file that would change,
2 usage or an unreadable / unwritable file. See ``patternc.formatter`` for the layout.
"""

from __future__ import annotations

import difflib
import sys

from ..errors import ExitCode, PatternError
from .common import print_json, report_errors


def register(sub) -> None:
    p = sub.add_parser("fmt", help="rewrite pattern files in the canonical layout (comments kept)",
                       description="Rewrite pattern files in the canonical layout, comments kept: each FILE "
                                   "in place (atomically; an unchanged file is not touched); -e EXPR and '-' "
                                   "print the result on stdout. Exit 1 on a syntax error or, with --check, "
                                   "a file that would change.")
    p.add_argument("files", nargs="*", metavar="FILE", help="files to format in place ('-' reads standard input)")
    p.add_argument("-e", "--expr", help="format a pattern given on the command line (printed on stdout)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    mode.add_argument("--diff", action="store_true", help="write nothing; print a unified diff of the changes")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _read(path: str) -> str:
    from ..lang.parser import decode_source

    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    return decode_source(data, "<stdin>" if path == "-" else path)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically, keeping its permission bits and
    writing through symlinks (``patternc.fileio.atomic_write``)."""
    from ..fileio import atomic_write_text

    atomic_write_text(path, text)


def run(args) -> int:
    from ..lang.formatter import format_source

    if args.expr is not None and args.files:
        return _usage("give FILE... or -e EXPR, not both", args.json)
    if args.expr is None and not args.files:
        return _usage("nothing to format: give FILE... or -e EXPR", args.json)
    sources = [("<expr>", args.expr)] if args.expr is not None else [(f, None) for f in args.files]
    results = []
    status = ExitCode.OK
    for name, text in sources:
        try:
            if text is None:
                text = _read(name)
            formatted = format_source(text, filename="<stdin>" if name == "-" else name)
        except OSError as e:  # this file only: the others are still formatted and reported
            status = _file_error(results, name, f"cannot read {name}: {e.strerror or e}", args.json, status)
            continue
        except PatternError as e:
            if args.json:
                results.append({"file": name, "ok": False, "diagnostics": [d.to_json() for d in e.diagnostics]})
                status = ExitCode.PROBLEMS
                continue
            report_errors(e.diagnostics, False)
            status = ExitCode.PROBLEMS
            continue
        changed = formatted != (text if name != "<expr>" or text.endswith("\n") else text + "\n")
        entry = {"file": name, "ok": True, "changed": changed}
        to_stdout = name in ("<expr>", "-")
        if args.check:
            if changed:
                status = ExitCode.PROBLEMS
                if not args.json:
                    print(f"would reformat {name}", file=sys.stderr)
        elif args.diff:
            diff = "".join(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                f"{name}", f"{name} (formatted)"))
            entry["diff"] = diff
            if not args.json:
                sys.stdout.write(diff)
        elif to_stdout:
            entry["formatted"] = formatted
            if not args.json:
                sys.stdout.write(formatted)
        elif changed:
            try:
                write_atomic(name, formatted)
            except OSError as e:
                status = _file_error(results, name, f"cannot write {name}: {e.strerror or e}", args.json, status)
                continue
            if not args.json:
                print(f"reformatted {name}", file=sys.stderr)
        results.append(entry)
    if args.json:
        print_json({"ok": status == ExitCode.OK, "files": results,
                    "diagnostics": [d for r in results for d in r.get("diagnostics", [])]})
    return status


def _file_error(results: list, name: str, message: str, as_json: bool, status: int) -> int:
    """A file that cannot be read or written: reported (exit 2 at the end), the rest go on."""
    from .common import decided

    decided(ExitCode.USAGE)
    results.append({"file": name, "ok": False, "error": message})
    if not as_json:
        print(f"error: {message}", file=sys.stderr)
    return max(status, ExitCode.USAGE)


def _usage(message: str, as_json: bool) -> int:
    from .common import usage_error

    return usage_error(message, as_json)
