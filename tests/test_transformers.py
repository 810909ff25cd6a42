"""``patternc.transformers`` checked against HF transformers' own implementations.

Tiny decoders are built from configs with random weights (no downloads, fixed seeds). For each
model in ``CASES`` the same weights run HF's ``eager`` attention and patternc's registered
attention, and:

* logits are equal (1e-4, float32) on a batch with left padding (at the real tokens: HF's
  eager gives a fully padded query row a uniform average, patternc gives it 0 — SPEC §1.7);
* greedy ``generate`` of 32 new tokens with the model's KV cache gives identical ids;
* one training step's gradients are equal (1e-4 relative, every parameter);
* packed sequences (``position_ids`` restarting at 0) equal running the documents one by one.

The verification table of ``docs/transformers.md`` is rendered from ``CASES`` and the checks
below; ``test_docs_table`` compares it (``PATTERNC_UPDATE_DOCS=1`` rewrites it).
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import patternc  # noqa: E402
import patternc.transformers as pt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "transformers.md"
WINDOW = 8  # tokens: shorter than the prompts + 32 generated tokens, so the window bites
BLOCK = 8  # BLOCK_SIZE of the registrations: several tiles even at these lengths
VOCAB = 101
PROMPT = 20
PAD = 5  # left padding of the second row
TOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore::patternc.PatternWarning")


def _small(**kw) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return base


@dataclass
class Case:
    model: str  # as in the docs table
    config: str  # transformers class names
    causal_lm: str
    kwargs: dict
    pattern: str  # what is registered
    hf_masks: str  # what HF's own masks are, in words (the docs table)
    checks: tuple = ("logits", "generate", "grads", "packed")
    notes: str = ""
    extra: dict = field(default_factory=dict)


CASES = [
    Case("Llama", "LlamaConfig", "LlamaForCausalLM", _small(), "causal", "causal"),
    Case("Mistral", "MistralConfig", "MistralForCausalLM", _small(sliding_window=WINDOW),
         f"local(w={WINDOW}) & causal", f"sliding_window={WINDOW} (W keys, the query's own included)"),
    Case("Gemma 3", "Gemma3TextConfig", "Gemma3ForCausalLM",
         _small(head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=16),
         f"layers(local(w={WINDOW}) & causal, causal)", f"layer_types sliding/full, sliding_window={WINDOW}",
         notes="query_pre_attn_scalar -> scaling"),
    Case("Gemma 2", "Gemma2Config", "Gemma2ForCausalLM",
         _small(head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=30.0),
         f"layers(local(w={WINDOW}) & causal, causal)",
         f"layer_types sliding/full, sliding_window={WINDOW}, attn_logit_softcapping=2",
         notes="the model's cap runs as the layer's `softcap(c=2)` score term (a dense interim path where score "
               "terms are unavailable); `… with softcap(c=2)` in the pattern is tested too; q/k weights x20 so "
               "the cap bites", extra={"qk_scale": 20.0}),
    Case("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", _small(num_key_value_heads=1), "causal",
         "causal (use_sliding_window=False)", notes="GQA 4:1"),
]
IDS = [c.model.replace(" ", "") for c in CASES]

_MODELS: dict = {}


def _models(case: Case):
    """(eager model, patternc model) with the same random weights, built once per case."""
    if case.model in _MODELS:
        return _MODELS[case.model]
    cfg_cls = getattr(transformers, case.config)
    lm_cls = getattr(transformers, case.causal_lm)
    torch.manual_seed(0)
    cfg = cfg_cls(**case.kwargs)
    cfg._attn_implementation = "eager"
    eager = lm_cls(cfg).eval()
    if "qk_scale" in case.extra:  # random init gives tiny attention logits: make them large enough to cap
        with torch.no_grad():
            for n, p in eager.named_parameters():
                if n.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(case.extra["qk_scale"])
    name = f"patternc-test-{case.model.replace(' ', '').lower()}"
    pt.register(name, case.pattern, block_size=BLOCK)
    mine = copy.deepcopy(eager)
    mine.set_attn_implementation(name)
    assert mine.config._attn_implementation == name
    _MODELS[case.model] = (eager, mine)
    return eager, mine


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=g)
    am = torch.ones(2, PROMPT, dtype=torch.long)
    am[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, am


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_equal_eager_on_a_left_padded_batch(case):
    eager, mine = _models(case)
    ids, am = _batch()
    with torch.no_grad():
        want = eager(ids, attention_mask=am).logits
        got = mine(ids, attention_mask=am).logits
    real = am.bool()
    assert _rel(got[real], want[real]) <= TOL
    # and without padding (the block-sparse path, no run-time data)
    with torch.no_grad():
        assert _rel(mine(ids[:1]).logits, eager(ids[:1]).logits) <= TOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_greedy_generate_with_the_kv_cache_gives_identical_ids(case):
    eager, mine = _models(case)
    ids, am = _batch(seed=2)
    kw = dict(attention_mask=am, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        got = mine.generate(ids, **kw)
    assert want.shape == (2, PROMPT + 32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_training_step_gives_equal_gradients(case):
    eager, mine = _models(case)
    ids, am = _batch(seed=3)
    labels = ids.masked_fill(am == 0, -100)
    labels[1, PAD] = -100  # its prediction comes from a padding row (HF's eager: a uniform average; SPEC: 0)
    grads = []
    for m in (eager, mine):
        m = copy.deepcopy(m).train()
        m.zero_grad()
        m(ids, attention_mask=am, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    want, got = grads
    assert set(got) == set(want) and len(want) > 10
    for n in want:
        assert _rel(got[n], want[n]) <= TOL, n


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_packed_sequences_equal_the_documents_run_separately(case):
    eager, mine = _models(case)
    g = torch.Generator().manual_seed(4)
    lengths = (11, 4, 13)
    docs = [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = mine(packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([mine(d, use_cache=False).logits for d in docs], dim=1)
        hf = eager(packed, position_ids=position_ids, use_cache=False).logits
    assert _rel(got, alone) <= TOL
    assert _rel(got, hf) <= TOL  # HF's eager packs the same way


def test_packed_sequences_with_an_anchored_pattern_give_each_document_its_sinks():
    # per_document(p): every packed document is run as if alone, its own sinks included
    eager, _ = _models(CASES[0])
    pt.register("patternc-test-packed-sinks", "(sink(n=2) | local(w=3)) & causal", block_size=BLOCK)
    mine = copy.deepcopy(eager)
    mine.set_attn_implementation("patternc-test-packed-sinks")
    g = torch.Generator().manual_seed(5)
    lengths = (9, 3, 12)
    docs = [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = mine(torch.cat(docs, dim=1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([mine(d, use_cache=False).logits for d in docs], dim=1)
    assert _rel(got, alone) <= TOL


# ---- the pattern really decides ---------------------------------------------------------------------


def test_hf_sliding_window_is_local_w_and_causal_not_w_minus_one():
    """HF's sliding_window=W keeps W keys (i-W+1 … i): `local(w=W) & causal`; `w=W-1` differs."""
    case = CASES[1]
    eager, _ = _models(case)
    pt.register("patternc-test-off-by-one", f"local(w={WINDOW - 1}) & causal", block_size=BLOCK)
    other = copy.deepcopy(eager)
    other.set_attn_implementation("patternc-test-off-by-one")
    ids, _ = _batch()
    with torch.no_grad():
        assert _rel(other(ids).logits, eager(ids).logits) > 1e-3


