"""The scored path's kernels in C (AVX2 + FMA, OpenMP), built at first use.

``fused.forward_scored`` / ``backward_scored`` run the strided runs of a pattern with a softcap
(or ALiBi the fused kernel cannot take) unfused: a batched matmul gives a call's scores, then
torch ops make the probabilities one pass each (sigmoid, bias, row max, subtract, floor, exp,
sum; nine passes in the backward). Each pass re-reads a score-sized tensor and every transcendental
runs through its own kernel. The two functions here do the whole elementwise part of one call in
a single pass over each score row, while the row is in L1:

* ``forward_rows(s, form, a, bias)``: ``y = a * f(s) + bias`` (``f`` sigmoid, tanh or identity),
  the row max ``m``, ``s <- exp(max(y - m, floor))`` and the row sum ``den``;
* ``backward_rows(s, ds, form, a, bias, lse, delta)``: ``p = exp(clamp(a * f(s) + bias - lse,
  floor, 0))`` into ``s`` and ``ds <- p * (ds - delta) * f'`` (``f(1 - f)``, ``1 - f^2`` or 1).

Measured (2 threads, 1 M float32 scores of a band's calls): 0.80 ms against the torch ops'
1.94 ms forward.

Where torch's own library exports the BLAS ``sgemm_`` (its x86-64 builds link MKL), a whole call
runs fused instead, FlashAttention's loop on the CPU, with no score-sized tensor:

* ``flash_forward``: per task (kernel row, 64 query rows), key steps of 128: ``S = Q K^T`` (sgemm),
  the row pass above with an online softmax, ``O += P V`` (sgemm); only the tile's allowed
  column range is read (a causal slab skips its upper triangle);
* ``flash_backward``: per task (kernel row, or kernel row and key chunk where a call has few
  rows), over the query tiles: ``S``, ``dP = dO V^T``,
  the backward row pass, ``dv += P^T dO``, ``dk += a dS^T Q``, ``dq += a dS K`` (each task its own
  ``dq`` partial, summed after).

A plain causal staircase takes its mask and ALiBi inline (``causal_off``, ``slopes``): no bias
tensor. Each thread's score tiles are one torch-allocated workspace (no allocation in C).

Measured on one causal slab call (256 queries, 4096 keys, 2 threads): forward 25.7 ms against
SDPA's 57.7 ms on the same masked square and 97 ms for matmul + rows + matmul; backward 77 against
126 ms. sgemm runs single-threaded inside the kernels' OpenMP region (MKL's dynamic default).

The source is compiled once per machine with the C compiler (``$CC``, split like a shell word list,
else ``cc`` / ``gcc``) into ``$PATTERNC_CACHE_DIR`` (default ``~/.cache/patternc``), named by a
hash of the source, the flags and the compiler's ``--version``; a file there that does not load
is built again once. It is written to a temporary file and renamed (no half file; concurrent
processes are fine), and loaded with ``ctypes`` (which releases the GIL). It links ``libgomp.so.1`` by soname, so in a process
where torch has loaded its own OpenMP runtime the kernels share torch's thread pool (two pools
would spin against each other). Where anything is missing (no x86-64 CPU with AVX2 and FMA, no
compiler, a failed build, ``PATTERNC_NATIVE=0``) ``kernels()`` returns None and the scored path
keeps its torch ops: same results, slower; ``status()`` says which and why. Without ``sgemm_``
(or with ``PATTERNC_NATIVE_FLASH=0``) the row kernels run between torch's matmuls.

The exp is the Cephes single-precision polynomial (relative error about 2e-7, arguments clamped
to +-88.38), tanh Cephes' tanhf (a polynomial below |x| = 0.625, where ``1 - 2 / (exp(2x) + 1)``
would cancel); arguments below ``floor`` (the caller's ``EXP_FLOOR``) are raised to it, as the torch
ops do, because torch's own exp is several times slower where its result underflows.

Importing this module imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..ir.specialize import cdiv

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *, const int *);

static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline float hmax(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

/* tanh as Cephes tanhf: x + x^3 P(x^2) for |x| < 0.625 (no cancellation near 0), else
   sign(x) (1 - 2 / (exp(2|x|) + 1)) */
static inline __m256 tanh256(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 big = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_mul_ps(two, ax)), one)));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

/* f(x): form 0 identity, 1 sigmoid, 2 tanh */
static inline __m256 vf(__m256 x, int form) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (form == 1)
        return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    if (form == 2)
        return tanh256(x);
    return x;
}

static inline float sf(float x, int form) {
    if (form == 1) return 1.0f / (1.0f + expf(-x));
    if (form == 2) return tanhf(x);
    return x;
}

/* The inline terms of a staircase call (no bias tensor): rel = column - (row + off), exact in
   float32; causal: allowed iff rel <= 0; ALiBi: + m * rel (0 at the row's last allowed key, so the
   keys that weigh most carry the smallest bias). */
static inline __m256 inline_terms(__m256 y, int64_t col0, float rowoff, int causal, float m) {
    const __m256 iota = _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f);
    __m256 rel = _mm256_sub_ps(_mm256_add_ps(_mm256_set1_ps((float)col0), iota), _mm256_set1_ps(rowoff));
    if (m != 0.0f) y = _mm256_fmadd_ps(_mm256_set1_ps(m), rel, y);
    if (causal)
        y = _mm256_blendv_ps(y, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(rel, _mm256_setzero_ps(), _CMP_GT_OQ));
    return y;
}

static inline float inline_term(float y, int64_t col, float rowoff, int causal, float m) {
    float rel = (float)col - rowoff;
    if (m != 0.0f) y += m * rel;
    if (causal && rel > 0.0f) y = -INFINITY;
    return y;
}

/* The inline terms of one score row (a staircase's, see inline_terms): off, or its causal limit
   and ALiBi slope, the column of its first entry and the row's offset. */
typedef struct { int on, causal; int64_t col0; float rowoff, m; } inl_t;
static const inl_t NO_INLINE = {0, 0, 0, 0.0f, 0.0f};

/* One score row of n entries, in place: y = a f(s) + bias (+ inline terms); returns max y. */
static inline float row_scores(float *row, int64_t n, int form, float a, const float *b, inl_t t) {
    const __m256 va = _mm256_set1_ps(a);
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 y = vf(_mm256_loadu_ps(row + c), form);
        y = form ? _mm256_mul_ps(va, y) : y;
        if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + c));
        if (t.on) y = inline_terms(y, t.col0 + c, t.rowoff, t.causal, t.m);
        _mm256_storeu_ps(row + c, y);
        vmax = _mm256_max_ps(vmax, y);
    }
    float mx = hmax(vmax);
    for (; c < n; ++c) {
        float y = sf(row[c], form);
        y = form ? a * y : y;
        if (b) y += b[c];
        if (t.on) y = inline_term(y, t.col0 + c, t.rowoff, t.causal, t.m);
        row[c] = y;
        if (y > mx) mx = y;
    }
    return mx;
}

/* row <- exp(max(row - mx, fl)) in place; returns the row's sum. */
static inline float row_exp_sum(float *row, int64_t n, float mx, float fl) {
    const __m256 vm = _mm256_set1_ps(mx), vfl = _mm256_set1_ps(fl);
    __m256 vsum = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 e = exp256(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(row + c), vm), vfl));
        _mm256_storeu_ps(row + c, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; c < n; ++c) {
        float z = row[c] - mx;
        float e = expf(z < fl ? fl : z);
        row[c] = e;
        sum += e;
    }
    return sum;
}

/* The backward of one row (raw scores row, dP drow): p = exp(clamp(a f(s) + bias (+ inline) - lse,
   fl, 0)) into row, drow <- p (drow - delta) f' with f' = f (1 - f) (sigmoid), 1 - f^2 (tanh),
   1 (identity); the factor a is the caller's. */
static inline void row_grads(float *row, float *drow, int64_t n, int form, float a, const float *b,
                             float lse, float delta, float fl, inl_t t) {
    const __m256 va = _mm256_set1_ps(a), one = _mm256_set1_ps(1.0f);
    const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(delta);
    const __m256 vfl = _mm256_set1_ps(fl), zero = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 f = vf(_mm256_loadu_ps(row + c), form);
        __m256 y = form ? _mm256_mul_ps(va, f) : f;
        if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + c));
        if (t.on) y = inline_terms(y, t.col0 + c, t.rowoff, t.causal, t.m);
        __m256 p = exp256(_mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(y, vl), vfl), zero));
        __m256 g = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(drow + c), vd));
        if (form == 1) g = _mm256_mul_ps(g, _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
        else if (form == 2) g = _mm256_mul_ps(g, _mm256_fnmadd_ps(f, f, one));
        _mm256_storeu_ps(row + c, p);
        _mm256_storeu_ps(drow + c, g);
    }
    for (; c < n; ++c) {
        float f = sf(row[c], form);
        float y = form ? a * f : f;
        if (b) y += b[c];
        if (t.on) y = inline_term(y, t.col0 + c, t.rowoff, t.causal, t.m);
        float z = y - lse;
        z = z < fl ? fl : (z > 0.0f ? 0.0f : z);
        float p = expf(z);
        float g = p * (drow[c] - delta);
        if (form == 1) g *= f * (1.0f - f);
        else if (form == 2) g *= 1.0f - f * f;
        row[c] = p;
        drow[c] = g;
    }
}

/* The columns [lo, hi) of [k0, k1) a query tile reads: with its bias Bt (tq rows, stride bs2),
   from the first to the last finite entry over its rows (a row with none widens nothing); a causal
   staircase (causal) stops at lim, its last row's diagonal + 1. lo <= hi. */
static inline void tile_range(const float *Bt, int tq, int64_t bs2, int64_t k0, int64_t k1, int causal,
                              int64_t lim, int64_t *lo_out, int64_t *hi_out) {
    int64_t lo = k0, hi = k1;
    if (Bt) {
        lo = k1; hi = k0;
        for (int i = 0; i < tq; ++i) {
            const float *b = Bt + i * bs2;
            int64_t c = k0;
            while (c < k1 && b[c] == -INFINITY) ++c;
            if (c == k1) continue;
            if (c < lo) lo = c;
            int64_t e = k1;
            while (e > c && b[e - 1] == -INFINITY) --e;
            if (e > hi) hi = e;
        }
    }
    if (causal && hi > lim) hi = lim;
    if (hi < lo) hi = lo;
    *lo_out = lo;
    *hi_out = hi;
}

static inline const float *bias_row(const float *bias, int64_t r, int64_t R, int64_t X,
                                    int64_t bs0, int64_t bs1, int64_t bs2) {
    if (!bias) return 0;
    int64_t x = r % X, q = (r / X) % R, p = r / (X * R);
    return bias + p * bs0 + q * bs1 + x * bs2;
}

/* Rows r of s (n rows of L floats, contiguous; row r = (p * R + q) * X + x): y = a f(s) + bias,
   m[r] = max y (-inf: no allowed entry; the row becomes 0, den 0), s <- exp(max(y - m, fl)),
   den[r] = sum of the row. */
void pc_forward_rows(float *s, int64_t n, int64_t L, int form, float a,
                     const float *bias, int64_t R, int64_t X, int64_t bs0, int64_t bs1, int64_t bs2,
                     float fl, float *m_out, float *den_out, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t r = 0; r < n; ++r) {
        float *row = s + r * L;
        const float *b = bias_row(bias, r, R, X, bs0, bs1, bs2);
        float mx = row_scores(row, L, form, a, b, NO_INLINE);
        if (mx == -INFINITY) {
            for (int64_t c = 0; c < L; ++c) row[c] = 0.0f;
            m_out[r] = -INFINITY;
            den_out[r] = 0.0f;
            continue;
        }
        m_out[r] = mx;
        den_out[r] = row_exp_sum(row, L, mx, fl);
    }
}

/* Rows r of s (raw kernel scores) and ds (dP = dO V^T), n rows of L floats each, contiguous:
   p = exp(clamp(a f(s) + bias - lse[r], fl, 0)) into s, ds <- p (ds - delta[r]) f' into ds,
   f' = f (1 - f) (sigmoid), 1 - f^2 (tanh), 1 (identity); the factor a is the caller's. */
void pc_backward_rows(float *s, float *ds, int64_t n, int64_t L, int form, float a,
                      const float *bias, int64_t R, int64_t X, int64_t bs0, int64_t bs1, int64_t bs2,
                      const float *lse, const float *delta, float fl, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t r = 0; r < n; ++r) {
        float *row = s + r * L, *drow = ds + r * L;
        const float *b = bias_row(bias, r, R, X, bs0, bs1, bs2);
        row_grads(row, drow, L, form, a, b, lse[r], delta[r], fl, NO_INLINE);
    }
}

/* One call of the scored path, fused (FlashAttention's forward loop on the CPU): for each kernel
   row (p, r), its Lq queries (rows of D floats, packed) against its L keys / values, TQ query rows
   per task and TK keys per step. S = Q K^T through MKL's sgemm (torch's own, single-threaded inside
   this OpenMP region), y = a f(S) + bias, the online softmax (running max m, sum l, O rescaled),
   O += P V through sgemm; o = O / l (0 for a row with no allowed key: m -inf, l 0). A task reads
   only its rows' allowed column range (first to last finite bias), so a staircase skips its
   upper triangle. Masked entries weigh exp(fl), as in pc_forward_rows. */
void pc_flash_forward(const float *q, const float *k, const float *v, float *o,
                      int64_t P, int64_t R, int64_t Lq, int64_t L, int64_t D, int64_t Dv,
                      int64_t qs0, int64_t qs1, int64_t ks0, int64_t ks1, int64_t vs0, int64_t vs1,
                      int64_t os0, int64_t os1,
                      int form, float a, const float *bias, int64_t bs0, int64_t bs1, int64_t bs2,
                      int causal, int64_t causal_off, const float *slopes,
                      float fl, float *m_out, float *den_out, int TQ, int TK, int nthreads,
                      void *sgemm_p, float *ws) {
    sgemm_t sgemm = (sgemm_t)sgemm_p;
    int64_t nqt = (Lq + TQ - 1) / TQ, ntask = P * R * nqt;
    #pragma omp parallel num_threads(nthreads)
    {
        float *S = ws + (int64_t)omp_get_thread_num() * (TQ * TK + TQ * Dv + 2 * TQ);
        float *O = S + TQ * TK, *mi = O + TQ * Dv, *li = mi + TQ;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; ++t) {
            int64_t qt = t % nqt, pr = t / nqt, r = pr % R, p = pr / R;
            int64_t i0 = qt * TQ;
            int tq = (int)((Lq - i0) < TQ ? (Lq - i0) : TQ);
            const float *Q = q + p * qs0 + r * qs1 + i0 * D;
            const float *K = k + p * ks0 + r * ks1;
            const float *V = v + p * vs0 + r * vs1;
            const float *Bt = bias ? bias + p * bs0 + r * bs1 + i0 * bs2 : 0;
            int64_t lo, hi;
            tile_range(Bt, tq, bs2, 0, L, causal, i0 + tq + causal_off, &lo, &hi);
            const float msl = slopes ? slopes[p] : 0.0f;
            const int inl = causal || msl != 0.0f;
            for (int i = 0; i < tq; ++i) { mi[i] = -INFINITY; li[i] = 0.0f; }
            memset(O, 0, sizeof(float) * tq * Dv);
            const float one = 1.0f, zero = 0.0f;
            const int iD = (int)D, iDv = (int)Dv, iTK = TK;
            for (int64_t c0 = lo; c0 < hi; c0 += TK) {
                int n = (int)((hi - c0) < TK ? (hi - c0) : TK);
                sgemm("T", "N", &n, &tq, &iD, &one, K + c0 * D, &iD, Q, &iD, &zero, S, &iTK);
                for (int i = 0; i < tq; ++i) {
                    float *row = S + i * TK;
                    const float *b = Bt ? Bt + i * bs2 + c0 : 0;
                    const inl_t t = {inl, causal, c0, (float)(i0 + i + causal_off), msl};
                    float mx = row_scores(row, n, form, a, b, t);
                    float mnew = mx > mi[i] ? mx : mi[i];
                    if (mnew == -INFINITY) { memset(row, 0, sizeof(float) * n); continue; }
                    float alpha = mi[i] == -INFINITY ? 0.0f : expf(mi[i] - mnew);
                    float sum = row_exp_sum(row, n, mnew, fl);
                    li[i] = li[i] * alpha + sum;
                    mi[i] = mnew;
                    if (alpha != 1.0f) {
                        float *orow = O + i * Dv;
                        for (int d = 0; d < Dv; ++d) orow[d] *= alpha;
                    }
                }
                sgemm("N", "N", &iDv, &tq, &n, &one, V + c0 * Dv, &iDv, S, &iTK, &one, O, &iDv);
            }
            float *Od = o + p * os0 + r * os1 + i0 * Dv;
            float *mo = m_out + (p * R + r) * Lq + i0, *lo_ = den_out + (p * R + r) * Lq + i0;
            for (int i = 0; i < tq; ++i) {
                float inv = li[i] > 0.0f ? 1.0f / li[i] : 0.0f;
                for (int d = 0; d < Dv; ++d) Od[i * Dv + d] = O[i * Dv + d] * inv;
                mo[i] = mi[i];
                lo_[i] = li[i];
            }
        }
    }
}

/* The backward of pc_flash_forward's call, fused. A task is a kernel row (p, r) and a chunk of KC
   keys (so one long row still runs on every thread): over its query tiles, P = exp(clamp(a f(S) +
   bias - lse, fl, 0)), dP = dO V^T, dS = P (dP - delta) f'; dk += a dS^T Q and dv += P^T dO for its
   keys, into the caller's per-row buffers dk, dv ([P, R, L, D or Dv], packed), which it folds;
   dq += a dS K into the chunk's own dq (pointer + strides (p, r, chunk); the caller sums chunks). */
void pc_flash_backward(const float *q, const float *k, const float *v, const float *dout,
                       float *dq, float *dk, float *dv,
                       int64_t P, int64_t R, int64_t Lq, int64_t L, int64_t D, int64_t Dv,
                       int64_t qs0, int64_t qs1, int64_t ks0, int64_t ks1, int64_t vs0, int64_t vs1,
                       int64_t ds0, int64_t ds1, int64_t dqs0, int64_t dqs1, int64_t dqs2, int64_t KC,
                       int form, float a, const float *bias, int64_t bs0, int64_t bs1, int64_t bs2,
                       int causal, int64_t causal_off, const float *slopes,
                       const float *lse, const float *delta, float fl, int TQ, int TK, int nthreads,
                       void *sgemm_p, float *ws) {
    sgemm_t sgemm = (sgemm_t)sgemm_p;
    int64_t nkc = (L + KC - 1) / KC, ntask = P * R * nkc;
    #pragma omp parallel num_threads(nthreads)
    {
        float *S = ws + (int64_t)omp_get_thread_num() * 2 * TQ * TK, *G = S + TQ * TK;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; ++t) {
            int64_t kc = t % nkc, pr = t / nkc, r = pr % R, p = pr / R;
            int64_t k0 = kc * KC, k1 = (k0 + KC) < L ? (k0 + KC) : L;
            const float *K = k + p * ks0 + r * ks1, *V = v + p * vs0 + r * vs1;
            float *dK = dk + (p * R + r) * L * D, *dV = dv + (p * R + r) * L * Dv;
            const float one = 1.0f, zero = 0.0f;
            const int iD = (int)D, iDv = (int)Dv, iTK = TK;
            for (int64_t i0 = 0; i0 < Lq; i0 += TQ) {
                int tq = (int)((Lq - i0) < TQ ? (Lq - i0) : TQ);
                const float *Q = q + p * qs0 + r * qs1 + i0 * D;
                const float *dO = dout + p * ds0 + r * ds1 + i0 * Dv;
                float *dQ = dq + p * dqs0 + r * dqs1 + kc * dqs2 + i0 * D;
                const float *ls = lse + (p * R + r) * Lq + i0, *dl = delta + (p * R + r) * Lq + i0;
                const float *Bt = bias ? bias + p * bs0 + r * bs1 + i0 * bs2 : 0;
                int64_t lo, hi;
                tile_range(Bt, tq, bs2, k0, k1, causal, i0 + tq + causal_off, &lo, &hi);
                const float msl = slopes ? slopes[p] : 0.0f;
                const int inl = causal || msl != 0.0f;
                for (int64_t c0 = lo; c0 < hi; c0 += TK) {
                    int n = (int)((hi - c0) < TK ? (hi - c0) : TK);
                    sgemm("T", "N", &n, &tq, &iD, &one, K + c0 * D, &iD, Q, &iD, &zero, S, &iTK);
                    sgemm("T", "N", &n, &tq, &iDv, &one, V + c0 * Dv, &iDv, dO, &iDv, &zero, G, &iTK);
                    for (int i = 0; i < tq; ++i) {
                        const float *b = Bt ? Bt + i * bs2 + c0 : 0;
                        const inl_t t = {inl, causal, c0, (float)(i0 + i + causal_off), msl};
                        row_grads(S + i * TK, G + i * TK, n, form, a, b, ls[i], dl[i], fl, t);
                    }
                    sgemm("N", "T", &iDv, &n, &tq, &one, dO, &iDv, S, &iTK, &one, dV + c0 * Dv, &iDv);
                    sgemm("N", "T", &iD, &n, &tq, &a, Q, &iD, G, &iTK, &one, dK + c0 * D, &iD);
                    sgemm("N", "N", &iD, &tq, &n, &a, K + c0 * D, &iD, G, &iTK, &one, dQ, &iD);
                }
            }
        }
    }
}
"""

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
FORMS = {"none": 0, "sigmoid": 1, "tanh": 2}

