"""``ReachReport``: the answer of ``patternc.analyze`` (SPEC §2, §4), as data, text and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Hop


@dataclass
class Witness:
    """A pair of positions that explains the answer.

    On success it is the pair that needs the most layers, with a path of that many hops; on
    failure it is a pair out of reach (within the asked ``layers``, or at any depth), with
    the reason and, when the pair is reachable later, how many layers it needs.

    Attributes:
        i: query position (tokens).
        j: key position (tokens).
        reachable: whether key ``j`` reaches query ``i`` within the asked layers (within
            ``min_layers`` when no layers were asked).
        layers_needed: the least number of layers connecting the pair (exact engines), a
            proven upper bound (bounds; see ``ReachReport.exact``), or None for never / unknown.
        path: the hops from key ``j`` (layer 0) to query ``i``, one per layer, when known.
        reason: one sentence in words.
    """

    i: int
    j: int
    reachable: bool
    layers_needed: int | None
    path: list[Hop] | None
    reason: str

    def to_json(self) -> dict:
        return {
            "query": self.i,
            "key": self.j,
            "pair": [self.i, self.j],
            "reachable": self.reachable,
            "layers_needed": self.layers_needed,
            "reason": self.reason,
            "path": None if self.path is None else [h.to_json() for h in self.path],
        }


@dataclass
class ReachReport:
    """The result of a reachability analysis (SPEC §4).

    Attributes:
        min_layers: the least k such that every required pair is connected by a path of k
            hops through layers 0 .. k-1; None for "never" (when ``exact``). When ``exact``
            is False it is the best proven upper bound (``min_layers <= upper_bound``), or
            None when no upper bound was proven.
        layers: the k asked for (``layers=``), or None.
        reachable: every required pair is connected within ``layers`` when given, else
            ``min_layers`` is not None. False also when it could not be decided (see
            ``decided``).
        mode: ``"earlier"`` (every j <= i) or ``"all"`` (every pair).
        exact: True when ``min_layers`` is the exact answer; False for a bound.
        engine: the engine that produced the answer (``exact-shift``, ``exact-token``,
            ``block-bound``, ``shift-bound``, ``networkx``).
        witness: see ``Witness``.
        seq_len: Q_LEN = KV_LEN, tokens (with offsets: the query rows, at positions
            ``q_offset .. q_offset + seq_len - 1``).
        q_offset, kv_offset: the offsets (SPEC §1.6): required queries at positions
            ``q_offset ..``, keys at ``kv_offset ..`` (0: every position).
        num_heads: H.
        lower_bound: proven ``min_layers >= lower_bound`` (equals ``min_layers`` when exact).
        upper_bound: proven ``min_layers <= upper_bound`` (None: no upper bound proven, or
            never).
        never: True when it is proven that some required pair is never connected.
        decided: whether ``reachable`` is proven (always True for exact answers).
        pattern: canonical text of the analysed pattern.
        seconds: wall-clock time of the analysis.
        notes: extra remarks (head period larger than ``num_heads``, block size of a bound).
    """

    min_layers: int | None
    layers: int | None
    reachable: bool
    mode: str
    exact: bool
    engine: str
    witness: Witness | None
    seq_len: int
    num_heads: int
    lower_bound: int | None = None
    upper_bound: int | None = None
    never: bool = False
    decided: bool = True
    pattern: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    q_offset: int = 0
    kv_offset: int = 0

    def to_json(self) -> dict:
        """A JSON-ready dict with every field (``witness`` nested; ``null`` for None)."""
        return {
            "min_layers": self.min_layers,
            "layers": self.layers,
            "reachable": self.reachable,
            "mode": self.mode,
            "exact": self.exact,
            "engine": self.engine,
            "witness": None if self.witness is None else self.witness.to_json(),
            "seq_len": self.seq_len,
            "q_offset": self.q_offset,
            "kv_offset": self.kv_offset,
            "num_heads": self.num_heads,
            "lower_bound": self.lower_bound,
            "upper_bound": self.upper_bound,
            "never": self.never,
            "decided": self.decided,
            "pattern": self.pattern,
            "seconds": round(self.seconds, 6),
            "notes": list(self.notes),
        }

    # ---- text -------------------------------------------------------------------------------
    def summary(self) -> str:
        """One line: the verdict."""
        if self.never:
            head = "never: some required pair is not connected at any depth"
        elif self.exact:
            head = f"min_layers = {self.min_layers}"
        elif self.upper_bound is not None:
            head = f"{self.lower_bound} <= min_layers <= {self.upper_bound} (bound)"
        else:
            head = f"min_layers >= {self.lower_bound} (bound; no upper bound proven)"
        if self.layers is not None:
            if self.reachable:
                head += f"; every required pair is reached within {self.layers} layers"
            elif self.decided:
                head += f"; NOT every required pair is reached within {self.layers} layers"
            else:
                head += f"; could not prove that every required pair is reached within {self.layers} layers"
        return head

    def format_text(self, max_hops: int = 40) -> str:
        """The multi-line report the CLI prints."""
        lines = [
            f"pattern:  {self.pattern}",
            f"seq_len:  {self.seq_len}   heads: {self.num_heads}   pairs: {self.mode}"
            + (f"   q_offset: {self.q_offset}   kv_offset: {self.kv_offset}" if self.q_offset or self.kv_offset
               else ""),
            f"engine:   {self.engine} ({'exact' if self.exact else 'bound'})",
            f"result:   {self.summary()}",
        ]
        w = self.witness
        if w is not None:
            lines.append(f"witness:  query {w.i}, key {w.j}: {w.reason}")
            if w.path is not None:
                lines.append(f"path ({len(w.path)} hop{'s' if len(w.path) != 1 else ''}):")
                hops = w.path
                shown = hops if len(hops) <= max_hops else hops[: max_hops // 2] + [None] + hops[-max_hops // 2:]
                width = len(str(max(self.q_offset + self.seq_len - 1, 0)))
                for h in shown:
                    if h is None:
                        lines.append(f"  ... {len(hops) - 2 * (max_hops // 2)} more hops ...")
                        continue
                    head = f" (head {h.head})" if (h.head is not None and self.num_heads > 1) else ""
                    lines.append(f"  layer {h.layer:>3}: {h.from_pos:>{width}} -> {h.to_pos:>{width}}  via {h.via}{head}")
        for note in self.notes:
            lines.append(f"note:     {note}")
        lines.append(f"time:     {self.seconds:.3f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()