def test_layer_l_runs_layer_l_of_the_stack_and_mappings_equal_stacks():
    case = CASES[2]  # Gemma 3: sliding, full
    eager, mine = _models(case)
    pt.register("patternc-test-map", {0: f"local(w={WINDOW}) & causal", 1: "causal"}, block_size=BLOCK)
    pt.register("patternc-test-swapped", f"layers(causal, local(w={WINDOW}) & causal)", block_size=BLOCK)
    ids, _ = _batch()
    outs = {}
    for name in ("patternc-test-map", "patternc-test-swapped"):
        m = copy.deepcopy(eager)
        m.set_attn_implementation(name)
        with torch.no_grad():
            outs[name] = m(ids).logits
    with torch.no_grad():
        want = eager(ids).logits
    assert _rel(outs["patternc-test-map"], want) <= TOL
    assert _rel(outs["patternc-test-swapped"], want) > 1e-3


def test_softcap_is_applied():
    case = CASES[3]  # Gemma 2 with attn_logit_softcapping
    eager, _ = _models(case)
    cfg = copy.deepcopy(eager.config)
    cfg.attn_logit_softcapping = None
    no_cap = type(eager)(cfg).eval()
    no_cap.load_state_dict(eager.state_dict())
    ids, _ = _batch()
    with torch.no_grad():
        assert _rel(no_cap(ids).logits, eager(ids).logits) > 1e-2  # the cap matters at these logits


