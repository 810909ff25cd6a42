"""The scored path's row kernels in C (AVX2 + FMA, OpenMP), built at first use.

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

The source is compiled once per machine with the C compiler (``$CC``, split like a shell word list,
else ``cc`` / ``gcc``) into ``$PATTERNC_CACHE_DIR`` (default ``~/.cache/patternc``), named by a
hash of the source, the flags and the compiler's ``--version``; a file there that does not load
is built again once. It is written to a temporary file and renamed (no half file; concurrent
processes are fine), and loaded with ``ctypes`` (which releases the GIL). It links ``libgomp.so.1`` by soname, so in a process
where torch has loaded its own OpenMP runtime the kernels share torch's thread pool (two pools
would spin against each other). Where anything is missing (no x86-64 CPU with AVX2 and FMA, no
compiler, a failed build, ``PATTERNC_NATIVE=0``) ``kernels()`` returns None and the scored path
keeps its torch ops: same results, slower; ``status()`` says which and why.

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

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

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
        const __m256 va = _mm256_set1_ps(a);
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        int64_t c = 0;
        for (; c + 8 <= L; c += 8) {
            __m256 y = vf(_mm256_loadu_ps(row + c), form);
            y = form ? _mm256_mul_ps(va, y) : y;
            if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + c));
            _mm256_storeu_ps(row + c, y);
            vmax = _mm256_max_ps(vmax, y);
        }
        float mx = hmax(vmax);
        for (; c < L; ++c) {
            float y = sf(row[c], form);
            y = form ? a * y : y;
            if (b) y += b[c];
            row[c] = y;
            if (y > mx) mx = y;
        }
        if (mx == -INFINITY) {
            for (c = 0; c < L; ++c) row[c] = 0.0f;
            m_out[r] = -INFINITY;
            den_out[r] = 0.0f;
            continue;
        }
        const __m256 vm = _mm256_set1_ps(mx), vfl = _mm256_set1_ps(fl);
        __m256 vsum = _mm256_setzero_ps();
        for (c = 0; c + 8 <= L; c += 8) {
            __m256 e = exp256(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(row + c), vm), vfl));
            _mm256_storeu_ps(row + c, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (; c < L; ++c) {
            float z = row[c] - mx;
            float e = expf(z < fl ? fl : z);
            row[c] = e;
            sum += e;
        }
        m_out[r] = mx;
        den_out[r] = sum;
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
        const __m256 va = _mm256_set1_ps(a), one = _mm256_set1_ps(1.0f);
        const __m256 vl = _mm256_set1_ps(lse[r]), vd = _mm256_set1_ps(delta[r]);
        const __m256 vfl = _mm256_set1_ps(fl), zero = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= L; c += 8) {
            __m256 f = vf(_mm256_loadu_ps(row + c), form);
            __m256 y = form ? _mm256_mul_ps(va, f) : f;
            if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + c));
            __m256 p = exp256(_mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(y, vl), vfl), zero));
            __m256 g = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(drow + c), vd));
            if (form == 1) g = _mm256_mul_ps(g, _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
            else if (form == 2) g = _mm256_mul_ps(g, _mm256_fnmadd_ps(f, f, one));
            _mm256_storeu_ps(row + c, p);
            _mm256_storeu_ps(drow + c, g);
        }
        for (; c < L; ++c) {
            float f = sf(row[c], form);
            float y = form ? a * f : f;
            if (b) y += b[c];
            float z = y - lse[r];
            z = z < fl ? fl : (z > 0.0f ? 0.0f : z);
            float p = expf(z);
            float g = p * (drow[c] - delta[r]);
            if (form == 1) g *= f * (1.0f - f);
            else if (form == 2) g *= 1.0f - f * f;
            row[c] = p;
            drow[c] = g;
        }
    }
}
"""

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
FORMS = {"none": 0, "sigmoid": 1, "tanh": 2}

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
    return lib, None


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
    return _state["lib"]


def status() -> str:
    """``"loaded: PATH"`` or ``"unavailable: REASON"`` (builds on first call)."""
    lib = _lib()
    return f"loaded: {_state['path']}" if lib is not None else f"unavailable: {_state['why']}"


def _bias_args(bias, shape):
    """Pointer and element strides of ``bias`` (broadcastable to ``shape`` ``[P, R, X, L]``,
    float32, unit column stride) for rows ``(p * R + q) * X + x``."""
    if bias is None:
        return None, 0, 0, 0
    b = bias.expand(shape)
    if b.stride(3) != 1 or b.dtype != torch.float32:
        b = b.contiguous().float()
    return b.data_ptr(), b.stride(0), b.stride(1), b.stride(2), b


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


_NATIVE = _Native()
