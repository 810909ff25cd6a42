"""BlockLayout: the torch-free block-sparse layout of one layer of a pattern.

Basics
    A ``BlockLayout`` cuts the ``[Q_LEN, KV_LEN]`` attention matrix of every head into tiles
    of ``Q_BLOCK_SIZE x KV_BLOCK_SIZE`` tokens and records, for each tile, whether all,
    some or none of its token pairs are allowed (FULL / PARTIAL / EMPTY). Tiles at the
    ragged ends are clipped to the real lengths: a last tile whose *real* token pairs are
    all allowed is FULL here (FlexAttention's ``create_block_mask`` pads with "not allowed"
    and calls it partial; see ``to_flex_kinds``).

Details
    ``kinds`` is the single source of truth. FlexAttention's lists are derived from it with
    FlexAttention's conventions: when the ``full_*`` lists are given, ``kv_num_blocks`` /
    ``kv_indices`` hold only PARTIAL tiles (the ones that need ``mask_mod``).

    Reference loop (what the lists mean)::

        for h in range(H):
            for q_block_idx in range(num_q_blocks):
                for k in range(kv_num_blocks[h, q_block_idx]):
                    kv_block_idx = kv_indices[h, q_block_idx, k]   # PARTIAL tile: apply mask_mod
                for k in range(full_kv_num_blocks[h, q_block_idx]):
                    kv_block_idx = full_kv_indices[h, q_block_idx, k]  # FULL tile: no mask

Shape legend
    H: heads; num_q_blocks = ceil(Q_LEN / Q_BLOCK_SIZE); num_kv_blocks = ceil(KV_LEN / KV_BLOCK_SIZE).

    ======================  =============================================  ========
    field                   dtype [dims]                                   status
    ======================  =============================================  ========
    kinds                   uint8 [H, num_q_blocks, num_kv_blocks]         required
    kv_num_blocks           int32 [H, num_q_blocks]                        derived
    kv_indices              int32 [H, num_q_blocks, num_kv_blocks]         derived
    full_kv_num_blocks      int32 [H, num_q_blocks]                        derived
    full_kv_indices         int32 [H, num_q_blocks, num_kv_blocks]         derived
    ======================  =============================================  ========

    Index lists are sorted ascending within a row; entries past the row's count are padding
    (0) and must not be read.

    A layout built with run-time data (``CompiledPattern.layout_for(documents=…,
    key_padding_mask=…)``, SPEC §1.7) has one more leading axis, B (batch rows): kinds
    ``uint8 [B, H, num_q_blocks, num_kv_blocks]`` and every derived list ``[B, H, …]``, as
    FlexAttention's ``BlockMask`` with batch size B.

Offsets
    ``q_offset`` / ``kv_offset`` (SPEC §1.6) are the positions of row 0 and column 0: tiles are
    tiles of rows and columns, and tile ``(a, c)`` holds positions ``q_offset + a *
    Q_BLOCK_SIZE …`` x ``kv_offset + c * KV_BLOCK_SIZE …``. A decode step's layout has one
    query row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..ir.specialize import cdiv

EMPTY = 0
PARTIAL = 1
FULL = 2


def normalize_block_size(block_size) -> tuple[int, int]:
    """Return ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` from an int or a pair (tokens).

    Raises:
        ValueError: a block size that is not a positive int or a pair of them.
    """
    def is_int(x) -> bool:  # 12.5, "16" and True are not token counts: refuse, never coerce
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if is_int(block_size):
        pair = (int(block_size), int(block_size))
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2 and all(map(is_int, block_size)):
        pair = (int(block_size[0]), int(block_size[1]))
    else:
        raise ValueError(
            f"block_size must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, got {block_size!r}"
        )
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"block sizes must be >= 1 token, got {pair}")
    return pair


def ordered_lists(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FlexAttention's ``(num_blocks, indices)`` of a boolean tile mask, without sorting.

    Args:
        mask: bool [..., num_q_blocks, num_kv_blocks] (e.g. [H, …] or [B, H, …]).

    Returns:
        counts int32 [H, num_q_blocks]; indices int32 [H, num_q_blocks, num_kv_blocks] with
        the selected kv block indices ascending first in each row, then zero padding.
    """
    if mask.ndim != 3:
        lead = mask.shape[:-2]
        c, i = ordered_lists(mask.reshape((-1,) + mask.shape[-2:]))
        return c.reshape(lead + c.shape[-1:]), i.reshape(lead + i.shape[-2:])
    counts = mask.sum(axis=-1, dtype=np.int32)
    idx = np.zeros(mask.shape, dtype=np.int32)
    h, q, k = np.nonzero(mask)  # row-major: k ascends within each (h, q)
    if k.size:
        row_start = np.cumsum(counts.ravel()) - counts.ravel()
        row = h * mask.shape[1] + q
        pos = np.arange(k.size) - row_start[row]
        idx[h, q, pos] = k
    return counts, idx


def merge_kinds(k: np.ndarray, fq: int, fk: int) -> np.ndarray:
    """uint8 [ceil(nq/fq), ceil(nk/fk)] from uint8 kinds [nq, nk]: groups of fq x fk tiles
    become FULL if all FULL, EMPTY if all EMPTY, else PARTIAL (for pictures)."""
    if fq == 1 and fk == 1:
        return k
    nq, nk = k.shape
    pq, pk = cdiv(nq, fq) * fq, cdiv(nk, fk) * fk
    all_full = np.ones((pq, pk), dtype=bool)
    all_empty = np.ones((pq, pk), dtype=bool)
    all_full[:nq, :nk] = k == FULL
    all_empty[:nq, :nk] = k == EMPTY
    af = all_full.reshape(pq // fq, fq, pk // fk, fk).all(axis=(1, 3))
    ae = all_empty.reshape(pq // fq, fq, pk // fk, fk).all(axis=(1, 3))
    return np.where(af, FULL, np.where(ae, EMPTY, PARTIAL)).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Tile kinds of one layer of a pattern, per head (see the module docstring).

    Args:
        kinds: uint8 [H, num_q_blocks, num_kv_blocks], EMPTY=0, PARTIAL=1, FULL=2; or
            uint8 [B, H, num_q_blocks, num_kv_blocks] for a layout built with run-time data
            (documents, key padding: SPEC §1.7, ``CompiledPattern.layout_for``), one per batch
            row. The derived lists then carry the same leading B axis.
        q_len: Q_LEN in tokens.
        kv_len: KV_LEN in tokens.
        q_block_size: Q_BLOCK_SIZE in tokens.
        kv_block_size: KV_BLOCK_SIZE in tokens.
        q_offset: position of query row 0 (SPEC §1.6; tokens, default 0).
        kv_offset: position of key column 0 (tokens, default 0). Tiles are tiles of rows
            and columns: tile ``(a, c)`` covers positions ``q_offset + a * Q_BLOCK_SIZE …`` x
            ``kv_offset + c * KV_BLOCK_SIZE …``.
    """

    kinds: np.ndarray
    q_len: int
    kv_len: int
    q_block_size: int
    kv_block_size: int
    q_offset: int = 0
    kv_offset: int = 0

    # ---- shape ---------------------------------------------------------------------------
    @property
    def batch(self) -> int | None:
        """B for a layout with a batch axis (kinds [B, H, nq, nkv]), else None."""
        return int(self.kinds.shape[0]) if self.kinds.ndim == 4 else None

    @property
    def num_heads(self) -> int:
        return int(self.kinds.shape[-3])

    @property
    def num_q_blocks(self) -> int:
        return int(self.kinds.shape[-2])

    @property
    def num_kv_blocks(self) -> int:
        return int(self.kinds.shape[-1])

    def batch_row(self, b: int) -> "BlockLayout":
        """The layout of batch row ``b`` (kinds [H, nq, nkv]); ``self`` without a batch axis."""
        if self.kinds.ndim == 3:
            return self
        return BlockLayout(kinds=self.kinds[b], q_len=self.q_len, kv_len=self.kv_len,
                           q_block_size=self.q_block_size, kv_block_size=self.kv_block_size,
                           q_offset=self.q_offset, kv_offset=self.kv_offset)

    @property
    def block_size(self) -> tuple[int, int]:
        return (self.q_block_size, self.kv_block_size)

    # ---- FlexAttention lists (derived) -----------------------------------------------------
    @cached_property
    def _partial_lists(self):
        return ordered_lists(self.kinds == PARTIAL)

    @cached_property
    def _full_lists(self):
        return ordered_lists(self.kinds == FULL)

    @property
    def kv_num_blocks(self) -> np.ndarray:
        """int32 [H, num_q_blocks]: PARTIAL tiles per query block."""
        return self._partial_lists[0]

    @property
    def kv_indices(self) -> np.ndarray:
        """int32 [H, num_q_blocks, num_kv_blocks]: PARTIAL kv block indices, ascending."""
        return self._partial_lists[1]

    @property
    def full_kv_num_blocks(self) -> np.ndarray:
        """int32 [H, num_q_blocks]: FULL tiles per query block."""
        return self._full_lists[0]

    @property
    def full_kv_indices(self) -> np.ndarray:
        """int32 [H, num_q_blocks, num_kv_blocks]: FULL kv block indices, ascending."""
        return self._full_lists[1]

    # ---- counts and densities ------------------------------------------------------------------
    def _block_extents(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 [num_q_blocks], int64 [num_kv_blocks]: real tokens in each block (clipped)."""
        qs = np.minimum(self.q_block_size, self.q_len - np.arange(self.num_q_blocks, dtype=np.int64) * self.q_block_size)
        ks = np.minimum(self.kv_block_size, self.kv_len - np.arange(self.num_kv_blocks, dtype=np.int64) * self.kv_block_size)
        return qs, ks

    def tile_token_counts(self) -> np.ndarray:
        """int64 [num_q_blocks, num_kv_blocks]: real token pairs in each tile (clipped).
        Allocates one int64 per tile; ``block_density`` does not need it."""
        qs, ks = self._block_extents()
        return np.outer(qs, ks)

    @property
    def full_blocks(self) -> int:
        """Number of FULL tiles over all heads."""
        return int((self.kinds == FULL).sum())

    @property
    def partial_blocks(self) -> int:
        """Number of PARTIAL tiles over all heads."""
        return int((self.kinds == PARTIAL).sum())

    @property
    def empty_blocks(self) -> int:
        """Number of EMPTY tiles over all heads."""
        return int((self.kinds == EMPTY).sum())

    @property
    def block_density(self) -> float:
        """Fraction in [0, 1] of *computed* token pairs: tokens of FULL + PARTIAL tiles over
        Q_LEN*KV_LEN*H, clipped at the real lengths (unlike ``BlockMask.sparsity()``)."""
        if self.q_len == 0 or self.kv_len == 0:
            return 0.0
        qs, ks = self._block_extents()
        # sum over computed tiles of rows(q block) * cols(kv block), in chunks of query-block
        # rows so the int64 temporaries stay small even at millions of tiles
        computed = 0
        step = max(1, (1 << 20) // max(1, self.num_kv_blocks))
        kinds = self.kinds.reshape((-1,) + self.kinds.shape[-2:])
        for h in range(kinds.shape[0]):
            for r in range(0, self.num_q_blocks, step):
                rows = (kinds[h, r:r + step] != EMPTY).astype(np.int64)
                computed += int(qs[r:r + step] @ (rows @ ks))
        return float(computed) / float(kinds.shape[0] * self.q_len * self.kv_len)

    # ---- flex conventions ------------------------------------------------------------------------
    def to_flex_kinds(self) -> np.ndarray:
        """uint8 [H, nq, nkv]: the kinds ``create_block_mask`` reports. Ragged last tiles
        (real part smaller than the block) can never be FULL there, because it pads with
        "not allowed": a FULL ragged tile becomes PARTIAL."""
        k = self.kinds.copy()
        if self.q_len % self.q_block_size:
            row = k[..., -1, :]
            row[row == FULL] = PARTIAL
        if self.kv_len % self.kv_block_size:
            col = k[..., :, -1]
            col[col == FULL] = PARTIAL
        return k

    # ---- construction from a dense mask (the slow, obvious classifier used by tests) -------------
    @classmethod
    def from_dense(cls, mask: np.ndarray, block_size) -> "BlockLayout":
        """Classify every tile of a dense mask.

        Args:
            mask: bool [H, Q_LEN, KV_LEN] (or [Q_LEN, KV_LEN] for one head).
            block_size: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.

        This materialises Q_LEN x KV_LEN: meant for tests and small sizes.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim == 2:
            mask = mask[None]
        qb, kb = normalize_block_size(block_size)
        H, Q, K = mask.shape
        nq, nk = cdiv(Q, qb), cdiv(K, kb)
        padded_any = np.zeros((H, nq * qb, nk * kb), dtype=bool)
        padded_all = np.ones((H, nq * qb, nk * kb), dtype=bool)
        padded_any[:, :Q, :K] = mask
        padded_all[:, :Q, :K] = mask
        any_ = padded_any.reshape(H, nq, qb, nk, kb).any(axis=(2, 4))
        all_ = padded_all.reshape(H, nq, qb, nk, kb).all(axis=(2, 4))
        kinds = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.uint8)
        return cls(kinds=kinds, q_len=Q, kv_len=K, q_block_size=qb, kv_block_size=kb)

    # ---- invariants --------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the layout is inconsistent: shapes against the lengths,
        kinds in {0,1,2}, list counts matching kinds, indices in range, ascending and
        without duplicates, PARTIAL and FULL lists disjoint."""
        k = self.kinds
        if k.ndim == 4:
            for b in range(k.shape[0]):
                self.batch_row(b).check_invariants()
            return
        assert k.dtype == np.uint8 and k.ndim == 3, (k.dtype, k.shape)
        assert self.num_q_blocks == cdiv(self.q_len, self.q_block_size), "num_q_blocks vs Q_LEN"
        assert self.num_kv_blocks == cdiv(self.kv_len, self.kv_block_size), "num_kv_blocks vs KV_LEN"
        assert np.isin(k, (EMPTY, PARTIAL, FULL)).all(), "kinds outside {EMPTY, PARTIAL, FULL}"
        for counts, idx, kind in (
            (self.kv_num_blocks, self.kv_indices, PARTIAL),
            (self.full_kv_num_blocks, self.full_kv_indices, FULL),
        ):
            assert (counts == (k == kind).sum(-1)).all(), "counts disagree with kinds"
            nk = self.num_kv_blocks
            valid = np.arange(nk) < counts[..., None]
            assert ((idx >= 0) & (idx < max(nk, 1)))[valid].all(), "index out of range"
            if nk > 1:
                inc = np.diff(idx, axis=-1) > 0
                both = valid[..., 1:]
                assert inc[both].all(), "indices not strictly ascending (duplicates?)"
            h, q, _ = np.nonzero(valid)
            assert (k[h, q, idx[valid]] == kind).all(), "listed tile has another kind"

    # ---- pictures --------------------------------------------------------------------------------
    def ascii(self, head: int = 0, max_blocks: int = 64, batch: int = 0) -> str:
        """Text picture of one head, one character per tile: '#' FULL, '+' PARTIAL, '.' EMPTY.
        With more than ``max_blocks`` tiles a side, neighbouring tiles are merged: '#' if all
        merged tiles are FULL, '.' if all are EMPTY, '+' otherwise."""
        nq, nk = self.kinds.shape[-2:]
        kinds = self.kinds[batch] if self.kinds.ndim == 4 else self.kinds
        merged = merge_kinds(kinds[head], max(1, cdiv(nq, max_blocks)), max(1, cdiv(nk, max_blocks)))
        chars = np.array([".", "+", "#"])  # indexed by EMPTY, PARTIAL, FULL
        return "\n".join("".join(row) for row in chars[merged])

    def __repr__(self) -> str:
        offsets = f", q_offset={self.q_offset}, kv_offset={self.kv_offset}" if self.q_offset or self.kv_offset else ""
        return (
            f"BlockLayout({'' if self.batch is None else f'B={self.batch}, '}H={self.num_heads}, Q_LEN={self.q_len}, KV_LEN={self.kv_len}{offsets}, "
            f"BLOCK_SIZE=({self.q_block_size}, {self.kv_block_size}), full={self.full_blocks}, "
            f"partial={self.partial_blocks}, empty={self.empty_blocks})"
        )
