"""The registry of primitives (SPEC §1.1): names, parameters, defaults and constraints.

This table drives argument checking, "did you mean" suggestions, the canonical printer and
the language reference in ``docs/language.md``. Predicates themselves live in
``patternc.reference`` (the oracle) and in the lowering passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class PrimSpec:
    name: str
    params: tuple[Param, ...]
    predicate: str
    source: str = ""
    example: str = ""
    # alternative keyword forms: e.g. global(n=k) | global(at=[...]); each is a tuple of params
    forms: tuple[tuple[Param, ...], ...] = field(default=())

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


PRIMITIVES: dict[str, PrimSpec] = {
    s.name: s
    for s in [
        PrimSpec("all", (), "always", example="all"),
        PrimSpec("none", (), "never", example="none"),
        PrimSpec("causal", (), "j <= i", "autoregressive masking", "causal"),
        PrimSpec(
            "local",
            (_p("w", 1, doc="window: keys with |i - j| < w"),),
            "|i - j| < w",
            "xformers make_local_attention / HF sliding_window=w (w keys incl. self when & causal)",
            "local(w=128) & causal",
        ),
        PrimSpec(
            "band",
            (_p("left", 0, doc="keys before the query"), _p("right", 0, doc="keys after the query")),
            "i - left <= j <= i + right",
            "FlashAttention window_size=(left, right)",
            "band(left=4, right=0)",
        ),
        PrimSpec(
            "strided",
            (_p("s", 1, doc="stride"),),
            "(i - j) mod s = 0",
            "Sparse Transformer A(2), Child et al. 2019 §4.2 (with & causal)",
            "strided(s=64) & causal",
        ),
        PrimSpec(
            "dilated",
            (_p("w", 1, doc="keys per side incl. self, in steps of d"), _p("d", 1, doc="dilation")),
            "(i - j) mod d = 0 and |i - j| < w*d",
            "Longformer dilated sliding window, Beltagy et al. 2020 §3",
            "dilated(w=4, d=2)",
        ),
        PrimSpec(
            "chunk",
            (_p("l", 1, doc="chunk length"),),
            "floor(i/l) = floor(j/l)",
            "Sparse Transformer fixed A(1); Llama-4 chunked attention",
            "chunk(l=128)",
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
        ),
        PrimSpec("sink", (_p("n", 0, doc="number of sink tokens"),), "j < n",
                 "StreamingLLM attention sinks, Xiao et al. 2023", "sink(n=4)"),
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
        ),
        PrimSpec("prefix", (_p("n", 0, doc="prefix length"),), "i < n and j < n",
                 "prefix-LM (causal | prefix(n)), Raffel et al. 2020 (T5) §3.2.1", "causal | prefix(n=16)"),
        PrimSpec(
            "random",
            (_p("r", 0, doc="keys drawn per query row"), _p("seed", 0, default=0, unit="", doc="PCG64 seed")),
            "j among the r keys drawn for row i",
            "BigBird random attention, Zaheer et al. 2020 §2",
            "random(r=3, seed=0)",
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

PRIMITIVE_NAMES = tuple(PRIMITIVES)
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
    if name == "summary":
        l, c, g = values.get("l"), values.get("c"), values.get("g", 0)
        if all(isinstance(x, int) for x in (l, c, g)) and l >= 1 and c >= 1 and g >= 0 and (g + 1) * c > l:
            out.append((None, f"`summary(l={l}, c={c}, g={g})` is out of range: (g+1)*c = {(g + 1) * c} exceeds l = {l}",
                        "the summary columns must fit in one period: choose (g+1)*c <= l"))
    return out