#: query rows per task and keys per step of ``flash_forward`` (a 32 KiB score tile: L1-sized)
FLASH_TQ, FLASH_TK = 64, 128
#: the fewest keys per task of ``flash_backward``, which cuts a call's kernel rows into key
#: chunks where it has fewer rows than 4 x threads (each chunk adds a ``dq`` partial)
FLASH_KC = 512
#: set False to run the scored forward as matmul + ``forward_rows`` + matmul (``flash_forward`` None)
USE_FLASH = os.environ.get("PATTERNC_NATIVE_FLASH", "1") != "0"

_lock = threading.Lock()
_state: dict = {}


def _cpu_ok() -> str | None:
    """None when this CPU runs the kernels (x86-64 with AVX2 and FMA), else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    cap = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if cap not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {cap or 'unknown'!r}, not AVX2"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None  # torch says AVX2 (its AVX2 kernels assume FMA too)
    return None if "fma" in flags else "the CPU has no FMA"


def _cache_dir() -> Path:
    root = os.environ.get("PATTERNC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "patternc")
    return Path(root) / "native"


def _build() -> tuple:
    """``(library, None)`` or ``(None, reason)``."""
    if os.environ.get("PATTERNC_NATIVE", "1") == "0":
        return None, "disabled by PATTERNC_NATIVE=0"
    why = _cpu_ok()
    if why:
        return None, why
    got = _target()
    if isinstance(got, str):
        return None, got
    cc, target = got
    lib = None
    for attempt in range(2):
        if not target.exists():
            why = _compile(cc, target)
            if why:
                return None, why
        try:
            lib = ctypes.CDLL(str(target))
            break
        except OSError as e:
            if attempt:
                return None, f"could not load {target}: {e}"
            try:  # a damaged file from elsewhere: build it again, once
                target.unlink()
            except OSError:
                return None, f"could not load {target}: {e}"
    i64, f32, ptr, cint = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.pc_forward_rows.restype = None
    lib.pc_forward_rows.argtypes = [ptr, i64, i64, cint, f32, ptr, i64, i64, i64, i64, i64, f32, ptr, ptr, cint]
    lib.pc_backward_rows.restype = None
    lib.pc_backward_rows.argtypes = [ptr, ptr, i64, i64, cint, f32, ptr, i64, i64, i64, i64, i64, ptr, ptr, f32,
                                     cint]
    lib.pc_flash_forward.restype = None
    lib.pc_flash_forward.argtypes = [ptr] * 4 + [i64] * 14 + [cint, f32, ptr, i64, i64, i64, cint, i64, ptr, f32,
                                                              ptr, ptr, cint, cint, cint, ptr, ptr]
    lib.pc_flash_backward.restype = None
    lib.pc_flash_backward.argtypes = [ptr] * 7 + [i64] * 18 + [cint, f32, ptr, i64, i64, i64, cint, i64, ptr,
                                                               ptr, ptr, f32, cint, cint, cint, ptr, ptr]
    return lib, None


def _sgemm() -> int | None:
    """The address of the BLAS ``sgemm_`` torch itself links (MKL on x86-64 builds), or None."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            try:
                return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


