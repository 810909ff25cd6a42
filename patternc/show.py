"""Pictures of a compiled pattern: the block layout or the token mask, in a terminal or a PNG.

Basics
    ``picture(...)`` compiles a pattern and gathers what to draw (a ``Picture``);
    ``to_text`` renders it for a terminal, ``to_json`` for machines and ``save_png`` through
    matplotlib. ``patternc show`` is a thin CLI over these three.

Details
    Two views. The *block view* draws one character (or one PNG cell) per tile of the
    ``BlockLayout``: ``#`` FULL, ``+`` PARTIAL, ``.`` EMPTY, rows are query blocks, columns key
    blocks. When there are more tiles than terminal columns, ``merge`` x ``merge`` tiles share a
    character, which is ``#`` only if all of them are FULL, ``.`` only if all are EMPTY, and
    ``+`` otherwise. The *token view* draws one character per token pair (``█`` allowed, ``·``
    masked; ``#`` / ``.`` with ``ascii_only``) for a window of query positions ``[q0, q1)`` and
    key positions ``[k0, k1)``; it is exact and never merges.

    ``view="auto"`` draws tokens when the whole mask fits (terminal: ``KV_LEN`` no wider than
    the picture, ``Q_LEN <= 2 * width``; PNG: both lengths <= 1024) and blocks otherwise. A
    ``window`` always means the token view. Axis labels count tokens in the token view and
    blocks in the block view. Heads with identical pictures are drawn once
    ("heads 0, 2, 4").

    The token mask of a window comes from ``cp.dense_mask()`` at small sizes and, at large
    ones, from evaluating the predicate on the window only (``cp.mask_numpy``, or
    ``cp.mask_mod`` through FlexAttention's ``create_mask`` with shifted indices), so a zoom
    at 1M tokens costs the window, not Q_LEN x KV_LEN.

``import patternc.show`` does not import torch or matplotlib: matplotlib is imported in
``save_png`` (Agg backend) and torch only if a window must be evaluated through mask_mod.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .ir.specialize import cdiv
from .lower.layout import EMPTY, FULL, PARTIAL, merge_kinds, normalize_block_size

BLOCK_CHARS = {FULL: "#", PARTIAL: "+", EMPTY: "."}
TOKEN_CHARS_UNICODE = ("·", "█")  # masked, allowed
TOKEN_CHARS_ASCII = (".", "#")
PNG_TOKEN_LIMIT = 1024  # auto view: token mask in a PNG up to this length
MAX_PNG_PANELS = 16  # distinct head pictures drawn in one PNG (the rest are named in the caption)
TICK = 10  # characters between axis labels

# PNG colours (colour-blind safe: Okabe-Ito blue / orange, light grey)
COLOURS = {EMPTY: "#f2f2f2", PARTIAL: "#e69f00", FULL: "#0072b2"}
TOKEN_COLOUR = "#1a1a1a"
TILE_TINT = {EMPTY: "#ffffff", PARTIAL: "#fbe3b0", FULL: "#b3d4ea"}


@dataclass
class Picture:
    """What ``patternc show`` draws for one layer of a pattern.

    Attributes:
        canonical: the pattern's canonical text.
        q_len, kv_len: Q_LEN, KV_LEN (tokens).
        num_heads: H compiled.
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.
        layer: the entry of ``layers(...)`` shown.
        view: ``"tokens"`` or ``"blocks"``.
        heads: the heads drawn (all of them, or the one asked for).
        kinds: uint8 [H, num_q_blocks, num_kv_blocks], the layout (EMPTY/PARTIAL/FULL).
        window: (q0, q1, k0, k1) token ranges of the token view (half-open), else None.
        tokens: bool [len(heads), q1 - q0, k1 - k0] for the token view, else None.
        density: token density in [0, 1] (allowed pairs / (H * Q_LEN * KV_LEN)).
        block_density: block density in [0, 1] (tokens of computed tiles, clipped).
        merge: tiles per character along each axis in the terminal block view (1 = exact).
        counts: FULL / PARTIAL / EMPTY tile counts over all heads.
        layer_canonical: for a ``layers(...)`` pattern, the canonical text of the drawn layer.
        doc_starts: with run-time ``documents``, the positions where a document starts
            (drawn as ``v`` above the columns and ``>`` after the row labels).
    """

    canonical: str
    q_len: int
    kv_len: int
    num_heads: int
    block_size: tuple[int, int]
    layer: int
    view: str
    heads: list[int]
    kinds: np.ndarray
    window: tuple[int, int, int, int] | None = None
    tokens: np.ndarray | None = None
    density: float = 0.0
    block_density: float = 0.0
    merge: int = 1
    counts: dict = field(default_factory=dict)
    layer_canonical: str | None = None  # the drawn layer's own text, for layers(...) patterns
    doc_starts: list | None = None  # positions where a packed document starts (SPEC §1.7)


class ShowError(ValueError):
    """A request ``show`` cannot draw (bad window, head out of range): a usage error."""


def parse_window(text: str, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
    """Parse ``Q0:Q1,K0:K1`` (half-open token ranges; ``Q0:Q1`` alone uses the same keys;
    an empty bound means the start or the end).

    Raises:
        ShowError: malformed text or a range outside ``[0, Q_LEN)`` x ``[0, KV_LEN)``.
    """
    parts = [s.strip() for s in text.split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ShowError(f"--window expects Q0:Q1,K0:K1 (token ranges), got {text!r}")
    out = []
    for part, n, what in ((parts[0], q_len, "query"), (parts[1], kv_len, "key")):
        lo_s, colon, hi_s = part.partition(":")
        if not colon:
            raise ShowError(f"--window: {what} range {part!r} is not START:END")
        try:
            lo = int(lo_s) if lo_s.strip() else 0
            hi = int(hi_s) if hi_s.strip() else n
        except ValueError:
            raise ShowError(f"--window: {what} range {part!r} must hold integers") from None
        if not (0 <= lo < hi <= n):
            raise ShowError(f"--window: {what} range {lo}:{hi} is empty or outside 0:{n} "
                            f"({'Q_LEN' if what == 'query' else 'KV_LEN'} = {n})")
        out += [lo, hi]
    return tuple(out)


def picture(p_or_source, *, q_len: int, kv_len: int | None = None, num_heads: int | None = None,
            head: int | None = None, block_size=128, layer: int = 0, params: dict | None = None,
            window=None, view: str = "auto", width: int = 100, target: str = "terminal", q_offset: int = 0,
            kv_offset: int = 0, documents=None) -> Picture:
    """Compile one layer and collect what to draw.

    Args:
        p_or_source: a ``Pattern`` or pattern source text.
        q_len: Q_LEN, tokens. kv_len: KV_LEN, tokens (default q_len).
        num_heads: H (default: the pattern's head period, so every ``heads(...)`` entry shows).
        head: draw only this head (0 <= head < H).
        block_size: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.
        layer: which entry of ``layers(...)`` to draw.
        params: values for the source's ``param``s.
        window: ``(q0, q1, k0, k1)`` token ranges or ``"Q0:Q1,K0:K1"``; implies the token view.
        view: ``"auto"``, ``"tokens"`` or ``"blocks"``.
        width: characters available for the picture (terminal target).
        target: ``"terminal"`` or ``"png"``: decides the auto view.
        q_offset, kv_offset: positions of row 0 / column 0 (SPEC §1.6, tokens); the picture
            shows rows and columns (window ranges are rows / columns too).
        documents: one packed row (ids [P] or lengths ``[[l0, l1, ...]]``, SPEC §1.7): the
            picture is that row's exact layout and mask, with the document boundaries marked.

    Returns:
        A ``Picture``.

    Raises:
        PatternError: the pattern has errors, or is invalid at these lengths (P301).
        ShowError: a bad window, head, layer, view or length.
    """
    import patternc

    from .source.frontdoor import parse

    kv_len = q_len if kv_len is None else kv_len
    if q_len < 1 or kv_len < 1:
        raise ShowError(f"lengths must be >= 1 token, got Q_LEN={q_len}, KV_LEN={kv_len}")
    if layer < 0:
        raise ShowError(f"--layer must be >= 0, got {layer}")
    if view not in ("auto", "tokens", "blocks"):
        raise ShowError(f"view must be auto, tokens or blocks, got {view!r}")
    try:
        bs = normalize_block_size(block_size)
    except ValueError as e:
        raise ShowError(str(e)) from None
    p = parse(p_or_source, params=params)
    H = p.num_heads if num_heads is None else num_heads
    if H < 1:
        raise ShowError(f"--heads must be >= 1, got {H}")
    if head is not None and not 0 <= head < H:
        raise ShowError(f"--head {head} is out of range: the layer has {H} head(s) (0..{H - 1})")
    cp = patternc.compile(p, q_len=q_len, kv_len=kv_len, num_heads=H, block_size=bs, layer=layer,
                          q_offset=q_offset, kv_offset=kv_offset)
    lay = cp.layout
    row_docs = None
    if documents is not None or cp.needs:
        lay_b = cp.layout_for(documents=documents)  # P360 / P361 for missing or bad documents
        if lay_b.batch is not None:
            from .lower.layout import BlockLayout

            lay = BlockLayout(kinds=lay_b.kinds[0], q_len=lay.q_len, kv_len=lay.kv_len, q_block_size=lay.q_block_size,
                              kv_block_size=lay.kv_block_size, q_offset=lay.q_offset, kv_offset=lay.kv_offset)
            from .lower.runtime import check_documents, runs

            ids = check_documents(documents, max(q_offset + q_len, kv_offset + kv_len))[0]
            row_docs = (documents, runs(ids)[0].tolist())
    if isinstance(window, str):
        window = parse_window(window, q_len, kv_len)
    if window is not None:
        view = "tokens"
    if view == "auto":
        if target == "png":
            fits = max(q_len, kv_len) <= PNG_TOKEN_LIMIT
        else:
            fits = kv_len <= width and q_len <= 2 * width
        view = "tokens" if fits else "blocks"
    heads = list(range(H)) if head is None else [head]
    pic = Picture(canonical=str(p), q_len=q_len, kv_len=kv_len, num_heads=H, block_size=bs, layer=layer,
                  view=view, heads=heads, kinds=np.asarray(lay.kinds),
                  density=float(cp.density) if row_docs is None else 0.0,
                  block_density=float(cp.block_density) if row_docs is None else float(lay.block_density),
                  counts={"full_blocks": lay.full_blocks, "partial_blocks": lay.partial_blocks,
                          "empty_blocks": lay.empty_blocks})
    if p.num_layers > 1:
        from .ir.normalize import normalize
        from .ir.specialize import select_layer

        pic.layer_canonical = str(normalize(select_layer(p, layer)))
    if row_docs is not None:
        pic.doc_starts = row_docs[1]
        if cp.document_parts is not None:  # exact token density of this packed row
            from .ir.specialize import head_patterns
            from .lower.documents import doc_rect_counts

            pa, pn = cp.document_parts
            ha, hn = head_patterns(pa, H), head_patterns(pn, H)
            Qe, Ke = q_offset + q_len, kv_offset + kv_len
            total = sum(int(doc_rect_counts(ha[h % len(ha)], hn[h % len(hn)], [q_offset], [Qe], [kv_offset], [Ke],
                                            Qe, Ke, ids)[0]) for h in range(H))
            pic.density = total / float(H * q_len * kv_len)
        elif cp.needs:  # per_document: exact token density of this packed row (lower.perdoc)
            pic.density = cp.per_document_pairs(ids[None])[0] / float(H * q_len * kv_len)
    if view == "tokens":
        pic.window = tuple(window) if window is not None else (0, q_len, 0, kv_len)
        if row_docs is not None:
            q0, q1, k0, k1 = pic.window
            dense = cp.dense_mask(documents=row_docs[0])[0]
            pic.tokens = dense[heads][:, q0:q1, k0:k1]
        else:
            pic.tokens = _token_window(cp, heads, pic.window, H)
    elif target == "terminal":
        pic.merge = max(1, math.ceil(max(lay.num_q_blocks, lay.num_kv_blocks) / max(1, width)))
    return pic


def _token_window(cp, heads, window, H) -> np.ndarray:
    """bool [len(heads), q1 - q0, k1 - k0]: the exact mask of the window (the compiler's
    torch-free predicate on just these positions)."""
    q0, q1, k0, k1 = window
    qi, ki = np.arange(q0, q1, dtype=np.int64)[:, None], np.arange(k0, k1, dtype=np.int64)[None, :]
    return np.stack([cp.mask_numpy(h, qi, ki) for h in heads])


# ---- terminal -------------------------------------------------------------------------------------------------


def _ruler(n_cells: int, start: int, step: int, indent: int) -> list[str]:
    """Two lines: labels every TICK cells (value = start + cell * step) and tick marks."""
    labels = [" "] * (n_cells + 12)
    ticks = [" "] * n_cells
    for c in range(0, n_cells, TICK):
        s = str(start + c * step)
        labels[c:c + len(s)] = list(s)
        ticks[c] = "|"
    return [" " * indent + "".join(labels).rstrip(), " " * indent + "".join(ticks).rstrip()]


def _grid_rows(p: Picture, i: int, ascii_only: bool) -> list[str]:
    """The picture rows of head ``p.heads[i]`` (no labels)."""
    if p.view == "tokens":
        chars = TOKEN_CHARS_ASCII if ascii_only else TOKEN_CHARS_UNICODE
        return ["".join(chars[1] if x else chars[0] for x in row) for row in p.tokens[i]]
    k = merge_kinds(p.kinds[p.heads[i]], p.merge, p.merge)
    return ["".join(BLOCK_CHARS[int(x)] for x in row) for row in k]


def _head_groups(p: Picture, ascii_only: bool) -> list[tuple[list[int], list[str]]]:
    groups: list[tuple[list[int], list[str]]] = []
    for i, h in enumerate(p.heads):
        rows = _grid_rows(p, i, ascii_only)
        for hs, r in groups:
            if r == rows:
                hs.append(h)
                break
        else:
            groups.append(([h], rows))
    return groups


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def header_lines(p: Picture) -> list[str]:
    qb, kb = p.block_size
    bs = str(qb) if qb == kb else f"({qb}, {kb})"
    c = p.counts
    layer = [f"{f'layer {p.layer}':<15}{p.layer_canonical}"] if p.layer_canonical else []
    docs = []
    if p.doc_starts is not None:
        shown = ", ".join(map(str, p.doc_starts[:12])) + (", ..." if len(p.doc_starts) > 12 else "")
        docs = [f"documents      {len(p.doc_starts)}, starting at positions {shown} (v / > mark the boundaries)"]
    return [
        f"pattern        {p.canonical}",
        *layer,
        *docs,
        f"Q_LEN {p.q_len}  KV_LEN {p.kv_len}  BLOCK_SIZE {bs}  heads {p.num_heads}  layer {p.layer}",
        f"token density {_pct(p.density)}  block density {_pct(p.block_density)}  "
        f"FULL {c['full_blocks']}  PARTIAL {c['partial_blocks']}  EMPTY {c['empty_blocks']} (tiles, all heads)",
    ]


def to_text(p: Picture, *, ascii_only: bool = False) -> str:
    """Render for a terminal: the header, a legend, then one labelled grid per group of
    identical heads. Rows are labelled with the query index (tokens or blocks), columns with
    a ruler every 10 characters."""
    lines = header_lines(p)
    if p.view == "tokens":
        q0, q1, k0, k1 = p.window
        m, a = TOKEN_CHARS_ASCII if ascii_only else TOKEN_CHARS_UNICODE
        lines.append(f"token mask: queries {q0}..{q1 - 1} (rows) x keys {k0}..{k1 - 1} (columns); "
                     f"{a} allowed, {m} masked")
        row_start, row_step, col_start, col_step = q0, 1, k0, 1
        n_rows, n_cols = q1 - q0, k1 - k0
    else:
        nq, nk = p.kinds.shape[1:]
        f = p.merge
        scale = "" if f == 1 else f"; 1 character = {f}x{f} tiles (# all FULL, . all EMPTY, + mixed)"
        lines.append(f"block layout: query blocks (rows) x key blocks (columns); "
                     f"# FULL, + PARTIAL, . EMPTY{scale}")
        row_start, row_step, col_start, col_step = 0, f, 0, f
        n_rows, n_cols = cdiv(nq, f), cdiv(nk, f)
    label_w = len(str(row_start + (n_rows - 1) * row_step))
    indent = label_w + 1
    for hs, rows in _head_groups(p, ascii_only):
        lines.append("")
        lines.append(("head " if len(hs) == 1 else "heads ") + ", ".join(map(str, hs)))
        lines.extend(_ruler(n_cols, col_start, col_step, indent))
        if p.doc_starts is None:
            for r, row in enumerate(rows):
                lines.append(f"{row_start + r * row_step:>{label_w}} {row}")
            continue
        # document boundaries: a column / row holding a document start (positions)
        qb, kb = p.block_size
        cu, ru = (1, 1) if p.view == "tokens" else (kb, qb)
        starts = np.asarray(p.doc_starts)

        def marks(n, start, step, unit, offset):
            lo = offset + (start + np.arange(n) * step) * unit
            hi = lo + step * unit
            return [bool(((starts >= a) & (starts < b)).any()) for a, b in zip(lo, hi)]

        kv_off = getattr(p, "kv_offset", 0)
        q_off = getattr(p, "q_offset", 0)
        cm = marks(n_cols, col_start, col_step, cu, kv_off)
        rm = marks(len(rows), row_start, row_step, ru, q_off)
        lines.append(" " * indent + "".join("v" if x else " " for x in cm).rstrip())
        for r, row in enumerate(rows):
            lines.append(f"{row_start + r * row_step:>{label_w}}{'>' if rm[r] else ' '}{row}")
    return "\n".join(lines)


def parse_text_grid(text: str) -> dict[tuple[int, ...], np.ndarray]:
    """Read ``to_text`` output back: {heads: array} where each array holds the characters of
    the grid rows (``[rows, cols]`` of str). Used by tests and handy for scripts."""
    out: dict[tuple[int, ...], np.ndarray] = {}
    heads = None
    rows: list[str] = []

    def flush():
        if heads is not None:
            out[heads] = np.array([list(r) for r in rows])

    for line in text.splitlines():
        if line.startswith("head"):
            flush()
            heads = tuple(int(x) for x in line.split(" ", 1)[1].split(", "))
            rows = []
            continue
        if heads is None or not line.strip():
            continue
        label, _, rest = line.strip().partition(" ")
        if label.isdigit() and rest and not set(rest) - set("#+.█·"):
            rows.append(rest)
    flush()
    return out


def to_json(p: Picture, *, ascii_only: bool = True, png: str | None = None) -> dict:
    """The ``--json`` object of ``patternc show``."""
    qb, kb = p.block_size
    return {
        "ok": True,
        "canonical": p.canonical,
        "q_len": p.q_len,
        "kv_len": p.kv_len,
        "num_heads": p.num_heads,
        "block_size": [qb, kb],
        "layer": p.layer,
        "layer_canonical": p.layer_canonical,
        "view": p.view,
        "window": list(p.window) if p.window else None,
        "merge": p.merge,
        "density": p.density,
        "block_density": p.block_density,
        **p.counts,
        "pictures": [{"heads": hs, "rows": rows} for hs, rows in _head_groups(p, ascii_only)],
        "png": png,
    }


# ---- PNG -----------------------------------------------------------------------------------------------------


def save_png(p: Picture, path, *, dpi: int = 110) -> Path:
    """Draw ``p`` with matplotlib (Agg) and write a PNG atomically (a temporary file in the
    same folder, renamed over ``path`` once complete; nothing is left behind on failure).

    The block view colours tiles FULL / PARTIAL / EMPTY; the token view draws allowed token
    pairs over a tint of their tile's kind, with the tile grid when it is coarse enough to
    see. The title holds the canonical text, the lengths, the block size and both densities.

    Raises:
        OSError: the folder cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    path = Path(path)
    groups = _head_groups(p, True)
    omitted = groups[MAX_PNG_PANELS:]
    groups = groups[:MAX_PNG_PANELS]
    n = len(groups)
    ncols = min(n, 4)
    nrows = cdiv(n, ncols)
    panel = 4.2 if n > 1 else 6.4
    fig_w = max(6.4, panel * ncols)
    title_lines = textwrap.wrap(p.canonical, max(40, int(fig_w * 72 / (11 * 0.62))), break_on_hyphens=False)
    if len(title_lines) > 4:
        title_lines = title_lines[:4]
        title_lines[-1] = title_lines[-1][:-4] + " ..."
    fig = plt.figure(figsize=(fig_w, panel * nrows + 0.9 + 0.2 * len(title_lines)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    kind_cmap = ListedColormap([COLOURS[EMPTY], COLOURS[PARTIAL], COLOURS[FULL]])
    qb, kb = p.block_size
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, (hs, _rows) in zip(axes.flat, groups):
        h = hs[0]
        if p.view == "blocks":
            k = p.kinds[h]
            ax.imshow(k, cmap=kind_cmap, vmin=0, vmax=2, interpolation="nearest", aspect="equal",
                      extent=(-0.5, k.shape[1] - 0.5, k.shape[0] - 0.5, -0.5))
            if max(k.shape) <= 64:  # tile boundaries
                ax.set_xticks(np.arange(-0.5, k.shape[1], 1), minor=True)
                ax.set_yticks(np.arange(-0.5, k.shape[0], 1), minor=True)
                ax.grid(which="minor", color="white", lw=0.5)
                ax.tick_params(which="minor", length=0)
            ax.set_xlabel(f"key block ({kb} tokens each)")
            ax.set_ylabel(f"query block ({qb} tokens each)")
        else:
            q0, q1, k0, k1 = p.window
            i = p.heads.index(h)
            qi = np.arange(q0, q1) // qb
            ki = np.arange(k0, k1) // kb
            tint = p.kinds[h][np.ix_(qi, ki)]
            rgb = _hex_rgb([TILE_TINT[EMPTY], TILE_TINT[PARTIAL], TILE_TINT[FULL]])[tint]
            rgb[p.tokens[i]] = _hex_rgb([TOKEN_COLOUR])[0]
            ax.imshow(rgb, interpolation="nearest", aspect="equal", extent=(k0 - 0.5, k1 - 0.5, q1 - 0.5, q0 - 0.5))
            if (k1 - k0) / kb <= 64 and (q1 - q0) / qb <= 64:  # tile boundaries
                for x in range((k0 // kb + 1) * kb, k1, kb):
                    ax.axvline(x - 0.5, color="#888888", lw=0.4)
                for y in range((q0 // qb + 1) * qb, q1, qb):
                    ax.axhline(y - 0.5, color="#888888", lw=0.4)
            ax.set_xlabel("key position (tokens)")
            ax.set_ylabel("query position (tokens)")
        ax.xaxis.set_label_position("top")
        ax.xaxis.tick_top()
        ax.set_title(("head " if len(hs) == 1 else "heads ") + _short_list(hs), fontsize=10)
    bs = str(qb) if qb == kb else f"({qb}, {kb})"
    layer = f"layer {p.layer} = {p.layer_canonical}" if p.layer_canonical else f"layer {p.layer}"
    sub = (f"Q_LEN {p.q_len}, KV_LEN {p.kv_len}, BLOCK_SIZE {bs}, {layer}, {p.num_heads} head(s)\n"
           f"token density {_pct(p.density)}   block density {_pct(p.block_density)}   "
           f"FULL {p.counts['full_blocks']}  PARTIAL {p.counts['partial_blocks']}  EMPTY {p.counts['empty_blocks']} tiles")
    fig.suptitle("\n".join(title_lines) + "\n", fontsize=11, fontfamily="monospace")
    fig.text(0.5, 1.0, "", ha="center")  # keeps constrained layout from trimming the suptitle
    if p.view == "blocks":
        handles = [Patch(facecolor=COLOURS[k], edgecolor="#555555", label=name)
                   for k, name in ((FULL, "FULL"), (PARTIAL, "PARTIAL"), (EMPTY, "EMPTY"))]
    else:
        handles = [Patch(facecolor=TOKEN_COLOUR, label="allowed token pair")] + [
            Patch(facecolor=TILE_TINT[k], edgecolor="#555555", label=f"{name} tile")
            for k, name in ((FULL, "FULL"), (PARTIAL, "PARTIAL"), (EMPTY, "EMPTY"))]
    if omitted:
        rest = [h for hs, _ in omitted for h in hs]
        sub += f"\n{len(rest)} more head(s) not drawn ({_short_list(sorted(rest))}): pick one with --head"
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9,
               title=sub, title_fontsize=9)
    try:
        from .fileio import atomic_write

        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return path


def _hex_rgb(colours) -> np.ndarray:
    return np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in colours], dtype=float)


def _short_list(hs: list[int]) -> str:
    if len(hs) > 6:
        return ", ".join(map(str, hs[:5])) + f", ... ({len(hs)} heads)"
    return ", ".join(map(str, hs))
