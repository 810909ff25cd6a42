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
    * GPUs (nccl): the same calls on CUDA tensors; ``all_to_all_single`` is nccl's all-to-all.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import Diagnostic, PatternError
from .balance import BALANCES, TOLERANCE, Schedule, make_schedule

__all__ = ["ContextParallel"]


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
        cp: a ``CompiledPattern`` with Q_LEN = KV_LEN (self-attention over one sequence).
        group: the torch.distributed process group (default: the default group, which must
            be initialised: gloo for CPU tensors, nccl for CUDA tensors).
        balance: ``"tiles"`` (equal computed tiles per rank, from the exact layout) or
            ``"contiguous"`` (equal chunks of query blocks in order).
        tolerance: for ``"tiles"``, the accepted imbalance (max / mean computed tiles - 1)
            before a better-balanced schedule that moves more keys is preferred.
        owner: int64 [num_q_blocks] ranks of the query blocks, to reuse another
            ``ContextParallel``'s positions (every layer of a model must shard the residual
            stream the same way); see ``for_pattern``.
        plan: ``"auto"`` (shard in a one-term execution plan's own order where there is one)
            or ``"natural"``.

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
        PatternError: P380 no initialised process group, Q_LEN != KV_LEN, score terms,
            an unknown balance, or ranks that compiled different patterns or lengths.
    """

    def __init__(self, cp, group=None, balance: str = "tiles", *, tolerance: float = TOLERANCE,
                 owner=None, plan: str = "auto"):
        if not dist.is_available() or not dist.is_initialized():
            raise _error("P380", "context parallel needs an initialised torch.distributed process group",
                         help='call torch.distributed.init_process_group("gloo") (CPU) or ("nccl") (GPU) '
                              "first, e.g. under torchrun --nproc-per-node N")
        if balance not in BALANCES:
            raise _error("P380", f"unknown balance {balance!r}; expected one of {', '.join(BALANCES)}",
                         help='balance="tiles" equalises computed tiles per rank')
        if cp.q_len != cp.kv_len:
            raise _error("P380", f"context parallel shards one sequence: Q_LEN={cp.q_len} and KV_LEN={cp.kv_len} differ",
                         help="compile the pattern with kv_len equal to q_len")
        if getattr(cp, "score_terms", ()):
            raise _error("P380", "context parallel does not run score terms (with softcap/alibi) yet",
                         help="run the pattern without its score terms, or on one process")
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
        self.positions = self._natural(self.schedule.positions[self.rank])
        self._check_same_everywhere()
        self._setup()
        self._plans: dict = {}
        self._children: dict = {}
        self._bytes = dict(bytes_sent_forward=0, bytes_received_forward=0, bytes_sent_backward=0,
                           bytes_received_backward=0, allgather_bytes=0)

    # ---- setup -------------------------------------------------------------------------------
    def _check_same_everywhere(self) -> None:
        cp = self.cp
        key = "|".join(str(x) for x in (cp.pattern, cp.q_len, cp.kv_len, cp.num_heads, self.q_block_size,
                                         self.kv_block_size, self.order_text, self.schedule.owner.tobytes().hex()))
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != h or int(t[1]) != -h:
            raise _error("P380", "the ranks compiled different patterns, lengths, heads, block sizes or balances",
                         help="build ContextParallel from the same patternc.compile(...) call on every rank")

    def _natural(self, pos: np.ndarray) -> np.ndarray:
        """Natural token positions of places ``pos`` of the sharding order."""
        return pos if self.order is None else self.order[pos]

    def _setup(self) -> None:
        self._static = _Step(self, self._kinds, None)
        self._step = self._static

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
            child = ContextParallel(cp, self.group, self.balance, owner=self.schedule.owner, plan="natural")
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

        Not differentiable: compute losses on the shards (the sum of the ranks' losses is the
        full loss) and unshard for inspection or output.

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
        sizes = [p.size for p in self.schedule.positions]
        m = max(sizes) if sizes else 0
        x0 = x_l.detach().movedim(dim, 0)
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
        if H != lh and not (lh == 1 and getattr(self.cp.pattern, "num_heads", 1) == 1):
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
            PatternError: P350 shapes that do not fit this rank's positions or the pattern;
                P351 dtypes or devices.
        """
        self._check(q_l, k_l, v_l)
        scale = 1.0 / math.sqrt(q_l.shape[-1]) if scale is None else float(scale)
        step = self._static
        if documents is not None or key_padding_mask is not None or getattr(self.cp, "needs", None):
            step = self._runtime_step(q_l, documents, key_padding_mask)
        self._step = step
        grad = torch.is_grad_enabled() and (q_l.requires_grad or k_l.requires_grad or v_l.requires_grad)
        if grad:
            return _ContextParallelAttention.apply(q_l, k_l, v_l, step, scale)
        return step.forward(q_l, k_l, v_l, scale, need_lse=False)[0]

    def _runtime_step(self, q_l, documents, key_padding_mask) -> "_Step":
        """The exchange and local layouts of one batch with run-time data (SPEC §1.7)."""
        cp = self.cp
        if self.order is not None:
            raise _error("P380", f"run-time data with a ContextParallel sharded in {self.order_text} order",
                         help="build it with plan='natural' to pass documents or key_padding_mask")
        if not hasattr(cp, "layout_for"):
            raise _error("P380", "this patternc build has no run-time data (documents, key_padding_mask)")
        layout = cp.layout_for(documents=documents, key_padding_mask=key_padding_mask)
        kinds = np.asarray(layout.kinds)
        if kinds.ndim == 3:
            return self._static
        if kinds.shape[0] not in (1, q_l.shape[0]):
            raise _error("P350", f"run-time data for {kinds.shape[0]} batch rows, but q has B={q_l.shape[0]}")
        mask_mod = cp.mask_mod_for(q_l.device, documents=documents, key_padding_mask=key_padding_mask)
        return _Step(self, kinds, mask_mod)

    def _row_bytes(self, x: torch.Tensor) -> int:
        """bytes of one position's row of a [n, B, H_kv, D + Dv] buffer."""
        return int(math.prod(x.shape[1:]) * x.element_size())

    # ---- statistics --------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """This rank's numbers (bytes from the most recent forward / backward call; 0 before):

        ``rank``, ``world_size``, ``positions`` (tokens owned), ``q_blocks``, ``kv_blocks_read``,
        ``computed_tiles`` (over heads; and batch rows with run-time data: of the latest call),
        ``positions_received`` / ``positions_sent`` (forward,
        tokens), ``bytes_sent_forward``, ``bytes_received_forward``, ``bytes_sent_backward``,
        ``bytes_received_backward``, ``allgather_bytes`` (what an all-gather of K and V would
        receive), ``imbalance`` (max / mean computed tiles over ranks), ``method`` (the
        schedule chosen) and ``order`` (the token order the sequence is sharded in).
        """
        s, r, st = self.schedule, self.rank, self._step
        return dict(rank=r, world_size=self.world_size, positions=int(self.positions.size),
                    q_blocks=int(s.q_blocks[r].size), kv_blocks_read=int(st.kv_blocks[r].size),
                    computed_tiles=int(st.tiles), positions_received=int(sum(st.recv_splits)),
                    positions_sent=int(sum(st.send_splits)), **self._bytes,
                    imbalance=round(s.imbalance, 4), method=s.method, order=self.order_text)


def _single_term_order(cp):
    """The one term of ``cp.plan`` when the plan runs the whole pattern (every head, every
    token) in one non-natural order shared by queries and keys, else None: sharding in that
    order keeps the pattern's tiles few there (``strided(s) & causal`` in residue order owns
    whole residue classes per rank and exchanges nothing)."""
    plan = getattr(cp, "plan", None)
    terms = getattr(plan, "terms", None)
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


class _Step:
    """What one layout (the static one, or one batch's with run-time data) makes a rank do: the
    key/value blocks every rank reads, the forward exchange (per-peer splits, the rows to send,
    where each buffer slot comes from) and the local layouts of the kernel (one per batch row
    with run-time data, else one for the whole batch)."""

    def __init__(self, cpx: ContextParallel, kinds: np.ndarray, mask_mod):
        from .balance import _block_tokens, row_reads

        s, r, W = cpx.schedule, cpx.rank, cpx.world_size
        self.cpx = cpx
        kinds4 = kinds if kinds.ndim == 4 else kinds[None]  # [Bk, H, nq, nkv]
        reads = row_reads(kinds4)
        self.kv_blocks = [np.nonzero(reads[s.q_blocks[p]].any(axis=0))[0].astype(np.int64) if s.q_blocks[p].size
                          else np.zeros(0, dtype=np.int64) for p in range(W)]
        kb, L = cpx.kv_block_size, cpx.seq_len
        buffers = [_block_tokens(self.kv_blocks[p], kb, L) for p in range(W)]
        own = s.positions[r]
        self.buffer = buf = buffers[r]
        recv = [buf[s.position_owner(buf) == p] if p != r else buf[:0] for p in range(W)]
        send = [np.searchsorted(own, buffers[p][s.position_owner(buffers[p]) == r]) if p != r
                else np.zeros(0, dtype=np.int64) for p in range(W)]
        self.recv_splits = [int(x.size) for x in recv]
        self.send_splits = [int(x.size) for x in send]
        self.send_index = np.concatenate(send)
        # buffer slot -> row of cat([own rows, received rows])
        index = np.empty(buf.size, dtype=np.int64)
        mine = s.position_owner(buf) == r
        index[mine] = np.searchsorted(own, buf[mine])
        recv_all = np.concatenate(recv)
        order = np.argsort(recv_all, kind="stable")
        index[~mine] = own.size + order[np.searchsorted(recv_all[order], buf[~mine])]
        self.buffer_index = index
        self.any = any(int(b.size) - int((s.position_owner(b) == p).sum()) > 0 for p, b in enumerate(buffers))
        local = kinds4[:, :, s.q_blocks[r]][:, :, :, self.kv_blocks[r]]
        self.tiles = int((local != 0).sum())
        self.layouts = [_LocalLayout(kinds=np.ascontiguousarray(x), q_len=int(own.size), kv_len=int(buf.size),
                                     q_block_size=cpx.q_block_size, kv_block_size=kb) for x in local]
        self.runtime = kinds.ndim == 4
        self.base = mask_mod
        self._plans: dict = {}

    # ---- the kernel's plans -------------------------------------------------------------------
    def plan(self, row: int, num_heads: int, device):
        """(Plan, mask_mod) of batch row ``row`` (0 for the static layout) in local coordinates."""
        from ..execute.blocksparse import Plan
        from ..execute.common import mask_mod_for

        key = (row, num_heads, str(device))
        got = self._plans.get(key)
        if got is None:
            base = self.base if self.base is not None else mask_mod_for(self.cpx.cp, device)
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
            got = self._plans[key] = (Plan(self.layouts[row], num_heads, device, mask_mod), mask_mod)
        return got

    def rows(self, B: int):
        """(layout row, batch slice) pairs covering B batch rows."""
        if not self.runtime:
            return [(0, slice(0, B))]
        return [(min(b, len(self.layouts) - 1), slice(b, b + 1)) for b in range(B)]

    # ---- the exchange -------------------------------------------------------------------------
    def _exchange(self, rows: torch.Tensor, send_splits, recv_splits) -> torch.Tensor:
        """All-to-all of ``rows`` [sum(send_splits), ...] -> [sum(recv_splits), ...]."""
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        if self.any:
            dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=list(recv_splits),
                                   input_split_sizes=list(send_splits), group=self.cpx.group)
        return out

    def gather_kv(self, k_l: torch.Tensor, v_l: torch.Tensor):
        """Forward exchange: (k_buf [B, H_kv, m, D], v_buf [B, H_kv, m, Dv]) at the buffer
        positions (``m`` = every token of the key/value blocks this rank's tiles read)."""
        cpx, D = self.cpx, k_l.shape[-1]
        own = torch.cat([k_l, v_l], dim=-1).permute(2, 0, 1, 3)  # [n, B, H_kv, D + Dv]
        sent = own.index_select(0, torch.as_tensor(self.send_index, device=own.device))
        recv = self._exchange(sent, self.send_splits, self.recv_splits)
        rb = cpx._row_bytes(own)
        cpx._bytes.update(bytes_sent_forward=int(sent.shape[0]) * rb, bytes_received_forward=int(recv.shape[0]) * rb,
                          allgather_bytes=(cpx.seq_len - cpx.positions.size) * rb)
        buf = torch.cat([own, recv], dim=0).index_select(0, torch.as_tensor(self.buffer_index, device=own.device))
        buf = buf.permute(1, 2, 0, 3)
        return buf[..., :D], buf[..., D:]

    def scatter_kv_grad(self, dk_buf: torch.Tensor, dv_buf: torch.Tensor, dtype: torch.dtype):
        """Backward exchange: the gradients at the buffer positions -> (dk_l, dv_l) of this
        rank's own positions, summed over every rank that read them (in dk_buf's dtype; sent in
        ``dtype``)."""
        cpx, D = self.cpx, dk_buf.shape[-1]
        g = torch.cat([dk_buf, dv_buf], dim=-1).permute(2, 0, 1, 3)  # [m, B, H_kv, D + Dv]
        n = cpx.positions.size
        full = g.new_zeros((n + sum(self.recv_splits),) + tuple(g.shape[1:]))
        full.index_add_(0, torch.as_tensor(self.buffer_index, device=g.device), g)
        back = full[n:].to(dtype)
        got = self._exchange(back, self.recv_splits, self.send_splits)
        rb = cpx._row_bytes(back)
        cpx._bytes.update(bytes_sent_backward=int(back.shape[0]) * rb, bytes_received_backward=int(got.shape[0]) * rb)
        own = full[:n]
        own.index_add_(0, torch.as_tensor(self.send_index, device=g.device), got.to(own.dtype))
        own = own.permute(1, 2, 0, 3)
        return own[..., :D], own[..., D:]

    # ---- compute ------------------------------------------------------------------------------
    def forward(self, q, k, v, scale, *, need_lse: bool):
        """(out [B, H, n, Dv] in q's dtype, per-row kernel results [(o, lse) | None], k_buf, v_buf)."""
        from ..execute.blocksparse import blocksparse_forward

        B, H, n, _ = q.shape
        Dv = v.shape[-1]
        kb, vb = self.gather_kv(k, v)
        out = q.new_zeros((B, H, n, Dv))
        saved = []
        for row, bs in self.rows(B):
            if n == 0 or not self.layouts[row].kinds.any():
                saved.append(None)
                continue
            plan, mask_mod = self.plan(row, H, q.device)
            o, lse = blocksparse_forward(plan, mask_mod, q[bs], kb[bs], vb[bs], scale, need_lse=need_lse)
            out[bs] = o.view(o.shape[0], H, -1, Dv)[:, :, :n].to(q.dtype)
            saved.append((o, lse))
        return out, saved, kb, vb

    def backward(self, q, kb, vb, saved, dout, scale):
        from ..execute.blocksparse import _compute_dtype, blocksparse_backward

        cdt = _compute_dtype(q.dtype)
        H = q.shape[1]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dkb = torch.zeros(kb.shape, dtype=cdt, device=q.device)
        dvb = torch.zeros(vb.shape, dtype=cdt, device=q.device)
        for (row, bs), got in zip(self.rows(q.shape[0]), saved):
            if got is None:
                continue
            plan, mask_mod = self.plan(row, H, q.device)
            o, lse = got
            dq[bs], dkb[bs], dvb[bs] = blocksparse_backward(plan, mask_mod, q[bs], kb[bs], vb[bs], o, lse,
                                                            dout[bs].contiguous(), scale)
        return dq, dkb, dvb


class _ContextParallelAttention(torch.autograd.Function):
    """Exchange + block-sparse attention; backward: block-sparse backward + reverse exchange
    (every rank runs both exchanges, also one with nothing to compute)."""

    @staticmethod
    def forward(ctx, q, k, v, step: _Step, scale: float):
        out, saved, kb, vb = step.forward(q, k, v, scale, need_lse=True)
        ctx.step, ctx.scale, ctx.kv_dtype, ctx.saved = step, scale, k.dtype, saved
        ctx.save_for_backward(q, kb, vb)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, kb, vb = ctx.saved_tensors
        step = ctx.step
        dq, dkb, dvb = step.backward(q, kb, vb, ctx.saved, dout, ctx.scale)
        dk, dv = step.scatter_kv_grad(dkb, dvb, ctx.kv_dtype)
        return dq.to(q.dtype), dk.to(ctx.kv_dtype), dv.to(ctx.kv_dtype), None, None