def _target():
    """``(compiler argv, library path in the cache)`` or why there is none. The compiler's
    ``--version`` is part of the name: an upgrade builds anew."""
    env_cc = os.environ.get("CC")
    cc = shlex.split(env_cc) if env_cc else [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc or not cc[0]:
        return "no C compiler (set CC, or install gcc)"
    try:
        ident = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run the C compiler {' '.join(cc)!r}: {e}"
    digest = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), " ".join(cc), ident]).encode()).hexdigest()[:16]
    return cc, _cache_dir() / f"scored_rows_{digest}.so"


def _compile(cc: list, target: Path) -> str | None:
    """Build ``target``; None, or why not."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "scored_rows.c"
            src.write_text(SOURCE)
            out = Path(tmp) / target.name
            res = subprocess.run([*cc, *FLAGS, "-o", str(out), str(src), "-lm"], capture_output=True,
                                 text=True, timeout=120)
            if res.returncode != 0:
                msg = (res.stderr.strip() or res.stdout.strip())[-400:]
                return f"{' '.join(cc)} failed (exit {res.returncode}){': ' + msg if msg else ''}"
            os.replace(out, target)  # atomic: no half file, concurrent builders agree
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not build in {target.parent}: {e}"
    return None


def _lib():
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _build()
            _state["path"] = None if _state["lib"] is None else _state["lib"]._name
            _state["sgemm"] = None if _state["lib"] is None or not USE_FLASH else _sgemm()
    return _state["lib"]


def status() -> str:
    """``"loaded: PATH"`` or ``"unavailable: REASON"`` (builds on first call)."""
    lib = _lib()
    if lib is None:
        return f"unavailable: {_state['why']}"
    if _state["sgemm"]:
        fused = "fused calls"
    elif not USE_FLASH:
        fused = "row kernels only: fused calls off by PATTERNC_NATIVE_FLASH=0"
    else:
        fused = "row kernels only: torch's library exports no sgemm_"
    return f"loaded: {_state['path']} ({fused})"


def _bias_args(bias, shape):
    """Pointer and element strides of ``bias`` (broadcastable to ``shape`` ``[P, R, X, L]``,
    float32, unit column stride) for rows ``(p * R + q) * X + x``."""
    if bias is None:
        return None, 0, 0, 0
    b = bias.expand(shape)
    if b.stride(3) != 1 or b.dtype != torch.float32:
        b = b.contiguous().float()
    return b.data_ptr(), b.stride(0), b.stride(1), b.stride(2), b


def _key_chunk(L: int, rows: int, threads: int) -> int:
    """Keys per ``flash_backward`` task: all ``L`` where ``rows`` kernel rows give the threads
    enough tasks (4 each), else about ``L / ceil(4 threads / rows)``, at least ``FLASH_KC``."""
    want = cdiv(4 * threads, max(1, rows))
    return L if want <= 1 else max(FLASH_KC, cdiv(L, want))


def _inline_args(causal_off, slopes, P: int) -> tuple:
    """``(causal, causal_off, slopes pointer)`` for the fused calls (``slopes``, float32 ``[P]``,
    must stay alive for the call: the caller holds it)."""
    if slopes is not None and not (slopes.dtype == torch.float32 and slopes.is_contiguous()
                                   and tuple(slopes.shape) == (P,)):
        raise ValueError("slopes must be contiguous float32 [P]")
    return int(causal_off is not None), int(causal_off or 0), None if slopes is None else slopes.data_ptr()


def _check_packed(name: str, *views) -> None:
    """The fused calls' operands: ``(tensor, width)`` float32 CPU views whose rows are packed
    (strides ``(*, *, width, 1)``)."""
    for t, w in views:
        if not (t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 and t.stride(-2) == w):
            raise ValueError(f"{name} takes float32 CPU views with packed rows")


def _check(s: torch.Tensor) -> None:
    if not (s.dtype == torch.float32 and s.is_contiguous() and s.dim() == 4 and s.device.type == "cpu"):
        raise ValueError("native row kernels take contiguous float32 CPU scores [P, R, X, L]")


def kernels():
    """The loaded library (an object with ``forward_rows`` / ``backward_rows`` below), or None."""
    return _NATIVE if _lib() is not None else None


class _Native:
    @staticmethod
    def forward_rows(s: torch.Tensor, form: str, a: float, bias, floor: float):
        """In place on ``s`` float32 contiguous ``[P, R, X, L]`` (raw kernel scores):
        ``exp(max(a f(s) + bias - m, floor))``; returns ``(m, den)`` float32 ``[P, R, X, 1]``
        (``m`` -inf and ``den`` 0 for a row with no allowed entry, whose ``s`` becomes 0).
        ``bias``: None or float32 broadcastable to ``s`` (0 / -inf mask, + ALiBi)."""
        _check(s)
        P, R, X, L = s.shape
        m = torch.empty((P, R, X, 1), dtype=torch.float32)
        den = torch.empty((P, R, X, 1), dtype=torch.float32)
        bp, b0, b1, b2, *keep = _bias_args(bias, s.shape)
        _lib().pc_forward_rows(s.data_ptr(), P * R * X, L, FORMS[form], float(a), bp, R, X, b0, b1, b2,
                               float(floor), m.data_ptr(), den.data_ptr(), torch.get_num_threads())
        del keep
        return m, den

    @staticmethod
    def backward_rows(s: torch.Tensor, ds: torch.Tensor, form: str, a: float, bias, lse: torch.Tensor,
                      delta: torch.Tensor, floor: float) -> None:
        """In place: ``s`` (raw kernel scores, float32 contiguous ``[P, R, X, L]``) becomes
        ``p = exp(clamp(a f(s) + bias - lse, floor, 0))``, ``ds`` (``dO V^T``, same shape) becomes
        ``p (ds - delta) f'``. ``lse`` / ``delta``: float32 ``[P, R, X]`` (the kernel frame's
        log-sum-exp, ``rowsum(dO * O)``)."""
        _check(s)
        _check(ds)
        P, R, X, L = s.shape
        lse = lse.to(torch.float32).contiguous()
        delta = delta.to(torch.float32).contiguous()
        bp, b0, b1, b2, *keep = _bias_args(bias, s.shape)
        _lib().pc_backward_rows(s.data_ptr(), ds.data_ptr(), P * R * X, L, FORMS[form], float(a), bp, R, X,
                                b0, b1, b2, lse.data_ptr(), delta.data_ptr(), float(floor), torch.get_num_threads())
        del keep

    @property
    def has_flash(self) -> bool:
        """True when ``flash_forward`` runs (torch's library exports ``sgemm_``)."""
        return bool(_state.get("sgemm"))

    @staticmethod
    def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, form: str, a: float,
                      bias, floor: float, *, causal_off: int | None = None, slopes: torch.Tensor | None = None):
        """One fused call: ``out`` (float32 ``[P, R, Lq, Dv]``, rows packed) <- softmax(``a f(q k^T) +
        bias``) ``v`` for ``q`` ``[P, R, Lq, D]``, ``k`` ``[P, R, L, D]``, ``v`` ``[P, R, L, Dv]`` (float32
        views whose rows are packed: strides ``(*, *, D or Dv, 1)``; ``bias`` None or float32
        broadcastable to ``[P, R, Lq, L]``). Returns ``(m, den)`` float32 ``[P, R, Lq, 1]``: the row
        max of ``y`` and the sum of ``exp(y - m)`` (lse = m + log den; -inf and 0, and a 0 row of
        ``out``, for a row with no allowed key). No score-sized tensor is made.

        Inline terms, for a causal staircase without a bias tensor: ``causal_off`` (query row ``i``
        allows columns ``c <= i + causal_off``) and ``slopes`` (float32 ``[P]``: ``+ m_p (c - i -
        causal_off)``, ALiBi centred on each row's last allowed key; the caller keeps the rest)."""
        P, R, Lq, D = q.shape
        L, Dv = k.shape[2], v.shape[-1]
        _check_packed("flash_forward", (q, D), (k, D), (v, Dv), (out, Dv))
        m = torch.empty((P, R, Lq, 1), dtype=torch.float32)
        den = torch.empty((P, R, Lq, 1), dtype=torch.float32)
        nt = torch.get_num_threads()
        ws = torch.empty(nt * (FLASH_TQ * FLASH_TK + FLASH_TQ * Dv + 2 * FLASH_TQ), dtype=torch.float32)
        bp, b0, b1, b2, *keep = _bias_args(bias, (P, R, Lq, L))
        _lib().pc_flash_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), P, R, Lq, L, D, Dv,
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                out.stride(0), out.stride(1), FORMS[form], float(a), bp, b0, b1, b2,
                                *_inline_args(causal_off, slopes, P), float(floor),
                                m.data_ptr(), den.data_ptr(), FLASH_TQ, FLASH_TK, nt, _state["sgemm"], ws.data_ptr())
        del keep
        return m, den

    @staticmethod
    def flash_backward(q, k, v, dout, dq, form: str, a: float, bias, lse, delta, floor: float, *,
                       causal_off: int | None = None, slopes: torch.Tensor | None = None):
        """The backward of one ``flash_forward`` call: ``dq`` (a view like ``q``) += ``a dS K``;
        returns ``(dk, dv)`` float32 ``[P, R, L, D or Dv]`` (``a dS^T Q`` and ``P^T dO`` per kernel row,
        for the caller to fold onto the keys each row read). ``lse`` / ``delta``: float32
        ``[P, R, Lq]`` (the kernel frame's log-sum-exp, ``rowsum(dO * O)``); views as in
        ``flash_forward`` (and its inline terms). Tasks are (kernel row, key chunk): where there
        are fewer kernel rows than ``4 x threads``, a row's keys are cut into chunks (at least
        ``FLASH_KC``), shared by the threads, each with its own ``dq`` partial, summed here (at
        most ``4 x threads`` partials of the call's rows)."""
        P, R, Lq, D = q.shape
        L, Dv = k.shape[2], v.shape[-1]
        _check_packed("flash_backward", (q, D), (k, D), (v, Dv), (dout, Dv), (dq, D))
        dk = torch.zeros((P, R, L, D), dtype=torch.float32)
        dv = torch.zeros((P, R, L, Dv), dtype=torch.float32)
        nt = torch.get_num_threads()
        kc = _key_chunk(L, P * R, nt)
        nkc = cdiv(L, kc)
        part = dq if nkc == 1 else torch.zeros((P, R, nkc, Lq, D), dtype=torch.float32)
        ws = torch.empty(nt * 2 * FLASH_TQ * FLASH_TK, dtype=torch.float32)
        s2 = 0 if nkc == 1 else part.stride(2)
        lse = lse.to(torch.float32).contiguous()
        delta = delta.to(torch.float32).contiguous()
        bp, b0, b1, b2, *keep = _bias_args(bias, (P, R, Lq, L))
        _lib().pc_flash_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), part.data_ptr(),
                                 dk.data_ptr(), dv.data_ptr(), P, R, Lq, L, D, Dv, q.stride(0), q.stride(1),
                                 k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
                                 part.stride(0), part.stride(1), s2, kc, FORMS[form], float(a), bp, b0, b1,
                                 b2, *_inline_args(causal_off, slopes, P), lse.data_ptr(), delta.data_ptr(),
                                 float(floor), FLASH_TQ, FLASH_TK, nt, _state["sgemm"], ws.data_ptr())
        del keep
        if nkc > 1:
            dq.add_(part.sum(2))
        return dk, dv


_NATIVE = _Native()
