"""Shared CLI plumbing: the source arguments (FILE | -e EXPR, --set, --json), reading the
source, and printing diagnostics (text on stderr, or JSON on stdout)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from ..errors import Diagnostic, ExitCode, PatternError


def add_source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="a .pattern file ('-' reads standard input)")
    src.add_argument("-e", "--expr", help="a pattern given on the command line")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=INT",
                   help="override a `param` (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


class UsageError(Exception):
    """A problem with the command line or an unreadable file: exit code 2."""


@dataclass
class Source:
    text: str
    filename: str
    params: dict


def parse_sets(sets) -> dict:
    out = {}
    for s in sets:
        name, eq, val = s.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise UsageError(f"--set expects NAME=INT, got {s!r}")
        if name in out:
            raise UsageError(f"--set {name} is given twice ({out[name]} and {val.strip()}); give each param once")
        try:
            out[name] = int(val.strip().replace("_", ""))
        except ValueError:
            raise UsageError(f"--set {name}: {val!r} is not an integer") from None
    return out


def read_source(args) -> Source:
    """Read FILE / -e / stdin. Raises UsageError (unreadable) or PatternError (bad UTF-8)."""
    from ..lang.parser import MAX_SOURCE_BYTES, decode_source, too_large_diagnostic

    params = parse_sets(args.sets)
    if args.expr is not None:
        return Source(args.expr, "<expr>", params)
    limit = 4 * MAX_SOURCE_BYTES  # bytes read at most: a huge file is refused, not loaded
    if args.file == "-":
        data = sys.stdin.buffer.read(limit + 1)
        name = "<stdin>"
    else:
        name = args.file
        try:
            with open(args.file, "rb") as f:
                data = f.read(limit + 1)
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror or e}") from None
    if len(data) > limit:
        raise PatternError(too_large_diagnostic(size if args.file != "-" else len(data), name))
    return Source(decode_source(data, name), name, params)


# Warnings raised through Python's ``warnings`` while a command runs (``PatternWarning``s from
# parse / compile / analyze) are collected by ``patternc.cli.main`` and shown like every other
# diagnostic: rendered on stderr, or inside the command's JSON object; each once.
_captured: list | None = None
_shown: set = set()


def start_capture(records: list) -> None:
    global _captured
    _captured = records
    _shown.clear()


def pending_warnings() -> list[Diagnostic]:
    """Captured PatternWarnings not shown yet (and marks them shown)."""
    from ..errors import PatternWarning

    out = []
    for w in _captured or []:
        if isinstance(w.message, PatternWarning):
            d = w.message.diagnostic
            key = (d.code, d.message)
            if key not in _shown:
                _shown.add(key)
                out.append(d)
    return out


def emit_diagnostics(diags, as_json: bool) -> None:
    """Text diagnostics go to stderr (JSON mode embeds them in the command's object)."""
    if as_json:
        for d in diags:
            _shown.add((d.code, d.message))
        return
    fresh = []
    for d in diags:
        key = (d.code, d.message)
        if d.severity != "warning" or key not in _shown:
            _shown.add(key)
            fresh.append(d)
    for d in fresh + pending_warnings():
        print(d.render(), file=sys.stderr)
        print(file=sys.stderr)


def _json_default(o):
    return str(o)


def _finite(obj):
    """JSON has no NaN/Infinity: write them as null (strict parsers reject the tokens)."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(obj) -> None:
    """Print one JSON object; captured warnings are added to its ``diagnostics``."""
    if isinstance(obj, dict):
        diags = obj.get("diagnostics")
        if isinstance(diags, list):
            for d in diags:
                if isinstance(d, dict):
                    _shown.add((d.get("code"), d.get("message")))
        extra = pending_warnings()
        if extra:
            obj = dict(obj)
            obj["diagnostics"] = list(diags or []) + [d.to_json() for d in extra]
    print(json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False))


def check_count(option: str, value, minimum: int = 1, unit: str = "") -> None:
    """The one range check of a command-line count (a length, heads, layers, ...): ``None``
    (not given) passes; below ``minimum`` raises ``UsageError`` (exit 2) naming the option.

    Example:
        >>> check_count("--seq-len", 0, unit="token")
        Traceback (most recent call last):
        ...
        patternc.cli.common.UsageError: --seq-len must be >= 1 token, got 0
    """
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be >= {minimum}{' ' + unit if unit else ''}, got {value}")


#: the exit code a command has decided on while it still prints (``main`` uses it when the
#: output pipe closes before the command returns)
_verdict = [ExitCode.OK]


def verdict(reset: bool = False) -> int:
    """The exit code decided so far (``reset``: start a new command at 0)."""
    if reset:
        _verdict[0] = ExitCode.OK
    return int(_verdict[0])


def decided(code: int) -> int:
    """Record that the command will exit with at least ``code``; returns ``code``."""
    _verdict[0] = max(_verdict[0], code)
    return code


def usage_error(message: str, as_json: bool) -> int:
    decided(ExitCode.USAGE)
    if as_json:
        print_json({"ok": False, "error": message, "diagnostics": []})
    print(f"error: {message}", file=sys.stderr)
    return ExitCode.USAGE


def run_guarded(args, body) -> int:
    """Run ``body(source) -> int`` mapping UsageError to 2 and PatternError to 1."""
    try:
        src = read_source(args)
    except UsageError as e:
        return usage_error(str(e), args.json)
    except PatternError as e:
        return report_errors(e.diagnostics, args.json)
    try:
        return body(src)
    except UsageError as e:
        return usage_error(str(e), args.json)
    except PatternError as e:
        return report_errors(e.diagnostics, args.json)


def report_errors(diags: list[Diagnostic], as_json: bool, extra: dict | None = None) -> int:
    decided(ExitCode.PROBLEMS)
    if as_json:
        obj = {"ok": False, "diagnostics": [d.to_json() for d in diags]}
        obj.update(extra or {})
        print_json(obj)
    else:
        emit_diagnostics(diags, False)
    return ExitCode.PROBLEMS


def parse_block_size(text: str):
    """``--block-size`` of compile / show / run: ``B``, or ``Q,KV`` (``QxKV`` too) -> int or
    (Q_BLOCK_SIZE, KV_BLOCK_SIZE) tokens. Raises UsageError (exit 2)."""
    parts = [t.strip() for t in str(text).lower().replace("x", ",").split(",")]
    try:
        vals = [int(t) for t in parts]
    except ValueError:
        raise UsageError(f"--block-size expects B or Q,KV (integers, e.g. 128 or 64,128), got {text!r}") from None
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise UsageError(f"--block-size expects one or two integers >= 1 (e.g. 128 or 64,128), got {text!r}")
    return vals[0] if len(vals) == 1 else (vals[0], vals[1])



def add_offset_args(p: argparse.ArgumentParser) -> None:
    """``--q-offset`` / ``--kv-offset`` (SPEC §1.6) of compile, show, analyze and run."""
    p.add_argument("--q-offset", type=int, default=0, metavar="T",
                   help="position of query row 0 in tokens (default 0); a decode step after T cached "
                        "tokens: --seq-len 1 --kv-len T+1 --q-offset T")
    p.add_argument("--kv-offset", type=int, default=0, metavar="T",
                   help="position of key column 0 in tokens (default 0): the oldest key a rolling cache keeps")


def offsets_of(args) -> dict:
    """``{"q_offset": …, "kv_offset": …}`` from the command line. Raises UsageError (exit 2)."""
    out = {}
    for name in ("q_offset", "kv_offset"):
        v = getattr(args, name, 0) or 0
        if v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 tokens, got {v}")
        out[name] = v
    return out


def add_documents_arg(p: argparse.ArgumentParser) -> None:
    """``--documents L1,L2,…`` (SPEC §1.7, §5) of compile, show and run."""
    p.add_argument("--documents", metavar="L1,L2,...",
                   help="document lengths of one packed row, in tokens (SPEC §1.7); --seq-len defaults to "
                        "their sum")


def documents_of(args) -> list | None:
    """``[[l1, l2, …]]`` (one row of lengths) from ``--documents``, and ``args.seq_len`` set from
    their sum when it was not given. Raises UsageError (exit 2): bad numbers, or a --seq-len
    whose position extent (--q-offset + --seq-len) differs from the sum."""
    text = getattr(args, "documents", None)
    if text is None:
        return None
    try:
        lens = [int(t.strip().replace("_", "")) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--documents expects lengths L1,L2,... (integers), got {text!r}") from None
    if not lens or min(lens) < 1:
        raise UsageError(f"--documents expects lengths >= 1 token, got {text!r}")
    total = sum(lens)
    qo = getattr(args, "q_offset", 0) or 0
    if args.seq_len is None:
        if total - qo < 1:
            raise UsageError(f"--documents sum to {total} tokens, not past --q-offset {qo}")
        args.seq_len = total - qo
    elif qo + args.seq_len != total:
        raise UsageError(f"--seq-len {args.seq_len} (+ --q-offset {qo}) differs from the sum of --documents, "
                         f"{total} tokens; drop --seq-len (it defaults to the sum) or fix the lengths")
    kv_len = getattr(args, "kv_len", None)
    ko = getattr(args, "kv_offset", 0) or 0
    if kv_len is not None and ko + kv_len > total:
        raise UsageError(f"--kv-len {kv_len} (+ --kv-offset {ko}) reaches past the documents' {total} tokens")
    return [lens]