@pytest.mark.skipif(not pt._HAS_TERMS, reason="score terms (SPEC §1.8) not available")
def test_the_patterns_own_softcap_term_wins():
    case = CASES[3]
    eager, _ = _models(case)
    ids, am = _batch()
    with torch.no_grad():
        want = eager(ids, attention_mask=am).logits
    real = am.bool()
    for c, equal in ((2, True), (3, False)):
        name = f"patternc-test-own-cap{c}"
        pt.register(name, case.pattern + f" with softcap(c={c})", block_size=BLOCK)
        m = copy.deepcopy(eager)
        m.set_attn_implementation(name)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with torch.no_grad():
                got = m(ids, attention_mask=am).logits
        msgs = [str(x.message) for x in w if isinstance(x.message, patternc.PatternWarning) and "softcap" in str(x.message)]
        if equal:
            assert _rel(got[real], want[real]) <= TOL and not msgs
        else:
            assert _rel(got[real], want[real]) > 1e-3
            assert len(msgs) == 1 and "softcap(c=3)" in msgs[0] and "2.0" in msgs[0]
    kw = dict(attention_mask=am, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    m = copy.deepcopy(eager)
    m.set_attn_implementation("patternc-test-own-cap2")
    with torch.no_grad():
        assert torch.equal(m.generate(ids, **kw), eager.generate(ids, **kw))


def test_a_cap_that_is_not_an_integer_runs_the_dense_path():
    case = CASES[3]
    eager, _ = _models(case)
    cfg = copy.deepcopy(eager.config)
    cfg.attn_logit_softcapping = 1.5
    want = type(eager)(cfg).eval()
    want.load_state_dict(eager.state_dict())
    pt.register("patternc-test-cap15", case.pattern, block_size=BLOCK)
    mine = copy.deepcopy(want)
    mine.set_attn_implementation("patternc-test-cap15")
    ids, am = _batch()
    with torch.no_grad():
        a, b = want(ids, attention_mask=am).logits, mine(ids, attention_mask=am).logits
    assert _rel(b[am.bool()], a[am.bool()]) <= TOL


def test_dropout_only_in_training():
    case = CASES[0]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(case.kwargs, attention_dropout=0.5))
    pt.register("patternc-test-dropout", "causal", block_size=BLOCK)
    m = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="patternc-test-dropout")
    ids, _ = _batch()
    m.eval()
    with torch.no_grad():
        a, b = m(ids).logits, m(ids).logits
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(1)
    c = m(ids).logits
    assert not torch.allclose(c, a) and torch.isfinite(c).all()
    c.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ---- the mask function's object and the cache ---------------------------------------------------------


