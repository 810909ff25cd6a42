"""Reachability analysis (SPEC §4): can every token reach every earlier token through the
layer stack, in how many layers, and which pair cannot?

``analyze(p, seq_len=n, layers=k)`` returns a ``ReachReport``. Engines (named in the report):

* ``exact-shift`` (``shift.py``): shift-invariant patterns (``local``, ``band``, ``strided``,
  ``dilated``, ``causal`` and ``~ & | -`` of them), on index differences; any length.
* ``exact-token`` (``token.py``): bit-packed reachability over every token pair, propagated
  along the layout's FULL / PARTIAL tiles; up to tens of thousands of tokens.
* ``block-bound`` (``block.py``): proven lower and upper bounds from block layouts (exact
  when they meet); very long sequences.
* ``networkx`` (``graph.py``): the layered graph itself; small sizes, cross-checks.

``engine="auto"`` tries the shift engine when the pattern is shift-invariant, then the token
engine up to ``TOKEN_AUTO_LIMIT`` tokens, else the block bound. See ``docs/reachability.md``.
"""

from __future__ import annotations

import time
import warnings

from ..errors import Diagnostic, PatternError, PatternWarning
from .model import MODES, Hop, Stack
from .report import ReachReport, Witness

__all__ = ["analyze", "ReachReport", "Witness", "Hop", "ENGINES", "TOKEN_AUTO_LIMIT"]

ENGINES = ("auto", "exact-shift", "exact-token", "block-bound", "networkx")
TOKEN_AUTO_LIMIT = 32768   # tokens: auto uses exact-token up to here (R needs n^2/8 bytes)
TOKEN_MAX = 65536          # tokens: exact-token refuses beyond (512 MiB per bit matrix)
PATH_MAX_CELLS = 1 << 28   # layers x tokens: single-source reach sets kept for a witness path


def _arg_error(message: str, help_: str) -> PatternError:
    return PatternError(Diagnostic("P401", message, None, help_, filename="<analyze>"))


def _engine_error(message: str, help_: str) -> PatternError:
    return PatternError(Diagnostic("P402", message, None, help_, filename="<analyze>"))


