"""Run-time data (SPEC §1.7): key padding and packed documents, checked and lowered to tile
kinds with a batch axis (numpy only; no torch).

Some of a pattern's truth is only known per batch. ``key_padding_mask`` is ANDed with the
pattern; ``documents`` gives ``doc(x)`` for the ``document`` / ``per_document`` primitives.
A layout built with them has kinds ``uint8 [B, H, num_q_blocks, num_kv_blocks]``.

Cost: every function here is O(B * (tiles + positions + documents)); nothing allocates or
evaluates Q_LEN x KV_LEN elements (the static part of the layout is computed once by the
compiler and reused for every batch).
"""

from __future__ import annotations

import numpy as np

from ..errors import Diagnostic, PatternError
from .layout import EMPTY, FULL, PARTIAL


def _error(code: str, message: str, help_: str) -> PatternError:
    return PatternError(Diagnostic(code, message, None, help_, filename="patternc (run-time data)"))


def _to_numpy(x, name: str) -> np.ndarray:
    """numpy view of a numpy array, a (CPU or CUDA) torch tensor, or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise _error("P362" if name == "key_padding_mask" else "P361",
                     f"{name} could not be read as an array: {e}", f"pass {name} as a tensor") from None


# ---------------------------------------------------------------------------------------------
# key padding


def check_key_padding(key_padding_mask, kv_len: int, batch: int | None = None) -> np.ndarray:
    """bool [B, KV_LEN] from ``key_padding_mask`` (True = a real key, HF's ``attention_mask``).

    Accepts bool or 0/1 integer values, shape ``[B, KV_LEN]`` or ``[KV_LEN]`` (one row).

    Raises:
        PatternError: P362 a wrong shape (the message gives the expected one), a batch size
            that differs from ``batch``, or values other than 0/1.
    """
    m = _to_numpy(key_padding_mask, "key_padding_mask")
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.shape[1] != kv_len or (batch is not None and m.shape[0] != batch):
        b = "B" if batch is None else str(batch)
        raise _error("P362", f"key_padding_mask has shape {list(m.shape)}, expected [{b}, {kv_len}] "
                     f"(batch, KV_LEN)", "pass a bool tensor [B, KV_LEN], True for real keys (HF's "
                     "attention_mask convention: 1 = keep)")
    if m.dtype != np.bool_:
        if not np.issubdtype(m.dtype, np.integer) or not np.isin(m, (0, 1)).all():
            raise _error("P362", f"key_padding_mask must be bool (or 0/1 integers), got {m.dtype}",
                         "True (1) marks a real key, False (0) a padding key")
        m = m.astype(bool)
    return m


def key_padding_kinds(kinds: np.ndarray, key_padding: np.ndarray, layout, head_patterns,
                      counter=None) -> np.ndarray:
    """Tile kinds ANDed with key padding, exactly: uint8 [B, H, nq, nkv].

    Args:
        kinds: uint8 [H, nq, nkv] or [B, H, nq, nkv], the pattern's kinds (clipped tiles).
        key_padding: bool [B, KV_LEN], True = real key.
        layout: the static ``BlockLayout`` (block sizes, lengths, offsets).
        head_patterns: head-free pattern per head (head h uses entry ``h mod len``); used to
            count the allowed pairs of the few tiles the padding leaves undecided.
        counter: ``counter(b, h, q0, q1, k0, k1) -> int64 counts`` replacing ``rect_counts`` of
            ``head_patterns[h]`` (patterns with documents count per batch row).

    Per batch row and key block: no real key -> every tile of the column EMPTY; all keys real
    -> unchanged; some real: FULL -> PARTIAL, EMPTY stays, and a PARTIAL tile is counted over
    the runs of real keys in its block (``rect_counts``: no token-pair work for the
    primitives' closed forms) -> PARTIAL if any allowed pair remains, else EMPTY.
    """
    from .lowering import Grid, rect_counts

    B, K = key_padding.shape
    kb = layout.kv_block_size
    nk = kinds.shape[-1]
    starts = np.arange(nk, dtype=np.int64) * kb
    ends = np.minimum(starts + kb, K)
    ps = np.zeros((B, K + 1), dtype=np.int64)
    np.cumsum(key_padding, axis=1, out=ps[:, 1:])
    real = ps[:, ends] - ps[:, starts]  # [B, nk]
    none = (real == 0)[:, None, None, :]
    some = ((real > 0) & (real < ends - starts))[:, None, None, :]
    k = np.broadcast_to(kinds if kinds.ndim == 4 else kinds[None], (B,) + kinds.shape[-3:])
    out = np.where(none, EMPTY, np.where(some & (k == FULL), PARTIAL, k)).astype(np.uint8)
    undecided = some & (k == PARTIAL)
    if not undecided.any():
        return out
    g = Grid.uniform(layout.q_len, layout.kv_len, layout.q_block_size, kb, layout.q_offset, layout.kv_offset)
    Qe, Ke = g.q_len, g.kv_len
    for b in np.flatnonzero(undecided.any(axis=(1, 2, 3))):
        row = key_padding[b].astype(np.int8)
        edges = np.diff(np.concatenate([[0], row, [0]]))
        rs, re = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs of real keys (columns)
        hh, aa, cc = np.nonzero(undecided[b])
        r0 = np.searchsorted(re, starts[cc], side="right")
        r1 = np.searchsorted(rs, ends[cc], side="left")
        n = np.maximum(r1 - r0, 0)
        owner = np.repeat(np.arange(cc.size), n)
        r = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(r0, n)
        c0 = np.maximum(rs[r], starts[cc[owner]]) + layout.kv_offset
        c1 = np.minimum(re[r], ends[cc[owner]]) + layout.kv_offset
        cnt = np.zeros(cc.size, dtype=np.int64)
        for h in np.unique(hh % len(head_patterns)):
            sel = (hh[owner] % len(head_patterns)) == h
            if sel.any():
                a = aa[owner[sel]]
                if counter is None:
                    got = rect_counts(head_patterns[h], g.q0[a], g.q1[a], c0[sel], c1[sel], Qe, Ke)
                else:
                    got = counter(b, h, g.q0[a], g.q1[a], c0[sel], c1[sel])
                cnt += np.bincount(owner[sel], weights=got, minlength=cc.size).astype(np.int64)
        out[b, hh, aa, cc] = np.where(cnt > 0, PARTIAL, EMPTY)
    return out


# ---------------------------------------------------------------------------------------------
# documents


def check_documents(documents, positions: int, batch: int | None = None) -> np.ndarray:
    """int64 [B, P] document ids per position from ``documents`` (SPEC §1.7).

    Args:
        documents: ids ``[B, P]`` or ``[P]`` (an integer tensor / array / flat list; ``[P]``
            is broadcast over the batch), or lengths per row as a list of lists
            ``[[l0, l1, …], …]`` (each row summing to P; row b's k-th document gets id k).
        positions: the least P accepted: ``max(q_offset + Q_LEN, kv_offset + KV_LEN)``.
        batch: the batch size B the ids must have (a ``[P]`` / single row broadcasts).

    Returns:
        int64 [B, P] (B = 1 for one broadcast row).

    Raises:
        PatternError: P361 non-integer ids, a wrong shape, fewer than ``positions`` positions,
            lengths that are not positive or do not sum to the same P, or a batch mismatch.
    """
    if isinstance(documents, (list, tuple)) and documents and all(isinstance(r, (list, tuple)) for r in documents):
        rows = []
        for b, lens in enumerate(documents):
            if not lens or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in lens):
                raise _error("P361", f"documents row {b}: lengths must be a non-empty list of integers, got {lens!r}",
                             "give each row's document lengths, e.g. [[512, 1024, 512]]")
            if min(lens) < 1:
                raise _error("P361", f"documents row {b}: document lengths must be >= 1 token, got {min(lens)}",
                             "drop empty documents from the list")
            rows.append(np.repeat(np.arange(len(lens), dtype=np.int64), np.asarray(lens, dtype=np.int64)))
        sizes = {r.size for r in rows}
        if len(sizes) != 1:
            raise _error("P361", f"documents: the rows' lengths sum to different totals {sorted(sizes)}",
                         "every row of a batch must cover the same P positions (pad the last document)")
        ids = np.stack(rows)
    else:
        ids = _to_numpy(documents, "documents")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise _error("P361", f"documents must hold integer ids, got dtype {ids.dtype}",
                         "pass int ids per position ([B, P] or [P]), or lengths as [[l0, l1, ...]]")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise _error("P361", f"documents has shape {list(ids.shape)}, expected [B, P] or [P]",
                         "one integer id per position, one row per batch element")
        ids = ids.astype(np.int64, copy=False)
    if ids.shape[1] < positions:
        raise _error("P361", f"documents covers {ids.shape[1]} positions, but this compile reaches position "
                     f"{positions - 1} (P must be >= max(q_offset + Q_LEN, kv_offset + KV_LEN) = {positions})",
                     f"give ids (or lengths summing to at least {positions}) for every position")
    if batch is not None and ids.shape[0] not in (1, batch):
        raise _error("P361", f"documents has {ids.shape[0]} rows, but the batch has {batch}",
                     "give one row per batch element, or a single [P] row for all of them")
    return ids


def documents_from_positions(position_ids) -> np.ndarray:
    """int64 [B, P] document ids from packed ``position_ids`` [B, P] (or [P]): a new document
    starts wherever the position does not continue the previous one (``pos[x] != pos[x-1] + 1``,
    e.g. restarting at 0), as HF transformers and FlashAttention's varlen path read packed rows.

    Example:
        >>> documents_from_positions([0, 1, 2, 0, 1, 0, 1, 2, 3]).tolist()
        [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    """
    pos = _to_numpy(position_ids, "documents")
    if pos.ndim == 1:
        pos = pos[None]
    if pos.ndim != 2 or not np.issubdtype(pos.dtype, np.integer):
        raise _error("P361", f"position_ids must be integer [B, P] or [P], got {pos.dtype} {list(pos.shape)}",
                     "pass the packed rows' position_ids (restarting at 0 for each document)")
    start = np.ones(pos.shape, dtype=np.int64)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return np.cumsum(start, axis=1) - 1


def runs(ids_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 starts [R] and run index per position [P] of one row of ids: a document is a
    maximal run of equal consecutive ids (SPEC §1.7)."""
    change = np.flatnonzero(ids_row[1:] != ids_row[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    run_of = np.zeros(ids_row.size, dtype=np.int64)
    run_of[change] = 1
    np.cumsum(run_of, out=run_of)
    return starts, run_of


__all__ = ["check_key_padding", "key_padding_kinds", "check_documents", "documents_from_positions", "runs"]