def test_mask_object_is_small_and_layouts_are_cached():
    reg = pt.register("patternc-test-cache", f"local(w={WINDOW}) & causal", block_size=BLOCK)
    mask = reg.mask_function(batch_size=2, q_length=1, kv_length=4096, q_offset=4095, kv_offset=0,
                             attention_mask=torch.ones(2, 4096, dtype=torch.bool))
    assert isinstance(mask, pt.PatternMask) and mask.key_padding_mask is None and mask.documents is None
    am = torch.ones(2, 4096, dtype=torch.bool)
    am[0, 100:103] = False  # inside the keys of the call (columns 96 …)
    mask = reg.mask_function(batch_size=2, q_length=1, kv_length=4000, q_offset=4095, kv_offset=96,
                             attention_mask=am)
    assert mask.key_padding_mask.shape == (2, 4000)  # only the keys of this call: [B, KV_LEN]
    assert mask.shape == (2, 1, 1, 4000)
    assert mask.key_padding_mask[0, 4:7].tolist() == [False] * 3 and bool(mask.key_padding_mask[1].all())
    case = CASES[1]
    eager, _ = _models(case)
    m = copy.deepcopy(eager)
    m.set_attn_implementation("patternc-test-cache")
    ids, _ = _batch()
    with torch.no_grad():
        m(ids)
        before = dict(reg.stats)
        m(ids)
    assert reg.stats["compiles"] == before["compiles"]  # the second forward compiles nothing
    assert reg.stats["cache_hits"] > before["cache_hits"]


def test_attention_without_the_mask_object_is_an_error():
    reg = pt.register("patternc-test-nomask", "causal")

    class Mod(torch.nn.Module):
        layer_idx = 0

    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(patternc.PatternError) as e:
        reg.attention_function(Mod(), q, q, q, None)
    assert e.value.code == "P370" and "help:" in str(e.value)
    with pytest.raises(patternc.PatternError) as e:
        reg.attention_function(Mod(), q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    assert e.value.code == "P370"


def test_unknown_overlays_and_bad_mappings_are_errors():
    reg = pt.register("patternc-test-errors", {0: "causal"})
    with pytest.raises(patternc.PatternError) as e:
        reg.mask_function(batch_size=1, q_length=4, kv_length=4, mask_function=lambda b, h, q, kv: q >= kv)
    assert e.value.code == "P372"
    with pytest.raises(patternc.PatternError) as e:
        reg.pattern_for_layer(3)
    assert e.value.code == "P371" and "layer 3" in str(e.value)
    with pytest.raises(patternc.PatternError) as e:
        pt.register("patternc-test-errors2", {"0": "causal"})
    assert e.value.code == "P371"
    for bad in ("org/patternc", "paged|patternc", "sdpa", ""):
        with pytest.raises(patternc.PatternError) as e:
            pt.register(bad, "causal")
        assert e.value.code == "P371"
    with pytest.raises(patternc.PatternError) as e:
        pt.register("patternc-test-errors3", "locl(w=4) & causal")
    assert e.value.code == "P201"


def test_pattern_file(tmp_path):
    f = tmp_path / "w.pattern"
    f.write_text("param w = 8\nlocal(w) & causal\n")
    reg = pt.register("patternc-test-file", str(f), params={"w": 5})
    assert reg.layer_text(0) == str(patternc.parse("local(w=5) & causal"))


def test_config_mismatch_warns_once_naming_both():
    case = CASES[2]  # Gemma 3 asks: sliding, full
    eager, _ = _models(case)
    pt.register("patternc-test-warn", "causal", block_size=BLOCK)
    m = copy.deepcopy(eager)
    m.set_attn_implementation("patternc-test-warn")
    ids, _ = _batch()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            m(ids)
            m(ids)
    msgs = [str(x.message) for x in w if isinstance(x.message, patternc.PatternWarning)]
    assert len(msgs) == 1, msgs
    assert "W020" in msgs[0] and f"local(w={WINDOW}) & causal" in msgs[0] and "`causal`" in msgs[0]
    # the matching pattern draws none
    _, mine = _models(case)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            mine(ids)
    assert not [x for x in w if isinstance(x.message, patternc.PatternWarning)]


def test_left_padding_with_an_anchored_pattern_warns_once():
    case = CASES[0]
    eager, _ = _models(case)
    ids, am = _batch()
    for pattern, warns in (("(sink(n=2) | local(w=4)) & causal", True), ("(local(w=4) | strided(s=3)) & causal", False)):
        name = f"patternc-test-left-{warns}"
        pt.register(name, pattern, block_size=BLOCK)
        m = copy.deepcopy(eager)
        m.set_attn_implementation(name)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with torch.no_grad():
                m(ids, attention_mask=am)
                m(ids, attention_mask=am)
                m(ids.flip(1), attention_mask=am.flip(1))  # right padding: never
        msgs = [str(x.message) for x in w if isinstance(x.message, patternc.PatternWarning)]
        assert [x for x in msgs if "W021" in x] == ([x for x in msgs if "sink" in x] if warns else [])
        assert len(msgs) == (1 if warns else 0), msgs


def test_expected_pattern_reads_the_config():
    cfg = transformers.Qwen2Config(use_sliding_window=False, num_hidden_layers=2)
    assert pt.expected_pattern(cfg, 0) is None
    cfg = transformers.MistralConfig(sliding_window=64)
    assert pt.expected_pattern(cfg, 3) == "local(w=64) & causal"
    cfg = transformers.Gemma2Config(sliding_window=16, num_hidden_layers=2)
    assert [pt.expected_pattern(cfg, i) for i in (0, 1)] == ["local(w=16) & causal", "causal"]


# ---- the docs table ---------------------------------------------------------------------------------


def verification_table() -> str:
    """The verified-models table of docs/transformers.md, rendered from CASES."""
    head = ("| model (transformers " + transformers.__version__ + ") | HF's own masks | registered pattern | "
            "logits = eager (left padding) | greedy generate, 32 tokens | training-step grads | "
            "packed = separate | notes |")
    rows = [head, "|" + "---|" * 8]
    mark = {True: "✓", False: "—"}
    for c in CASES:
        rows.append(f"| {c.model} (`{c.causal_lm}`) | {c.hf_masks} | `{c.pattern}` | "
                    f"{mark['logits' in c.checks]} ≤ {TOL:g} | {mark['generate' in c.checks]} identical ids | "
                    f"{mark['grads' in c.checks]} ≤ {TOL:g} | {mark['packed' in c.checks]} ≤ {TOL:g} | "
                    f"{c.notes} |")
    return "\n".join(rows) + "\n"


START, END = "<!-- verified-table:start (tests/test_transformers.py) -->\n", "<!-- verified-table:end -->"


def test_docs_table():
    text = DOC.read_text()
    table = verification_table()
    if os.environ.get("PATTERNC_UPDATE_DOCS") == "1":
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: START + table + END, text, flags=re.S)
        DOC.write_text(text)
    assert START in text and END in text, "docs/transformers.md lost its table markers"
    got = text.split(START, 1)[1].split(END, 1)[0]
    assert got == table, "docs/transformers.md's table is stale: PATTERNC_UPDATE_DOCS=1 pytest tests/test_transformers.py"