def _check_int(name, v, minimum, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _arg_error(f"`{name}` must be an integer >= {minimum}, got {v!r}", f"pass {name}={max(minimum, 1)} or more")


def analyze(p_or_source, *, seq_len: int, layers: int | None = None, num_heads: int = 1,
            params: dict | None = None, pairs: str = "earlier", engine: str = "auto",
            block_size: int | None = None, q_offset: int = 0, kv_offset: int = 0) -> ReachReport:
    """Reachability of a pattern through its layer stack (SPEC §4).

    Information flows from key ``j`` to query ``i`` in layer ``m`` when some head allows
    ``(i, j)`` in that layer, or ``i == j`` (residual). ``min_layers`` is the least ``k``
    such that every required pair is connected by a path of ``k`` hops through layers
    ``0 .. k-1`` (``None``: never).

    Args:
        p_or_source: a ``Pattern`` or pattern source text.
        seq_len: Q_LEN = KV_LEN, tokens (>= 1).
        layers: k to check (``reachable`` then means "within k layers"), or None.
        num_heads: H (>= 1); a query attends the union of its heads' keys.
        params: values for the source's ``param`` s.
        pairs: ``"earlier"`` (every j <= i, the default) or ``"all"`` (every pair).
        engine: ``"auto"``, ``"exact-shift"``, ``"exact-token"``, ``"block-bound"`` or
            ``"networkx"``.
        block_size: tokens per block for ``exact-token`` / ``block-bound`` (default: 128 or
            less for short inputs / the smallest power of two giving <= 8192 blocks).
        q_offset, kv_offset: positions (SPEC §1.6, tokens, >= 0). The stack spans positions
            ``0 .. q_offset + seq_len - 1`` (``q_len`` / ``kv_len`` are that extent) and only
            the queries at positions ``q_offset ..`` (the ``seq_len`` rows of a decode step or
            prefill chunk) and the keys at ``kv_offset ..`` are required; paths run through
            every position, as the hidden states of earlier tokens exist in every layer.
            Offsets use ``exact-token`` (or ``networkx``); the other engines are P402.

    Returns:
        ``ReachReport`` (``min_layers``, ``reachable``, ``exact``, ``engine``, ``witness``, ...).

    Raises:
        PatternError: invalid source (P1xx/P2xx), a parameter out of range at this length
            (P301), a bad argument (P401), or an engine that does not apply or is too small
            for this length (P402).

    Example:
        >>> r = analyze("(local(w=9) | strided(s=8)) & causal", seq_len=64)
        >>> r.min_layers, r.exact, r.engine
        (2, True, 'exact-shift')
        >>> analyze("local(w=8) & causal", seq_len=64, layers=2).reachable
        False
    """
    t0 = time.perf_counter()
    _check_int("seq_len", seq_len, 1)
    _check_int("layers", layers, 0, allow_none=True)
    _check_int("num_heads", num_heads, 1)
    _check_int("block_size", block_size, 1, allow_none=True)
    _check_int("q_offset", q_offset, 0)
    _check_int("kv_offset", kv_offset, 0)
    extent = q_offset + seq_len
    if kv_offset >= extent:
        raise _arg_error(f"`kv_offset` {kv_offset} leaves no key: the positions end at {extent - 1} "
                         f"(q_offset + seq_len - 1)", f"use kv_offset <= {extent - 1}")
    if pairs not in MODES:
        raise _arg_error(f"`pairs` must be one of {', '.join(MODES)}, got {pairs!r}",
                         "use pairs='earlier' (every j <= i) or pairs='all'")
    if engine not in ENGINES:
        from ..errors import did_you_mean

        hint = did_you_mean(str(engine), ENGINES)
        raise _arg_error(f"unknown engine {engine!r}", hint or f"choose one of {', '.join(ENGINES)}")
    from ..source.frontdoor import parse

    pattern = parse(p_or_source, params=params)
    notes = []
    if pattern.num_heads > num_heads:
        msg = (f"the pattern has {pattern.num_heads} different heads but num_heads={num_heads}: only heads "
               f"0..{num_heads - 1} are analysed; pass num_heads={pattern.num_heads} (--heads) for all of them")
        notes.append(msg)
        warnings.warn(PatternWarning(Diagnostic("W003", msg, None, None,
                                                severity="warning", filename="<pattern>")), stacklevel=2)
    from ..ir.specialize import head_cycle_warning

    cycle = head_cycle_warning(pattern.num_heads, num_heads)
    if cycle is not None:
        notes.append(cycle.message)
        warnings.warn(PatternWarning(cycle), stacklevel=2)
    canonical = str(pattern)
    from ..ir.specialize import uses_documents

    if uses_documents(pattern):
        pattern = _one_document(pattern, extent, notes)
    stack = Stack(pattern, extent, num_heads)
    if q_offset or kv_offset:
        if engine not in ("auto", "exact-token", "networkx"):
            raise _engine_error(f"{engine} answers for every pair of the sequence; offsets (q_offset={q_offset}, "
                                f"kv_offset={kv_offset}) restrict the required pairs, which only exact-token and "
                                "networkx do", "use engine='auto' (exact-token) or 'networkx'")
        if engine == "auto":
            if extent > TOKEN_MAX:
                raise _engine_error(f"with offsets the analysis keeps every token pair of the {extent} positions "
                                    f"(exact-token), more than its limit of {TOKEN_MAX}",
                                    "analyse without offsets (every pair), or a shorter sequence")
            engine = "exact-token"
        notes.append(f"offsets: required queries at positions {q_offset}..{extent - 1}, keys from position "
                     f"{kv_offset}; paths run through every position 0..{extent - 1}")
    out = _run(stack, pairs, engine, layers, block_size, notes, q_offset, kv_offset)
    out.pattern = canonical
    out.seq_len, out.q_offset, out.kv_offset = seq_len, q_offset, kv_offset
    out.seconds = time.perf_counter() - t0
    return out


def _one_document(pattern, seq_len: int, notes: list):
    """A pattern that reads run-time documents, analysed within one document of ``seq_len``
    tokens (docs/reachability.md): ``document`` is ``all`` and ``per_document(p)`` is ``p``
    bound at ``seq_len``. Pairs in two documents never connect (no pattern lets information
    cross a document boundary), so that question has no informative answer; the one asked is
    how many layers a document of this length needs."""
    from ..ir.nodes import ALL
    from ..ir.specialize import substitute_document, substitute_per_document

    notes.append(f"the pattern reads run-time documents: analysed within one document of {seq_len} tokens "
                 "(`document` is all, `per_document(p)` is p at that length); pairs in two documents never "
                 "connect")
    return substitute_document(substitute_per_document(pattern, "whole", seq_len), ALL)


# ---- engine dispatch ---------------------------------------------------------------------------------------
def _run(stack, mode, engine, layers, block_size, notes, q_offset=0, kv_offset=0) -> ReachReport:
    n = stack.n
    if engine == "networkx":
        from . import graph

        if n > graph.MAX_TOKENS:
            raise _engine_error(f"the networkx engine builds the whole layered graph; {n} tokens is more than its "
                                f"limit of {graph.MAX_TOKENS}", "use engine='auto' (or exact-token)")
        return _from_graph(stack, mode, layers, notes, q_offset, kv_offset)
    if engine in ("auto", "exact-shift"):
        from .shift import NotShiftInvariant, ShiftAnalysis

        try:
            sa = ShiftAnalysis(stack)
        except NotShiftInvariant as e:
            if engine == "exact-shift":
                raise _engine_error(f"exact-shift needs a shift-invariant pattern: {e}",
                                    "use engine='auto' or 'exact-token' (or 'block-bound' for long sequences)") from None
            sa = None
        if sa is not None:
            res = sa.run(mode)
            if res.exact or engine == "exact-shift" or n > TOKEN_AUTO_LIMIT:
                return _from_shift(stack, mode, layers, res, notes)
            notes.append("the shift engine could only bound this mixed-direction pattern; exact-token used instead")
    if engine == "exact-token" or (engine == "auto" and n <= TOKEN_AUTO_LIMIT):
        if n > TOKEN_MAX:
            raise _engine_error(f"exact-token keeps every token pair ({n}^2 bits); {n} tokens is more than its "
                                f"limit of {TOKEN_MAX}", "use engine='block-bound' (a proven bound) or 'auto'")
        from . import token as tok

        try:
            return _from_token(stack, mode, layers, block_size, notes, q_offset, kv_offset)
        except tok.TooLarge as e:
            if engine == "exact-token" or q_offset or kv_offset:
                raise _engine_error(f"exact-token: {e}", "use engine='block-bound'") from None
            notes.append(f"exact-token gave up ({e}); block-bound used instead")
    return _from_block(stack, mode, layers, block_size, notes)


def _verdict(layers, min_layers, never):
    if layers is None:
        return not never
    return (not never) and min_layers is not None and min_layers <= layers


def _witness_success(stack, i, j, K, path_fn, layers, exact=True):
    path = path_fn(i, j, K) if path_fn is not None else None
    if path is not None:
        assert stack.validate_path(path, i, j), "engine produced an invalid witness path"
    if layers is None or K <= layers:
        reason = (f"the pair that needs the most layers: {K}" if exact
                  else f"connected within {K} layers by the path below; the proof covers this pair last "
                       f"(a bound: the exact number may be smaller)")
        if K == 0:
            reason = "a single position: nothing to connect"
        return Witness(i, j, True, K, path, reason)
    return Witness(i, j, False, K, path,
                   f"key {j} does not reach query {i} within {layers} layer{'s' if layers != 1 else ''}; "
                   f"it needs {K}")


def _cycle_text(stack):
    if stack.period > 1:
        return f"a full cycle of the {stack.period}-entry layers(...) stack adds nothing"
    return "another layer adds nothing"


def _path_fn_token(stack, adjs):
    from . import token as tok

    def fn(i, j, K):
        if K * adjs[0].nb * adjs[0].b > PATH_MAX_CELLS:
            return None
        return tok.backtrack(stack, tok.forward(adjs, j, K), i, j)

    return fn


def _from_token(stack, mode, layers, block_size, notes, q_offset=0, kv_offset=0) -> ReachReport:
    from . import token as tok
    from .tiles import layer_tiles

    n = stack.n
    b = block_size or tok.default_block_size(n)
    adjs = [tok.Adjacency(layer_tiles(stack, m, b)) for m in range(stack.period)]
    res = tok.reach(adjs, n, mode, q_offset=q_offset, kv_offset=kv_offset)
    if res.never:
        i, j = res.unreachable
        why = (f"the reachable set stops growing after {res.stalled_at} "
               f"layer{'s' if res.stalled_at != 1 else ''} ({_cycle_text(stack)})")
        return _never_report(stack, i, j, why, "exact-token", layers, mode, notes)
    K = res.min_layers
    i, j = res.hardest
    w = _witness_success(stack, i, j, K, _path_fn_token(stack, adjs), layers)
    return ReachReport(K, layers, _verdict(layers, K, False), mode, True, "exact-token", w, n, stack.num_heads,
                       lower_bound=K, upper_bound=K, notes=notes)


def _never_hint(stack, i, j):
    """A structural reason when one is plain (sound: ``proves_causal`` is a proof)."""
    import numpy as np

    from ..ir.facts import proves_causal

    if j > i and all(proves_causal(lp) for lp in stack.layer_patterns):
        return "every layer is causal (j <= i), so no information flows from a later key to an earlier query"
    if not any(bool(stack.attend(m, np.int64(i), np.int64(j))) for m in range(stack.period)):
        return f"no layer lets query {i} attend key {j} directly, and no chain of hops connects them"
    return None


def _bound_verdict(layers, lo, up) -> tuple[bool, bool]:
    """(reachable, decided) from proven bounds lo <= min_layers <= up (up None: unproven)."""
    if layers is None:
        return up is not None, up is not None
    reachable = up is not None and up <= layers
    return reachable, reachable or lo > layers


def _never_report(stack, i, j, why, engine, layers, mode, notes) -> ReachReport:
    """The exact "never" report: key j cannot reach query i at any depth, and why."""
    reason = f"key {j} never reaches query {i}: {why}"
    hint = _never_hint(stack, i, j)
    if hint:
        reason += f"; {hint}"
    w = Witness(i, j, False, None, None, reason)
    return ReachReport(None, layers, False, mode, True, engine, w, stack.n, stack.num_heads, never=True, notes=notes)


def _from_shift(stack, mode, layers, res, notes) -> ReachReport:
    n = stack.n
    if res.never:
        i, j = res.unreachable
        w = Witness(i, j, False, None, None, f"key {j} never reaches query {i}: {res.reason}")
        return ReachReport(None, layers, False, mode, True, "exact-shift", w, n, stack.num_heads, never=True,
                           notes=notes)
    if res.exact:
        K = res.min_layers
        i, j = res.hardest
        w = _witness_success(stack, i, j, K, res.path_fn, layers)
        return ReachReport(K, layers, _verdict(layers, K, False), mode, True, "exact-shift", w, n, stack.num_heads,
                           lower_bound=K, upper_bound=K, notes=notes)
    # a bound (mixed directions, monotone paths disagree with the line)
    lo, up = res.lower, res.upper
    reachable, decided = _bound_verdict(layers, lo, up)
    notes.append("bound: monotone paths give the upper bound, paths on the unbounded line the lower bound; "
                 f"use exact-token (n <= {TOKEN_MAX}) for the exact value")
    if reachable:
        i, j = res.hardest
        w = _witness_success(stack, i, j, up, res.path_fn, layers, exact=False)
    elif layers is not None and lo > layers:
        i, j = res.lower_pair
        w = Witness(i, j, False, None, None,
                    f"key {j} cannot reach query {i} within {layers} layers: even on the unbounded line "
                    f"i - j = {i - j} needs {lo} steps")
    elif up is not None:
        i, j = res.hardest
        w = Witness(i, j, False, None, None,
                    f"not proven within {layers} layers: monotone paths need {up} for this pair, the line "
                    f"allows {lo}; the exact answer needs engine='exact-token'")
    else:
        i, j = res.lower_pair
        w = Witness(i, j, False, None, None,
                    "not proven: no monotone path connects some pair; the exact answer needs engine='exact-token'")
    return ReachReport(up, layers, reachable, mode, False, "shift-bound", w, n, stack.num_heads,
                       lower_bound=lo, upper_bound=up, decided=decided, notes=notes)


def _from_block(stack, mode, layers, block_size, notes) -> ReachReport:
    from .block import BlockAnalysis

    n = stack.n
    ba = BlockAnalysis(stack, block_size)
    res = ba.run(mode)
    notes.append(f"block size {res.block_size} token{'s' if res.block_size != 1 else ''} ({ba.nb} blocks)")
    if res.never:
        i, j = res.unreachable
        return _never_report(stack, i, j, res.reason, "block-bound", layers, mode, notes)
    lo, up = res.lower, res.upper
    real = res.real_pair()  # needs >= lo layers for certain (None: show the proof's last pair)
    if res.exact:
        i, j = real or res.hardest
        w = _witness_success(stack, i, j, up, res.walk_fn if real else res.path_fn, layers)
        return ReachReport(up, layers, _verdict(layers, up, False), mode, True, "block-bound", w, n,
                           stack.num_heads, lower_bound=lo, upper_bound=up, notes=notes)
    # a bound
    reachable, decided = _bound_verdict(layers, lo, up)
    if (reachable or (layers is None and up is not None)) and real is not None:
        # the witness is a pair that really needs lo layers, shown with a path of up layers
        i, j = real
        path = res.walk_fn(i, j, up)
        assert stack.validate_path(path, i, j), "engine produced an invalid witness path"
        w = Witness(i, j, True, up, path,
                    f"needs at least {lo} layers (no shorter chain of non-empty tiles of {res.block_size} tokens "
                    f"joins their blocks) and is connected within {up} by the path below (a bound: min_layers "
                    f"is between {lo} and {up})")
    elif reachable or (layers is None and up is not None):
        i, j = res.hardest
        w = _witness_success(stack, i, j, up, res.path_fn, layers, exact=False)
    elif layers is not None and lo > layers:
        i, j = res.lower_pair
        w = Witness(i, j, False, None, None,
                    f"key {j} cannot reach query {i} within {layers} layers: at least {lo} are needed "
                    f"(no shorter chain of non-empty tiles of {res.block_size} tokens connects their blocks)")
    else:
        pair = res.unproven or res.hardest or res.lower_pair
        i, j = pair
        need = f"; the bound proves it within {up} layers" if up is not None else ""
        w = Witness(i, j, False, None, None,
                    f"not proven: no chain of FULL tiles of {res.block_size} tokens (and no diagonal tile) connects "
                    f"key {j} to query {i} within {layers if layers is not None else 'any number of'} layers{need}; "
                    f"the exact answer needs engine='exact-token' (n <= {TOKEN_MAX}) or a smaller block_size")
    return ReachReport(up, layers, reachable, mode, False, "block-bound", w, n, stack.num_heads,
                       lower_bound=lo, upper_bound=up, decided=decided, notes=notes)


def _from_graph(stack, mode, layers, notes, q_offset=0, kv_offset=0) -> ReachReport:
    from . import graph

    n = stack.n
    res, g = graph.run(stack, mode, q_offset, kv_offset)
    if res.never:
        i, j = res.unreachable
        return _never_report(stack, i, j, f"no path in the layered graph ({_cycle_text(stack)})", "networkx",
                             layers, mode, notes)
    K = res.min_layers
    i, j = res.hardest
    w = _witness_success(stack, i, j, K, g.path, layers)
    return ReachReport(K, layers, _verdict(layers, K, False), mode, True, "networkx", w, n, stack.num_heads,
                       lower_bound=K, upper_bound=K, notes=notes)
