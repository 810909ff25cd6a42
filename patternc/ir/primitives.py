"""The registry of primitives (SPEC §1.1): one entry per primitive holds everything the
compiler knows about it.

An entry (``PrimSpec``) holds

* its **parameters** (names in SPEC order, defaults, minima, units, docs) and any constraint
  between them (``constraint``): argument checking, "did you mean", the canonical printer and
  the language reference in ``docs/language.md`` read them;
* its **predicate**, as text for the docs (``predicate``) and as ONE formula (``formula``)
  written against an *array namespace* ``xp`` (below), so the same formula evaluates on numpy
  (``patternc.lower.evaluate``: layouts, counting, witnesses, reachability) and on torch
  (``patternc.execute.maskmod``: the FlexAttention ``mask_mod``, traceable by
  ``torch.compile``, every integer parameter a 0-d tensor so a new value does not recompile);
* the **facts** the passes need: what it reads (``reads``: the difference ``i - j`` only, only
  ``i``, only ``j``, both as separate halves, or both), when it provably allows only ``j <= i``
  (``causal_if``) or is symmetric (``symmetric_if``), the stride of the arithmetic progressions
  its allowed differences or key columns form (``stride``), when it allows every pair at a
  length ``n`` (``full_at``), when its arguments make it the constant ``all`` / ``none``
  (``constant``), and whether it is bidirectional on purpose (``two_way``).

The IR stays standard-library only: a formula receives the array namespace as an argument.

**The array namespace** ``xp`` a formula is given (``NumpyArrays`` in ``patternc.lower``,
``TorchArrays`` in ``patternc.execute.maskmod``):

* ``xp.abs(x)``: elementwise absolute value;
* ``xp.const(value)``: the predicate that is ``value`` (bool) on every pair, at the broadcast
  shape of ``i`` and ``j``;
* ``xp.index_set(positions, axis)``: a function ``x -> x in positions`` for query (``axis="q"``)
  or key (``axis="kv"``) indices (numpy: ``isin``; torch: a lookup table of Q_LEN / KV_LEN);
* ``xp.random_pairs(r, seed)``: a function ``(i, j) -> bool``, True on the pairs ``random(r,
  seed)`` draws at the namespace's lengths (SPEC §1.1: one PCG64(seed) generator, rows 0, 1, …
  in order, ``choice(KV_LEN, size=min(r, KV_LEN), replace=False)``);
* ``xp.q_len``, ``xp.kv_len``: the lengths of the index space (tokens, or blocks inside
  ``blocks(b, ...)``).

``formula(xp, a)`` is called once per build with ``a`` the argument dict (numpy: ints; torch:
0-d int64 tensors; ``at``: a tuple of ints) and returns ``pred(i, j)`` on broadcastable integer
arrays (int64 ``ndarray`` or tensors) with only ``&``, ``|``, ``~``, comparisons, ``+ - * // %``
and the namespace's functions, so no Python branching depends on index values. A formula may
branch on the *form* of its arguments (``"n" in a``) and may compute derived parameters once.

``patternc.reference`` (the test oracle) does not read these formulas: it is written by hand
from SPEC §1, so that a wrong formula here is caught by every compile-vs-oracle test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

MAX_INT = 2**31 - 1  # largest integer accepted as a length/parameter


@dataclass(frozen=True)
class Param:
    name: str
    kind: str = "int"  # 'int' | 'intlist' | 'pattern' | 'patterns' (variadic)
    default: object = None  # None = required
    minimum: int | None = None
    unit: str = "tokens"
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


def _never(a) -> bool:
    return False


def _no_stride(a):
    return None


@dataclass(frozen=True)
class PrimSpec:
    """One primitive: parameters, docs, the formula and the facts (see the module docstring).

    Attributes:
        name: the name in the language.
        params: parameters in SPEC order (positional order).
        predicate: the predicate as text (docs, ``patternc check``).
        source: the published pattern it implements (paper and section, or library).
        example: a short source example.
        forms: alternative keyword forms (``global(n=k)`` | ``global(at=[...])``), each a tuple
            of params.
        reads: ``""`` (a constant), ``"d"`` (only ``i - j``: shift-invariant), ``"i"`` (only
            the query index), ``"j"`` (only the key index: a key-column family), ``"ij"``
            (an ``i``-half combined with a ``j``-half) or ``"x"`` (both, any other way).
        formula: ``formula(xp, a) -> pred(i, j)`` (None for the combinators ``heads``,
            ``layers``, ``blocks``, which the passes handle structurally).
        causal_if: ``causal_if(a) -> bool``: True proves the primitive allows only ``j <= i``
            (``a`` may hold symbolic ``IntExpr`` values: compare with ``==`` only).
        symmetric_if: ``symmetric_if(a) -> bool``: True proves ``attend(i, j) == attend(j, i)``.
        stride: ``stride(a) -> int | None``: the period of the arithmetic progressions the
            allowed differences (``reads == "d"``) or key columns (``reads == "j"``) form
            (the hint the reachability engine's AP cover uses).
        constant: ``constant(a) -> bool | None``: True / False when these (concrete) arguments
            make the primitive ``all`` / ``none`` at every length (the normaliser rewrites it
            so), None otherwise.
        full_at: ``full_at(a, n) -> bool``: True proves that at ``Q_LEN = KV_LEN = n`` every
            pair is allowed (so the primitive is the constant ``all`` at that length).
        two_way: bidirectional on purpose (``prefix``, ``global``): the W002 lint does not
            blame it when a ``causal`` pattern lets a query see a later key.
        constraint: ``constraint(values) -> [(param, message, help)]`` for a rule between
            several concrete parameters (single-parameter minima are in ``params``).
    """

    name: str
    params: tuple[Param, ...]
    predicate: str
    source: str = ""
    example: str = ""
    # alternative keyword forms: e.g. global(n=k) | global(at=[...]); each is a tuple of params
    forms: tuple[tuple[Param, ...], ...] = field(default=())
    reads: str = "x"
    formula: Callable | None = None
    causal_if: Callable = _never
    symmetric_if: Callable = _never
    stride: Callable = _no_stride
    constant: Callable = lambda a: None  # noqa: E731
    full_at: Callable = lambda a, n: False  # noqa: E731
    two_way: bool = False
    constraint: Callable | None = None

    @property
    def combinator(self) -> bool:
        return any(p.kind in ("pattern", "patterns") for p in self.params)

    def all_param_names(self) -> list[str]:
        names = [p.name for p in self.params]
        for f in self.forms:
            names += [p.name for p in f if p.name not in names]
        return names


def _p(name, minimum=None, default=None, unit="tokens", doc="", kind="int"):
    return Param(name=name, kind=kind, default=default, minimum=minimum, unit=unit, doc=doc)


def _always(a) -> bool:
    return True


# ---------------------------------------------------------------------------------------------
# the formulas (one per primitive; see the module docstring for the namespace ``xp``)


def _f_all(xp, a):
    return xp.const(True)


def _f_none(xp, a):
    return xp.const(False)


def _f_causal(xp, a):
    return lambda i, j: j <= i


def _f_local(xp, a):
    w = a["w"]
    return lambda i, j: xp.abs(i - j) < w


def _f_band(xp, a):
    left, right = a["left"], a["right"]
    return lambda i, j: (i - j <= left) & (j - i <= right)


def _f_strided(xp, a):
    s = a["s"]
    return lambda i, j: (i - j) % s == 0


def _f_dilated(xp, a):
    d, span = a["d"], a["w"] * a["d"]
    return lambda i, j: ((i - j) % d == 0) & (xp.abs(i - j) < span)


def _f_chunk(xp, a):
    l = a["l"]  # noqa: E741
    return lambda i, j: i // l == j // l


def _f_summary(xp, a):
    l, c, g = a["l"], a["c"], a["g"]  # noqa: E741
    lo, hi = l - (g + 1) * c, l - g * c

    def summary(i, j):
        jm = j % l
        return (jm >= lo) & (jm < hi)

    return summary


def _f_sink(xp, a):
    n = a["n"]
    return lambda i, j: j < n


def _f_global(xp, a):
    if "n" in a:
        n = a["n"]
        return lambda i, j: (i < n) | (j < n)
    in_q, in_kv = xp.index_set(a["at"], "q"), xp.index_set(a["at"], "kv")
    return lambda i, j: in_q(i) | in_kv(j)


def _f_prefix(xp, a):
    n = a["n"]
    return lambda i, j: (i < n) & (j < n)


def _f_random(xp, a):
    return xp.random_pairs(a["r"], a["seed"])


def _f_document(xp, a):
    """doc(i) = doc(j): the namespace gives the batch row's ids (``xp.documents``, int64 [P]
    indexed by position); without run-time data the predicate is undefined (P360)."""
    ids = getattr(xp, "documents", None)
    if ids is None:
        from ..errors import Diagnostic, PatternError

        raise PatternError(Diagnostic(
            "P360", "`document` needs run-time `documents` (SPEC §1.7) to be evaluated", None,
            "pass documents=ids [B, P] (or lengths [[l0, l1, ...]]) to layout_for / block_mask / attention "
            "(CLI: --documents L1,L2,...)"))
    top = ids.shape[-1] - 1
    return lambda i, j: ids[i.clip(0, top)] == ids[j.clip(0, top)]


def _summary_constraint(values):
    l, c, g = values.get("l"), values.get("c"), values.get("g", 0)
    if all(isinstance(x, int) for x in (l, c, g)) and l >= 1 and c >= 1 and g >= 0 and (g + 1) * c > l:
        return [(None, f"`summary(l={l}, c={c}, g={g})` is out of range: (g+1)*c = {(g + 1) * c} exceeds l = {l}",
                 "the summary columns must fit in one period: choose (g+1)*c <= l")]
    return []


def _global_full_at(a, n):
    if "n" in a:
        return a["n"] >= n
    return set(range(n)) <= set(a["at"])


PRIMITIVES: dict[str, PrimSpec] = {
    s.name: s
    for s in [
        PrimSpec("all", (), "always", example="all", reads="", formula=_f_all,
                 symmetric_if=_always, constant=lambda a: True, full_at=lambda a, n: True),
        PrimSpec("none", (), "never", example="none", reads="", formula=_f_none,
                 causal_if=_always, symmetric_if=_always, constant=lambda a: False),
        PrimSpec("causal", (), "j <= i", "autoregressive masking", "causal", reads="d", formula=_f_causal,
                 causal_if=_always),
        PrimSpec(
            "local",
            (_p("w", 1, doc="window: keys with |i - j| < w"),),
            "|i - j| < w",
            "xformers make_local_attention / HF sliding_window=w (w keys incl. self when & causal)",
            "local(w=128) & causal",
            reads="d", formula=_f_local,
            causal_if=lambda a: a.get("w") == 1,
            symmetric_if=_always,
        ),
        PrimSpec(
            "band",
            (_p("left", 0, doc="keys before the query"), _p("right", 0, doc="keys after the query")),
            "i - left <= j <= i + right",
            "FlashAttention window_size=(left, right)",
            "band(left=4, right=0)",
            reads="d", formula=_f_band,
            causal_if=lambda a: a.get("right") == 0,
            symmetric_if=lambda a: a.get("left") == a.get("right"),
        ),
        PrimSpec(
            "strided",
            (_p("s", 1, doc="stride"),),
            "(i - j) mod s = 0",
            "Sparse Transformer A(2), Child et al. 2019 §4.2 (with & causal)",
            "strided(s=64) & causal",
            reads="d", formula=_f_strided,
            symmetric_if=_always,
            stride=lambda a: a["s"],
            constant=lambda a: True if a["s"] == 1 else None,
        ),
        PrimSpec(
            "dilated",
            (_p("w", 1, doc="keys per side incl. self, in steps of d"), _p("d", 1, doc="dilation")),
            "(i - j) mod d = 0 and |i - j| < w*d",
            "Longformer dilated sliding window, Beltagy et al. 2020 §3",
            "dilated(w=4, d=2)",
            reads="d", formula=_f_dilated,
            causal_if=lambda a: a.get("w") == 1,
            symmetric_if=_always,
            stride=lambda a: a["d"],
        ),
        PrimSpec(
            "chunk",
            (_p("l", 1, doc="chunk length"),),
            "floor(i/l) = floor(j/l)",
            "Sparse Transformer fixed A(1); Llama-4 chunked attention",
            "chunk(l=128)",
            reads="x", formula=_f_chunk,
            causal_if=lambda a: a.get("l") == 1,
            symmetric_if=_always,
            full_at=lambda a, n: a["l"] >= n,
        ),
        PrimSpec(
            "summary",
            (
                _p("l", 1, doc="period"),
                _p("c", 1, doc="summary columns per period"),
                _p("g", 0, default=0, doc="which group of c columns, counted from the end"),
            ),
            "l - (g+1)*c <= (j mod l) < l - g*c",
            "Sparse Transformer fixed A(2), Child et al. 2019 §4.2 (c last positions of each block)",
            "summary(l=128, c=8)",
            reads="j", formula=_f_summary,
            stride=lambda a: a["l"],
            constant=lambda a: True if a["g"] == 0 and a["c"] == a["l"] else None,
            constraint=_summary_constraint,
        ),
        PrimSpec("sink", (_p("n", 0, doc="number of sink tokens"),), "j < n",
                 "StreamingLLM attention sinks, Xiao et al. 2023", "sink(n=4)",
                 reads="j", formula=_f_sink,
                 causal_if=lambda a: a.get("n") in (0, 1),  # j < 1 means j = 0 <= i
                 constant=lambda a: False if a["n"] == 0 else None,
                 full_at=lambda a, n: a["n"] >= n),
        PrimSpec(
            "global",
            (),
            "i < n or j < n  |  i in P or j in P",
            "BigBird ITC / Longformer global tokens",
            "global(n=1)",
            forms=(
                (_p("n", 0, doc="the first n positions are global"),),
                (_p("at", 0, kind="intlist", doc="global positions"),),
            ),
            reads="ij", formula=_f_global,
            causal_if=lambda a: a.get("n") == 0 or a.get("at") == (),
            symmetric_if=_always,
            constant=lambda a: False if a.get("n") == 0 or a.get("at") == () else None,
            full_at=_global_full_at,
            two_way=True,
        ),
        PrimSpec("prefix", (_p("n", 0, doc="prefix length"),), "i < n and j < n",
                 "prefix-LM (causal | prefix(n)), Raffel et al. 2020 (T5) §3.2.1", "causal | prefix(n=16)",
                 reads="ij", formula=_f_prefix,
                 causal_if=lambda a: a.get("n") in (0, 1),
                 symmetric_if=_always,
                 constant=lambda a: False if a["n"] == 0 else None,
                 full_at=lambda a, n: a["n"] >= n,
                 two_way=True),
        PrimSpec(
            "random",
            (_p("r", 0, doc="keys drawn per query row"), _p("seed", 0, default=0, unit="", doc="PCG64 seed")),
            "j among the r keys drawn for row i",
            "BigBird random attention, Zaheer et al. 2020 §2",
            "random(r=3, seed=0)",
            reads="x", formula=_f_random,
            causal_if=lambda a: a.get("r") == 0,
            constant=lambda a: False if a["r"] == 0 else None,
            full_at=lambda a, n: a["r"] >= n,
        ),
        PrimSpec(
            "document",
            (),
            "doc(i) = doc(j), doc from the run-time `documents` (SPEC §1.7)",
            "packed sequences: FlexAttention document masking (attention-gym generate_doc_mask_mod), "
            "xformers BlockDiagonalMask",
            "document & causal",
            reads="x", formula=_f_document,
            symmetric_if=_always,
            two_way=True,
        ),
        PrimSpec(
            "per_document",
            (Param("p", kind="pattern", doc="the pattern inside each document, in its own coordinates"),),
            "doc(i) = doc(j) and p at (i - start(i), j - start(j)), with q_len = kv_len = that document's length",
            "packed sequences where each document keeps its own anchors: StreamingLLM sinks / prefix-LM "
            "per document (xformers BlockDiagonalMask with a per-block pattern)",
            "per_document(sink(n=4) | local(w=512)) & causal",
        ),
        PrimSpec("heads", (Param("p", kind="patterns"),), "p_(h mod m)", "per-head patterns", "heads(local(w=8), strided(s=8))"),
        PrimSpec("layers", (Param("p", kind="patterns"),), "p_(l mod m)", "per-layer patterns (Gemma-2 style interleaving)", "layers(local(w=8), all)"),
        PrimSpec(
            "blocks",
            (_p("b", 1, doc="block size"), Param("p", kind="pattern")),
            "p at (floor(i/b), floor(j/b))",
            "DeepSpeed / OpenAI block-sparse layouts",
            "blocks(16, local(w=3))",
        ),
    ]
}

#: primitives whose truth comes from run-time data (SPEC §1.7): the input each needs
RUNTIME_PRIMITIVES = {"document": "documents", "per_document": "documents"}

INT_FUNCTION_NAMES = ("min", "max", "isqrt")
BUILTIN_INTS = ("q_len", "kv_len")


def check_values(name: str, values: dict) -> list[tuple[str, str, str]]:
    """Check concrete argument values of primitive ``name``.

    Args:
        values: param name -> int (or tuple of ints for ``at``); symbolic values are skipped.

    Returns:
        A list of ``(param, message, help)`` for each violated constraint (empty when valid);
        ``param`` is None for a constraint between several parameters.

    Example:
        >>> check_values("local", {"w": 0})[0][1]
        '`local(w=0)` is out of range: w must be >= 1'
    """
    spec = PRIMITIVES[name]
    params = {p.name: p for p in spec.params}
    for f in spec.forms:
        params.update({p.name: p for p in f})
    out = []
    for key, v in values.items():
        p = params.get(key)
        if p is None or p.minimum is None:
            continue
        if p.kind == "intlist" and isinstance(v, tuple):
            bad = [x for x in v if isinstance(x, int) and x < p.minimum]
            if bad:
                out.append((key, f"`{name}` position {bad[0]} is negative", "positions are 0-based token indices (>= 0)"))
        elif isinstance(v, int) and v < p.minimum:
            out.append((key, f"`{name}({key}={v})` is out of range: {key} must be >= {p.minimum}",
                        f"use {key} >= {p.minimum}" + (f" ({p.doc})" if p.doc else "")))
    if spec.constraint is not None:
        out += spec.constraint(values)
    return out