# ---- patterns HF has no built-in for: the cache's offsets --------------------------------------------


@pytest.mark.parametrize("pattern", ["(sink(n=2) | local(w=4)) & causal",
                                     "layers(blocks(4, local(w=2) & causal) & causal, (local(w=3) | strided(s=5)) & causal)"])
def test_generate_with_the_cache_equals_generate_without(pattern):
    """Decode steps (Q_LEN = 1 at q_offset = t) see the rows of the whole sequence: greedy ids
    with the KV cache equal recomputing everything at each step — also inside `blocks(4, …)`,
    whose offsets are rounded down to whole blocks."""
    case = CASES[0]  # Llama: a full cache
    eager, _ = _models(case)
    name = "patternc-test-gen-" + str(abs(hash(pattern)))
    pt.register(name, pattern, block_size=BLOCK)
    m = copy.deepcopy(eager)
    m.set_attn_implementation(name)
    ids, _ = _batch(seed=5)
    ids = ids[:1, :7]  # not a multiple of the blocks' 4 tokens
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = m.generate(ids, use_cache=True, **kw)
        full = m.generate(ids, use_cache=False, **kw)
        hf_causal = eager.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, full)
    assert not torch.equal(cached, hf_causal)  # the pattern really differs from causal here


@pytest.mark.slow
def test_the_example_trains_and_generates(tmp_path):
    """examples/hf_sparse_llama.py end to end at a tiny size: it trains, evaluates, and
    generation with the KV cache equals generation without it for every run (exit 0)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_sparse_llama.py"), "--steps", "2",
                           "--seq-len", "64", "--gen", "6", "--layers", "2", "--d-model", "32", "--block-size", "16",
                           "--eval-windows", "2", "--max-bytes", "200000", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert [r["run"] for r in res] == ["dense", "window|strided", "window/global"]
    assert all(r["cache_equals_no_cache"] and math.isfinite(r["heldout_bits_per_byte"]) for r in res)


# ---- found by a review: silent differences made errors or exact ------------------------------------


def _gemma2_dense(cap: float):
    """A tiny Gemma 2 (full-attention layers) with a cap that is not an integer: the dense path."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    sliding_window=8, layer_types=["full_attention", "full_attention"],
                                    query_pre_attn_scalar=16, attn_logit_softcapping=cap,
                                    final_logit_softcapping=None)
    cfg._attn_implementation = "eager"
    m = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # logits large enough for the cap to matter
        for n, p in m.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
    return m


