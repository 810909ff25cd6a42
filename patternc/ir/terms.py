"""The registry of score terms (SPEC §1.8): ``softcap(c)`` and ``alibi(max_bias=8)``.

A pattern says which pairs attend; a score term says how a kept pair's score changes before
the softmax. For a kept pair, ``s = scale * (q_i . k_j)``, then in this order (``TERM_ORDER``):

==================== =================================== ===================================
term                 s becomes                           parameters
==================== =================================== ===================================
``softcap(c)``       ``c * tanh(s / c)``                 c >= 1 (Gemma 2 caps at 50)
``alibi(max_bias)``  ``s + m_h * (j - i)``               max_bias >= 1, default 8; slopes
                                                         ``alibi_slopes(H, max_bias)``
==================== =================================== ===================================

Masked pairs stay ``-inf``. Terms are written after the final expression:
``(local(w=4096) & causal) with softcap(c=50)``. They are checked and documented from this
table the way primitives are from ``primitives.PRIMITIVES`` (``TermSpec``, the shape of
``PrimSpec``: parameters, minimum, default, docs, source and ONE formula over an array
namespace), so "did you mean", the printer, the language reference and the FlexAttention
``score_mod`` share it. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .primitives import Param


@dataclass(frozen=True)
class TermSpec:
    """One score term: parameters, docs and its ONE formula (the shape of ``PrimSpec``).

    Attributes:
        name: the name in the language.
        params: parameters (positional order), with defaults, minima and docs.
        effect: what ``s`` becomes, as text (docs, ``patternc check``).
        source: the published model / paper it comes from.
        example: a short source example.
        formula: ``formula(xp, a) -> f(s, m, d)``: the new score from the score ``s``, the
            head's ALiBi slope ``m`` and the position difference ``d = j - i``, written against
            an array namespace ``xp`` with ``tanh`` (torch works as it is). FlexAttention's
            ``score_mod`` and SDPA's bias evaluate it; the block-sparse kernel runs an
            in-place equivalent (``execute.scoremod.ScoreTerms.apply_``) and the float64
            reference is written by hand from SPEC §1.8, so a wrong formula is caught.
        uses_slopes: the term reads ``m`` (ALiBi): kernels build ``alibi_slopes(H, ...)``.
    """

    name: str
    params: tuple[Param, ...]
    effect: str
    source: str = ""
    example: str = ""
    formula: Callable | None = None
    uses_slopes: bool = False


def _f_softcap(xp, a):
    c = a["c"]
    return lambda s, m, d: c * xp.tanh(s / c)


def _f_alibi(xp, a):
    return lambda s, m, d: s + m * d


SCORE_TERMS: dict[str, TermSpec] = {
    s.name: s
    for s in [
        TermSpec(
            "softcap",
            (Param("c", minimum=1, unit="", doc="the cap: scores end in (-c, c)"),),
            "s -> c * tanh(s / c)  (d/ds = 1 - tanh(s / c)^2)",
            "Gemma 2 attention-logit soft-capping (Gemma Team 2024, §2: c = 50); Grok-1 (c = 30)",
            "softcap(c=50)",
            formula=_f_softcap,
        ),
        TermSpec(
            "alibi",
            (Param("max_bias", default=8, minimum=1, unit="",
                   doc="the first head's slope is 2^(-max_bias / H) for H a power of two"),),
            "s -> s + m_h * (j - i)",
            "ALiBi, Press et al. 2022 (ofirpress/attention_with_linear_biases); BLOOM, MPT",
            "alibi(max_bias=8)",
            formula=_f_alibi,
            uses_slopes=True,
        ),
    ]
}

#: the order terms are applied in, and printed in (SPEC §1.8)
TERM_ORDER = tuple(SCORE_TERMS)
TERM_NAMES = TERM_ORDER


def check_term_values(name: str, values: dict) -> list[tuple[str, str, str]]:
    """Check concrete argument values of score term ``name``.

    Returns:
        ``(param, message, help)`` per violated constraint (empty when valid).

    Example:
        >>> check_term_values("softcap", {"c": 0})[0][1]
        '`softcap(c=0)` is out of range: c must be >= 1'
    """
    spec = SCORE_TERMS[name]
    out = []
    for p in spec.params:
        v = values.get(p.name)
        if isinstance(v, int) and p.minimum is not None and v < p.minimum:
            out.append((p.name, f"`{name}({p.name}={v})` is out of range: {p.name} must be >= {p.minimum}",
                        f"use {p.name} >= {p.minimum}" + (f" ({p.doc})" if p.doc else "")))
    return out


def alibi_slopes(num_heads: int, max_bias: int = 8) -> list[float]:
    """ALiBi slopes ``m_h`` of heads ``h = 0 .. num_heads - 1`` (SPEC §1.8).

    For H a power of two, ``m_h = 2^(-max_bias * (h + 1) / H)``. Otherwise (the reference
    recipe of Press et al. 2022, ``ofirpress/attention_with_linear_biases``, and HF BLOOM's
    ``build_alibi_tensor``): the H' slopes of the largest power of two H' < H, then every
    other slope of the 2H' recipe, ``H - H'`` of them. ``max_bias=8`` is the paper's recipe
    (first slope ``2^(-8/H)``).

    Args:
        num_heads: H (>= 1).
        max_bias: >= 1.

    Returns:
        H floats (Python floats, exact powers of two up to float rounding).

    Raises:
        ValueError: ``num_heads < 1`` or ``max_bias < 1``.

    Example:
        >>> alibi_slopes(4)
        [0.25, 0.0625, 0.015625, 0.00390625]
        >>> [round(m, 6) for m in alibi_slopes(3)]
        [0.0625, 0.003906, 0.25]
    """
    if num_heads < 1 or max_bias < 1:
        raise ValueError(f"alibi_slopes needs num_heads >= 1 and max_bias >= 1, got {num_heads}, {max_bias}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-max_bias * (h + 1) / n) for h in range(n)]

    base = 1 << (num_heads.bit_length() - 1)  # largest power of two <= H
    if base == num_heads:
        return power_of_two(num_heads)
    return power_of_two(base) + power_of_two(2 * base)[0::2][: num_heads - base]



def terms_json(terms, num_heads: int | None = None) -> list[dict]:
    """``[{"name", "args", "text"}]`` for ``--json`` output (``args``: param -> int, defaults
    included; ``text``: the canonical spelling); with ``num_heads``, ``alibi`` also carries
    its ``slopes`` (one float per head)."""
    out = []
    for t in terms:
        d = {"name": t.name, "args": dict(t.args), "text": str(t)}
        if t.name == "alibi" and num_heads:
            d["slopes"] = alibi_slopes(num_heads, t.arg("max_bias"))
        out.append(d)
    return out
