"""``patternc.transformers``: a pattern as the attention of any HF transformers decoder.

Basics
    ``register(name, pattern)`` adds an attention function to ``transformers.AttentionInterface``
    and an attention-mask function to ``transformers.AttentionMaskInterface`` under the same
    name (SPEC §8). A model built with ``attn_implementation=name`` then runs layer ``l`` of the
    pattern (entry ``l mod m`` of a ``layers(…)`` stack, or ``pattern[l]`` of a mapping) in its
    decoder layer ``l`` (``module.layer_idx``), in training, prefill and cached generation::

        import patternc.transformers as pt
        pt.register("patternc", "layers(local(w=4096) & causal, causal)")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="patternc")

Details
    * **The mask function** (called by the model once per forward and per mask type) turns
      HF's sizes and offsets (``q_length``, ``kv_length``, ``q_offset``, ``kv_offset`` of its
      KV cache), the 2-D ``attention_mask`` (left or right padding; 1 = a real token) and the
      packed sequences HF detects from ``position_ids`` restarting at 0 into a small
      ``PatternMask``: the lengths, offsets, ``key_padding_mask`` bool [B, KV_LEN] and
      ``documents`` int64 [B, Q_LEN] (HF's own packed-sequence ids). It never builds a
      Q_LEN × KV_LEN mask; the compiled layouts it leads to are cached per
      (layer pattern, lengths, offsets, heads) in the registration.
    * **The attention function** runs ``CompiledPattern.attention`` on ``query`` float
      [B, H, Q_LEN, D], ``key``/``value`` [B, H_kv, KV_LEN, D] (grouped-query attention:
      ``H_kv = H / module.num_key_value_groups`` key heads are shared, never repeated), with the
      model's ``scaling``, its ``dropout`` in training, and its ``softcap`` (Gemma 2) when the
      pattern has no soft-cap of its own. It returns ``(out [B, Q_LEN, H, D], None)`` like HF's
      ``sdpa_attention_forward`` (attention weights are never materialised).
    * **Positions.** Query row r of a forward is position ``q_offset + r`` of the model's cache
      and key column c is position ``kv_offset + c`` (SPEC §1.6): a decode step sees the same
      pattern as the whole sequence it ends, and a sliding-window cache that keeps only the last
      ``sliding_window - 1`` keys (HF's ``DynamicSlidingWindowLayer``) is read at its
      ``kv_offset``. Positions count cache slots, as HF's own masks do, so under *left padding*
      a row's positions start at its pad count (harmless for shift-invariant patterns such as
      ``causal`` and ``local``; see ``docs/transformers.md`` for ``sink``/``global``).
    * **The pattern replaces the model's masking.** A config whose ``sliding_window`` /
      ``layer_types`` ask for something else than the pattern gets one ``PatternWarning``
      (W020) naming both; HF's sliding window ``W`` is ``local(w=W) & causal`` (W keys, the
      query's own included).

This module imports torch; ``transformers`` (5.23.0, the verified version; extra
``patternc[transformers]``) is imported by ``register``.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .errors import Diagnostic, PatternError, PatternWarning
from .ir.nodes import Pattern

__all__ = ["register", "unregister", "PatternAttention", "PatternMask", "expected_pattern", "VERIFIED_VERSION"]

#: the transformers version the verification tests run (``docs/transformers.md``)
VERIFIED_VERSION = "5.23.0"
#: compiled patterns kept per registration (an LRU over (layer pattern, lengths, offsets, heads))
CACHE_SIZE = 256

_WHERE = "patternc.transformers"

# HF's own mask-function building blocks (transformers/masking_utils.py): the pattern replaces
# them. Anything else found in the mask function (an image-token overlay, a user's
# or/and_mask_function, blockwise groups) is something a pattern cannot express: P372.
_HF_BASE_MASKS = (
    "causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.",
    "sliding_window_bidirectional_overlay.", "chunked_overlay.", "and_masks.", "or_masks.",
    "packed_sequence_mask_function.", "remap_positions_for_packed_sequence.",
    "add_offsets_to_mask_function.", "padding_mask_function.",
)


#: transformers' built-in attention / mask implementation names (not to be replaced)
_HF_NAMES = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
             "paged|eager"}


def _error(code: str, message: str, help_: str | None = None) -> PatternError:
    return PatternError(Diagnostic(code, message, None, help_, filename=_WHERE))


def _warn(code: str, message: str, help_: str | None = None) -> None:
    warnings.warn(PatternWarning(Diagnostic(code, message, None, help_, severity="warning", filename=_WHERE)),
                  stacklevel=3)


def _parse(pattern, params):
    """A pattern given as source text, a ``.pattern`` path or a ``Pattern`` -> ``Pattern``."""
    from .source import frontdoor

    if isinstance(pattern, Pattern):
        return frontdoor.parse(pattern) if not params else frontdoor.parse(str(pattern), params=params)
    if isinstance(pattern, os.PathLike) or (isinstance(pattern, str) and pattern.endswith(".pattern")
                                            and "\n" not in pattern and os.path.isfile(pattern)):
        return frontdoor.load(pattern, params=params)
    if not isinstance(pattern, str):
        raise _error("P371", f"a pattern must be source text, a .pattern path or a patternc.Pattern, "
                             f"got {type(pattern).__name__}", "pass e.g. \"local(w=4096) & causal\"")
    return frontdoor.parse(pattern, params=params)


def expected_pattern(config, layer_idx: int) -> str | None:
    """The pattern HF's own masks give layer ``layer_idx`` of ``config``: ``local(w=W) & causal``
    for a sliding-window layer (``sliding_window=W``: keys ``i-W+1 … i``, HF's
    ``sliding_window_overlay``), ``chunk(l=C) & causal`` for a chunked layer (Llama 4's
    ``attention_chunk_size=C``, HF's ``chunked_overlay``), ``causal`` for a full-attention layer
    beside those; ``None`` when the config asks for neither (then any pattern is the user's
    choice, and no warning).
    """
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is not None and layer_idx < len(types):
        kind = types[layer_idx]
        if kind == "sliding_attention" and window:
            return f"local(w={int(window)}) & causal"
        if kind == "chunked_attention" and chunk:
            return f"chunk(l={int(chunk)}) & causal"
        if kind == "full_attention":
            local = (window and "sliding_attention" in types) or (chunk and "chunked_attention" in types)
            return "causal" if local else None
        return None
    if window and getattr(config, "use_sliding_window", True):
        return f"local(w={int(window)}) & causal"
    return None


@dataclass(eq=False)
class PatternMask:
    """What the mask function hands to the attention function: sizes, offsets and run-time data
    of one forward (never a dense mask).

    Attributes:
        registration: the ``PatternAttention`` that made it.
        batch_size: B.
        q_length, kv_length: Q_LEN, KV_LEN of the attention call (tokens).
        q_offset, kv_offset: the positions of query row 0 and key column 0 (tokens, SPEC §1.6).
        key_padding_mask: bool [B, KV_LEN] (True = a real key, HF's ``attention_mask`` = 1),
            or None when every key is real.
        documents: int64 [B, Q_LEN] packed-sequence ids over positions 0 … Q_LEN-1 (HF's
            ``find_packed_sequence_indices``; then q_offset = kv_offset = 0 and Q_LEN = KV_LEN),
            or None.
    """

    registration: "PatternAttention"
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    key_padding_mask: torch.Tensor | None
    documents: torch.Tensor | None

    @property
    def shape(self) -> tuple:
        """(B, 1, Q_LEN, KV_LEN): the shape of the 4-D mask this object stands for."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def __repr__(self) -> str:
        return (f"PatternMask({self.registration.name!r}, B={self.batch_size}, Q_LEN={self.q_length}, "
                f"KV_LEN={self.kv_length}, q_offset={self.q_offset}, kv_offset={self.kv_offset}, "
                f"key_padding={'yes' if self.key_padding_mask is not None else 'no'}, "
                f"documents={'yes' if self.documents is not None else 'no'})")


def _walk_mask_functions(fn, seen=None):
    """Every function reachable from HF's ``mask_function`` through closures (and_masks /
    or_masks keep their parts in a closure tuple)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return
    seen.add(id(fn))
    yield fn
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if callable(x) and hasattr(x, "__qualname__") and not isinstance(x, type):
                yield from _walk_mask_functions(x, seen)


def _packed_documents(mask_function):
    """HF's packed-sequence ids int64 [B, Q_LEN] hidden in ``mask_function`` (built by
    ``packed_sequence_mask_function`` when ``position_ids`` restart at 0), or None.

    Raises:
        PatternError: P372 when the mask function holds an overlay a pattern cannot express.
    """
    docs = None
    for fn in _walk_mask_functions(mask_function):
        q = getattr(fn, "__qualname__", "")
        mod = getattr(fn, "__module__", "") or ""
        if not mod.startswith("transformers.masking_utils") or not q.startswith(_HF_BASE_MASKS):
            name = f"{mod}.{q}" if mod else q
            raise _error("P372", f"the model adds its own mask function `{name}` (e.g. an image-token or "
                                 "blockwise overlay) that a patternc pattern cannot express",
                         "run this model without the overlay (text only), or with attn_implementation='sdpa'")
        if q.startswith("packed_sequence_mask_function."):
            names = fn.__code__.co_freevars
            docs = fn.__closure__[names.index("packed_sequence_mask")].cell_contents
    return docs


try:  # score terms (SPEC §1.8)
    from .ir.nodes import Term as _Term
    from .ir.nodes import score_terms as _score_terms
    from .ir.nodes import with_terms as _ir_with_terms

    _HAS_TERMS = True
except ImportError:  # pragma: no cover - before score terms
    _HAS_TERMS = False


def _terms(p: Pattern) -> tuple:
    return tuple(_score_terms(p)) if _HAS_TERMS else ()


def _with_terms(p: Pattern, terms) -> Pattern:
    return _ir_with_terms(p, terms) if _HAS_TERMS and terms else p


def _softcap_term(c: int):
    return _Term("softcap", (("c", int(c)),))


def _shift_invariant(p: Pattern) -> bool:
    """True when every primitive of ``p`` reads only ``i - j`` (or nothing) and there is no
    ``blocks``: moving every position by the same amount changes nothing (SPEC §1.1 facts)."""
    from .ir import nodes as ir
    from .ir.primitives import PRIMITIVES

    for n in p.walk():
        if isinstance(n, ir.Blocks):
            return False
        if isinstance(n, ir.Prim):
            spec = PRIMITIVES.get(n.name)
            if spec is None or spec.reads not in ("", "d"):
                return False
    return True


def _with_documents(layer_text: str) -> Pattern:
    """``per_document(p)`` (SPEC §1.1): HF's packed-sequence mask (same packed sequence) with the
    layer pattern ``p`` read at document-relative positions, as HF re-reads positions from
    ``position_ids`` inside each sequence: every packed sequence is run as if alone, anchored
    patterns (``sink``, ``global``, ``prefix``) included. For patterns that read only ``i - j``
    it equals ``document & p``."""
    from .source.frontdoor import parse

    return parse(f"per_document({layer_text})")


class PatternAttention:
    """One registered pattern: its per-layer patterns, the compiled-layout cache, and the two
    functions given to HF (``attention_function`` and ``mask_function``).

    Args:
        name: the ``attn_implementation`` name.
        pattern: source text, a ``.pattern`` path, a ``patternc.Pattern``, or a mapping
            ``{layer_idx: pattern}`` (each value any of those).
        params: values for the pattern's ``param``s.
        block_size: BLOCK_SIZE (tokens), int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``.
        backend: ``"auto"``, ``"flex"``, ``"blocksparse"`` or ``"sdpa"`` (``patternc.execute``).

    Raises:
        PatternError: P1xx/P2xx a pattern that does not parse; P371 a bad mapping.
    """

    def __init__(self, name: str, pattern, *, params: dict | None = None, block_size=128, backend: str = "auto"):
        from .execute import BACKENDS
        from .lower.layout import normalize_block_size

        if not isinstance(name, str) or not name:
            raise _error("P371", f"the attention name must be a non-empty string, got {name!r}")
        if "/" in name or "|" in name or name in _HF_NAMES:
            # HF reads "org/repo" as a Hub kernel and "paged|…" as a paged prefix; its own names stay its own
            raise _error("P371", f"the attention name {name!r} is taken or has a meaning in transformers "
                                 "('/' = a Hub kernel repository, '|' = a prefix such as 'paged|', or a built-in name)",
                         "use a plain name such as 'patternc' or 'patternc-window'")
        if backend not in BACKENDS:
            raise _error("P371", f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}",
                         "use backend='auto'")
        self.name, self.backend = name, backend
        self.block_size = normalize_block_size(block_size)
        if isinstance(pattern, dict):
            if not pattern:
                raise _error("P371", "the pattern mapping {layer_idx: pattern} is empty",
                             "give a pattern for every decoder layer, e.g. {0: 'causal', 1: 'local(w=64) & causal'}")
            bad = [k for k in pattern if isinstance(k, bool) or not isinstance(k, int) or k < 0]
            if bad:
                raise _error("P371", f"layer indices must be ints >= 0, got {bad!r}",
                             "key the mapping by the decoder layer index (module.layer_idx)")
            self.patterns = {int(k): _parse(v, params) for k, v in sorted(pattern.items())}
        else:
            self.patterns = {None: _parse(pattern, params)}
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._warned: set = set()
        self._units: dict = {}
        self.stats = {"compiles": 0, "cache_hits": 0, "masks": 0}

    # ---- layer -> pattern --------------------------------------------------------------------
    def pattern_for_layer(self, layer_idx: int) -> tuple[Pattern, int]:
        """(the pattern, the layer to select in it) for decoder layer ``layer_idx``.

        Raises:
            PatternError: P371 the mapping has no entry for this layer.
        """
        if None in self.patterns:
            return self.patterns[None], layer_idx
        if layer_idx not in self.patterns:
            have = ", ".join(str(k) for k in self.patterns)
            raise _error("P371", f"decoder layer {layer_idx} has no pattern: the mapping gives layers {have}",
                         f"add an entry for layer {layer_idx}, or register one pattern with layers(...)")
        return self.patterns[layer_idx], layer_idx

    def layer_text(self, layer_idx: int) -> str:
        """The canonical pattern text of decoder layer ``layer_idx`` (lengths unbound)."""
        from .ir.normalize import normalize
        from .ir.specialize import select_layer

        p, layer = self.pattern_for_layer(layer_idx)
        return str(normalize(select_layer(p, layer)))

    def compiled(self, layer_idx: int, *, q_len: int, kv_len: int, q_offset: int = 0, kv_offset: int = 0,
                 num_heads: int = 1, documents: bool = False, softcap: int | None = None):
        """The ``CompiledPattern`` of decoder layer ``layer_idx`` at these lengths and offsets
        (tokens), cached (an LRU of ``CACHE_SIZE``). ``documents=True``: the layer's pattern
        inside ``per_document(…)`` (packed sequences: a token attends only inside its own
        document, at positions relative to the document's start — HF's packed-sequence mask
        with its per-sequence ``position_ids``). ``softcap=c``: the model's logit soft-cap as the layer's
        ``softcap(c)`` score term when the pattern has none (SPEC §1.8)."""
        from .compiler import compile as compile_pattern

        p, layer = self.pattern_for_layer(layer_idx)
        key = (id(p), layer, q_len, kv_len, q_offset, kv_offset, num_heads, documents, softcap)
        with self._lock:
            cp = self._cache.get(key)
            if cp is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return cp
        terms = _terms(p)
        if documents:
            p, layer = _with_terms(_with_documents(self.layer_text(layer_idx)), terms), 0
        if softcap is not None and not any(t.name == "softcap" for t in terms):
            p = _with_terms(p, (_softcap_term(softcap),) + tuple(terms))
        cp = compile_pattern(p, q_len=q_len, kv_len=kv_len, num_heads=num_heads, block_size=self.block_size,
                             layer=layer, q_offset=q_offset, kv_offset=kv_offset)
        with self._lock:
            self._cache[key] = cp
            self.stats["compiles"] += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return cp

    def softcap_for(self, layer_idx: int, model_softcap) -> tuple[str, int | None]:
        """How the model's ``softcap`` is applied in this layer: ``("none", None)`` (no cap
        anywhere, or the pattern's own ``softcap`` term, which wins: W020 once if the two
        differ), ``("term", c)`` (added as the layer's ``softcap(c)`` term) or ``("dense", None)``
        (the interim dense path: score terms unavailable, or a cap that is not an integer)."""
        if model_softcap is None:
            return "none", None
        p, _ = self.pattern_for_layer(layer_idx)
        own = [t for t in _terms(p) if t.name == "softcap"]
        if own:
            c = own[0].arg("c")
            if float(c) != float(model_softcap) and "softcap" not in self._warned:
                self._warned.add("softcap")
                _warn("W020", f"the model config caps attention logits at {model_softcap} "
                              f"(attn_logit_softcapping) but the pattern {self.name!r} says `softcap(c={c})` "
                              f"in layer {layer_idx}; the pattern is used",
                      f"write `with softcap(c={model_softcap:g})` in the pattern, or drop it to use the model's")
            return "none", None
        c = float(model_softcap)
        if _HAS_TERMS and c.is_integer() and c >= 1:
            return "term", int(c)
        if _terms(p):
            raise _error("P373", f"the model caps attention logits at {model_softcap} (attn_logit_softcapping), "
                                 "which is not an integer >= 1 and cannot join the pattern's score terms "
                                 f"`{', '.join(str(t) for t in _terms(p))}`",
                         f"write the cap in the pattern, e.g. `with softcap(c={max(1, round(c))})`")
        return "dense", None

    def _check_left_padding(self, layer_idx: int, padding: torch.Tensor) -> None:
        """W021 once: left padding (a padded key before a real one) with a layer pattern that
        is not shift-invariant: its positions count the pads (as HF's own masks do)."""
        from .source.frontdoor import parse

        left = bool((~padding[:, 0] & padding.any(dim=1)).any())
        if not left:
            return
        text = self.layer_text(layer_idx)
        if _shift_invariant(parse(text)):
            return
        self._warned.add("left-padding")
        _warn("W021", f"left padding with layer {layer_idx}'s pattern `{text}`, which reads absolute positions: "
                      "positions count the pad tokens (cache slots, as in HF's own masks), so a padded row's "
                      "real tokens start at its pad count",
              "pad on the right (tokenizer.padding_side='right') for training and scoring, or batch prompts of "
              "equal length for generation")

    def offset_unit(self, layer_idx: int) -> int:
        """The tokens every offset of this layer must be a multiple of (the ``blocks(b, …)``
        sizes, SPEC §1.6; 1 for a pattern without ``blocks``)."""
        unit = self._units.get(layer_idx)
        if unit is None:
            from .compiler import block_offset_unit
            from .source.frontdoor import parse

            unit = self._units[layer_idx] = block_offset_unit(parse(self.layer_text(layer_idx)))
        return unit

    # ---- config check ------------------------------------------------------------------------
    def check_config(self, config) -> None:
        """Warn once (W020) when the config's ``sliding_window`` / ``layer_types`` disagree with
        the pattern, naming both (the first layer that differs and how many do)."""
        if config is None or id(config) in self._warned:
            return
        self._warned.add(id(config))
        from .source.frontdoor import parse

        n = int(getattr(config, "num_hidden_layers", 0) or 0)
        diffs = []
        for layer in range(n):
            want = expected_pattern(config, layer)
            if want is None:
                continue
            try:
                have = self.layer_text(layer)
            except PatternError:
                continue  # a missing layer is reported when it runs
            if str(parse(want)) != have:
                diffs.append((layer, want, have))
        if diffs:
            layer, want, have = diffs[0]
            more = f" (and {len(diffs) - 1} more layers)" if len(diffs) > 1 else ""
            window = getattr(config, "sliding_window", None)
            kinds = getattr(config, "layer_types", None)
            asked = f"layer_types[{layer}]={kinds[layer]!r}, " if kinds is not None and layer < len(kinds) else ""
            if want.startswith("chunk("):
                asked += f"attention_chunk_size={getattr(config, 'attention_chunk_size', None)}, "
            _warn("W020", f"the model config asks layer {layer} for `{want}` ({asked}sliding_window={window}) but "
                          f"the pattern {self.name!r} gives `{have}`{more}; the pattern is used",
                  "this is fine if intended; a sliding-window (or chunked) KV cache keeps only the last "
                  "sliding_window - 1 keys (or the current chunk), so a pattern that reads further back "
                  "needs config.layer_types all 'full_attention' for generation (else P354)")

    # ---- the two functions given to HF ---------------------------------------------------------
    def mask_function(self, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                      mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
        """HF ``AttentionMaskInterface`` entry: -> ``PatternMask`` (see the module docstring).

        Args:
            batch_size: B.
            q_length, kv_length: Q_LEN, KV_LEN (tokens).
            q_offset, kv_offset: positions of query row 0 / key column 0 (int or 0-d tensor).
            mask_function: HF's mask_mod (causal / sliding window / packed sequences); read only
                for the packed-sequence ids, the pattern replaces the rest.
            attention_mask: bool or int [B, >= kv_offset + KV_LEN] or None; 1 = real token.
            config: the model config (checked once against the pattern, W020).

        Raises:
            PatternError: P372 an overlay in ``mask_function`` a pattern cannot express.
        """
        self.stats["masks"] += 1
        self.check_config(config)
        q_offset = int(q_offset)
        kv_offset = int(kv_offset)
        padding = None
        if attention_mask is not None:
            am = attention_mask.to(torch.bool)
            short = kv_offset + kv_length - am.shape[-1]
            if short > 0:  # as HF's prepare_padding_mask: slots past the mask are not real keys
                am = torch.nn.functional.pad(am, (0, short), value=False)
            am = am[:, kv_offset:kv_offset + kv_length]
            if not bool(am.all()):
                padding = am
        documents = _packed_documents(mask_function) if mask_function is not None else None
        if documents is not None:
            documents = documents.to(torch.int64)
        return PatternMask(self, int(batch_size), int(q_length), int(kv_length), q_offset, kv_offset, padding,
                           documents)

    def attention_function(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           softcap: float | None = None, **kwargs):
        """HF ``AttentionInterface`` entry.

        Args:
            module: the model's attention module (``layer_idx``, ``num_key_value_groups``,
                ``training``).
            query: float [B, H, Q_LEN, D]; key: [B, H_kv, KV_LEN, D]; value: [B, H_kv, KV_LEN, Dv].
            attention_mask: the ``PatternMask`` of this forward.
            dropout: attention dropout probability (applied in training only).
            scaling: multiplier of q·k (default 1/sqrt(D)).
            softcap: the model's logit soft-cap c (Gemma 2): s -> c·tanh(s/c), used when the
                pattern has no ``softcap`` of its own.

        Returns:
            (float [B, Q_LEN, H, Dv], None).

        Raises:
            PatternError: P370 the attention mask is not a ``PatternMask`` (the model was not
                built with this name's mask function, or a 4-D mask was passed); P371 no pattern
                for this layer; P374 learned attention sinks (``s_aux``); P354 a sliding-window or
                chunked cache dropped keys the pattern reads; P350-P353 from ``patternc.execute``.
        """
        if not isinstance(attention_mask, PatternMask):
            got = "None" if attention_mask is None else f"{type(attention_mask).__name__}"
            raise _error("P370", f"attention {self.name!r} got attention_mask={got}, not the PatternMask its "
                                 "mask function makes", "build the model with attn_implementation="
                                 f"{self.name!r} after patternc.transformers.register, and pass a 2-D "
                                 "attention_mask [B, L] (a prepared 4-D mask cannot be read as a pattern)")
        layer_idx = int(getattr(module, "layer_idx", 0) or 0)
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        if sinks is not None:  # GPT-OSS & co: a learned per-head logit in every softmax
            raise _error("P374", f"layer {layer_idx}: the model passes learned attention sinks (`s_aux`, one logit "
                                 "per head added to every row's softmax), which patternc's kernels do not take; "
                                 "ignoring them would change every output",
                         "run this model with attn_implementation='eager' or 'sdpa' (a `sink(n)` pattern is a "
                         "different thing: attending the first n tokens)")
        m = attention_mask
        B, H, Q, _ = query.shape
        KV = key.shape[2]
        if Q != m.q_length or KV != m.kv_length:  # e.g. a static cache longer than the mask says
            raise _error("P370", f"layer {layer_idx}: q/k have Q_LEN={Q}, KV_LEN={KV} but the mask function "
                                 f"saw q_length={m.q_length}, kv_length={m.kv_length}",
                         "use the model's DynamicCache (the default) with this attention")
        dropout = float(dropout) if getattr(module, "training", False) else 0.0
        if m.key_padding_mask is not None and "left-padding" not in self._warned:
            self._check_left_padding(layer_idx, m.key_padding_mask)
        out = _attend(self, layer_idx, query, key, value, m, scaling, dropout, softcap)
        return out.transpose(1, 2).contiguous(), None


def _attend(reg: PatternAttention, layer_idx, query, key, value, m: PatternMask, scaling, dropout, softcap):
    """Attention of one decoder layer: [B, H, Q_LEN, Dv], through ``CompiledPattern.attention``
    with the call's offsets, key padding and documents.

    Inside ``blocks(b, …)`` offsets must be whole blocks (SPEC §1.6, P302); a decode step at
    any other offset runs with both offsets rounded down to the pattern's block unit: the
    rows in between are zero queries that are dropped, the columns in between are keys the
    call does not have, given as padding (key padding False), so the result is exact."""
    B, H, Q, D = query.shape
    KV = key.shape[2]
    how, cap = reg.softcap_for(layer_idx, softcap)
    if m.kv_offset > 0 and m.documents is None:
        _check_dropped_keys(reg, layer_idx, m, H)
    padding = m.key_padding_mask
    unit = reg.offset_unit(layer_idx)
    dq, dk = m.q_offset % unit, m.kv_offset % unit
    if dq:
        query = torch.nn.functional.pad(query, (0, 0, dq, 0))
    if dk:
        key = torch.nn.functional.pad(key, (0, 0, dk, 0))
        value = torch.nn.functional.pad(value, (0, 0, dk, 0))
        real = torch.ones(B, KV, dtype=torch.bool, device=key.device) if padding is None else padding
        padding = torch.nn.functional.pad(real, (dk, 0), value=False)
    cp = reg.compiled(layer_idx, q_len=Q + dq, kv_len=KV + dk, q_offset=m.q_offset - dq,
                      kv_offset=m.kv_offset - dk, num_heads=H, documents=m.documents is not None,
                      softcap=None if how == "dense" else cap)
    if how == "dense":
        out = _attend_dense(cp, query, key, value, m.documents, padding, scaling, dropout, softcap)
    else:
        out = cp.attention(query, key, value, scale=scaling, backend=reg.backend, dropout_p=dropout,
                           documents=m.documents, key_padding_mask=padding)
    return out[:, :, dq:] if dq else out


def _check_dropped_keys(reg: PatternAttention, layer_idx: int, m: PatternMask, H: int) -> None:
    """P354 when a query of this call may attend a key before ``kv_offset``: one HF's sliding-
    window (or chunked) cache has dropped (HF hands the attention only the keys it kept). Counted
    exactly on the layout of those columns (rows rounded down to the ``blocks`` unit)."""
    dq = m.q_offset % reg.offset_unit(layer_idx)
    cp = reg.compiled(layer_idx, q_len=m.q_length + dq, kv_len=m.kv_offset, q_offset=m.q_offset - dq,
                      kv_offset=0, num_heads=H)
    if cp.allows_any:
        raise _error("P354", f"layer {layer_idx}: the model's KV cache keeps keys from position {m.kv_offset} on "
                             f"(a sliding-window or chunked cache), but the pattern `{reg.layer_text(layer_idx)}` "
                             f"lets a query at positions {m.q_offset}..{m.q_offset + m.q_length - 1} attend an "
                             "earlier key", "register a pattern within the config's window, or keep every key: "
                             "config.layer_types all 'full_attention' (a full cache for every layer)")


def _attend_dense(cp, query, key, value, documents, padding, scaling, dropout, softcap):
    """INTERIM path for a model softcap that cannot be the layer's ``softcap(c)`` term (score
    terms unavailable, or a cap that is not an integer >= 1): ``cp``'s mask with this call's
    documents and key padding (``dense_mask``: ``per_document`` at document-relative positions,
    as the block-sparse path), dense bool [B or 1, H, Q_LEN, KV_LEN]; ``c·tanh(s/c)`` on the
    scores, float32 softmax (a row with no allowed key gives 0). O(Q_LEN · KV_LEN) per call."""
    import numpy as np

    B, H, Q, D = query.shape
    H_kv = key.shape[1]
    dense = cp.dense_mask(documents=None if documents is None else documents.cpu(),
                          key_padding_mask=None if padding is None else padding.cpu())
    allowed = torch.from_numpy(np.ascontiguousarray(dense)).to(query.device)
    if allowed.dim() == 3:
        allowed = allowed[None]  # [1, H, Q, KV]
    groups = H // H_kv
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = D ** -0.5 if scaling is None else float(scaling)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    s = torch.matmul(query.to(work), k.to(work).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no allowed key -> 0
    if dropout > 0:
        p = torch.nn.functional.dropout(p, p=dropout)
    return torch.matmul(p, v.to(work)).to(query.dtype)


_REGISTERED: dict[str, PatternAttention] = {}


def register(name: str, pattern, *, params: dict | None = None, block_size=128,
             backend: str = "auto") -> PatternAttention:
    """Register ``pattern`` as attention ``name`` with HF transformers (SPEC §8).

    Adds ``PatternAttention.attention_function`` to ``transformers.AttentionInterface`` and
    ``PatternAttention.mask_function`` to ``transformers.AttentionMaskInterface`` under
    ``name`` (registering a name again replaces it). Then
    ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``) runs the pattern.

    Args:
        name: the ``attn_implementation`` name, e.g. ``"patternc"``.
        pattern: source text, a ``.pattern`` path, a ``patternc.Pattern``, or
            ``{layer_idx: pattern}``. Decoder layer l runs layer l of a ``layers(…)`` stack
            (entry ``l mod m``), or ``pattern[l]`` of a mapping.
        params: values for the pattern's ``param``s.
        block_size: BLOCK_SIZE in tokens (int or pair).
        backend: ``patternc.execute`` backend (``"auto"`` picks per device and pattern).

    Returns:
        The ``PatternAttention`` (its ``stats`` count compiles, cache hits and mask calls).

    Raises:
        PatternError: a pattern that does not parse (P1xx/P2xx), a bad mapping (P371).
        ImportError: transformers is not installed (``pip install 'patternc[transformers]'``).

    Example::

        >>> import patternc.transformers as pt                     # doctest: +SKIP
        >>> pt.register("patternc", "(local(w=128) | strided(s=128)) & causal")  # doctest: +SKIP
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("patternc.transformers needs HF transformers: pip install 'patternc[transformers]' "
                          f"(verified with transformers=={VERIFIED_VERSION})") from e
    reg = PatternAttention(name, pattern, params=params, block_size=block_size, backend=backend)
    AttentionInterface.register(name, reg.attention_function)
    AttentionMaskInterface.register(name, reg.mask_function)
    _REGISTERED[name] = reg
    return reg


def unregister(name: str) -> None:
    """Remove attention ``name`` from both HF interfaces (a no-op for an unknown name)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    for iface in (AttentionInterface, AttentionMaskInterface):
        iface._global_mapping.pop(name, None)
    _REGISTERED.pop(name, None)