def test_the_dense_path_runs_packed_documents_as_if_alone():
    """A non-integer cap runs the dense path; packed sequences there were `document & p` at
    absolute positions, so an anchored pattern lost each document's sinks (rel. error 1.27)."""
    pt.register("patternc-test-dense-docs", "(sink(n=2) | local(w=3)) & causal", block_size=BLOCK)
    m = _gemma2_dense(2.5)
    m.set_attn_implementation("patternc-test-dense-docs")
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (9, 3, 12)]
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed = m(torch.cat(docs, 1), position_ids=pos, use_cache=False).logits
        alone = torch.cat([m(d, use_cache=False).logits for d in docs], 1)
    assert _rel(packed, alone) <= TOL


def test_the_dense_path_decodes_inside_blocks():
    """The dense path compiled the step's unaligned offsets inside `blocks(4, …)`: P302 in generate."""
    pt.register("patternc-test-dense-blocks", "blocks(4, local(w=2) & causal) & causal", block_size=BLOCK)
    m = _gemma2_dense(2.5)
    m.set_attn_implementation("patternc-test-dense-blocks")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        assert torch.equal(m.generate(ids, use_cache=True, **kw), m.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("config, pattern", [
    (dict(kind="mistral"), "(local(w=4) | sink(n=2)) & causal"),  # narrower than the window, but sinks
    (dict(kind="llama4"), "causal"),  # chunked layers keep only the current chunk
])
def test_a_cache_that_dropped_keys_the_pattern_reads_is_an_error(config, pattern):
    """HF's sliding-window / chunked caches hand the attention only the keys they kept
    (kv_offset > 0); a pattern that reads an earlier key generated silently different ids."""
    torch.manual_seed(0)
    if config["kind"] == "mistral":
        cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                         pad_token_id=0)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, attention_chunk_size=WINDOW,
                                            layer_types=["chunked_attention", "full_attention"],
                                            num_local_experts=2, pad_token_id=0)
        model = transformers.Llama4ForCausalLM(cfg)
    name = "patternc-test-dropped-" + config["kind"]
    pt.register(name, pattern, block_size=BLOCK)
    model.eval().set_attn_implementation(name)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W020: the config asks for another pattern
        with torch.no_grad(), pytest.raises(patternc.PatternError, match="P354"):
            model.generate(ids, use_cache=True, **kw)


def test_expected_pattern_knows_chunked_layers():
    cfg = transformers.Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=8,
                                        layer_types=["chunked_attention", "full_attention"])
    assert [pt.expected_pattern(cfg, i) for i in (0, 1)] == ["chunk(l=8) & causal", "causal"]


def test_learned_attention_sinks_are_an_error():
    """GPT-OSS adds a learned per-head logit to every softmax (`s_aux`); it was ignored (0.19 off)."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=64,
                                    layer_types=["full_attention", "full_attention"], max_position_embeddings=256)
    model = transformers.GptOssForCausalLM(cfg).eval()
    pt.register("patternc-test-sinks", "causal", block_size=BLOCK)
    model.set_attn_implementation("patternc-test-sinks")
    with torch.no_grad(), pytest.raises(patternc.PatternError, match="P374"):
        model(torch.randint(3, VOCAB, (1, 12)))
