"""``ContextParallel``: one sequence's attention over the ranks of a torch.distributed group.

Basics
    Every rank holds the queries, keys and values of the positions it owns (whole query
    blocks, chosen by ``patternc.distributed.balance``). ``attention`` brings to each rank
    exactly the key/value blocks that its computed tiles read, in **one** exchange
    (``all_to_all_single`` with per-peer split sizes), runs the block-sparse kernel on the
    rank's query blocks against that buffer, and returns the rank's output rows. The backward
    pass sends the key/value gradients of the received blocks back to their owners in one
    reverse exchange, where they are summed into the owners' own gradients.

Details
    * The schedule (owners, the blocks each rank reads, who sends what to whom) is a pure
      function of the layout, so every rank computes it alone; construction costs one small
      collective that checks all ranks compiled the same pattern at the same lengths.
    * The per-rank kernel is ``patternc.execute.blocksparse`` on a *local layout*: the rows of
      the owned query blocks and the columns of the read key/value blocks, both in ascending
      global order (so the one ragged block of the sequence, if read, is last, where the
      kernel expects padding), with ``mask_mod`` evaluated at the global positions. Rows are
      complete on their rank (all of a row's keys are in the buffer), so no log-sum-exp merge
      across ranks is needed and the result equals the single-process one up to float
      rounding.
    * K and V travel together: one ``[positions, B, H_kv, D + Dv]`` buffer in the input dtype;
      gradients travel back in the input dtype and are summed in float32 (float64 stays
      float64).
    * Collectives: every rank must call ``attention`` (and ``backward``) with the same B, H,
      H_kv, D, Dv and dtype, even a rank that owns no position. An exchange that moves nothing
      on any rank is skipped on all of them (they all know it from the schedule).
    * Per-term exchange: when the pattern's execution plan (SPEC §6) has a natural term and
      terms in other orders (``(local | strided) & causal``), each term is exchanged in its own
      order: the natural term on the rows' owners, every other term on the ranks that own
      contiguous ranges of *its* order (they fetch queries and keys, and send back each row's
      partial output and log-sum-exp, merged on the owner). Chosen where it moves less
      (``exchange``, ``stats["exchange"]``; docs/distributed.md has the arithmetic).
    * GPUs (nccl): the same calls on CUDA tensors; ``all_to_all_single`` is nccl's all-to-all.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import Diagnostic, PatternError, PatternWarning
from ..execute.common import Compiled
from ..execute.scoremod import score_terms_for
from .balance import (
    BALANCES,
    TOLERANCE,
    Schedule,
    _block_tokens,
    _build,
    block_weights,
    contiguous_balanced,
    make_schedule,
    row_reads,
)

__all__ = ["ContextParallel"]

#: the dtypes ``attention`` takes (their index is the dtype's code in the per-call agreement check)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the head dimension the per-term choice assumes before a call shows the real one
_NOMINAL_HEAD_DIM = 64


def _row_bytes_of(heads: int, kv_heads: int, dtype, D: int = _NOMINAL_HEAD_DIM, Dv: int | None = None):
    """Bytes of one position's (query row, key/value row, partial-output row) in the exchanges,
    per batch row: queries travel in the input dtype with ``heads`` heads, keys and values
    together with ``kv_heads``, a partial output and its log-sum-exp in the compute dtype
    (float32, float64 for float64 inputs) with ``heads``."""
    Dv = D if Dv is None else Dv
    size = torch.empty((), dtype=dtype).element_size()
    csize = 8 if dtype == torch.float64 else 4
    return heads * D * size, kv_heads * (D + Dv) * size, heads * (Dv + 1) * csize


def _max_bytes(counts, weights) -> int:
    """The busiest rank's bytes of a per-term exchange: ``counts`` int64 [W] (queries, key/value
    rows, partial-output rows received per rank), ``weights`` their bytes (``_row_bytes_of``)."""
    return int(max(sum(c[p] * w for c, w in zip(counts, weights)) for p in range(len(counts[0]))))


def _error(code: str, message: str, help: str | None = None) -> PatternError:
    return PatternError(Diagnostic(code, message, help=help, filename="patternc.distributed.ContextParallel"))


def _shape(x) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


@dataclass(eq=False)
class _LocalLayout:
    """The rows and columns of the global layout this rank computes (duck-typed BlockLayout
    for the kernel's ``Plan``: kinds, lengths and block sizes)."""

    kinds: np.ndarray  # uint8 [H, nq_r, nkv_r]
    q_len: int
    kv_len: int
    q_block_size: int
    kv_block_size: int

    @property
    def num_heads(self) -> int:
        return int(self.kinds.shape[0])

    @property
    def num_q_blocks(self) -> int:
        return int(self.kinds.shape[-2])


class ContextParallel:
    """Context-parallel attention of one compiled self-attention pattern (SPEC §7).

    Example (run under ``torchrun --nproc-per-node 4``)::

        dist.init_process_group("gloo")
        cp = patternc.compile("local(w=512) & causal", q_len=16384, num_heads=4)
        ctx = ContextParallel(cp)                               # balance="tiles"
        q_l, k_l, v_l = ctx.shard(q), ctx.shard(k), ctx.shard(v)   # [B, H, n_r, D]
        out_l = ctx.attention(q_l, k_l, v_l)                    # differentiable
        out = ctx.unshard(out_l)                                # [B, H, 16384, Dv] on every rank

    Args:
        cp: a ``CompiledPattern`` (any ``patternc.execute.common.Compiled``: its members are all
            this reads, plus the public ``layout_for`` / ``mask_mod_for`` with run-time data) with
            Q_LEN = KV_LEN (self-attention over one sequence).
        group: the torch.distributed process group (default: the default group, which must
            be initialised: gloo for CPU tensors, nccl for CUDA tensors).
        balance: ``"tiles"`` (equal computed tiles per rank, from the exact layout) or
            ``"contiguous"`` (equal chunks of query blocks in order).
        tolerance: for ``"tiles"``, the accepted imbalance (max / mean computed tiles - 1)
            before a better-balanced schedule that moves more keys is preferred.
        owner: int64 [num_q_blocks] ranks of the query blocks, to reuse another
            ``ContextParallel``'s positions (every layer of a model must shard the residual
            stream the same way); see ``for_pattern``.
        plan: ``"auto"`` (shard in a one-term execution plan's own order where there is one;
            exchange a several-term plan's terms each in its own order where that moves less)
            or ``"natural"``.
        exchange: ``"auto"``; ``"natural"`` (one exchange of the keys every rank's rows read,
            never per term); ``"per-term"`` (each plan term in its own order even where it
            does not move less: P380 if the plan has no such terms).
        kv_heads, dtype: the k/v heads (default: the pattern's heads) and the torch dtype
            (default float32) that ``attention`` will be called with. ``exchange="auto"``
            weighs bytes with them when it chooses the per-term exchange (queries and partial
            outputs travel with H heads, keys and values with H_kv; partial outputs in float32
            for half-precision inputs). Each call checks the choice again with its real shapes
            and runs the one natural exchange where that moves fewer bytes.

    Attributes:
        schedule: the ``balance.Schedule`` (identical on every rank).
        rank, world_size: this process' rank and the group's size.
        positions: int64 [n_r] the token positions this rank owns, in the sharding order
            (ascending when ``order`` is None).
        order: None (natural order), or int64 [seq_len] the natural position at each place of
            the order the sequence is sharded in: with ``plan="auto"``, a pattern whose execution
            plan (SPEC §6) is one term in one non-natural order for queries and keys (e.g.
            ``strided(s) & causal`` in residue order) is sharded in that order, whole blocks of
            it per rank.

    Raises:
        PatternError: P380 no initialised process group, ``cp`` not a compiled pattern, Q_LEN != KV_LEN,
            an unknown balance, or ranks that compiled different patterns or lengths.
    """

    def __init__(self, cp: Compiled, group=None, balance: str = "tiles", *, tolerance: float = TOLERANCE,
                 owner=None, plan: str = "auto", exchange: str = "auto", kv_heads: int | None = None,
                 dtype=None):
        if not dist.is_available() or not dist.is_initialized():
            raise _error("P380", "context parallel needs an initialised torch.distributed process group",
                         help='call torch.distributed.init_process_group("gloo") (CPU) or ("nccl") (GPU) '
                              "first, e.g. under torchrun --nproc-per-node N")
        if not isinstance(cp, Compiled):
            raise _error("P380", f"ContextParallel takes a compiled pattern, got {type(cp).__name__}",
                         help="pass patternc.compile(pattern, q_len=L, num_heads=H, ...) (the same call on every rank)")
        if balance not in BALANCES:
            raise _error("P380", f"unknown balance {balance!r}; expected one of {', '.join(BALANCES)}",
                         help='balance="tiles" equalises computed tiles per rank')
        if cp.q_len != cp.kv_len:
            raise _error("P380", f"context parallel shards one sequence: Q_LEN={cp.q_len} and KV_LEN={cp.kv_len} differ",
                         help="compile the pattern with kv_len equal to q_len")
        self.cp = cp
        self.group = group
        self.balance = balance
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if str(backend) == "nccl"
                       else torch.device("cpu"))
        if plan not in ("auto", "natural"):
            raise _error("P380", f"plan must be 'auto' or 'natural', got {plan!r}")
        if exchange not in ("auto", "natural", "per-term"):
            raise _error("P380", f"exchange must be 'auto', 'natural' or 'per-term', got {exchange!r}")
        layout = cp.layout
        self.seq_len = cp.q_len
        self.q_block_size, self.kv_block_size = layout.q_block_size, layout.kv_block_size
        #: the token order the sequence is sharded in: None (natural) or int64 [seq_len], the
        #: natural position at each place (a one-term execution plan's own order, SPEC §6)
        self.order, self.order_text = None, "natural"
        kinds = np.asarray(layout.kinds)
        term = _single_term_order(cp) if plan == "auto" and owner is None else None
        if term is not None:
            self.order = term.q_positions(cp.q_len)
            self.order_text = str(term.q_order)
            kinds = np.asarray(term.kinds)
        self._kinds = kinds
        if owner is None:
            self.schedule = make_schedule(kinds, world=self.world_size, seq_len=self.seq_len,
                                          q_block_size=self.q_block_size, kv_block_size=self.kv_block_size,
                                          balance=balance, tolerance=tolerance)
        else:
            self.schedule = _schedule_from_owner(layout, owner, self.world_size)
        #: "natural" (one exchange of the keys each rank's rows read, in the sharding order) or
        #: "per-term" (each execution-plan term exchanged in its own order, see docs/distributed.md)
        self.exchange = "natural"
        self._exchange_opt = exchange
        self._split_terms = None
        if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1):
            raise _error("P380", f"kv_heads must be a positive number of heads, got {kv_heads!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise _error("P380", f"dtype must be one of {', '.join(str(d) for d in _DTYPES)}, got {dtype!r}")
        self._kv_heads_opt, self._dtype_opt = kv_heads, dtype
        self._hint = (min(kv_heads or cp.num_heads, cp.num_heads), dtype or torch.float32)
        self._per_term_counts = None
        self._choice: dict = {}
        self._calls = 0
        if plan == "auto" and term is None and exchange != "natural":
            self._choose_per_term(balance, tolerance, force=exchange == "per-term", owner=owner)
        if exchange == "per-term" and self.exchange != "per-term":
            raise _error("P380", f"exchange='per-term' needs an execution plan with a natural term and terms in "
                         f"other orders, all heads each; `{cp.pattern}` has none here",
                         help="use exchange='auto' (the default) or 'natural'")
        self.positions = self._natural(self.schedule.positions[self.rank])
        self._check_same_everywhere()
        self._setup()
        self._plans: dict = {}
        self._children: dict = {}
        self._bytes = dict(bytes_sent_forward=0, bytes_received_forward=0, kv_bytes_received_forward=0,
                           bytes_sent_backward=0, bytes_received_backward=0, allgather_bytes=0)

    # ---- setup -------------------------------------------------------------------------------
    def _check_same_everywhere(self) -> None:
        cp = self.cp
        key = "|".join(str(x) for x in (cp.pattern, cp.q_len, cp.kv_len, cp.num_heads, self.q_block_size,
                                         self.kv_block_size, self.order_text, self.exchange, self._hint,
                                         self.schedule.owner.tobytes().hex()))
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
        if self._extremes([h]) != ([h], [h]):
            raise _error("P380", "the ranks compiled different patterns, lengths, heads, block sizes or balances, "
                         "or gave different kv_heads / dtype",
                         help="build ContextParallel from the same patternc.compile(...) call on every rank")

    def _extremes(self, values: list[int]) -> tuple[list[int], list[int]]:
        """(max, min) over the ranks of each of ``values`` (ints): one all-reduce of them and of
        their negation. Equal on every rank exactly when every rank gave the same values."""
        t = torch.tensor(values + [-x for x in values], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        n = len(values)
        return t[:n].tolist(), [-x for x in t[n:].tolist()]

    def _natural(self, pos: np.ndarray) -> np.ndarray:
        """Natural token positions of places ``pos`` of the sharding order."""
        return pos if self.order is None else self.order[pos]

    def _choose_per_term(self, balance: str, tolerance: float, force: bool = False, owner=None) -> None:
        """Exchange the execution plan's terms each in its own order when that makes the rank
        that receives most receive fewer bytes (``_row_bytes_of`` with the ``kv_heads`` / ``dtype``
        hints, D = Dv). Rows are owned in natural order, balanced
        on the natural term's tiles; each other term's query blocks are computed by ranks in
        contiguous equal-tile ranges of *its* order (``_RemoteTerm``). With ``owner`` given (``for_pattern``)
        the rows keep those owners."""
        split = _split_plan(self.cp)
        if split is None:
            return
        home, remotes = split
        W, L = self.world_size, self.seq_len
        home_kinds = _padded_kinds(home, self._kinds.shape[-2], self._kinds.shape[-1])
        if owner is None:
            sched = make_schedule(home_kinds, world=W, seq_len=L, q_block_size=self.q_block_size,
                                  kv_block_size=self.kv_block_size, balance=balance, tolerance=tolerance)
        else:
            sched = _build(np.asarray(owner, dtype=np.int64), "given", block_weights(home_kinds),
                           row_reads(home_kinds), W, L, self.q_block_size, self.kv_block_size)
        kv_in = np.asarray(sched.received_positions(), dtype=np.int64).copy()  # the natural term's keys
        q_in = np.zeros(W, dtype=np.int64)
        part_in = np.zeros(W, dtype=np.int64)
        heads = self.cp.num_heads
        tiles = sched.tiles * (heads if home_kinds.shape[0] == 1 else 1)
        owners = []
        for t in remotes:
            w = block_weights(t.kinds)
            own_t = contiguous_balanced(w, W)
            owners.append(own_t)
            q_need, kv_need = _term_needs(t, own_t, W, L, self.q_block_size, self.kv_block_size)
            for p in range(W):
                q_in[p] += int((sched.position_owner(q_need[p]) != p).sum())  # queries in
                kv_in[p] += int((sched.position_owner(kv_need[p]) != p).sum())  # keys / values in
                for x in q_need[:p] + q_need[p + 1:]:  # partial outputs of its own rows come back
                    part_in[p] += int((sched.position_owner(x) == p).sum())
            tiles = tiles + np.array([int(w[own_t == p].sum()) for p in range(W)]) * (
                heads if t.kinds.shape[0] == 1 else 1)
        counts = (q_in, kv_in, part_in)
        w_kv = _row_bytes_of(heads, *self._hint)[1]
        # against the natural exchange on its own rows, and on these rows (what each call compares
        # with, ``_per_term_pays``: so the call never undoes this choice at the hinted shapes)
        same_rows = _build(sched.owner, "given", block_weights(self._kinds), row_reads(self._kinds), W, L,
                           self.q_block_size, self.kv_block_size)
        natural = min(int(self.schedule.received_positions().max()), int(same_rows.received_positions().max()))
        if _max_bytes(counts, _row_bytes_of(heads, *self._hint)) >= natural * w_kv and not force:
            return
        self._per_term_counts = counts
        self.schedule = sched
        self.exchange = "per-term"
        self._split_terms = (home, remotes, owners)
        self._tiles_per_rank = tiles

    def _setup(self) -> None:
        self._static_step = None
        self._step = None
        self._split = None
        if self._split_terms is not None:
            home, remotes, owners = self._split_terms
            self._split = _SplitStep(self, home, remotes, owners)
            self._step = self._split
        else:
            self._step = self._static

    @property
    def _static(self) -> "_Step":
        """The one-exchange step of the whole pattern in the sharding order (built on first use:
        in per-term mode only run-time data needs it)."""
        if self._static_step is None:
            self._static_step = _Step(self, self._kinds, None)
        return self._static_step

    def for_pattern(self, cp) -> "ContextParallel":
        """A ``ContextParallel`` for another pattern at the same length and block size that
        keeps this one's positions (another layer of the same model); cached per ``cp``."""
        if cp is self.cp:
            return self
        if self.order is not None:
            raise _error("P380", f"this ContextParallel shards in {self.order_text} order (its pattern's execution "
                         "plan); another pattern cannot keep those positions",
                         help="build the first ContextParallel with plan='natural' to share it across layers")
        child = self._children.get(id(cp))
        if child is None or child.cp is not cp:
            if cp.q_len != self.seq_len or cp.layout.q_block_size != self.q_block_size:
                raise _error("P380", f"for_pattern needs the same Q_LEN and Q_BLOCK_SIZE ({self.seq_len}, "
                             f"{self.q_block_size}); got ({cp.q_len}, {cp.layout.q_block_size})")
            child = ContextParallel(cp, self.group, self.balance, owner=self.schedule.owner,
                                    exchange="natural" if self._exchange_opt == "natural" else "auto",
                                    kv_heads=self._kv_heads_opt, dtype=self._dtype_opt)
            self._children[id(cp)] = child
        return child

    # ---- shards ------------------------------------------------------------------------------
    def _index(self, device) -> torch.Tensor:
        return torch.as_tensor(self.positions, device=device)

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a full-sequence tensor.

        Args:
            x: any dtype, the sequence (``seq_len`` tokens) on axis ``dim`` (2 for
                [B, H, L, D] attention inputs; 1 for [B, L, E] hidden states).

        Returns:
            ``x`` with axis ``dim`` reduced to this rank's ``n_r`` positions (ascending).

        Raises:
            PatternError: P381 axis ``dim`` is not ``seq_len`` long.
        """
        if x.dim() <= dim or x.shape[dim] != self.seq_len:
            raise _error("P381", f"shard expects the sequence of {self.seq_len} tokens on axis {dim}, got {_shape(x)}",
                         help="pass the full-sequence tensor, or the axis of the sequence with dim=")
        return x.index_select(dim, self._index(x.device))

    def unshard(self, x_l: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The full-sequence tensor from every rank's shard (an all-gather; every rank gets it).

        Differentiable: the gradient of a shard is the sum over ranks of the gradients of its
        positions in each rank's full tensor (``torch.distributed.nn.functional.all_gather``'s
        convention), so a loss on the unsharded tensor computed on every rank counts once per
        rank; every rank must call ``backward`` (it is a collective). Losses on the shards
        (summed over ranks) need no unshard at all.

        Args:
            x_l: this rank's shard, its ``n_r`` positions on axis ``dim``; same shape
                elsewhere, dtype and device on every rank.

        Returns:
            [..., seq_len, ...] with the positions in order.

        Raises:
            PatternError: P381 axis ``dim`` is not this rank's ``n_r`` positions long.
        """
        n = self.positions.size
        if x_l.dim() <= dim or x_l.shape[dim] != n:
            raise _error("P381", f"unshard expects this rank's {n} positions on axis {dim}, got {_shape(x_l)}",
                         help="pass the output of ctx.attention (or of ctx.shard) on this rank")
        if torch.is_grad_enabled() and x_l.requires_grad:
            return _Unshard.apply(x_l, self, dim)
        return self._gather_full(x_l.detach(), dim)

    def _gather_full(self, x_l: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.positions.size
        sizes = [p.size for p in self.schedule.positions]
        m = max(sizes) if sizes else 0
        x0 = x_l.movedim(dim, 0)
        pad = x0.new_zeros((m,) + tuple(x0.shape[1:]))
        pad[:n] = x0
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        dist.all_gather(parts, pad.contiguous(), group=self.group)
        full = x0.new_empty((self.seq_len,) + tuple(x0.shape[1:]))
        for p, part in enumerate(parts):
            idx = torch.as_tensor(self._natural(self.schedule.positions[p]), device=full.device)
            full.index_copy_(0, idx, part[:sizes[p]])
        return full.movedim(0, dim)

    # ---- attention ---------------------------------------------------------------------------
    def _check(self, q, k, v) -> None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise _error("P350", f"{name} must be a 4-D tensor [B, H, n_r, D], got "
                             f"{_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
        n = self.positions.size
        if q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
            raise _error("P350", f"rank {self.rank} owns {n} positions: expected q, k, v [B, H, {n}, D], got "
                         f"{_shape(q)}, {_shape(k)}, {_shape(v)}", help="pass ctx.shard(x) of the full tensors")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                    torch.float64):
            raise _error("P351", f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise _error("P351", f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
        B, H, _, D = q.shape
        if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[3] != D:
            raise _error("P350", f"q, k, v do not fit together: {_shape(q)}, {_shape(k)}, {_shape(v)}")
        H_kv = k.shape[1]
        if H_kv < 1 or H % H_kv:
            raise _error("P350", f"k/v have H_kv={H_kv} heads, which does not divide q's H={H}")
        lh = self.cp.layout.num_heads
        if H != lh and not (lh == 1 and self.cp.pattern.num_heads == 1):
            raise _error("P350", f"q has H={H} heads, but the pattern was compiled for num_heads={lh}",
                         help=f"compile the pattern with num_heads={H}")

    def attention(self, q_l: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor, *,
                  scale: float | None = None, documents=None, key_padding_mask=None) -> torch.Tensor:
        """This rank's rows of the pattern's attention over the whole sequence.

        Args:
            q_l: float16/bfloat16/float32/float64 [B, H, n_r, D], this rank's queries
                (``shard(q)``).
            k_l: same dtype [B, H_kv, n_r, D]; v_l: [B, H_kv, n_r, Dv] (H_kv divides H).
            scale: multiplier of ``q k^T`` (default ``1 / sqrt(D)``).
            documents: run-time documents of the *whole* sequence (SPEC §1.7: ids [B, P] /
                [P] or lengths per row; the same on every rank).
            key_padding_mask: bool [B, seq_len] over the *whole* sequence, True = a real key
                (the same on every rank).

            With run-time data the positions stay those of the schedule (balanced on the
            static layout); what moves is derived from this batch's exact layout
            (``cp.layout_for``), so a document boundary or padded keys move less.

        Returns:
            [B, H, n_r, Dv] in q's dtype, differentiable in q_l, k_l, v_l (the backward runs
            one reverse exchange: every rank must call backward too).

        Raises:
            PatternError: P350 shapes that do not fit this rank's positions or the pattern, or
                ranks that called with different B, H, H_kv, D, Dv, dtype or kinds of run-time
                data (every rank raises it); P351 dtypes or devices.
        """
        try:
            self._check(q_l, k_l, v_l)
            bad = None
        except PatternError as e:  # raised after the agreement check, which the other ranks are in
            bad = e
        self._check_same_call(q_l, k_l, v_l, documents is not None, key_padding_mask is not None, bad=bad)
        scale = 1.0 / math.sqrt(q_l.shape[-1]) if scale is None else float(scale)
        score_mod = score_terms_for(self.cp, q_l.shape[1])
        if score_mod is not None:  # softcap: the matmul divides by the cap (as the one-process kernel)
            scale, score_mod = scale * score_mod.prescale, score_mod.prescaled()
        if documents is not None or key_padding_mask is not None or self.cp.needs:
            step = self._runtime_step(q_l, documents, key_padding_mask)
        else:
            step = self._split if self._split is not None and self._per_term_pays(q_l, k_l, v_l) else self._static
        self._step = step
        self._bytes.update(allgather_bytes=(self.seq_len - self.positions.size) * k_l.shape[0] * k_l.shape[1]
                           * (k_l.shape[-1] + v_l.shape[-1]) * k_l.element_size())
        grad = torch.is_grad_enabled() and (q_l.requires_grad or k_l.requires_grad or v_l.requires_grad)
        if isinstance(step, _SplitStep):
            if grad:
                return _SplitAttention.apply(q_l, k_l, v_l, step, scale, score_mod)
            return step.forward(q_l, k_l, v_l, scale, score_mod)[0].to(q_l.dtype)
        if grad:
            return _ContextParallelAttention.apply(q_l, k_l, v_l, step, scale, score_mod)
        return step.forward(q_l, k_l, v_l, scale, need_lse=False, score_mod=score_mod)[0]

    def _check_same_call(self, q, k, v, *runtime: bool, bad: PatternError | None = None) -> None:
        """Every rank must call with the same B, H, H_kv, D, Dv, dtype and kinds of run-time
        data: the exchanges' sizes depend on them, and gloo aborts the process on a mismatch.
        One all-reduce of the call's signature (max of it and of its negation): on every call
        with gloo, on the first with nccl (where reading it back is a host sync). ``bad``: this
        rank's own inputs failed ``_check``; it takes part, then raises that, and the other
        ranks raise P350 instead of waiting for it in the exchange."""
        if self._calls and self.device.type == "cuda":
            if bad is not None:
                raise bad
            return
        if bad is None:
            sig = [*q.shape[:2], k.shape[1], q.shape[-1], v.shape[-1], _DTYPES.index(q.dtype),
                   *(int(x) for x in runtime), 0]
        else:
            sig = [0] * (6 + len(runtime)) + [1]
        hi, lo = self._extremes(sig)
        if bad is not None:
            raise bad
        if hi[-1]:
            raise _error("P350", "another rank's call to attention had inputs that do not fit (it raised the "
                         "diagnostic)", help="fix the inputs on that rank: every rank calls attention with "
                         "ctx.shard(x) of the same full tensors")
        self._calls += 1
        if hi != sig or lo != sig:
            names = ("B", "H", "H_kv", "D", "Dv", "dtype", "documents", "key_padding_mask")
            differ = ", ".join(n for n, a, b in zip(names, hi, lo) if a != b)
            raise _error("P350", f"the ranks called attention with different {differ} (rank {self.rank}: q "
                         f"{_shape(q)}, k {_shape(k)}, v {_shape(v)}, {q.dtype})",
                         help="every rank calls attention with the same batch, heads, head dims, dtype and "
                              "run-time data (each with its own positions)")

    def _per_term_pays(self, q, k, v) -> bool:
        """Whether the per-term exchange receives fewer bytes on its busiest rank than the one
        natural exchange on the same rows, for this call's H, H_kv, D, Dv and dtype (the
        construction weighed the ``kv_heads`` / ``dtype`` hints). Every rank computes the same
        answer: it depends only on the shared schedule and on shapes every rank agrees on."""
        if self._exchange_opt == "per-term" or self._per_term_counts is None:
            return True
        key = (q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], q.dtype)
        got = self._choice.get(key)
        if got is None:
            weights = _row_bytes_of(q.shape[1], k.shape[1], q.dtype, q.shape[-1], v.shape[-1])
            natural = int(self._static.received_all.max()) * weights[1]
            got = self._choice[key] = _max_bytes(self._per_term_counts, weights) < natural
            if not got:
                hkv, hdt = self._hint
                warnings.warn(PatternWarning(Diagnostic(
                    "W030", f"context parallel chose the per-term exchange for H_kv={hkv}, D=Dv, {hdt}; with this "
                    f"call's H={q.shape[1]}, H_kv={k.shape[1]}, D={q.shape[-1]}, Dv={v.shape[-1]}, {q.dtype} the one "
                    "natural exchange on the same rows receives fewer bytes, so it runs (its tiles were not "
                    "balanced for it)", None,
                    f"pass ContextParallel(..., kv_heads={k.shape[1]}, dtype={q.dtype}) so that the exchange and "
                    "the balance are chosen for these shapes", severity="warning",
                    filename="patternc.distributed")), stacklevel=3)
        return got

    def _runtime_step(self, q_l, documents, key_padding_mask) -> "_Step":
        """The exchange and local layouts of one batch with run-time data (SPEC §1.7)."""
        cp = self.cp
        if self.order is not None:
            raise _error("P380", f"run-time data with a ContextParallel sharded in {self.order_text} order",
                         help="build it with plan='natural' to pass documents or key_padding_mask")
        layout = cp.layout_for(documents=documents, key_padding_mask=key_padding_mask)
        kinds = np.asarray(layout.kinds)
        if kinds.ndim == 3:
            return self._static
        if kinds.shape[0] not in (1, q_l.shape[0]):
            raise _error("P350", f"run-time data for {kinds.shape[0]} batch rows, but q has B={q_l.shape[0]}")
        mask_mod = cp.mask_mod_for(q_l.device, documents=documents, key_padding_mask=key_padding_mask)
        return _Step(self, kinds, mask_mod)

    # ---- statistics --------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """This rank's numbers (bytes from the most recent forward / backward call; 0 before):

        ``rank``, ``world_size``, ``positions`` (tokens owned), ``q_blocks``, ``kv_blocks_read``,
        ``computed_tiles`` (over heads; and batch rows with run-time data: of the latest call),
        ``positions_received`` / ``positions_sent`` (key/value positions of the forward
        exchanges, tokens; ``kv_blocks_read``: of the natural term with ``exchange ==
        "per-term"``), ``bytes_sent_forward``, ``bytes_received_forward``, ``bytes_sent_backward``,
        ``bytes_received_backward``, ``allgather_bytes`` (what an all-gather of K and V would
        receive), ``kv_bytes_received_forward`` (the part of ``bytes_received_forward`` that is keys
        and values), ``imbalance`` (max / mean computed tiles over ranks, of the exchange the
        latest call ran), ``method`` (the schedule chosen), ``order`` (the token order the
        sequence is sharded in) and ``exchange`` (the latest call's: ``"natural"``, or
        ``"per-term"``: each execution-plan term in its own order; a per-term ContextParallel
        runs the natural one with run-time data, or where this call's shapes make it move less).
        """
        s, r, st = self.schedule, self.rank, self._step
        split = isinstance(st, _SplitStep)
        t = np.asarray(self._tiles_per_rank if split else st.tiles_all)  # of the exchange that ran last
        imbalance = float(t.max() * t.size / t.sum()) if t.sum() else 1.0
        return dict(rank=r, world_size=self.world_size, positions=int(self.positions.size),
                    q_blocks=int(s.q_blocks[r].size), kv_blocks_read=int(st.kv_blocks[r].size),
                    computed_tiles=int(st.tiles), positions_received=int(st.positions_received),
                    positions_sent=int(st.positions_sent), **self._bytes,
                    imbalance=round(imbalance, 4), method=s.method, order=self.order_text,
                    exchange="per-term" if split else "natural")


def _single_term_order(cp):
    """The one term of ``cp.plan`` when the plan runs the whole pattern (every head, every
    token) in one non-natural order shared by queries and keys, else None: sharding in that
    order keeps the pattern's tiles few there (``strided(s) & causal`` in residue order owns
    whole residue classes per rank and exchanges nothing)."""
    plan = cp.plan_for("auto")
    terms = None if plan is None or plan.is_natural else plan.terms
    if not terms or len(terms) != 1:
        return None
    t = terms[0]
    if (t.q_order.kind == "natural" or str(t.q_order) != str(t.kv_order) or t.q_count != cp.q_len
            or t.kv_count != cp.kv_len or len(t.heads) != cp.num_heads or cp.layout.q_block_size != cp.layout.kv_block_size):
        return None
    return t


def _schedule_from_owner(layout, owner, world: int) -> Schedule:
    from .balance import _build, block_weights, row_reads

    owner = np.asarray(owner, dtype=np.int64)
    kinds = np.asarray(layout.kinds)
    if owner.shape != (kinds.shape[-2],) or (owner.size and (owner.min() < 0 or owner.max() >= world)):
        raise _error("P380", f"owner must give a rank in [0, {world}) for each of the {kinds.shape[-2]} query blocks")
    return _build(owner, "given", block_weights(kinds), row_reads(kinds), world, layout.q_len,
                  layout.q_block_size, layout.kv_block_size)


class _Fetch:
    """One exchange pattern: rank ``p`` wants the rows of ``need[p]`` (unique places of the
    schedule's order, in any order), each owned by ``schedule.position_owner``. ``gather``
    brings them (one ``all_to_all_single``); ``scatter_add`` sends per-slot values back to the
    owners and sums them there (its reverse). Identical on every rank: the splits are known
    everywhere, so an exchange that moves nothing anywhere is skipped by all ranks."""

    def __init__(self, cpx: "ContextParallel", need: list):
        s, r, W = cpx.schedule, cpx.rank, cpx.world_size
        self.cpx = cpx
        own = s.positions[r]
        self.n = int(own.size)
        need = [np.asarray(x, dtype=np.int64) for x in need]
        owners = [s.position_owner(x) for x in need]
        mine, src = need[r], owners[r]
        self.m = int(mine.size)
        self.recv_splits = [int((src == p).sum()) if p != r else 0 for p in range(W)]
        send = [np.searchsorted(own, need[p][owners[p] == r]) if p != r else np.zeros(0, dtype=np.int64)
                for p in range(W)]
        self.send_splits = [int(x.size) for x in send]
        self.send_index = np.concatenate(send) if send else np.zeros(0, dtype=np.int64)
        # slot of need[r] -> row of cat([own rows, received rows]) (received: peer by peer, in
        # need[r]'s order within each peer, which is the order the peer sends them in)
        index = np.empty(self.m, dtype=np.int64)
        home = src == r
        index[home] = np.searchsorted(own, mine[home])
        offset = self.n
        for p in range(W):
            if p == r:
                continue
            slots = np.nonzero(src == p)[0]
            index[slots] = offset + np.arange(slots.size, dtype=np.int64)
            offset += slots.size
        self.index = index
        # the same map split in two, to fill a buffer without concatenating: own rows -> slots
        # (``home_slots`` <- ``home_rows``), received rows (in arrival order) -> ``recv_slots``
        self.home_slots = np.nonzero(home)[0]
        self.home_rows = index[home]
        self.recv_slots = np.argsort(np.where(home, -1, index), kind="stable")[self.home_slots.size:]
        self.identity = bool(self.m == self.n and not (~home).any() and np.array_equal(index, np.arange(self.n)))
        self.any = any(bool((o != p).any()) for p, o in enumerate(owners))
        self._t: dict = {}

    def _tensor(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        t = self._t.get(key)
        if t is None:
            t = self._t[key] = torch.as_tensor(getattr(self, name), device=device)
        return t

    def _exchange(self, rows: torch.Tensor, send_splits, recv_splits) -> torch.Tensor:
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        if self.any:
            dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=list(recv_splits),
                                   input_split_sizes=list(send_splits), group=self.cpx.group)
        return out

    def gather(self, own: torch.Tensor):
        """``own`` [n, ...] (this rank's rows, ascending places) -> ([m, ...] rows of need[rank],
        bytes sent, bytes received)."""
        dev = own.device
        sent = own.index_select(0, self._tensor("send_index", dev))
        recv = self._exchange(sent, self.send_splits, self.recv_splits)
        if self.identity:  # the buffer is this rank's own rows, in order
            buf = own
        else:
            buf = own.new_empty((self.m,) + tuple(own.shape[1:]))
            buf.index_copy_(0, self._tensor("home_slots", dev), own.index_select(0, self._tensor("home_rows", dev)))
            if recv.shape[0]:
                buf.index_copy_(0, self._tensor("recv_slots", dev), recv)
        rb = _row_bytes(own)
        return buf, int(sent.shape[0]) * rb, int(recv.shape[0]) * rb

    def scatter_add(self, vals: torch.Tensor, dtype: torch.dtype):
        """``vals`` [m, ...] per slot of need[rank] -> ([n, ...] this rank's rows: the sum of every
        rank's values for them, in vals' dtype; sent in ``dtype``), bytes sent, bytes received."""
        full = vals.new_zeros((self.n + sum(self.recv_splits),) + tuple(vals.shape[1:]))
        full.index_add_(0, self._tensor("index", vals.device), vals)
        back = full[self.n:].to(dtype)
        got = self._exchange(back, self.recv_splits, self.send_splits)
        own = full[:self.n]
        own.index_add_(0, self._tensor("send_index", vals.device), got.to(own.dtype))
        rb = _row_bytes(back)
        return own, int(back.shape[0]) * rb, int(got.shape[0]) * rb


def _row_bytes(x: torch.Tensor) -> int:
    """bytes of one row (axis 0) of ``x``."""
    return int(math.prod(x.shape[1:]) * x.element_size())


class _Step:
    """What one layout (the static one, or one batch's with run-time data) makes a rank do: the
    key/value blocks every rank reads, the forward exchange (a ``_Fetch`` of those blocks'
    tokens) and the local layouts of the kernel (one per batch row with run-time data, else one
    for the whole batch). ``mask_for(device)`` gives the natural ``mask_mod`` when it is not the
    compiled pattern's (the natural term of a per-term exchange)."""

    def __init__(self, cpx: ContextParallel, kinds: np.ndarray, mask_mod, mask_for=None):
        s, r, W = cpx.schedule, cpx.rank, cpx.world_size
        self.cpx = cpx
        kinds4 = kinds if kinds.ndim == 4 else kinds[None]  # [Bk, H or 1, nq, nkv]
        reads = row_reads(kinds4)
        self.kv_blocks = [np.nonzero(reads[s.q_blocks[p]].any(axis=0))[0].astype(np.int64) if s.q_blocks[p].size
                          else np.zeros(0, dtype=np.int64) for p in range(W)]
        kb, L = cpx.kv_block_size, cpx.seq_len
        buffers = [_block_tokens(self.kv_blocks[p], kb, L) for p in range(W)]
        self.buffer = buffers[r]
        self.kv = _Fetch(cpx, buffers)
        self.recv_splits, self.send_splits = self.kv.recv_splits, self.kv.send_splits
        self.positions_received, self.positions_sent = sum(self.recv_splits), sum(self.send_splits)
        #: int64 [W] key/value positions each rank receives; computed tiles of each rank (over heads)
        self.received_all = np.array([int((s.position_owner(b) != p).sum()) for p, b in enumerate(buffers)],
                                     dtype=np.int64)
        own = s.positions[r]
        local = kinds4[:, :, s.q_blocks[r]][:, :, :, self.kv_blocks[r]]
        per_head = cpx.cp.num_heads if kinds4.shape[1] == 1 else 1
        self.tiles = int((local != 0).sum()) * per_head
        self.tiles_all = np.array([int((kinds4[:, :, s.q_blocks[p]] != 0).sum()) * per_head for p in range(W)],
                                  dtype=np.int64)
        self.layouts = [_LocalLayout(kinds=np.ascontiguousarray(x), q_len=int(own.size), kv_len=int(self.buffer.size),
                                     q_block_size=cpx.q_block_size, kv_block_size=kb) for x in local]
        self.runtime = kinds.ndim == 4
        self.base = mask_mod
        self.mask_for = mask_for
        self._plans: dict = {}

    # ---- the kernel's plans -------------------------------------------------------------------
    def plan(self, row: int, num_heads: int, device):
        """(Plan, mask_mod, positions) of batch row ``row`` (0 for the static layout) in local
        coordinates; ``positions`` maps local rows / columns to natural ones (for score terms)."""
        from ..execute.blocksparse import Plan, _Positions

        key = (row, num_heads, str(device))
        got = self._plans.get(key)
        if got is None:
            if self.base is not None:
                base = self.base
            elif self.mask_for is not None:
                base = self.mask_for(device)
            else:
                base = self.cpx.cp.mask_mod_on(device)
            qpos = torch.as_tensor(self.cpx.positions, device=device)
            kpos = torch.as_tensor(self.cpx._natural(self.buffer), device=device)
            if self.runtime:
                b_row = torch.tensor(row, dtype=torch.int64, device=device)

                def mask_mod(b, h, q_idx, kv_idx):
                    return base(b_row, h, qpos[q_idx], kpos[kv_idx])
            else:
                def mask_mod(b, h, q_idx, kv_idx):
                    return base(b, h, qpos[q_idx], kpos[kv_idx])

            mask_mod.__name__ = f"{getattr(base, '__name__', 'mask_mod')} @ rank {self.cpx.rank}"
            plan = Plan(self.layouts[row], num_heads, device, mask_mod)
            got = self._plans[key] = (plan, mask_mod, _Positions(plan, None, qpos, kpos))
        return got

    def rows(self, B: int):
        """(layout row, batch slice) pairs covering B batch rows."""
        if not self.runtime:
            return [(0, slice(0, B))]
        return [(min(b, len(self.layouts) - 1), slice(b, b + 1)) for b in range(B)]

    # ---- the exchange -------------------------------------------------------------------------
    def gather_kv(self, k_l: torch.Tensor, v_l: torch.Tensor):
        """Forward exchange: (k_buf [B, H_kv, m, D], v_buf [B, H_kv, m, Dv], bytes sent, bytes
        received) at the buffer positions (``m`` = every token of the key/value blocks this
        rank's tiles read). K and V travel together as one [n, B, H_kv, D + Dv] tensor."""
        D = k_l.shape[-1]
        own = torch.cat([k_l, v_l], dim=-1).permute(2, 0, 1, 3)  # [n, B, H_kv, D + Dv]
        buf, sent, recv = self.kv.gather(own)
        buf = buf.permute(1, 2, 0, 3)
        return buf[..., :D], buf[..., D:], sent, recv

    def scatter_kv_grad(self, dk_buf: torch.Tensor, dv_buf: torch.Tensor, dtype: torch.dtype):
        """Backward exchange: the gradients at the buffer positions -> (dk_l, dv_l, bytes sent,
        bytes received) of this rank's own positions, summed over every rank that read them (in
        dk_buf's dtype; sent in ``dtype``)."""
        D = dk_buf.shape[-1]
        g = torch.cat([dk_buf, dv_buf], dim=-1).permute(2, 0, 1, 3)  # [m, B, H_kv, D + Dv]
        own, sent, recv = self.kv.scatter_add(g, dtype)
        own = own.permute(1, 2, 0, 3)
        return own[..., :D], own[..., D:], sent, recv

    # ---- compute ------------------------------------------------------------------------------
    def forward(self, q, k, v, scale, *, need_lse: bool, score_mod=None):
        """(out [B, H, n, Dv] in q's dtype, per-row kernel results [(o, lse) | None], k_buf, v_buf)."""
        from ..execute.blocksparse import blocksparse_forward

        B, H, n, _ = q.shape
        Dv = v.shape[-1]
        kb, vb, sent, recv = self.gather_kv(k, v)
        self.cpx._bytes.update(bytes_sent_forward=sent, bytes_received_forward=recv, kv_bytes_received_forward=recv)
        out = q.new_zeros((B, H, n, Dv))
        saved = []
        for row, bs in self.rows(B):
            if n == 0 or not self.layouts[row].kinds.any():
                saved.append(None)
                continue
            plan, mask_mod, pos = self.plan(row, H, q.device)
            o, lse = blocksparse_forward(plan, mask_mod, q[bs], kb[bs], vb[bs], scale, need_lse=need_lse,
                                         score_mod=score_mod, positions=pos)
            out[bs] = o.view(o.shape[0], H, -1, Dv)[:, :, :n].to(q.dtype)
            saved.append((o, lse))
        return out, saved, kb, vb

    def backward(self, q, kb, vb, saved, dout, scale, score_mod=None):
        from ..execute.blocksparse import _compute_dtype, blocksparse_backward

        cdt = _compute_dtype(q.dtype)
        H = q.shape[1]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dkb = torch.zeros(kb.shape, dtype=cdt, device=q.device)
        dvb = torch.zeros(vb.shape, dtype=cdt, device=q.device)
        for (row, bs), got in zip(self.rows(q.shape[0]), saved):
            if got is None:
                continue
            plan, mask_mod, pos = self.plan(row, H, q.device)
            o, lse = got
            dq[bs], dkb[bs], dvb[bs] = blocksparse_backward(plan, mask_mod, q[bs], kb[bs], vb[bs], o, lse,
                                                            dout[bs].contiguous(), scale, score_mod=score_mod,
                                                            positions=pos)
        return dq, dkb, dvb


class _ContextParallelAttention(torch.autograd.Function):
    """Exchange + block-sparse attention; backward: block-sparse backward + reverse exchange
    (every rank runs both exchanges, also one with nothing to compute)."""

    @staticmethod
    def forward(ctx, q, k, v, step: _Step, scale: float, score_mod):
        out, saved, kb, vb = step.forward(q, k, v, scale, need_lse=True, score_mod=score_mod)
        ctx.step, ctx.scale, ctx.score_mod, ctx.kv_dtype, ctx.saved = step, scale, score_mod, k.dtype, saved
        ctx.save_for_backward(q, kb, vb)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, kb, vb = ctx.saved_tensors
        step = ctx.step
        with torch.autocast(q.device.type, enabled=False):
            dq, dkb, dvb = step.backward(q, kb, vb, ctx.saved, dout, ctx.scale, ctx.score_mod)
            dk, dv, sent, recv = step.scatter_kv_grad(dkb, dvb, ctx.kv_dtype)
        step.cpx._bytes.update(bytes_sent_backward=sent, bytes_received_backward=recv)
        return dq.to(q.dtype), dk.to(ctx.kv_dtype), dv.to(ctx.kv_dtype), None, None, None


# ---- per-term exchange (execution plans, SPEC §6) --------------------------------------------
def _split_plan(cp):
    """(natural term, [other terms]) of ``cp.plan`` when it has a natural term and at least one
    term in another order, every term covering every head; else None."""
    ep = cp.plan_for("auto")
    terms = list(ep.terms) if ep is not None and not ep.is_natural else []
    if len(terms) < 2 or any(len(t.heads) != cp.num_heads for t in terms):
        return None
    natural = [t for t in terms if t.q_order.kind == "natural" and t.kv_order.kind == "natural"]
    if len(natural) != 1:
        return None
    return natural[0], [t for t in terms if t is not natural[0]]


def _padded_kinds(t, nq: int, nkv: int) -> np.ndarray:
    """A natural-order plan term's kinds [1, nq, nkv] (a term that stops early is a prefix)."""
    k = np.zeros((1, nq, nkv), dtype=np.uint8)
    tk = np.asarray(t.kinds)
    k[:, :tk.shape[-2], :tk.shape[-1]] = tk
    return k


def _term_needs(t, owner_t: np.ndarray, W: int, L: int, qb: int, kb: int):
    """Per rank p: (natural query positions, natural key positions) of the term rows p computes
    (``owner_t`` [nq_t]: the rank of each query block of the term's order) and of the key
    blocks those rows read, both in the term's order."""
    qo, ko = t.q_positions(L), t.kv_positions(L)
    reads = row_reads(t.kinds)
    q_need, kv_need = [], []
    for p in range(W):
        rows = np.nonzero(owner_t == p)[0].astype(np.int64)
        cols = (np.nonzero(reads[rows].any(axis=0))[0].astype(np.int64) if rows.size
                else np.zeros(0, dtype=np.int64))
        q_need.append(qo[_block_tokens(rows, qb, qo.size)])
        kv_need.append(ko[_block_tokens(cols, kb, ko.size)])
    return q_need, kv_need


class _RemoteTerm:
    """One execution-plan term computed in its own order: rank p computes the term's query
    blocks ``owner_t == p`` (contiguous, equal tiles in the term's order). It fetches their
    queries and the key/value blocks their tiles read from the owners, runs the block-sparse
    kernel, and returns each row's partial output and log-sum-exp to the row's owner, which
    merges it with its other terms'. Backward: the owners send the merged output, its gradient
    and the merged log-sum-exp of those rows; dq and dk, dv go back to the owners."""

    def __init__(self, cpx: ContextParallel, t, owner_t: np.ndarray):
        r, W, L = cpx.rank, cpx.world_size, cpx.seq_len
        qb, kb = cpx.q_block_size, cpx.kv_block_size
        self.cpx, self.term = cpx, t
        q_need, kv_need = _term_needs(t, owner_t, W, L, qb, kb)
        self.q, self.kv = _Fetch(cpx, q_need), _Fetch(cpx, kv_need)
        own = cpx.schedule.positions[r]
        self.covered = np.isin(own, np.concatenate(q_need)) if own.size else np.zeros(0, dtype=bool)
        self.q_nat, self.kv_nat = q_need[r], kv_need[r]
        kinds = np.asarray(t.kinds)
        rows = np.nonzero(owner_t == r)[0]
        reads = row_reads(kinds)
        cols = np.nonzero(reads[rows].any(axis=0))[0] if rows.size else np.zeros(0, dtype=np.int64)
        local = np.ascontiguousarray(kinds[:, rows][:, :, cols])
        self.layout = _LocalLayout(kinds=local, q_len=int(self.q_nat.size), kv_len=int(self.kv_nat.size),
                                   q_block_size=qb, kv_block_size=kb)
        self.tiles = int((local != 0).sum()) * (cpx.cp.num_heads if kinds.shape[0] == 1 else 1)
        self.work = bool(local.any())
        self._plans: dict = {}

    def plan(self, num_heads: int, device):
        from ..execute.blocksparse import Plan, _Positions
        from ..execute.maskmod import lower_to_mask_mod

        key = (num_heads, str(device))
        got = self._plans.get(key)
        if got is None:
            cp = self.cpx.cp
            base = lower_to_mask_mod(self.term.pattern, cp.q_len, cp.kv_len, device=device)
            qpos = torch.as_tensor(self.q_nat, device=device)
            kpos = torch.as_tensor(self.kv_nat, device=device)

            def mask_mod(b, h, q_idx, kv_idx):
                return base(b, h, qpos[q_idx], kpos[kv_idx])

            mask_mod.__name__ = f"{self.term.text} @ rank {self.cpx.rank}"
            plan = Plan(self.layout, num_heads, device, mask_mod)
            got = self._plans[key] = (plan, mask_mod, _Positions(plan, None, qpos, kpos))
        return got

    def forward(self, q, k, v, scale, score_mod, nbytes: dict):
        """-> ((o [B, H, n, Dv], lse [B, H, n] with -inf for no key) of this rank's own rows, in
        the compute dtype; saved state for the backward)."""
        from ..execute.blocksparse import _compute_dtype, _unpad, blocksparse_forward

        B, H, n, D = q.shape
        Dv = v.shape[-1]
        cdt = _compute_dtype(q.dtype)
        qbuf, s1, r1 = self.q.gather(q.permute(2, 0, 1, 3))
        kvbuf, s2, r2 = self.kv.gather(torch.cat([k, v], dim=-1).permute(2, 0, 1, 3))
        qbuf, kvbuf = qbuf.permute(1, 2, 0, 3), kvbuf.permute(1, 2, 0, 3)
        kbuf, vbuf = kvbuf[..., :D], kvbuf[..., D:]
        m = qbuf.shape[2]
        inf = float("inf")
        if self.work:
            plan, mask_mod, pos = self.plan(H, q.device)
            o, lse = blocksparse_forward(plan, mask_mod, qbuf, kbuf, vbuf, scale, need_lse=True,
                                         score_mod=score_mod, positions=pos)
            # (float64 with ALiBi, blocksparse.lse_dtype: sent in the compute dtype)
            o, lse = _unpad(o, B, H, m), _unpad(lse, B, H, m).to(cdt)
        else:
            o = torch.zeros((B, H, m, Dv), dtype=cdt, device=q.device)
            lse = torch.full((B, H, m), inf, dtype=cdt, device=q.device)
        lse = lse.masked_fill(lse == inf, -inf)
        part = torch.cat([o, lse[..., None]], dim=-1).permute(2, 0, 1, 3)  # [m, B, H, Dv + 1]
        home, s3, r3 = self.q.scatter_add(part, part.dtype)
        home = home.permute(1, 2, 0, 3)
        o_home, lse_home = home[..., :Dv], home[..., Dv].clone()
        lse_home[:, :, torch.as_tensor(~self.covered, device=q.device)] = -inf
        nbytes["sent"] += s1 + s2 + s3
        nbytes["recv"] += r1 + r2 + r3
        nbytes["kv_recv"] += r2
        return o_home, lse_home, (qbuf, kbuf, vbuf)

    def backward(self, saved, out, lse, dout, scale, score_mod, dtypes, nbytes: dict):
        """-> (dq, dk, dv) of this rank's own rows (compute dtype) from the merged ``out``
        [B, H, n, Dv], ``lse`` [B, H, n] (+inf: no key) and ``dout``."""
        from ..execute.blocksparse import _pad_rows, blocksparse_backward

        qbuf, kbuf, vbuf = saved
        B, H, _, D = qbuf.shape
        Dv = out.shape[-1]
        pack = torch.cat([out, dout.to(out.dtype), lse[..., None]], dim=-1).permute(2, 0, 1, 3)
        got, s1, r1 = self.q.gather(pack)  # [m, B, H, 2 Dv + 1]
        got = got.permute(1, 2, 0, 3)
        if self.work:
            plan, mask_mod, pos = self.plan(H, qbuf.device)
            nq, qb = plan.num_q_blocks, plan.q_block_size
            dq_t, dk_t, dv_t = blocksparse_backward(
                plan, mask_mod, qbuf, kbuf, vbuf, _pad_rows(got[..., :Dv].contiguous(), nq, qb),
                _pad_rows(got[..., 2 * Dv].contiguous(), nq, qb), got[..., Dv:2 * Dv].contiguous(), scale,
                score_mod=score_mod, positions=pos)
        else:
            dq_t = torch.zeros(qbuf.shape, dtype=out.dtype, device=out.device)
            dk_t = torch.zeros(kbuf.shape, dtype=out.dtype, device=out.device)
            dv_t = torch.zeros(vbuf.shape, dtype=out.dtype, device=out.device)
        q_dtype, kv_dtype = dtypes
        dq, s2, r2 = self.q.scatter_add(dq_t.permute(2, 0, 1, 3), q_dtype)
        dkv, s3, r3 = self.kv.scatter_add(torch.cat([dk_t, dv_t], dim=-1).permute(2, 0, 1, 3), kv_dtype)
        dkv = dkv.permute(1, 2, 0, 3)
        nbytes["sent"] += s1 + s2 + s3
        nbytes["recv"] += r1 + r2 + r3
        return dq.permute(1, 2, 0, 3), dkv[..., :D], dkv[..., D:]


class _SplitStep:
    """A per-term exchange: the plan's natural term on the rows' owners (a ``_Step``: its keys
    fetched as a halo, or whatever it reads), every other term a ``_RemoteTerm``; the owners
    merge the terms' partial results through their log-sum-exp (SPEC §6's merge, across ranks)."""

    def __init__(self, cpx: ContextParallel, home, remotes, owners):
        from ..execute.maskmod import lower_to_mask_mod

        cp = cpx.cp
        kinds = _padded_kinds(home, cpx._kinds.shape[-2], cpx._kinds.shape[-1])
        self.cpx = cpx
        self.home = _Step(cpx, kinds, None,
                          mask_for=lambda device: lower_to_mask_mod(home.pattern, cp.q_len, cp.kv_len, device=device))
        self.remotes = [_RemoteTerm(cpx, t, o) for t, o in zip(remotes, owners)]
        self.kv_blocks = self.home.kv_blocks
        self.tiles = self.home.tiles + sum(t.tiles for t in self.remotes)
        self.positions_received = self.home.positions_received + sum(sum(t.kv.recv_splits) for t in self.remotes)
        self.positions_sent = self.home.positions_sent + sum(sum(t.kv.send_splits) for t in self.remotes)

    def forward(self, q, k, v, scale, score_mod):
        """-> (out [B, H, n, Dv] compute dtype, lse [B, H, n] (+inf: no key), saved state)."""
        from ..execute.blocksparse import _compute_dtype, _unpad

        B, H, n, _ = q.shape
        Dv = v.shape[-1]
        cdt = _compute_dtype(q.dtype)
        inf = float("inf")
        nbytes = dict(sent=0, recv=0, kv_recv=0)
        _, saved, kb, vb = self.home.forward(q, k, v, scale, need_lse=True, score_mod=score_mod)
        nbytes["sent"] += self.cpx._bytes["bytes_sent_forward"]
        nbytes["recv"] += self.cpx._bytes["bytes_received_forward"]
        nbytes["kv_recv"] += self.cpx._bytes["bytes_received_forward"]
        if saved[0] is None:
            outs = [torch.zeros((B, H, n, Dv), dtype=cdt, device=q.device)]
            lses = [torch.full((B, H, n), -inf, dtype=cdt, device=q.device)]
        else:
            o, lse = saved[0]
            lse = _unpad(lse, B, H, n).to(cdt)  # merged with the remote terms' in the compute dtype
            outs, lses = [_unpad(o, B, H, n)], [lse.masked_fill(lse == inf, -inf)]
        rsaved = []
        for t in self.remotes:
            o, lse, st = t.forward(q, k, v, scale, score_mod, nbytes)
            outs.append(o)
            lses.append(lse)
            rsaved.append(st)
        lse_all = torch.stack(lses)
        total = torch.logsumexp(lse_all, dim=0)
        empty = total == -inf
        w = torch.exp(lse_all - total.masked_fill(empty, 0.0)[None])
        out = (torch.stack(outs) * w[..., None]).sum(0)
        lse = total.masked_fill(empty, inf)
        self.cpx._bytes.update(bytes_sent_forward=nbytes["sent"], bytes_received_forward=nbytes["recv"],
                               kv_bytes_received_forward=nbytes["kv_recv"])
        return out, lse, (kb, vb, rsaved)

    def backward(self, q, k, v, state, out, lse, dout, scale, score_mod):
        from ..execute.blocksparse import _pad_rows

        kb, vb, rsaved = state
        B, H, n, _ = q.shape
        nbytes = dict(sent=0, recv=0)
        layout = self.home.layouts[0]
        nq = layout.num_q_blocks if layout.q_len else 0
        qb = layout.q_block_size
        saved = [None] if not layout.kinds.any() or n == 0 else [(_pad_rows(out, nq, qb), _pad_rows(lse, nq, qb))]
        dq, dkb, dvb = self.home.backward(q, kb, vb, saved, dout, scale, score_mod)
        dk, dv, s, r = self.home.scatter_kv_grad(dkb, dvb, k.dtype)
        nbytes["sent"] += s
        nbytes["recv"] += r
        for t, st in zip(self.remotes, rsaved):
            dq_t, dk_t, dv_t = t.backward(st, out, lse, dout, scale, score_mod, (q.dtype, k.dtype), nbytes)
            dq += dq_t.to(dq.dtype)
            dk = dk + dk_t.to(dk.dtype)
            dv = dv + dv_t.to(dv.dtype)
        self.cpx._bytes.update(bytes_sent_backward=nbytes["sent"], bytes_received_backward=nbytes["recv"])
        return dq, dk, dv


class _SplitAttention(torch.autograd.Function):
    """Per-term exchange + attention; backward through every term (all ranks take part)."""

    @staticmethod
    def forward(ctx, q, k, v, step: _SplitStep, scale: float, score_mod):
        out, lse, state = step.forward(q, k, v, scale, score_mod)
        ctx.step, ctx.scale, ctx.score_mod, ctx.state = step, scale, score_mod, state
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = ctx.step.backward(q, k, v, ctx.state, out, lse, dout.to(out.dtype), ctx.scale, ctx.score_mod)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _Unshard(torch.autograd.Function):
    """All-gather of the shards; backward: all-reduce (sum) of the full gradient, then this rank's
    positions of it."""

    @staticmethod
    def forward(ctx, x_l, cpx: ContextParallel, dim: int):
        ctx.cpx, ctx.dim = cpx, dim
        return cpx._gather_full(x_l.detach(), dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cpx = ctx.cpx
        g = g.contiguous().clone()
        dist.all_reduce(g, group=cpx.group)
        return g.index_select(ctx.dim, cpx._index(g.device)), None, None
