"""Single-row matrix-vector products (batch-1 decoding) that stream weights at the CPU's memory bandwidth.

At batch 1 an LM's decode step is a chain of matrix-vector products: every weight is read once and used for one
multiply-add, so its speed is the rate at which the weights stream from memory. PyTorch's stock CPU kernels reach
that rate for fp32 only roughly, and reach well under half of it for bf16 weights and for int8 weight-only
(``_weight_int8pack_mm`` is compute-bound for one row). The kernels here, in a small C file compiled with the system C
compiler on first use (AVX512; loaded with ctypes, no torch headers, cached under ``$ZOO_HOME/kernels``):

* read each weight row as one sequential stream (a software prefetch runs ahead of it; measured on the Zen 4 VM this
  project first ran on, several interleaved row streams read markedly slower than one; on the current Xeon they read
  no faster either);
* widen bf16 weights to fp32 by a 16-bit shift and int8 weights by a sign-extending convert, then use fp32 FMAs, so
  every product is exact and sums are fp32: the math of ``F.linear`` on the dequantized weights, up to summation
  order (int8: the per-row scale multiplies the finished dot product; activations are never quantized);
* accept any K (masked tail) and split rows over ``torch.get_num_threads()`` threads of a persistent pool (rows are
  independent, so the result does not depend on the thread count).

:func:`linear` is ``F.linear`` with these paths for single-row inference products; anything else (autograd, batches,
other devices or dtypes, a missing compiler, a non-AVX512 CPU, ``ZOO_DISABLE_{F32,BF16,INT8}_GEMV=1``) runs the stock
product. :func:`int8_linear` is the int8 weight-only product (per-output-row scales) with the same fallback
(``_weight_int8pack_mm``).

Once the products stream at bandwidth, the Python around them is the rest of a step (~0.4 ms per layer). A
:class:`StepProgram` records a whole batch-1 decode step as a list of these kernel calls over fixed buffers and runs
it with one C call per token (``zoo_run``); :func:`move_to_arena` lays the recorded matrices out in reading order in one
buffer of 2 MiB pages. ``ZOO_DISABLE_STEP_PROGRAM=1`` turns programs off.

Prompts (prefill) are the opposite case: many rows per weight, so the products are compute-bound. For bf16 on CPUs with
AMX (Sapphire Rapids and later; the same C file, built with ``-mamx-tile -mamx-bf16`` where the compiler knows them)
:func:`prefill_linear` multiplies on AMX tiles without reordering the weight: its plain rows are the tiles' A operand
(16 outputs x 32 k), the activations are packed once per call into B tiles (VNNI pairs), and each finished 32 x 32
block is transposed into the output in pieces that run inside the next block's multiplies. Its epilogues add a
residual or apply SiLU x up where the PyTorch ops would round; :func:`prefill_ffn` runs a SwiGLU feed-forward in one
call, the hidden activations going straight from the first product's epilogue into the second product's tile layout.
:func:`attn_prefill` (causal grouped-query attention), :func:`rope_prompt`, :func:`conv_prefill` and :func:`rms_norm`
cover the rest of a bf16 prompt. ``ZOO_DISABLE_AMX_GEMM=1`` turns the AMX products and attention off.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["linear", "int8_linear", "use_hugepages", "move_to_arena", "rms_norm", "attn_decode", "conv_step", "rope",
           "kernels_available", "reset", "StepProgram", "NotProgrammable", "prefill_linear", "prefill_ffn",
           "attn_prefill", "rope_prompt", "conv_prefill"]

# fp32 rows: 4 accumulators x 16 lanes; bf16 rows: shift to fp32; int8 rows: sign-extend + convert; all FMA.
_GEMV_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <math.h>

#define PF 2048 /* bytes the software prefetch runs ahead of the row stream (fp32 over 2 MiB pages, CPU time: 15.0 GB/s
                   at 768, 18.1 at 2048, 18.6 at 4096; int8 9.7 / 10.6 / 9.0) */

static inline __m512 ld_f32(const void *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld_bf16(const void *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 ld_i8(const void *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline __m512 ldm_f32(__mmask16 m, const void *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 ldm_bf16(__mmask16 m, const void *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 ldm_i8(__mmask16 m, const void *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

/* dot(w_row, x) for one row of K weights of ES bytes each; fixed summation order for a given K. */
#define DOT(NAME, ES, LD, LDM)                                                                                    \
static float NAME(const char *w, const float *x, int64_t k) {                                                    \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                                   \
    int64_t j = 0;                                                                                                \
    for (; j + 64 <= k; j += 64) {                                                                                \
        for (int l = 0; l < 64 * ES; l += 64) _mm_prefetch(w + j * ES + PF + l, _MM_HINT_T0);                     \
        a0 = _mm512_fmadd_ps(LD(w + j * ES), _mm512_loadu_ps(x + j), a0);                                         \
        a1 = _mm512_fmadd_ps(LD(w + (j + 16) * ES), _mm512_loadu_ps(x + j + 16), a1);                             \
        a2 = _mm512_fmadd_ps(LD(w + (j + 32) * ES), _mm512_loadu_ps(x + j + 32), a2);                             \
        a3 = _mm512_fmadd_ps(LD(w + (j + 48) * ES), _mm512_loadu_ps(x + j + 48), a3);                             \
    }                                                                                                             \
    for (; j + 16 <= k; j += 16) a0 = _mm512_fmadd_ps(LD(w + j * ES), _mm512_loadu_ps(x + j), a0);                \
    if (j < k) {                                                                                                  \
        __mmask16 m = (__mmask16)((1u << (k - j)) - 1);                                                           \
        a1 = _mm512_fmadd_ps(LDM(m, w + j * ES), _mm512_maskz_loadu_ps(m, x + j), a1);                            \
    }                                                                                                             \
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));                    \
}
DOT(dot_f32, 4, ld_f32, ldm_f32)
DOT(dot_bf16, 2, ld_bf16, ldm_bf16)
DOT(dot_i8, 1, ld_i8, ldm_i8)

static inline uint16_t to_bf16(float f) { /* round to nearest even, like torch's float -> bfloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
/* 16 floats to bf16, round to nearest even like to_bf16 (NaN payloads aside) */
static inline __m256i bf16_round(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
static inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
static inline __m512 bf16_trunc(__m512 x) { return bf16_to_f32(bf16_round(x)); } /* x rounded to bf16, as fp32 */
static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* wkind 0 fp32, 1 bf16, 2 int8 (scale: one per row, fp32 if !sbf else bf16); y fp32 (ybf 0) or bf16 (ybf 1). */
typedef struct { int wkind, sbf, ybf; const char *w; const float *x; const void *s; void *y; int64_t k; } job_t;

static void rows(const job_t *j, int64_t n0, int64_t n1) {
    int64_t es = j->wkind == 0 ? 4 : j->wkind == 1 ? 2 : 1;
    for (int64_t n = n0; n < n1; n++) {
        const char *w = j->w + n * j->k * es;
        float v = j->wkind == 0 ? dot_f32(w, j->x, j->k) : j->wkind == 1 ? dot_bf16(w, j->x, j->k)
                                                                         : dot_i8(w, j->x, j->k);
        if (j->wkind == 2) v *= j->sbf ? from_bf16(((const uint16_t *)j->s)[n]) : ((const float *)j->s)[n];
        if (j->ybf) ((uint16_t *)j->y)[n] = to_bf16(v); else ((float *)j->y)[n] = v;
    }
}

/* RMSNorm of m rows of k: fp32 as F.rms_norm (x * rsqrt(mean(x^2) + eps) * w); bf16 as the hybrid LMs' RMSNorm
   (statistics in fp32, the normalised row rounded to bf16, then times the bf16 weight, rounded again). */
void zoo_rmsnorm(const void *x, const void *w, void *y, int bf, int64_t m, int64_t k, float eps) {
    for (int64_t r = 0; r < m; r++) {
        __m512 acc = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j < k; j += 16) {
            __mmask16 mk = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
            __m512 v = bf ? ldm_bf16(mk, (const uint16_t *)x + r * k + j) : ldm_f32(mk, (const float *)x + r * k + j);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)k + eps);
        if (bf) {
            __m512 vi = _mm512_set1_ps(inv);
            for (j = 0; j < k; j += 16) {
                __mmask16 mk = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
                __m512 h = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round(
                    _mm512_mul_ps(ldm_bf16(mk, (const uint16_t *)x + r * k + j), vi))), 16));
                _mm256_mask_storeu_epi16((uint16_t *)y + r * k + j, mk,
                                         bf16_round(_mm512_mul_ps(ldm_bf16(mk, (const uint16_t *)w + j), h)));
            }
            continue;
        }
        for (j = 0; j < k; j++) ((float *)y)[r * k + j] = ((const float *)x)[r * k + j] * inv * ((const float *)w)[j];
    }
}

/* exp for softmax: 2^n * e^f with n = round(x / ln2), |f| <= ln2 / 2, degree-6 polynomial (~1 ulp); x <= 0 here. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* exp(-x) for any x (silu): the same polynomial, inputs clamped so the result saturates to 0 / inf like expf */
static inline __m512 exp512neg(__m512 x) {
    __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    return exp512(y);
}

/* sums of 16 vectors: lane l of the result is the sum of v[l]'s lanes (a transpose-and-add tree: 15 adds for 16
   sums instead of one full horizontal reduction each) */
static inline __m512 hsum16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* halves: [a_lo + a_hi | b_lo + b_hi], 8 partial sums each */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 128-bit lanes: one source vector per lane, 4 partial sums each */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
    /* the tree leaves source i in lane 4 * (i % 4) + i / 4: put it back in lane i */
    const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(perm, r);
}

/* Scores of one query head against keys [j0, j0 + nj), nj <= 16 (q: NV fp32 vectors): one FMA chain per key, then
   the 16 sums at once. NV is a compile-time constant where inlined with one (hd 64 / 128), so q and the chain stay
   in registers. */
static inline __m512 scores16(const char *kb, int bf, int64_t hd, int64_t j0, int64_t nj, const __m512 *q, int NV,
                              __mmask16 tail) {
    __m512 part[16];
    for (int64_t jj = 0; jj < 16; jj++) {
        __m512 a = _mm512_setzero_ps();
        if (jj < nj) {
            const char *row = kb + (j0 + jj) * hd * (bf ? 2 : 4);
            _mm_prefetch(row + 32 * hd * (bf ? 2 : 4), _MM_HINT_T0); /* the row 32 keys ahead */
            for (int i = 0; i < NV; i++) {
                __mmask16 mk = i == NV - 1 ? tail : (__mmask16)0xffff;
                __m512 kv = bf ? ldm_bf16(mk, row + i * 32) : ldm_f32(mk, row + i * 64);
                a = _mm512_fmadd_ps(kv, q[i], a);
            }
        }
        part[jj] = a;
    }
    return hsum16(part);
}

/* out (NV vectors) = sum_j p[j] * v_j over S value rows */
static inline void weighted_rows(const char *vb, int bf, int64_t hd, int64_t S, const float *p, __m512 *acc, int NV,
                                 __mmask16 tail) {
    for (int i = 0; i < NV; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        const char *row = vb + j * hd * (bf ? 2 : 4);
        _mm_prefetch(row + 32 * hd * (bf ? 2 : 4), _MM_HINT_T0);
        __m512 pj = _mm512_set1_ps(p[j]);
        for (int i = 0; i < NV; i++) {
            __mmask16 mk = i == NV - 1 ? tail : (__mmask16)0xffff;
            acc[i] = _mm512_fmadd_ps(pj, bf ? ldm_bf16(mk, row + i * 32) : ldm_f32(mk, row + i * 64), acc[i]);
        }
    }
}

/* One query per row against a KV cache (decode attention): q [B, H, hd] contiguous, k / v [B, KVH, S, hd] with
   row strides (sb, sh) and contiguous [S, hd] blocks, keep [B, S] (1 = visible) or NULL, o [B, H, hd]; head h reads
   kv head h / (H / KVH). Scores and softmax in fp32, output rounded to the dtype once. Query heads sharing a kv head
   run one after another, so their keys and values come from cache after the first. */
#define ATT_MAXV 32 /* hd <= 512 */
typedef struct { const void *q, *k, *v; void *o; const uint8_t *keep; int bf; int64_t B, H, KVH, S, hd, sb, sh;
                 float scale; } attn_t;

/* Two query heads of one kv head (h, h + 1), sharing every key / value load and its bf16 widening, in ONE pass over
   the cache: per block of 8 keys, the 8 x 2 scores through one 16-sum tree, then the block's values weighted at once
   (online softmax: a running maximum per head; sums and outputs rescaled when it grows). Keys and values stream
   together, so the memory reads overlap the arithmetic of the block before. fp32 throughout, one rounding at the end. */
static inline void attn_pair(const attn_t *A, int64_t b, int64_t h, float *sa, float *sb_, int NV, __mmask16 tail) {
    (void)sa; (void)sb_;
    int bf = A->bf;
    int64_t H = A->H, S = A->S, hd = A->hd, g = h / (A->H / A->KVH), es = bf ? 2 : 4, rb = hd * es;
    const char *kb = (const char *)A->k + (b * A->sb + g * A->sh) * es;
    const char *vb = (const char *)A->v + (b * A->sb + g * A->sh) * es;
    __m512 qa[ATT_MAXV], qb[ATT_MAXV], aa[ATT_MAXV], ab[ATT_MAXV];
    for (int i = 0; i < NV; i++) {
        __mmask16 mk = i == NV - 1 ? tail : (__mmask16)0xffff;
        const char *qa_p = (const char *)A->q + ((b * H + h) * hd + i * 16) * es, *qb_p = qa_p + hd * es;
        qa[i] = bf ? ldm_bf16(mk, qa_p) : ldm_f32(mk, qa_p);
        qb[i] = bf ? ldm_bf16(mk, qb_p) : ldm_f32(mk, qb_p);
        aa[i] = ab[i] = _mm512_setzero_ps();
    }
    float ma = -INFINITY, mb = -INFINITY, suma = 0.0f, sumb = 0.0f;
    for (int64_t j0 = 0; j0 < S; j0 += 8) {
        int64_t nj = S - j0 < 8 ? S - j0 : 8;
        __m512 part[16];
        for (int64_t jj = 0; jj < 8; jj++) {
            __m512 x0 = _mm512_setzero_ps(), x1 = x0;
            if (jj < nj) {
                const char *row = kb + (j0 + jj) * rb;
                for (int64_t l = 0; l < rb; l += 64) {
                    _mm_prefetch(row + 32 * rb + l, _MM_HINT_T0);
                    _mm_prefetch(vb + (j0 + jj + 32) * rb + l, _MM_HINT_T0);
                }
                for (int i = 0; i < NV; i++) {
                    __mmask16 mk = i == NV - 1 ? tail : (__mmask16)0xffff;
                    __m512 kv = bf ? ldm_bf16(mk, row + i * 32) : ldm_f32(mk, row + i * 64);
                    x0 = _mm512_fmadd_ps(kv, qa[i], x0);
                    x1 = _mm512_fmadd_ps(kv, qb[i], x1);
                }
            }
            part[jj] = x0;
            part[8 + jj] = x1;
        }
        /* lanes 0-7: head h's scores of keys j0.., lanes 8-15: head h + 1's */
        __m512 x = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(A->scale));
        __mmask16 live = (__mmask16)((1u << nj) - 1);
        live |= (__mmask16)(live << 8);
        if (A->keep) {
            __m128i kp = _mm_maskz_loadu_epi8((__mmask16)((1u << nj) - 1), A->keep + b * S + j0);
            __mmask16 seen = (__mmask16)_mm_test_epi8_mask(kp, kp) & 0xff;
            live &= (__mmask16)(seen | (seen << 8));
        }
        if (!live) continue;
        float ba = _mm512_mask_reduce_max_ps(live & 0x00ff, x), bb = _mm512_mask_reduce_max_ps(live & 0xff00, x);
        float na = ba > ma ? ba : ma, nb = bb > mb ? bb : mb;
        if (na > ma && ma > -INFINITY) { /* a larger maximum: what was summed so far shrinks by exp(old - new) */
            float c = expf(ma - na);
            suma *= c;
            for (int i = 0; i < NV; i++) aa[i] = _mm512_mul_ps(aa[i], _mm512_set1_ps(c));
        }
        if (nb > mb && mb > -INFINITY) {
            float c = expf(mb - nb);
            sumb *= c;
            for (int i = 0; i < NV; i++) ab[i] = _mm512_mul_ps(ab[i], _mm512_set1_ps(c));
        }
        ma = na;
        mb = nb;
        __m512 mv = _mm512_mask_mov_ps(_mm512_set1_ps(na), 0xff00, _mm512_set1_ps(nb));
        __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, mv))); /* masked keys: exactly 0 */
        suma += _mm512_mask_reduce_add_ps(0x00ff, e);
        sumb += _mm512_mask_reduce_add_ps(0xff00, e);
        float p[16];
        _mm512_storeu_ps(p, e);
        for (int64_t jj = 0; jj < nj; jj++) {
            const char *row = vb + (j0 + jj) * rb;
            __m512 pa = _mm512_set1_ps(p[jj]), pb = _mm512_set1_ps(p[8 + jj]);
            for (int i = 0; i < NV; i++) {
                __mmask16 mk = i == NV - 1 ? tail : (__mmask16)0xffff;
                __m512 vv = bf ? ldm_bf16(mk, row + i * 32) : ldm_f32(mk, row + i * 64);
                aa[i] = _mm512_fmadd_ps(pa, vv, aa[i]);
                ab[i] = _mm512_fmadd_ps(pb, vv, ab[i]);
            }
        }
    }
    float inv[2] = {1.0f / suma, 1.0f / sumb};
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < NV; i++) {
            float of[16];
            _mm512_storeu_ps(of, _mm512_mul_ps(w ? ab[i] : aa[i], _mm512_set1_ps(inv[w])));
            for (int64_t l = 0; l < 16 && i * 16 + l < hd; l++) {
                int64_t at = (b * H + h + w) * hd + i * 16 + l;
                if (bf) ((uint16_t *)A->o)[at] = to_bf16(of[l]); else ((float *)A->o)[at] = of[l];
            }
        }
}

/* query rows [r0, r1) of the flattened (batch, head) index */
static void attn_rows(const void *arg, int64_t r0, int64_t r1) {
    const attn_t *A = (const attn_t *)arg;
    const void *q = A->q, *k = A->k, *v = A->v;
    void *o = A->o;
    const uint8_t *keep = A->keep;
    int bf = A->bf;
    int64_t H = A->H, KVH = A->KVH, S = A->S, hd = A->hd, sb = A->sb, sh = A->sh;
    float scale = A->scale;
    int64_t rep = H / KVH, nv = (hd + 15) / 16;
    if (nv > ATT_MAXV) return;
    float *s = (float *)malloc(sizeof(float) * (S + 16));
    if (!s) return;
    __mmask16 tail = (hd % 16) ? (__mmask16)((1u << (hd % 16)) - 1) : (__mmask16)0xffff;
    float *s2 = (float *)malloc(sizeof(float) * (S + 16));
    for (int64_t r = r0; r < r1; r++) {
            int64_t b = r / H, h = r % H;
            int64_t g = h / rep;
            if (s2 && rep % 2 == 0 && h % 2 == 0 && r + 1 < r1 && (nv == 4 || nv == 8)) { /* h, h + 1: same kv head */
                if (nv == 4) attn_pair(A, b, h, s, s2, 4, tail); else attn_pair(A, b, h, s, s2, 8, tail);
                r++;
                continue;
            }
            const char *kb = (const char *)k + (b * sb + g * sh) * (bf ? 2 : 4);
            const char *vb = (const char *)v + (b * sb + g * sh) * (bf ? 2 : 4);
            __m512 qv[ATT_MAXV], acc[ATT_MAXV];
            for (int64_t i = 0; i < nv; i++) {
                __mmask16 mk = i == nv - 1 ? tail : (__mmask16)0xffff;
                qv[i] = bf ? ldm_bf16(mk, (const uint16_t *)q + (b * H + h) * hd + i * 16)
                           : ldm_f32(mk, (const float *)q + (b * H + h) * hd + i * 16);
            }
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j0 = 0; j0 < S; j0 += 16) {
                int64_t nj = S - j0 < 16 ? S - j0 : 16;
                __mmask16 jm = nj == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nj) - 1);
                __m512 x = nv == 4 ? scores16(kb, bf, hd, j0, nj, qv, 4, tail)
                         : nv == 8 ? scores16(kb, bf, hd, j0, nj, qv, 8, tail)
                                   : scores16(kb, bf, hd, j0, nj, qv, (int)nv, tail);
                x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
                if (keep) {
                    __m128i kp = _mm_maskz_loadu_epi8(jm, keep + b * S + j0);
                    x = _mm512_mask_blend_ps(_mm_test_epi8_mask(kp, kp), _mm512_set1_ps(-INFINITY), x);
                }
                mx = _mm512_mask_max_ps(mx, jm, mx, x);
                _mm512_mask_storeu_ps(s + j0, jm, x);
            }
            __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < S; j += 16) { /* masked keys: exactly 0 */
                __mmask16 mk = S - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - j)) - 1);
                __m512 x = _mm512_maskz_loadu_ps(mk, s + j);
                mk &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(x, mv)));
                _mm512_storeu_ps(s + j, e); /* (s has 16 floats of room past S) */
                sum = _mm512_add_ps(sum, e);
            }
            __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            if (nv == 4) weighted_rows(vb, bf, hd, S, s, acc, 4, tail);
            else if (nv == 8) weighted_rows(vb, bf, hd, S, s, acc, 8, tail);
            else weighted_rows(vb, bf, hd, S, s, acc, (int)nv, tail);
            for (int64_t i = 0; i < nv; i++) {
                float of[16];
                _mm512_storeu_ps(of, _mm512_mul_ps(acc[i], inv));
                for (int64_t l = 0; l < 16 && i * 16 + l < hd; l++) {
                    if (bf) ((uint16_t *)o)[(b * H + h) * hd + i * 16 + l] = to_bf16(of[l]);
                    else ((float *)o)[(b * H + h) * hd + i * 16 + l] = of[l];
                }
            }
    }
    free(s);
    free(s2);
}

/* LFM2 short-conv decode step for one token per row: bcx [B, 3d] = (b, c, x) from in_proj, st [B, L-1, d] the cached
   conv inputs (updated in place), w [d, L] depthwise taps, bias [d] or NULL, keep [B] (0 = padding) or NULL;
   out [B, d] = c * (sum_j window_j * w_j + bias) with window = (st, b * x). Every product and sum is rounded to the
   dtype where PyTorch's ops round it (bf16: each elementwise result; the tap sum accumulated in fp32). */
static inline __m512 ldv(__mmask16 m, const void *p, int64_t i, int bf) {
    return bf ? ldm_bf16(m, (const uint16_t *)p + i) : ldm_f32(m, (const float *)p + i);
}
static inline void stv(__mmask16 m, void *p, int64_t i, __m512 v, int bf) { /* bf16: rounded like to_bf16 */
    if (bf) _mm256_mask_storeu_epi16((uint16_t *)p + i, m, bf16_round(v)); else _mm512_mask_storeu_ps((float *)p + i, m, v);
}
static inline __m512 rnd(__m512 v, int bf) { return bf ? bf16_trunc(v) : v; }

/* 16 channels (mask m: the first n of them) of LFM2's gated short conv step, as the scalar loop below computes them:
   the L <= 4 taps of these channels (rows of L in w) are gathered from two masked loads (bf16) or a gather (fp32). */
static void conv_step16(const void *bcx, void *st, const void *w, const void *bias, int zero, void *out, int bf,
                        int64_t b, int64_t d, int64_t L, int64_t ch, __mmask16 m, int n) {
    __m512 tap[4];
    if (bf) {
        int cnt = n * (int)L;
        __mmask32 ma = cnt >= 32 ? 0xffffffffu : (1u << cnt) - 1, mb = cnt <= 32 ? 0 : cnt >= 64 ? 0xffffffffu : (1u << (cnt - 32)) - 1;
        __m512i lo = _mm512_maskz_loadu_epi16(ma, (const uint16_t *)w + ch * L);
        __m512i hi = _mm512_maskz_loadu_epi16(mb, (const uint16_t *)w + ch * L + 32);
        for (int64_t j = 0; j < L; j++) {
            uint16_t at[32] = {0};
            for (int k = 0; k < 16; k++) at[k] = (uint16_t)(j + L * k);
            __m512i r = _mm512_permutex2var_epi16(lo, _mm512_loadu_si512(at), hi);
            tap[j] = bf16_to_f32(_mm512_castsi512_si256(r));
        }
    } else {
        __m512i k16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((int)L));
        for (int64_t j = 0; j < L; j++)
            tap[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_add_epi32(k16, _mm512_set1_epi32((int)j)),
                                              (const float *)w + ch * L, 4);
    }
    int64_t row = b * 3 * d, srow = b * (L - 1) * d;
    __m512 y = rnd(_mm512_mul_ps(ldv(m, bcx, row + ch, bf), ldv(m, bcx, row + 2 * d + ch, bf)), bf);
    if (zero) y = rnd(_mm512_mul_ps(y, _mm512_setzero_ps()), bf);
    __m512 z = _mm512_setzero_ps(), sj[4];
    for (int64_t j = 0; j < L - 1; j++) {
        sj[j] = ldv(m, st, srow + j * d + ch, bf);
        z = _mm512_add_ps(z, rnd(_mm512_mul_ps(sj[j], tap[j]), bf));
    }
    z = rnd(_mm512_add_ps(z, rnd(_mm512_mul_ps(y, tap[L - 1]), bf)), bf);
    if (bias) z = rnd(_mm512_add_ps(z, ldv(m, bias, ch, bf)), bf);
    for (int64_t j = 0; j + 1 < L - 1; j++) stv(m, st, srow + j * d + ch, sj[j + 1], bf);
    if (L > 1) stv(m, st, srow + (L - 2) * d + ch, y, bf);
    stv(m, out, b * d + ch, _mm512_mul_ps(ldv(m, bcx, row + d + ch, bf), z), bf);
}

void zoo_conv_step(const void *bcx, void *st, const void *w, const void *bias, const uint8_t *keep, void *out,
                   int bf, int64_t B, int64_t d, int64_t L) {
    if (L >= 1 && L <= 4) { /* LFM2 (L = 3): 16 channels per step */
        for (int64_t b = 0; b < B; b++)
            for (int64_t ch = 0; ch < d; ch += 16) {
                int n = d - ch >= 16 ? 16 : (int)(d - ch);
                conv_step16(bcx, st, w, bias, keep && !keep[b], out, bf, b, d, L, ch,
                            n == 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1), n);
            }
        return;
    }
#define RD(p, i) (bf ? from_bf16(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])
#define RND(v) (bf ? from_bf16(to_bf16(v)) : (v))
#define WR(p, i, v) do { if (bf) ((uint16_t *)(p))[i] = to_bf16(v); else ((float *)(p))[i] = (v); } while (0)
    for (int64_t b = 0; b < B; b++)
        for (int64_t ch = 0; ch < d; ch++) {
            float y = RND(RD(bcx, b * 3 * d + ch) * RD(bcx, b * 3 * d + 2 * d + ch));
            if (keep && !keep[b]) y = RND(y * 0.0f);
            float z = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                float xv = j < L - 1 ? RD(st, (b * (L - 1) + j) * d + ch) : y;
                z += RND(xv * RD(w, ch * L + j));
            }
            z = RND(z);
            if (bias) z = RND(z + RD(bias, ch));
            for (int64_t j = 0; j + 1 < L - 1; j++) WR(st, (b * (L - 1) + j) * d + ch, RD(st, (b * (L - 1) + j + 1) * d + ch));
            if (L > 1) WR(st, (b * (L - 1) + L - 2) * d + ch, y);
            WR(out, b * d + ch, RD(bcx, b * 3 * d + d + ch) * z);
        }
#undef RD
#undef RND
#undef WR
}

/* LFM2 short conv over a bf16 prompt (prefill), B rows of T tokens: bcx [B, T, 3d] = (b, c, x) from in_proj, st_in
   [B, L-1, d] the cached conv inputs (NULL: zeros), wt [L, d] the taps, bias [d] or NULL; out [B, T, d] = c * z with
   y = b * x, z = the causal depthwise conv of (st_in, y), and st_out [B, L-1, d] the last L-1 inputs. Rounded where
   ShortConv.forward's PyTorch ops round: y; z after the first tap and after each further tap (addcmul_); + bias; c * z.
   L <= 16. */
void zoo_conv_prefill(const uint16_t *bcx, int64_t B, int64_t T, int64_t d, int64_t L, const uint16_t *st_in,
                      uint16_t *st_out, const uint16_t *wt, const uint16_t *bias, uint16_t *out) {
    /* token by token (rows are read in order); the last L inputs wait in a ring of L rows: input t in row t % L */
    float *ring = (float *)aligned_alloc(64, (size_t)L * ((d + 15) / 16 * 16) * sizeof(float));
    if (!ring) return;
    int64_t dp = (d + 15) / 16 * 16;
    for (int64_t b = 0; b < B; b++) {
        const uint16_t *in = bcx + b * T * 3 * d;
        for (int64_t j = 1; j < L; j++) /* input -j (state row L - 1 - j) lives in ring row (L - j) % L */
            for (int64_t ch = 0; ch < d; ch += 16) {
                __mmask16 mk = d - ch >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - ch)) - 1);
                _mm512_store_ps(ring + ((L - j) % L) * dp + ch, st_in ? ldm_bf16(mk, st_in + (b * (L - 1) + L - 1 - j) * d + ch) : _mm512_setzero_ps());
            }
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *row = in + t * 3 * d;
            for (int64_t ch = 0; ch < d; ch += 16) {
                __mmask16 mk = d - ch >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - ch)) - 1);
                __m512 y = bf16_trunc(_mm512_mul_ps(ldm_bf16(mk, row + ch), ldm_bf16(mk, row + 2 * d + ch)));
                _mm512_store_ps(ring + (t % L) * dp + ch, y);
                /* taps oldest first: w[0] on input t - (L - 1), ..., w[L - 1] on input t */
                __m512 z = bf16_trunc(_mm512_mul_ps(_mm512_load_ps(ring + ((t + 1) % L) * dp + ch), ldm_bf16(mk, wt + ch)));
                for (int64_t j = 1; j < L; j++)
                    z = bf16_trunc(_mm512_add_ps(z, _mm512_mul_ps(_mm512_load_ps(ring + ((t + 1 + j) % L) * dp + ch), ldm_bf16(mk, wt + j * d + ch))));
                if (bias) z = bf16_trunc(_mm512_add_ps(z, ldm_bf16(mk, bias + ch)));
                _mm256_mask_storeu_epi16(out + (b * T + t) * d + ch, mk, bf16_round(_mm512_mul_ps(ldm_bf16(mk, row + d + ch), z)));
            }
        }
        for (int64_t j = 1; j < L; j++) /* the new state: inputs T - (L - 1) .. T - 1, oldest first */
            for (int64_t ch = 0; ch < d; ch += 16) {
                __mmask16 mk = d - ch >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - ch)) - 1);
                _mm256_mask_storeu_epi16(st_out + (b * (L - 1) + L - 1 - j) * d + ch, mk,
                                         bf16_round(_mm512_load_ps(ring + (((T - j) % L + L) % L) * dp + ch)));
            }
    }
    free(ring);
}

/* RoPE of one position per row: out = x * cos + rotate_half(x) * sin for x [B, R, hd] (R heads), cos / sin [B or 1,
   hd] (row stride cs), rounded where the PyTorch ops round (bf16: each product and the sum). */
void zoo_rope(const void *x, const void *cos, const void *sin, void *out, int bf, int64_t B, int64_t R, int64_t hd,
              int64_t cs) {
#define RD(p, i) (bf ? from_bf16(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])
#define RND(v) (bf ? from_bf16(to_bf16(v)) : (v))
    int64_t half = hd / 2;
    if (bf && half % 16 == 0) { /* 16 lanes at a time, the same roundings (prompts: one row per token) */
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < R; r++) {
                const uint16_t *xr = (const uint16_t *)x + (b * R + r) * hd, *cr = (const uint16_t *)cos + b * cs,
                               *sr = (const uint16_t *)sin + b * cs;
                uint16_t *orow = (uint16_t *)out + (b * R + r) * hd;
                for (int64_t i = 0; i < half; i += 16) {
                    __m512 x1 = ld_bf16(xr + i), x2 = ld_bf16(xr + half + i);
                    __m512 o1 = _mm512_add_ps(bf16_trunc(_mm512_mul_ps(x1, ld_bf16(cr + i))),
                                              bf16_trunc(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), ld_bf16(sr + i))));
                    __m512 o2 = _mm512_add_ps(bf16_trunc(_mm512_mul_ps(x2, ld_bf16(cr + half + i))),
                                              bf16_trunc(_mm512_mul_ps(x1, ld_bf16(sr + half + i))));
                    _mm256_storeu_si256((__m256i *)(orow + i), bf16_round(o1));
                    _mm256_storeu_si256((__m256i *)(orow + half + i), bf16_round(o2));
                }
            }
        return;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < hd; i++) {
                int64_t o = (b * R + r) * hd;
                float rot = i < half ? -RD(x, o + i + half) : RD(x, o + i - half);
                float v = RND(RND(RD(x, o + i) * RD(cos, b * cs + i)) + RND(rot * RD(sin, b * cs + i)));
                if (bf) ((uint16_t *)out)[o + i] = to_bf16(v); else ((float *)out)[o + i] = v;
            }
#undef RD
#undef RND
}

/* Per row of `rows` (row stride `rs` bytes), the index of the largest of n fp32 / bf16 values as torch.argmax takes
   it: the first of equal maxima, the first NaN when there is one (NaN counts as the largest). Lanes keep their own
   first maximum; the lowest index among the lanes holding the overall maximum wins. */
void zoo_argmax(const void *x, int bf, int64_t rows, int64_t n, int64_t rs, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * rs;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i at = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        int64_t found = -1;
        for (int64_t j = 0; j < n && found < 0; j += 16) {
            __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            __m512 v = bf ? ldm_bf16(m, (const uint16_t *)row + j) : ldm_f32(m, (const float *)row + j);
            __mmask16 nan = _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            if (nan) found = j + __builtin_ctz(nan);
            __mmask16 up = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, up, v);
            at = _mm512_mask_mov_epi32(at, up, idx);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
        if (found < 0) {
            __mmask16 hold = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ) &
                             _mm512_cmp_epi32_mask(at, _mm512_set1_epi32(-1), _MM_CMPINT_NE);
            found = hold ? (int64_t)_mm512_mask_reduce_min_epi32(hold, at) : 0; /* (all -inf: the first) */
        }
        out[r] = found;
    }
}

/* ---- a persistent pool: workers spin ~0.2 ms for the next call (decode issues them back to back), then sleep; short spins
   because a PAUSE costs ~90 ns on Zen 4 and a spinning thread on a shared machine takes the core its peer needs */
#define MAXT 64
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER, call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go_cv = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static int nworkers;                 /* started so far */
static atomic_long gen;              /* call counter: a change starts the workers */
static atomic_int pending;           /* workers still busy with the current call */
static void (*cur_fn)(const void *, int64_t, int64_t); /* the current call's work over part [lo, hi) */
static const void *cur_arg;
static int parts_now;                /* threads taking part in the current call */
static atomic_long next_chunk;       /* the current call's range [0, chunk_n) goes in chunk_total chunks, claimed in
                                        order by whoever is free: a thread that starts late or runs slow (a busy host
                                        core) takes fewer, instead of holding up the call with a fixed share */
static int64_t chunk_total, chunk_n;
#define CHUNKS_PER_THREAD 4

static void rows_part(const void *arg, int64_t lo, int64_t hi) { rows((const job_t *)arg, lo, hi); }

/* Matrix-vector products claim shrinking parts instead (guided): each claim takes 1 / (2 x threads) of the rows left,
   at least 1 / (16 x threads) of all, so the first parts are long streams and the last ones short, and a thread
   seldom waits at the end of a product for the other's last part (+1-2% of the 2-thread bandwidth, int8 and bf16).
   Other calls keep fixed parts (attention's head pairs must not be split). */
static int guided_now;
static int64_t guided_min;

static void take_chunks(void) {
    if (guided_now) { /* next_chunk is the next row here: each claim takes 1 / (2 x threads) of what is left */
        for (;;) {
            int64_t lo = atomic_load_explicit(&next_chunk, memory_order_relaxed), hi;
            do {
                if (lo >= chunk_n) return;
                int64_t size = (chunk_n - lo) / (2 * parts_now);
                if (size < guided_min) size = guided_min;
                hi = lo + size < chunk_n ? lo + size : chunk_n;
            } while (!atomic_compare_exchange_weak_explicit(&next_chunk, &lo, hi, memory_order_relaxed,
                                                            memory_order_relaxed));
            cur_fn(cur_arg, lo, hi);
        }
    }
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&next_chunk, 1, memory_order_relaxed);
        if (c >= chunk_total) return;
        cur_fn(cur_arg, chunk_n * c / chunk_total, chunk_n * (c + 1) / chunk_total);
    }
}

static atomic_int hot;               /* a step program is running: workers keep spinning between its products */
static long start_gen[MAXT + 1];   /* the call count when a worker was created (it may start running later) */

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    long seen = start_gen[id];
    for (;;) {
        for (int i = 0; (i < 2000 || atomic_load_explicit(&hot, memory_order_relaxed)) &&
                        atomic_load_explicit(&gen, memory_order_acquire) == seen; i++) _mm_pause();
        if (atomic_load_explicit(&gen, memory_order_acquire) == seen) {
            pthread_mutex_lock(&mu);
            while (atomic_load(&gen) == seen) pthread_cond_wait(&go_cv, &mu);
            pthread_mutex_unlock(&mu);
        }
        seen = atomic_load_explicit(&gen, memory_order_acquire);
        if (id < parts_now) take_chunks();
        if (atomic_fetch_sub(&pending, 1) == 1) {
            pthread_mutex_lock(&mu);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&mu);
        }
    }
    return 0;
}

static void reset_after_fork(void) { /* the child has no workers: start again lazily */
    nworkers = 0;
    pthread_mutex_init(&mu, 0); pthread_mutex_init(&call_mu, 0);
    pthread_cond_init(&go_cv, 0); pthread_cond_init(&done_cv, 0);
}

static int ensure_workers(int want) {
    static int atfork;
    if (!atfork) { pthread_atfork(0, 0, reset_after_fork); atfork = 1; }
    while (nworkers < want) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        start_gen[nworkers + 1] = atomic_load(&gen);
        int rc = pthread_create(&t, &at, worker, (void *)(intptr_t)(nworkers + 1));
        pthread_attr_destroy(&at);
        if (rc) break;
        nworkers++;
    }
    return nworkers;
}

/* fn(arg, lo, hi) over [0, n) on `parts` threads, the caller among them, in contiguous chunks (CHUNKS_PER_THREAD per
   thread) claimed in order (one part, or the pool busy with another caller: all on the calling thread). Callers'
   parts are independent, so which thread runs a chunk never changes a result. */
static void run_split(void (*fn)(const void *, int64_t, int64_t), const void *arg, int64_t n, int64_t parts) {
    if (parts > n) parts = n;
    if (parts <= 1 || pthread_mutex_trylock(&call_mu) != 0) {
        fn(arg, 0, n);
        return;
    }
    int have = ensure_workers((int)parts - 1);
    if (have < parts - 1) parts = have + 1;
    cur_fn = fn;
    cur_arg = arg;
    parts_now = (int)parts;
    chunk_n = n;
    chunk_total = parts * CHUNKS_PER_THREAD < n ? parts * CHUNKS_PER_THREAD : n;
    guided_now = fn == rows_part;
    guided_min = n / (parts * 16) > 0 ? n / (parts * 16) : 1;
    atomic_store_explicit(&next_chunk, 0, memory_order_relaxed);
    atomic_store(&pending, have);
    pthread_mutex_lock(&mu);
    atomic_fetch_add_explicit(&gen, 1, memory_order_release);
    pthread_cond_broadcast(&go_cv);
    pthread_mutex_unlock(&mu);
    take_chunks();
    for (int i = 0; i < 1000 && atomic_load_explicit(&pending, memory_order_acquire) > 0; i++) _mm_pause();
    if (atomic_load(&pending) > 0) {
        pthread_mutex_lock(&mu);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&done_cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_unlock(&call_mu);
}

void zoo_attn_decode(const void *q, const void *k, const void *v, void *o, const uint8_t *keep, int bf,
                     int64_t B, int64_t H, int64_t KVH, int64_t S, int64_t hd, int64_t sb, int64_t sh, float scale,
                     int threads) {
    attn_t a = {q, k, v, o, keep, bf, B, H, KVH, S, hd, sb, sh, scale};
    /* heads are independent: split them once the cache is long enough to pay for a hand-off (~64K values) */
    int64_t parts = threads < 1 ? 1 : threads > MAXT ? MAXT : threads;
    if (B * H * S * hd < ((int64_t)1 << 16)) parts = 1;
    run_split(attn_rows, &a, B * H, parts);
}

void zoo_gemv(int wkind, const void *w, const void *x, int xbf, const void *s, int sbf, void *y, int ybf,
              int64_t n, int64_t k, int threads) {
    float stackx[8192];
    float *xf = (float *)x;
    if (xbf) { /* bf16 activations widened once (exact) */
        xf = k <= 8192 ? stackx : (float *)malloc(k * sizeof(float));
        for (int64_t i = 0; i < k; i++) xf[i] = from_bf16(((const uint16_t *)x)[i]);
    }
    job_t j = {wkind, sbf, ybf, (const char *)w, xf, s, y, k};
    int64_t es = wkind == 0 ? 4 : wkind == 1 ? 2 : 1;
    /* at least 1 MiB of weights per thread: a 2-thread call cost 40-95 us more than a 1-thread one on a 1 MiB matrix
       at load ~14 (waking / waiting for a worker); inside a step program the workers spin, so 128 KiB */
    int64_t per = atomic_load_explicit(&hot, memory_order_relaxed) ? (int64_t)1 << 17 : (int64_t)1 << 20;
    int64_t parts = threads < 1 ? 1 : threads > MAXT ? MAXT : threads;
    if (parts > (n * k * es) / per) parts = (n * k * es) / per;
    run_split(rows_part, &j, n, parts);
    if (xf != x && xf != stackx) free(xf);
}

/* ---- prefill products on AMX (bf16 x bf16, fp32 sums): y = x W^T for many rows without reordering W. The weight's
   plain rows are the A tiles (16 outputs x 32 k), the activations are packed once per call into B tiles (32 k as
   16 pairs x 16 rows, the VNNI layout), so each tile computes 16 outputs x 16 rows; the epilogue transposes it into
   the output rows. Built only where the compiler knows AMX (ZOO_AMX); used only where the CPU has it. */
#ifdef ZOO_AMX
#include <sys/syscall.h>
#include <unistd.h>

int zoo_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

typedef struct { uint8_t palette, start; uint8_t rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg_t;
static void tiles_on(void) { /* 8 tiles of 16 rows x 64 bytes; loaded per call (other libraries reconfigure) */
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    _tile_loadconfig(&c);
}

/* 16 x 16 transpose of 32-bit elements in registers: r[i] element j -> r[j] element i */
static inline void tr16x16(__m512i *r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) { t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]); t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]); }
    for (int i = 0; i < 16; i += 4) { /* u[i + c]: column 4 L + c of rows i..i+3 in 128-bit lane L */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]); u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]); u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88); r[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88); r[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
    }
}

typedef struct {
    const uint16_t *x; uint16_t *xp; int64_t M, K, ldx;             /* packing */
    const uint16_t *w; int64_t N, K0, KC; int64_t up;               /* up: row offset of the second A tile (16 or F) */
    uint16_t *y; int64_t ldy; int epi; const uint16_t *aux; int64_t ldaux; const uint16_t *bias;
    float *acc;                                                     /* partial sums when K is split (KC < K) */
    uint16_t *hp;    /* EPI_SILU_MUL: write the result packed here (the next product's B tiles) instead of to y */
} gemm_t;

/* x [M, K] (row stride ldx) -> xp: per 16-row block b and 32-wide k step q, 16 pairs x 16 rows (zeros past M) */
static void pack_part(const void *arg, int64_t b0, int64_t b1) {
    const gemm_t *g = (const gemm_t *)arg;
    int64_t kq = g->K / 32;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t q = 0; q < kq; q++) {
            __m512i r[16];
            for (int m = 0; m < 16; m++)
                r[m] = b * 16 + m < g->M ? _mm512_loadu_si512(g->x + (b * 16 + m) * g->ldx + q * 32) : _mm512_setzero_si512();
            tr16x16(r);
            uint16_t *dst = g->xp + (b * kq + q) * 512;
            for (int i = 0; i < 16; i++) _mm512_store_si512(dst + i * 32, r[i]);
        }
}


enum { EPI_STORE = 0, EPI_ADD = 1, EPI_SILU_MUL = 2 };

/* piece u (0..15) of the epilogue of one finished 32 x 32 block: c[0..3] = tiles (A0 B0, A0 B1, A1 B0, A1 B1) as
   [16 out][16 rows] fp32. Transposed output: piece 4 t transposes tile t into 16 output rows (EPI_SILU_MUL: tile pairs
   (0, 2), (1, 3); the other pieces do nothing). Packed output (hp): piece u takes two output rows of tile pair u / 8. */
#define EPI_PIECES 16
static void epilogue_unit(const gemm_t *g, float (*c)[256], int64_t nb, int64_t m0, int u) {
    if (g->hp) { /* rows stay outputs (= the next product's k): pairs of them interleave into half a B tile */
        int t = u / 8, i = (u % 8) * 2;
        int64_t fq = g->N / 64, blk = m0 / 16 + t; /* k steps of the next product; this tile's 16-row block */
        uint32_t *dst = (uint32_t *)(g->hp + (blk * fq + nb / 2) * 512) + (nb % 2) * 8 * 16;
        __m512 h[2];
        for (int e = 0; e < 2; e++) {
            __m512 gt = bf16_trunc(_mm512_load_ps(c[t] + (i + e) * 16)), up = bf16_trunc(_mm512_load_ps(c[t + 2] + (i + e) * 16));
            __m512 sv = _mm512_div_ps(gt, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512neg(gt)));
            h[e] = _mm512_mul_ps(bf16_trunc(sv), up);
        }
        __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(bf16_round(h[0])),
                                       _mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round(h[1])), 16));
        _mm512_store_si512(dst + (i / 2) * 16, pair);
        return;
    }
    if (u % 4) return;
    int t = u / 4;
    if (g->epi == EPI_SILU_MUL && t >= 2) return;
    __m512i r[16], s[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(c[t] + i * 16);
    tr16x16(r);
    if (g->epi == EPI_SILU_MUL) {
        for (int i = 0; i < 16; i++) s[i] = _mm512_load_si512(c[t + 2] + i * 16);
        tr16x16(s);
    }
    int64_t n = g->epi == EPI_SILU_MUL ? nb * 16 : nb * 32 + (t >> 1) * 16, mb = m0 + (t & 1) * 16;
    __m512 bias = g->bias ? bf16_to_f32(_mm256_loadu_si256((const __m256i *)(g->bias + n))) : _mm512_setzero_ps();
    for (int j = 0; j < 16 && mb + j < g->M; j++) {
        __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[j]), bias);
        uint16_t *dst = g->y + (mb + j) * g->ldy + n;
        if (g->epi == EPI_ADD) { /* residual + the rounded product, rounded: the two bf16 ops it replaces */
            v = _mm512_add_ps(bf16_trunc(v), bf16_to_f32(_mm256_loadu_si256((const __m256i *)(g->aux + (mb + j) * g->ldaux + n))));
        } else if (g->epi == EPI_SILU_MUL) { /* gate and up rounded, silu rounded, times up: F.silu(g) * u */
            __m512 gt = bf16_trunc(v), up = bf16_trunc(_mm512_castsi512_ps(s[j]));
            __m512 sv = _mm512_div_ps(gt, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512neg(gt)));
            v = _mm512_mul_ps(bf16_trunc(sv), up);
        }
        _mm256_storeu_si256((__m256i *)dst, bf16_round(v));
    }
}

/* n-blocks [nb0, nb1): 32 outputs each (rows n, n + up of W for EPI_SILU_MUL, else 32 consecutive rows). The
   epilogue of each block runs in pieces inside the next block's k loop, so its vector work overlaps the tile
   multiplies instead of stalling them. */
static void gemm_part(const void *arg, int64_t nb0, int64_t nb1) {
    const gemm_t *g = (const gemm_t *)arg;
    int64_t kq = g->K / 32, mp = (g->M + 31) / 32;
    float c[2][4][256] __attribute__((aligned(64)));
    int have = 0, cur = 0, done = EPI_PIECES; /* a finished block waits in c[cur ^ 1]: pieces [done, 16) to write */
    int64_t pnb = 0, pm0 = 0;
    tiles_on();
    for (int64_t k0 = 0; k0 < g->K; k0 += g->KC) {
        int64_t q0 = k0 / 32, q1 = (k0 + g->KC < g->K ? k0 + g->KC : g->K) / 32, every = (q1 - q0) / EPI_PIECES > 1 ? (q1 - q0) / EPI_PIECES : 1;
        int first = k0 == 0, last = k0 + g->KC >= g->K;
        for (int64_t nb = nb0; nb < nb1; nb++) {
            int64_t n = g->epi == EPI_SILU_MUL ? nb * 16 : nb * 32;
            const uint16_t *wa = g->w + n * g->K, *wb = g->w + (n + g->up) * g->K;
            /* the next block's weight rows come from memory: prefetch them into L2 over this block's steps, a few
               lines per step (its own rows would otherwise stall the first pass of tile loads) */
            int64_t nn = g->epi == EPI_SILU_MUL ? (nb + 1) * 16 : (nb + 1) * 32, lines = q1 - q0;
            const uint16_t *na = g->w + nn * g->K, *nbw = g->w + (nn + g->up) * g->K;
            int64_t per = (32 + mp - 1) / mp, li = nb + 1 < nb1 ? 0 : 32 * lines;
            for (int64_t p = 0; p < mp; p++) {
                const uint16_t *x0 = g->xp + (2 * p) * kq * 512, *x1 = g->xp + (2 * p + 1) * kq * 512;
                float *acc = g->acc + (nb * mp + p) * 1024;
                if (first) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
                else { _tile_loadd(0, acc, 64); _tile_loadd(1, acc + 256, 64); _tile_loadd(2, acc + 512, 64); _tile_loadd(3, acc + 768, 64); }
                for (int64_t q = q0; q < q1; q++) {
                    _tile_loadd(4, wa + q * 32, g->K * 2);
                    _tile_loadd(5, wb + q * 32, g->K * 2);
                    _tile_loadd(6, x0 + q * 512, 64);
                    _tile_loadd(7, x1 + q * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    if (have && done < EPI_PIECES && (q - q0) % every == 0) epilogue_unit(g, c[cur ^ 1], pnb, pm0, done++);
                    for (int64_t e = 0; e < per && li < 32 * lines; e++, li++) {
                        int64_t row = li / lines, col = q0 + li % lines;
                        _mm_prefetch((const char *)((row < 16 ? na + row * g->K : nbw + (row - 16) * g->K) + col * 32), _MM_HINT_T1);
                    }
                }
                if (last) {
                    while (have && done < EPI_PIECES) epilogue_unit(g, c[cur ^ 1], pnb, pm0, done++);
                    _tile_stored(0, c[cur][0], 64); _tile_stored(1, c[cur][1], 64);
                    _tile_stored(2, c[cur][2], 64); _tile_stored(3, c[cur][3], 64);
                    have = 1, done = 0, pnb = nb, pm0 = 32 * p, cur ^= 1;
                } else {
                    _tile_stored(0, acc, 64); _tile_stored(1, acc + 256, 64); _tile_stored(2, acc + 512, 64); _tile_stored(3, acc + 768, 64);
                }
            }
        }
    }
    _tile_release();
    while (have && done < EPI_PIECES) epilogue_unit(g, c[cur ^ 1], pnb, pm0, done++);
}

/* Causal attention of a bf16 prompt on AMX tiles: q [B, H, T, hd], k / v [B, KVH, S, hd] (strides in elements:
   q (qb, qh, qt), k and v (kb, kh, S rows of hd), o [B, T, H, hd] contiguous), query i at position S - T + i sees keys
   [0, S - T + i]; head h reads kv head h / (H / KVH). Scores and softmax in fp32; the unnormalised probabilities
   (<= 1) go to bf16 for the value product, whose fp32 sums are divided by the row's sum before the one rounding of
   the output (what a flash kernel does). hd % 32 == 0, hd <= 256. */
typedef struct {
    const uint16_t *q, *k, *v; uint16_t *o, *kp, *vp; int64_t B, H, KVH, T, S, SP, hd, qb, qh, qt, kb, kh; float scale;
} attn_amx_t;

static void attn_pack_part(const void *arg, int64_t i0, int64_t i1) { /* kv heads (b, kvh): keys and values -> B tiles */
    const attn_amx_t *a = (const attn_amx_t *)arg;
    int64_t hd = a->hd, kq = hd / 32;
    for (int64_t i = i0; i < i1; i++) {
        const uint16_t *k = a->k + (i / a->KVH) * a->kb + (i % a->KVH) * a->kh, *v = a->v + (i / a->KVH) * a->kb + (i % a->KVH) * a->kh;
        uint16_t *kp = a->kp + i * a->SP * hd, *vp = a->vp + i * a->SP * hd;
        for (int64_t j0 = 0; j0 < a->SP; j0 += 16) /* K^T: per 16 keys and 32 dims, 16 dim pairs x 16 keys */
            for (int64_t q = 0; q < kq; q++) {
                __m512i r[16];
                for (int m = 0; m < 16; m++)
                    r[m] = j0 + m < a->S ? _mm512_loadu_si512(k + (j0 + m) * hd + q * 32) : _mm512_setzero_si512();
                tr16x16(r);
                for (int m = 0; m < 16; m++) _mm512_store_si512(kp + ((j0 / 16) * kq + q) * 512 + m * 32, r[m]);
            }
        for (int64_t j0 = 0; j0 < a->SP; j0 += 32) /* V: per 32 keys and 16 dims, 16 key pairs x 16 dims */
            for (int64_t c = 0; c < hd; c += 16)
                for (int r = 0; r < 16; r++) {
                    int64_t j = j0 + 2 * r;
                    __m512i lo = j < a->S ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + j * hd + c))) : _mm512_setzero_si512();
                    __m512i hi = j + 1 < a->S ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + (j + 1) * hd + c))) : _mm512_setzero_si512();
                    _mm512_store_si512(vp + ((j0 / 32) * (hd / 16) + c / 16) * 512 + r * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
    }
}

static void attn_amx_part(const void *arg, int64_t w0, int64_t w1) { /* work items (b, h, 16-query block) */
    const attn_amx_t *a = (const attn_amx_t *)arg;
    int64_t hd = a->hd, kq = hd / 32, nqb = (a->T + 15) / 16, past = a->S - a->T;
    float *s = (float *)aligned_alloc(64, (size_t)16 * a->SP * sizeof(float) + 16 * hd * sizeof(float));
    uint16_t *p = (uint16_t *)aligned_alloc(64, (size_t)16 * a->SP * sizeof(uint16_t) + 64);
    if (!s || !p) { free(s); free(p); return; }
    float *ob = s + 16 * a->SP, sums[16];
    tiles_on();
    for (int64_t w = w0; w < w1; w++) {
        int64_t b = w / (a->H * nqb), h = (w / nqb) % a->H, i0 = (w % nqb) * 16, kvi = b * a->KVH + h / (a->H / a->KVH);
        int64_t rows = a->T - i0 < 16 ? a->T - i0 : 16, last = past + i0 + rows - 1; /* last key any row sees */
        int64_t nk = (last + 1 + 31) / 32 * 32;                                    /* keys computed, whole blocks */
        const uint16_t *q = a->q + b * a->qb + h * a->qh + i0 * a->qt, *kp = a->kp + kvi * a->SP * hd, *vp = a->vp + kvi * a->SP * hd;
        uint16_t qbuf[16 * 256] __attribute__((aligned(64)));
        for (int r = 0; r < 16; r++) /* the queries (zeros past T) as A tiles */
            for (int64_t c = 0; c < hd; c += 32)
                _mm512_store_si512(qbuf + r * hd + c, r < rows ? _mm512_loadu_si512(q + r * a->qt + c) : _mm512_setzero_si512());
        for (int64_t j0 = 0; j0 < nk; j0 += 16) {
            _tile_zero(0);
            for (int64_t c = 0; c < kq; c++) {
                _tile_loadd(4, qbuf + c * 32, hd * 2);
                _tile_loadd(6, kp + ((j0 / 16) * kq + c) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, s + j0, a->SP * 4);
        }
        for (int r = 0; r < 16; r++) { /* masked, scaled softmax numerators in fp32 -> bf16 */
            float *sr = s + r * a->SP;
            uint16_t *pr = p + r * a->SP;
            int64_t see = r < rows ? past + i0 + r + 1 : 0;
            __m512 mx = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(a->scale), acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < see; j += 16) {
                __mmask16 mk = see - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (see - j)) - 1);
                mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_mul_ps(_mm512_loadu_ps(sr + j), sc));
            }
            float m = see ? _mm512_reduce_max_ps(mx) : 0.0f;
            for (int64_t j = 0; j < nk; j += 16) {
                __mmask16 mk = j >= see ? 0 : see - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (see - j)) - 1);
                __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(sr + j), sc), _mm512_set1_ps(m))));
                __m256i eb = bf16_round(e);
                acc = _mm512_add_ps(acc, bf16_to_f32(eb)); /* the sum of what the value product multiplies */
                _mm256_storeu_si256((__m256i *)(pr + j), eb);
            }
            sums[r] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t c0 = 0; c0 < hd; c0 += 64) { /* up to 4 column groups of 16 at a time */
            int ng = hd - c0 >= 64 ? 4 : (int)((hd - c0) / 16);
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t j0 = 0; j0 < nk; j0 += 32) {
                _tile_loadd(4, p + j0, a->SP * 2);
                const uint16_t *vb = vp + ((j0 / 32) * (hd / 16) + c0 / 16) * 512;
                _tile_loadd(6, vb, 64); _tile_dpbf16ps(0, 4, 6);
                if (ng > 1) { _tile_loadd(7, vb + 512, 64); _tile_dpbf16ps(1, 4, 7); }
                if (ng > 2) { _tile_loadd(6, vb + 1024, 64); _tile_dpbf16ps(2, 4, 6); }
                if (ng > 3) { _tile_loadd(7, vb + 1536, 64); _tile_dpbf16ps(3, 4, 7); }
            }
            _tile_stored(0, ob + c0, hd * 4);
            if (ng > 1) _tile_stored(1, ob + c0 + 16, hd * 4);
            if (ng > 2) _tile_stored(2, ob + c0 + 32, hd * 4);
            if (ng > 3) _tile_stored(3, ob + c0 + 48, hd * 4);
        }
        for (int r = 0; r < rows; r++) {
            __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
            uint16_t *dst = a->o + ((b * a->T + i0 + r) * a->H + h) * hd;
            for (int64_t c = 0; c < hd; c += 16)
                _mm256_storeu_si256((__m256i *)(dst + c), bf16_round(_mm512_mul_ps(_mm512_loadu_ps(ob + r * hd + c), inv)));
        }
    }
    _tile_release();
    free(s);
    free(p);
}

int zoo_attn_prefill(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int64_t B, int64_t H,
                     int64_t KVH, int64_t T, int64_t S, int64_t hd, const int64_t *strides, float scale, int threads) {
    int64_t sp = (S + 31) / 32 * 32;
    uint16_t *kp = (uint16_t *)aligned_alloc(64, (size_t)2 * B * KVH * sp * hd * sizeof(uint16_t));
    if (!kp) return -1;
    attn_amx_t a = {q, k, v, o, kp, kp + B * KVH * sp * hd, B, H, KVH, T, S, sp, hd,
                    strides[0], strides[1], strides[2], strides[3], strides[4], scale};
    int64_t parts = threads < 1 ? 1 : threads > MAXT ? MAXT : threads;
    run_split(attn_pack_part, &a, B * KVH, parts);
    run_split(attn_amx_part, &a, B * H * ((T + 15) / 16), parts);
    free(kp);
    return 0;
}

/* packs x (unless pack is 0: g->xp holds it already), then runs the product over n-blocks on `threads` threads */
static int gemm_run(gemm_t *g, int pack, int threads) {
    int64_t mp = (g->M + 31) / 32, nbs = g->N / 32; /* EPI_SILU_MUL: F / 16 blocks of (16 gate, 16 up) rows */
    /* the packed rows of one k chunk stay in L2 (1 MiB): longer K is summed in chunks through fp32 partials */
    int64_t kc = ((int64_t)1 << 19) / (mp * 32) / 32 * 32;
    if (kc < 256) kc = 256;
    g->KC = g->K;
    g->acc = 0;
    if (kc < g->K) {
        int64_t chunks = (g->K + kc - 1) / kc;
        g->KC = ((g->K + chunks - 1) / chunks + 31) / 32 * 32;
        g->acc = (float *)aligned_alloc(64, (size_t)(nbs * mp) * 1024 * sizeof(float));
        if (!g->acc) return -1;
    }
    int64_t parts = threads < 1 ? 1 : threads > MAXT ? MAXT : threads;
    if (pack) run_split(pack_part, g, 2 * mp, parts);
    run_split(gemm_part, g, nbs, parts);
    free(g->acc);
    return 0;
}

/* y [M, N'] bf16 = epi(x [M, K] W^T): N' = N (EPI_STORE / EPI_ADD: y = aux + x W^T, aux may be y) or N / 2 (EPI_SILU_MUL:
   W holds the gate rows then the up rows). K % 32 == 0, N % 32 == 0. xp: (M + 31) / 32 * 32 * K bf16, 64-byte
   aligned. Returns 0, or -1 where a scratch allocation failed (nothing written). */
int zoo_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                  const uint16_t *bias, uint16_t *y, int64_t ldy, int epi, const uint16_t *aux, int64_t ldaux,
                  uint16_t *xp, int threads) {
    gemm_t g = {x, xp, M, K, ldx, w, N, K, K, epi == EPI_SILU_MUL ? N / 2 : 16, y, ldy, epi, aux, ldaux, bias, 0, 0};
    return gemm_run(&g, 1, threads);
}

/* SwiGLU feed-forward: y [M, K] = aux + (silu(x W1^T) * (x W3^T)) W2^T (aux NULL: no residual; aux may be y) with
   w13 = [W1; W3] ([2F, K]) and w2 [K, F]; the hidden activations go from the first product's epilogue straight into
   the second's packed layout (hp: (M + 31) / 32 * 32 * F bf16). F % 32 == 0, K % 32 == 0. */
int zoo_ffn_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w13, int64_t F,
                 const uint16_t *w2, uint16_t *y, const uint16_t *aux, uint16_t *xp, uint16_t *hp, int threads) {
    gemm_t g1 = {x, xp, M, K, ldx, w13, 2 * F, K, K, F, 0, 0, EPI_SILU_MUL, 0, 0, 0, 0, hp};
    if (gemm_run(&g1, 1, threads)) return -1;
    gemm_t g2 = {0, hp, M, F, 0, w2, K, F, F, 16, y, K, aux ? EPI_ADD : EPI_STORE, aux, K, 0, 0, 0};
    return gemm_run(&g2, 0, threads);
}
#else
int zoo_amx_init(void) { return -1; }
int zoo_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                  const uint16_t *bias, uint16_t *y, int64_t ldy, int epi, const uint16_t *aux, int64_t ldaux,
                  uint16_t *xp, int threads) { return -1; }
int zoo_ffn_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w13, int64_t F,
                 const uint16_t *w2, uint16_t *y, const uint16_t *aux, uint16_t *xp, uint16_t *hp, int threads) { return -1; }
int zoo_attn_prefill(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int64_t B, int64_t H,
                     int64_t KVH, int64_t T, int64_t S, int64_t hd, const int64_t *strides, float scale, int threads) { return -1; }
#endif

/* ---- a decode-step program: one call runs a whole layer stack (no Python between the kernels). Each instruction is
   16 int64 words (opcode, operands); dyn[] holds what changes per step: dyn[0] the cache length before this token
   (= its KV slot), dyn[1] its RoPE position, then per-layer words (KV buffer / conv state addresses and strides)
   referenced by index. Elementwise results round where the PyTorch ops they replace round. */
enum { OP_NORM = 1, OP_GEMV, OP_ADD, OP_SILU_MUL, OP_CONV, OP_ROPE, OP_KV_STORE, OP_ATTN, OP_DELTANET, OP_MAMBA2,
       OP_EMBED, OP_WARM };
#define P(i) ((void *)(intptr_t)op[i])
static inline float rdv(const void *p, int64_t i, int bf) { return bf ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i]; }
static inline void wrv(void *p, int64_t i, float v, int bf) { if (bf) ((uint16_t *)p)[i] = to_bf16(v); else ((float *)p)[i] = v; }
static inline float f32_of(int64_t bits) { uint32_t u = (uint32_t)bits; float f; memcpy(&f, &u, 4); return f; }

/* Depthwise causal conv of one new input per channel, then SiLU: window = (the L-1 cached inputs, x), taps w[ch]
   (row stride L; wsel picks the tap matrix of a channel range: three for DeltaNet's q / k / v, one for Mamba2),
   products and the tap sum rounded like ``(window * w).sum(1)`` (+ bias) in the dtype; the state shifts in place.
   out (fp32) = silu of the rounded sum, rounded to the dtype like F.silu. */
static void dwconv_silu_step(const void *x, void *st, const void *const *w, int64_t wsplit, const void *bias,
                             float *out, int bf, int64_t C, int64_t L) {
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        float zs[16] = {0};
        for (int64_t l = 0; l < 16 && c0 + l < C; l++) {
            int64_t ch = c0 + l;
            const void *wc = w[ch / wsplit];
            int64_t wi = (ch % wsplit) * L;
            float y = rdv(x, ch, bf), z = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                float xv = j < L - 1 ? rdv(st, j * C + ch, bf) : y;
                float pr = xv * rdv(wc, wi + j, bf);
                z += bf ? from_bf16(to_bf16(pr)) : pr;
            }
            if (bf) z = from_bf16(to_bf16(z));
            if (bias) { z += rdv(bias, ch, bf); if (bf) z = from_bf16(to_bf16(z)); }
            for (int64_t j = 0; j + 1 < L - 1; j++) wrv(st, j * C + ch, rdv(st, (j + 1) * C + ch, bf), bf);
            if (L > 1) wrv(st, (L - 2) * C + ch, y, bf);
            zs[l] = z;
        }
        __m512 g = _mm512_loadu_ps(zs);
        __m512 sv = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512neg(g)));
        float o[16];
        _mm512_storeu_ps(o, sv);
        for (int64_t l = 0; l < 16 && c0 + l < C; l++) out[c0 + l] = bf ? from_bf16(to_bf16(o[l])) : o[l];
    }
}

/* DeltaNet decode step (one token): qkvb = packed q|k|v|b products [3d + H], conv over q|k|v + SiLU, L2-normed q (x
   hd^-0.5) and k, beta = sigmoid(b); per head the fp32 state s [hd, hd]: u = (v - k s) beta, s += k^T u, o = q s;
   o [d] rounded to the dtype (the o_norm and o_proj are separate ops). */
static void deltanet_step(const void *qkvb, void *conv_st, float *s_all, const void *const *w, void *o, int bf,
                          int64_t d, int64_t H, int64_t L) {
    int64_t hd = d / H;
    float *a = (float *)malloc(sizeof(float) * 3 * d), *u = (float *)malloc(sizeof(float) * 2 * hd);
    if (!a || !u) { free(a); free(u); return; }
    dwconv_silu_step(qkvb, conv_st, w, d, 0, a, bf, 3 * d, L);
    for (int64_t h = 0; h < H; h++) {
        float *q = a + h * hd, *k = a + d + h * hd, *v = a + 2 * d + h * hd, *s = s_all + h * hd * hd, *acc = u + hd;
        float sq = 0.0f, sk = 0.0f;
        for (int64_t i = 0; i < hd; i++) { sq += q[i] * q[i]; sk += k[i] * k[i]; }
        float iq = 1.0f / sqrtf(sq + 1e-6f) * (1.0f / sqrtf((float)hd)), ik = 1.0f / sqrtf(sk + 1e-6f);
        float b = rdv(qkvb, 3 * d + h, bf), beta = 1.0f / (1.0f + expf(-b));
        for (int64_t j = 0; j < hd; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < hd; i++) {
            float ki = k[i] * ik;
            for (int64_t j = 0; j < hd; j++) acc[j] += ki * s[i * hd + j];
        }
        for (int64_t j = 0; j < hd; j++) { u[j] = (v[j] - acc[j]) * beta; acc[j] = 0.0f; }
        for (int64_t i = 0; i < hd; i++) {
            float ki = k[i] * ik, qi = q[i] * iq;
            for (int64_t j = 0; j < hd; j++) { s[i * hd + j] += ki * u[j]; acc[j] += qi * s[i * hd + j]; }
        }
        for (int64_t j = 0; j < hd; j++) wrv(o, h * hd + j, acc[j], bf);
    }
    free(a);
    free(u);
}

/* Mamba2 decode step (one token): zxbcdt = in_proj output [d_inner | conv_dim | H]; conv + SiLU over conv_dim (x | B |
   C); dt = softplus(dt + dt_bias); per head h (group g = h / (H / G)) the fp32 state s [P, N]:
   s = s exp(-dt exp(A_log)) + dt x B^T, y = s C + D x; then y * silu(z) RMS-normed over each group's d_inner / G,
   times the norm weight, rounded to the dtype into out [d_inner]. dims: d_inner, conv_dim, H, P, N, G, L, eps bits;
   prm: dt_bias, A_log, D (fp32, or the dtype if pbf). */
static void mamba2_step(const void *zx, void *conv_st, float *s_all, const void *w, const void *bias,
                        const void *const *prm, int pbf, const void *nw, void *out, int bf, const int64_t *dims) {
    int64_t di = dims[0], cd = dims[1], H = dims[2], P = dims[3], N = dims[4], G = dims[5], L = dims[6];
    float eps = f32_of(dims[7]);
    float *a = (float *)malloc(sizeof(float) * (cd + di));
    if (!a) return;
    float *y = a + cd;
    dwconv_silu_step((const char *)zx + di * (bf ? 2 : 4), conv_st, &w, cd, bias, a, bf, cd, L);
    const float *xs = a, *B = a + di, *Cm = a + di + G * N;
    for (int64_t h = 0; h < H; h++) {
        int64_t g = h / (H / G);
        float dt = rdv(zx, di + cd + h, bf) + rdv(prm[0], h, pbf);
        dt = dt > 20.0f ? dt : log1pf(expf(dt));
        float decay = expf(dt * -expf(rdv(prm[1], h, pbf))), dd = rdv(prm[2], h, pbf);
        for (int64_t p = 0; p < P; p++) {
            float *s = s_all + (h * P + p) * N, xv = xs[h * P + p], acc = 0.0f, dx = dt * xv;
            for (int64_t n = 0; n < N; n++) {
                s[n] = s[n] * decay + dx * B[g * N + n];
                acc += s[n] * Cm[g * N + n];
            }
            y[h * P + p] = acc + xv * dd;
        }
    }
    int64_t gs = di / G;
    for (int64_t g = 0; g < G; g++) {
        float ss = 0.0f;
        for (int64_t i = g * gs; i < (g + 1) * gs; i++) {
            float zv = rdv(zx, i, bf), sz = zv / (1.0f + expf(-zv));
            y[i] *= sz;
            ss += y[i] * y[i];
        }
        float inv = 1.0f / sqrtf(ss / (float)gs + eps);
        for (int64_t i = g * gs; i < (g + 1) * gs; i++) wrv(out, i, rdv(nw, i, bf) * (y[i] * inv), bf);
    }
    free(a);
}

void zoo_run(const int64_t *prog, int64_t nops, const int64_t *dyn, int threads) {
    if (threads > 1) atomic_store(&hot, 1); /* (the products come back to back: a sleeping worker costs ~50 us) */
    for (int64_t i = 0; i < nops; i++) {
        const int64_t *op = prog + 16 * i;
        switch (op[0]) {
        case OP_NORM: /* x, w, y, bf, m, k, eps */
            zoo_rmsnorm(P(1), P(2), P(3), (int)op[4], op[5], op[6], f32_of(op[7]));
            break;
        case OP_GEMV: /* wkind, w, x, xbf, s, sbf, y, ybf, n, k, y_dyn (1: y is the address in dyn[op[7]]) */
            zoo_gemv((int)op[1], P(2), P(3), (int)op[4], P(5), (int)op[6], op[11] ? (void *)(intptr_t)dyn[op[7]] : P(7),
                     (int)op[8], op[9], op[10], threads);
            break;
        case OP_ADD: { /* a, b, out, n, bf: out = a + b (out may be a) */
            int bf = (int)op[5];
            if (!bf) {
                const float *a = P(1), *b = P(2);
                float *o = P(3);
                int64_t n = op[4], j = 0;
                for (; j + 16 <= n; j += 16) _mm512_storeu_ps(o + j, _mm512_add_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j)));
                for (; j < n; j++) o[j] = a[j] + b[j];
            } else {
                for (int64_t j = 0; j < op[4]; j++) wrv(P(3), j, rdv(P(1), j, 1) + rdv(P(2), j, 1), 1);
            }
            break;
        }
        case OP_SILU_MUL: { /* g, u, out, n, bf: out = silu(g) * u, silu rounded to the dtype first */
            int bf = (int)op[5];
            int64_t n = op[4];
            for (int64_t j = 0; j < n; j += 16) {
                __mmask16 mk = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
                __m512 g = bf ? ldm_bf16(mk, (const uint16_t *)P(1) + j) : ldm_f32(mk, (const float *)P(1) + j);
                __m512 u = bf ? ldm_bf16(mk, (const uint16_t *)P(2) + j) : ldm_f32(mk, (const float *)P(2) + j);
                __m512 sv = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512neg(g)));
                if (bf) _mm256_mask_storeu_epi16((uint16_t *)P(3) + j, mk, bf16_round(_mm512_mul_ps(
                            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round(sv)), 16)), u)));
                else _mm512_mask_storeu_ps((float *)P(3) + j, mk, _mm512_mul_ps(sv, u));
            }
            break;
        }
        case OP_CONV: /* bcx, dyn index of the state, w, bias, out, bf, d, L */
            zoo_conv_step(P(1), (void *)(intptr_t)dyn[op[2]], P(3), P(4), 0, P(5), (int)op[6], 1, op[7], op[8]);
            break;
        case OP_ROPE: /* x, dyn index (this step's cos row, sin row), out, bf, heads, hd */
            zoo_rope(P(1), (const void *)(intptr_t)dyn[op[2]], (const void *)(intptr_t)dyn[op[2] + 1], P(3), (int)op[4], 1,
                     op[5], op[6], 0);
            break;
        case OP_KV_STORE: { /* k, v, dyn index (k base, v base, head stride), kv heads, hd, bf: slot dyn[0] */
            int64_t es = op[6] ? 2 : 4, hd = op[5], sh = dyn[op[3] + 2];
            for (int64_t h = 0; h < op[4]; h++) {
                memcpy((char *)(intptr_t)dyn[op[3]] + (h * sh + dyn[0] * hd) * es, (const char *)P(1) + h * hd * es, hd * es);
                memcpy((char *)(intptr_t)dyn[op[3] + 1] + (h * sh + dyn[0] * hd) * es, (const char *)P(2) + h * hd * es, hd * es);
            }
            break;
        }
        case OP_DELTANET: { /* qkvb, dyn index (conv state, fp32 state), wq, wk, wv, out, bf, d, heads, L */
            const void *w3[3] = {P(3), P(4), P(5)};
            deltanet_step(P(1), (void *)(intptr_t)dyn[op[2]], (float *)(intptr_t)dyn[op[2] + 1], w3, P(6), (int)op[7],
                          op[8], op[9], op[10]);
            break;
        }
        case OP_MAMBA2: { /* zxbcdt, dyn index (conv state, fp32 state), conv w, conv bias, dt_bias, A_log, D, param
                             dtype, norm weight, out, bf, dims (int64 [8]) */
            const void *prm[3] = {P(5), P(6), P(7)};
            mamba2_step(P(1), (void *)(intptr_t)dyn[op[2]], (float *)(intptr_t)dyn[op[2] + 1], P(3), P(4), prm,
                        (int)op[8], P(9), P(10), (int)op[11], (const int64_t *)P(12));
            break;
        }
        case OP_EMBED: { /* table, scale (int8 rows), kind (0 fp32, 1 bf16, 2 int8), out, bf, d, dyn index of the
                            token: its row, int8 dequantized like ``q.to(dtype) * scale.to(dtype)`` */
            int64_t d = op[6], row = dyn[op[7]], kind = op[3];
            int bf = (int)op[5];
            if (kind < 2) {
                memcpy(P(4), (const char *)P(1) + row * d * (kind ? 2 : 4), d * (kind ? 2 : 4));
            } else {
                const int8_t *q = (const int8_t *)P(1) + row * d;
                float s = rdv(P(2), row, bf);
                for (int64_t j = 0; j < d; j++) wrv(P(4), j, (float)q[j] * s, bf);
            }
            break;
        }
        case OP_WARM: /* addresses (int64), count: bring these lines back into the caches (prefetch never faults) */
            for (int64_t j = 0; j < op[2]; j++) _mm_prefetch((const char *)(intptr_t)((const int64_t *)P(1))[j], _MM_HINT_T0);
            break;
        case OP_ATTN: /* q, o, dyn index (k base, v base, head stride), bf, heads, kv heads, hd, scale */
            zoo_attn_decode(P(1), (void *)(intptr_t)dyn[op[3]], (void *)(intptr_t)dyn[op[3] + 1], P(2), 0, (int)op[4], 1,
                            op[5], op[6], dyn[0] + 1, op[7], 0, dyn[op[3] + 2], f32_of(op[8]), threads);
            break;
        }
    }
    atomic_store(&hot, 0);
}
#undef P
"""

# no contraction of a * b + c into an FMA: the scalar parts round exactly where the PyTorch ops they replace round
_FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-shared", "-fPIC", "-pthread"]
_AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-DZOO_AMX"]  # the prefill products (zoo_gemm_bf16); dropped if unknown
_state: dict[str, Any] = {}
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_ENV = {0: "ZOO_DISABLE_F32_GEMV", 1: "ZOO_DISABLE_BF16_GEMV", 2: "ZOO_DISABLE_INT8_GEMV", 3: "ZOO_DISABLE_CPU_NORM",
        4: "ZOO_DISABLE_CPU_ATTN", 5: "ZOO_DISABLE_CPU_CONV", 6: "ZOO_DISABLE_CPU_ROPE", 7: "ZOO_DISABLE_HUGEPAGES",
        8: "ZOO_DISABLE_STEP_PROGRAM", 9: "ZOO_DISABLE_AMX_GEMM"}
_huge_done: set[tuple[int, int]] = set()


def use_hugepages(t: torch.Tensor) -> None:
    """Back a weight's memory by 2 MiB pages, once per tensor (``madvise(MADV_HUGEPAGE)`` + ``MADV_COLLAPSE``, Linux
    >= 6.1; any failure is ignored). Streaming 1.4 GB of fp32 LFM2-350M weights read at 11.0 GB/s through 4 KiB pages
    and 18.5 GB/s through 2 MiB pages (CPU time, same process, this VM): a hardware prefetcher stops at every 4 KiB
    page and every page costs a TLB walk. PyTorch's allocator uses 2 MiB pages only with ``THP_MEM_ALLOC_ENABLE=1``
    set before start-up (``transparent_hugepage`` is ``madvise`` here)."""
    key = (t.data_ptr(), t.numel())
    if key in _huge_done or 7 in _state.get("off", ()) or not sys.platform.startswith("linux"):
        return
    _huge_done.add(key)
    lib = _state.get("libc")
    if lib is None:
        import ctypes

        lib = _state["libc"] = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    a, n, page = t.data_ptr(), t.numel() * t.element_size(), 2 << 20
    lo, hi = (a + page - 1) & -page, (a + n) & -page
    if hi > lo and lib.madvise(lo, hi - lo, 14) == 0:  # MADV_HUGEPAGE
        lib.madvise(lo, hi - lo, 25)  # MADV_COLLAPSE: the existing pages now


def hugepage_empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(*shape, dtype=dtype)`` on the CPU starting at a 2 MiB boundary and advised to 2 MiB pages before
    its first touch (see :func:`use_hugepages`), for buffers streamed by the decode kernels (KV caches)."""
    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    page = 2 << 20
    raw = torch.empty(n + page, dtype=torch.uint8)
    base = (-raw.data_ptr()) % page
    use_hugepages(raw[base:])
    return raw[base: base + n].view(dtype).view(*shape)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux ``/proc/self/maps``; empty elsewhere)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def move_to_arena(slots: list[tuple[Any, str]]) -> torch.Tensor | None:
    """Move the storages behind the tensors ``owner.<name>`` (parameters or buffers), in this order, into one buffer
    backed by 2 MiB pages, and re-point the tensors to views of it (values, shapes, strides, storage sharing and
    ``Parameter`` identity unchanged; each old storage is freed once nothing else holds it). A decode step then
    streams its weights as one run of huge pages in the order it reads them: on this machine single-row int8 products
    over separately allocated 1-9 MB matrices (4 KiB pages wherever a matrix does not cover an aligned 2 MiB) read at
    ~14 GB/s, and at ~16 GB/s over the arena. Weights mapped from a checkpoint file (safetensors' lazy loading) stay
    where they are: the file's pages would stay mapped next to the copy. Returns the arena (uint8), or None when there
    is nothing to move."""
    groups: dict[int, list] = {}
    files = _file_mappings()
    for owner, name in slots:
        t = getattr(owner, name)
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        if any(lo <= st.data_ptr() < hi for lo, hi in files):
            continue  # mapped from a checkpoint file: a copy would not free the file's pages (peak RSS x2)
        groups.setdefault(st.data_ptr(), [st, []])[1].append((owner, name, t))
    if not groups:
        return None
    page = 2 << 20
    sizes = [(st.nbytes() + 63) // 64 * 64 for st, _ in groups.values()]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: training may follow
        raw = torch.empty(sum(sizes) + page, dtype=torch.uint8)
        base = (-raw.data_ptr()) % page
        use_hugepages(raw[base:])  # before the first touch: the copies below fault in huge pages
        pos = base
        order = list(groups)
        for key, size in zip(order, sizes):
            st, items = groups.pop(key)  # (dropped as we go: each old storage is freed once re-pointed)
            raw[pos: pos + st.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(st))
            del st
            while items:
                owner, name, t = items.pop(0)
                el = t.element_size()
                view = torch.empty(0, dtype=t.dtype).set_(raw.untyped_storage(), pos // el + t.storage_offset(),
                                                          t.shape, t.stride())
                if name in getattr(owner, "_parameters", {}):
                    owner._parameters[name].data = view
                elif name in getattr(owner, "_buffers", {}):
                    owner._buffers[name] = view
                else:
                    setattr(owner, name, view)
                del t, view
            pos += size
    return raw


def _compiler() -> str | None:
    import shutil

    cc = os.environ.get("CC")
    if cc is not None:  # an explicit compiler (or a missing one) is taken as given
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _load():
    """The compiled ``zoo_gemv`` (a ctypes function), or None: not x86 Linux with AVX512F/BW/VL, no C compiler, or
    the build failed (any failure means the stock products run). The ``ZOO_DISABLE_*_GEMV`` switches and ``CC`` are
    read here, once per process (:func:`reset` reads them again)."""
    if "fn" in _state:
        return _state["fn"]
    _state["fn"] = None
    _state["off"] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        if not {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
            return None
        import ctypes
        import hashlib
        import shutil
        import subprocess
        import tempfile

        cc = _compiler()
        if cc is None:
            return None
        from zoo.checkpoints import zoo_home

        amx = {"amx_tile", "amx_bf16"} <= flags
        for flags_now in ([*_FLAGS, *_AMX_FLAGS], _FLAGS) if amx else (_FLAGS,):  # a compiler without AMX: no AMX
            key = hashlib.sha256((_GEMV_C + " ".join(flags_now)).encode()).hexdigest()[:16]
            so = zoo_home() / "kernels" / f"gemv_{key}.so"
            if so.exists():
                break
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "gemv.c")
                with open(src, "w") as f:
                    f.write(_GEMV_C)
                tmp = os.path.join(d, "gemv.so")
                if subprocess.run([cc, *flags_now, src, "-o", tmp], capture_output=True).returncode != 0:
                    continue
                part = so.with_suffix(f".{os.getpid()}.part")  # atomic publish: concurrent builders never clash
                shutil.move(tmp, part)
                os.replace(part, so)
                break
        else:
            return None
        lib = ctypes.CDLL(str(so))
        fn = lib.zoo_gemv
        c = ctypes
        fn.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_int, c.c_void_p, c.c_int,
                       c.c_int64, c.c_int64, c.c_int]
        fn.restype = None
        _state["fn"] = fn
        norm = lib.zoo_rmsnorm
        norm.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_float]
        norm.restype = None
        _state["norm"] = norm
        am = lib.zoo_argmax
        am.argtypes = [c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_int64, c.c_void_p]
        am.restype = None
        _state["argmax"] = am
        att = lib.zoo_attn_decode
        att.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, *[c.c_int64] * 7,
                        c.c_float, c.c_int]
        att.restype = None
        _state["attn"] = att
        cs = lib.zoo_conv_step
        cs.argtypes = [c.c_void_p] * 6 + [c.c_int, c.c_int64, c.c_int64, c.c_int64]
        cs.restype = None
        _state["conv"] = cs
        run = lib.zoo_run
        run.argtypes = [c.c_void_p, c.c_int64, c.c_void_p, c.c_int]
        run.restype = None
        _state["run"] = run
        rp = lib.zoo_rope
        rp.argtypes = [c.c_void_p] * 4 + [c.c_int, c.c_int64, c.c_int64, c.c_int64, c.c_int64]
        rp.restype = None
        _state["rope"] = rp
        gm = lib.zoo_gemm_bf16
        gm.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p,
                       c.c_int64, c.c_int, c.c_void_p, c.c_int64, c.c_void_p, c.c_int]
        gm.restype = c.c_int
        ff = lib.zoo_ffn_bf16
        ff.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p,
                       c.c_void_p, c.c_void_p, c.c_void_p, c.c_int]
        ff.restype = c.c_int
        ap = lib.zoo_attn_prefill
        ap.argtypes = [c.c_void_p] * 4 + [c.c_int64] * 6 + [c.c_void_p, c.c_float, c.c_int]
        ap.restype = c.c_int
        cp = lib.zoo_conv_prefill
        cp.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_int64] + [c.c_void_p] * 5
        cp.restype = None
        _state["conv_prefill"] = cp
        # AMX needs the kernel's permission for its tile state once per process (Linux >= 5.16)
        amx = amx and lib.zoo_amx_init() == 0
        _state["gemm"], _state["ffn"], _state["attn_prefill"] = (gm, ff, ap) if amx else (None, None, None)
        _state["off"] = {k for k, env in _ENV.items() if os.environ.get(env)}
    except Exception:  # noqa: BLE001 - any failure just means the stock kernel is used
        _state["fn"] = None
    return _state["fn"]


def reset() -> None:
    """Forget the loaded kernel (the next product looks for it again, re-reading the environment)."""
    _state.clear()


def kernels_available() -> bool:
    """Whether the compiled single-row kernels are in use on this machine (see the module docstring)."""
    return _load() is not None


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] == x.shape[-1]
        and x.shape[-1] > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _call(kind: int, weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype):
    fn = _state["fn"] if "fn" in _state else _load()
    if fn is None or kind in _state["off"]:
        return None
    xv = x.reshape(-1)
    if not xv.is_contiguous():
        xv = xv.contiguous()
    if weight.numel() * weight.element_size() >= 2 << 20:
        use_hugepages(weight)
    y = torch.empty(weight.shape[0], dtype=out_dtype)
    fn(kind, weight.data_ptr(), xv.data_ptr(), int(x.dtype is torch.bfloat16),
       None if scale is None else scale.data_ptr(), int(scale is not None and scale.dtype is torch.bfloat16),
       y.data_ptr(), int(out_dtype is torch.bfloat16), weight.shape[0], weight.shape[1], torch.get_num_threads())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the single-row kernels for fp32 x fp32 and bf16 x bf16 inference products (CPU)."""
    if x.dtype is weight.dtype and _usable(x, weight) and (bias is None or bias.dtype is x.dtype):
        y = _call(_KIND[x.dtype], weight, x, None, x.dtype)
        if y is not None:
            return y if bias is None else y.add_(bias)
    if x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.numel() >= 16 * x.shape[-1] > 0:
        y = prefill_linear(x, weight, bias)  # many rows (prefill): AMX tiles where the CPU has them
        if y is not None:
            return y
    return F.linear(x, weight, bias)


_scratch = threading.local()  # per calling thread: ctypes releases the GIL, so two threads may be inside at once
_PREFILL_ROWS = 1024  # rows per call of the prompt products: bounds the packed scratch (a few MB) for any prompt


def _packed_rows(n: int, name: str = "xp") -> torch.Tensor:
    """A reusable bf16 buffer of at least ``n`` values for packed activations (a fresh one per call would
    page-fault its megabytes every time)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.bfloat16)
        setattr(_scratch, name, buf)
    return buf


def _prompt_rows(x: torch.Tensor, m: int, k: int) -> tuple[torch.Tensor, int]:
    """``x`` as [m, k] rows with unit stride inside a row, and the rows of packed scratch one call of a prompt
    product needs (its row blocks are ``_PREFILL_ROWS`` long, rounded up to whole 32-row tiles)."""
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, (min(m, _PREFILL_ROWS) + 31) // 32 * 32


def prefill_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """The SwiGLU feed-forward ``(F.silu(x W1^T) * (x W3^T)) W2^T`` (plus ``residual``) of a many-row bf16 inference
    input on AMX tiles, ``w13`` = [W1; W3] ([2F, K]), ``w2`` [K, F]: :func:`prefill_linear`'s two products, the hidden
    activations going from the first one's epilogue straight into the second one's tile layout. None where it does
    not apply (see :func:`prefill_linear`; also F % 32 == 0)."""
    fn = _state.get("ffn") if "fn" in _state else (_load() and _state.get("ffn"))
    if fn is None or 9 in _state["off"] or not all(t.dtype is torch.bfloat16 for t in (x, w13, w2)):
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    f = w13.shape[0] // 2 if w13.dim() == 2 else 0
    if (m < 16 or k % 32 or f % 32 or f == 0 or w13.shape != (2 * f, k) or w2.shape != (k, f)
            or not (w13.is_contiguous() and w2.is_contiguous()) or x.device.type != "cpu"
            or w13.device.type != "cpu" or w2.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad or w2.requires_grad))):
        return None
    if residual is not None and (residual.dtype is not torch.bfloat16 or residual.shape != x.shape
                                 or not residual.is_contiguous()
                                 or (torch.is_grad_enabled() and residual.requires_grad)):
        return None
    x2, rows = _prompt_rows(x, m, k)
    xp, hp = _packed_rows(rows * k), _packed_rows(rows * f, "hp")
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    y2, r2 = y.view(m, k), None if residual is None else residual.view(m, k)
    for r0 in range(0, m, _PREFILL_ROWS):
        mr = min(_PREFILL_ROWS, m - r0)
        rc = fn(x2[r0].data_ptr(), mr, k, x2.stride(0), w13.data_ptr(), f, w2.data_ptr(), y2[r0].data_ptr(),
                None if r2 is None else r2[r0].data_ptr(), xp.data_ptr(), hp.data_ptr(), torch.get_num_threads())
        if rc != 0:
            return None
    return y


def prefill_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   residual: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor | None:
    """Many-row bf16 products on AMX tiles (prefill), or None where they do not apply (the caller runs its own ops).

    ``F.linear(x, weight, bias)`` (fp32 sums of exact bf16 products, rounded to bf16 once, like PyTorch's oneDNN
    product up to summation order) without reordering the weight at every call, optionally followed by
    ``residual + y`` (``residual`` [..., N]) or, for ``silu_mul`` (``weight`` = gate rows then up rows, [2F, K]),
    ``F.silu(gate) * up`` -- each rounded to bf16 where those PyTorch ops round. Needs a CPU with AMX (Sapphire Rapids
    and later), bf16 ``x`` and ``weight``, K % 32 == 0, N % 32 == 0, at least 16 rows, no autograd;
    ``ZOO_DISABLE_AMX_GEMM=1`` turns it off."""
    fn = _state.get("gemm") if "fn" in _state else (_load() and _state.get("gemm"))
    if fn is None or 9 in _state["off"] or x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16:
        return None
    k = x.shape[-1]
    n = weight.shape[0] if weight.dim() == 2 else 0
    m = x.numel() // k if k else 0
    if (m < 16 or k % 32 or n % 32 or weight.shape[1] != k or not weight.is_contiguous() or x.device.type != "cpu"
            or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    out_n = n // 2 if silu_mul else n
    if bias is not None and (silu_mul or bias.dtype is not torch.bfloat16 or not bias.is_contiguous()
                             or bias.shape != (n,) or (torch.is_grad_enabled() and bias.requires_grad)):
        return None
    if residual is not None and (silu_mul or residual.dtype is not torch.bfloat16
                                 or residual.shape != (*x.shape[:-1], n) or not residual.is_contiguous()
                                 or (torch.is_grad_enabled() and residual.requires_grad)):
        return None
    x2, rows = _prompt_rows(x, m, k)
    xp = _packed_rows(rows * k)
    y = torch.empty(*x.shape[:-1], out_n, dtype=torch.bfloat16)
    y2, r2 = y.view(m, out_n), None if residual is None else residual.view(m, n)
    for r0 in range(0, m, _PREFILL_ROWS):
        mr = min(_PREFILL_ROWS, m - r0)
        rc = fn(x2[r0].data_ptr(), mr, k, x2.stride(0), weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
                y2[r0].data_ptr(), out_n, 2 if silu_mul else int(residual is not None),
                None if r2 is None else r2[r0].data_ptr(), n, xp.data_ptr(), torch.get_num_threads())
        if rc != 0:
            return None
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim of an inference input in one call, or None where the kernel does not apply (the
    caller runs its own ops): fp32 up to 65536 values (decode rows), bf16 any size. fp32: ``F.rms_norm``'s math;
    bf16: fp32 statistics, the normalised row rounded to bf16 and multiplied by the bf16 weight (the hybrid LMs'
    ``RMSNorm``)."""
    fn = _state.get("norm") if "fn" in _state else (_load() and _state.get("norm"))
    if (fn is None or 3 in _state["off"] or x.dtype is not weight.dtype or x.dtype not in (torch.float32, torch.bfloat16)
            or x.device.type != "cpu" or (x.numel() > 65536 and x.dtype is not torch.bfloat16) or x.numel() == 0
            or not x.is_contiguous()
            or not weight.is_contiguous() or weight.numel() != x.shape[-1]
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    y = torch.empty_like(x)
    k = x.shape[-1]
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), int(x.dtype is torch.bfloat16), x.numel() // k, k, eps)
    return y


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of a [B, V] fp32 / bf16 CPU tensor in one single-threaded pass per row, without the fp32
    copy and PyTorch's two parallel regions (on 2 cores each wakes a sleeping OpenMP worker: 0.3-0.6 ms per decoded
    token); the same index (first of equal maxima, NaN first). Other inputs: ``torch.argmax``."""
    fn = _state.get("argmax") if "fn" in _state else (_load() and _state.get("argmax"))
    if fn is not None and logits.dtype in _ARGMAX_DTYPES and logits.ndim == 2 and logits.is_cpu:
        (rows, n), (rs, cs) = logits.shape, logits.stride()
        if cs == 1 and 0 < n < 1 << 31:
            out = torch.empty(rows, dtype=torch.long)
            fn(logits.data_ptr(), logits.dtype is torch.bfloat16, rows, n, rs * logits.element_size(), out.data_ptr())
            return out
    return logits.argmax(-1)


_ARGMAX_DTYPES = (torch.float32, torch.bfloat16)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                scale: float) -> torch.Tensor | None:
    """Grouped-query attention of ONE query per row: ``q`` [B, H, 1, hd], ``k`` / ``v`` [B, KVH, S, hd] (views of a
    KV buffer: contiguous [S, hd] blocks), ``keep`` [B, S] bool (visible keys) or None; returns [B, H, 1, hd]
    (head h reads kv head h // (H / KVH)), or None where the kernel does not apply. fp32 scores and softmax, one
    rounding of the output; reads the cache once."""
    fn = _state.get("attn") if "fn" in _state else (_load() and _state.get("attn"))
    if (fn is None or 4 in _state["off"] or q.dtype not in (torch.float32, torch.bfloat16)
            or not (q.dtype is k.dtype is v.dtype) or q.device.type != "cpu" or q.shape[2] != 1
            or k.shape != v.shape or k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != k.shape[3]
            or q.shape[-1] != k.shape[-1] or k.shape[-1] > 512 or q.shape[1] % k.shape[1] or k.shape[2] == 0
            or torch.is_grad_enabled()):
        return None
    b, h, _, hd = q.shape
    qc = q.contiguous()
    o = torch.empty_like(qc)
    kp = None
    if keep is not None:
        keep = keep.reshape(b, -1)
        kp = keep.to(torch.uint8).contiguous() if keep.dtype is not torch.uint8 else keep.contiguous()
    fn(qc.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), None if kp is None else kp.data_ptr(),
       int(q.dtype is torch.bfloat16), b, h, k.shape[1], k.shape[2], hd, k.stride(0), k.stride(1), scale,
       torch.get_num_threads())
    return o


def conv_step(bcx: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              keep: torch.Tensor | None) -> torch.Tensor | None:
    """LFM2's gated short convolution for one new token per row in one call: ``bcx`` [B, 1, 3d] (in_proj output:
    B, C, x), ``state`` [B, L-1, d] (the cached conv inputs, shifted in place), ``weight`` [d, 1, L], ``keep`` [B, 1]
    (0 = padding) or None; returns ``C * conv(B * x)`` [B, 1, d] rounded as the module's ops round it, or None where
    the kernel does not apply."""
    fn = _state.get("conv") if "fn" in _state else (_load() and _state.get("conv"))
    dt = bcx.dtype
    if (fn is None or 5 in _state["off"] or dt not in (torch.float32, torch.bfloat16) or bcx.device.type != "cpu"
            or not (state.dtype is weight.dtype is dt) or (bias is not None and bias.dtype is not dt)
            or bcx.shape[1] != 1 or not bcx.is_contiguous() or not state.is_contiguous()
            or not weight.is_contiguous() or torch.is_grad_enabled()):
        return None
    b, _, d3 = bcx.shape
    d, L = d3 // 3, weight.shape[-1]
    if state.shape != (b, L - 1, d) or weight.numel() != d * L:
        return None
    kp = None if keep is None else keep.reshape(b).to(torch.uint8).contiguous()
    out = bcx.new_empty(b, 1, d)
    fn(bcx.data_ptr(), state.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
       None if kp is None else kp.data_ptr(), out.data_ptr(), int(dt is torch.bfloat16), b, d, L)
    return out


def attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal grouped-query attention of a bf16 prompt on AMX tiles: ``q`` [B, H, T, hd], ``k`` / ``v`` [B, KVH, S,
    hd] (S >= T: the last T keys are the prompt's, earlier ones cached; each [S, hd] block contiguous); query i sees
    keys up to S - T + i. Returns the output as [B, T, H, hd] (the layout the output projection reads), or None where
    the kernel does not apply. fp32 scores and softmax, bf16 probabilities into the value product (as a flash
    kernel), one rounding of the output."""
    fn = _state.get("attn_prefill") if "fn" in _state else (_load() and _state.get("attn_prefill"))
    if fn is None or 9 in _state["off"] or 4 in _state["off"] or not all(t.dtype is torch.bfloat16 for t in (q, k, v)):
        return None
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.device.type != "cpu":
        return None
    b, h, t, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    if (k.shape[0] != b or k.shape[3] != hd or hd % 32 or hd > 256 or h % kvh or s < t or t < 16
            or q.stride(3) != 1 or k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != hd
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    o = torch.empty(b, t, h, hd, dtype=torch.bfloat16)
    strides = torch.tensor([q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1)], dtype=torch.int64)
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), b, h, kvh, t, s, hd, strides.data_ptr(), scale,
            torch.get_num_threads())
    return o if rc == 0 else None


def conv_prefill(bcx: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LFM2's gated short conv over a bf16 prompt in one call: ``bcx`` [B, T, 3d] (b, c, x), ``state`` [B, L-1, d]
    (the cached inputs, None: zeros), ``weight`` [d, 1, L], ``bias`` [d] or None. Returns ``(c * conv(b * x), new
    state)`` rounded where ``ShortConv.forward``'s PyTorch ops round, or None where the kernel does not apply."""
    fn = _state.get("conv_prefill") if "fn" in _state else (_load() and _state.get("conv_prefill"))
    if (fn is None or 5 in _state["off"] or bcx.dtype is not torch.bfloat16 or bcx.dim() != 3
            or bcx.device.type != "cpu"):
        return None
    b, t, d3 = bcx.shape
    d, taps = d3 // 3, weight.shape[-1]
    if (d3 % 3 or taps < 2 or taps > 16 or weight.shape != (d, 1, taps)
            or (torch.is_grad_enabled() and bcx.requires_grad)
            or (bias is not None and bias.shape != (d,))
            or (state is not None and (state.shape != (b, taps - 1, d) or state.dtype is not torch.bfloat16))):
        return None
    bcx = bcx.contiguous()
    wt = weight.detach()[:, 0, :].t().to(torch.bfloat16).contiguous()
    bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
    state = None if state is None else state.contiguous()
    out = torch.empty(b, t, d, dtype=torch.bfloat16)
    new_state = torch.empty(b, taps - 1, d, dtype=torch.bfloat16)
    fn(bcx.data_ptr(), b, t, d, taps, None if state is None else state.data_ptr(), new_state.data_ptr(), wt.data_ptr(),
       None if bias is None else bias.data_ptr(), out.data_ptr())
    return out, new_state


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for one position per row in one call: ``x`` [B, H, 1, hd] (laid out as
    [B, H, hd]), ``cos`` / ``sin`` [B or 1, 1, 1, hd]; rounded as those ops round; None where it does not apply."""
    fn = _state.get("rope") if "fn" in _state else (_load() and _state.get("rope"))
    if (fn is None or 6 in _state["off"] or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu"
            or not (cos.dtype is sin.dtype is x.dtype) or x.dim() != 4 or x.shape[2] != 1 or x.shape[3] % 2
            or x.stride(3) != 1 or x.stride(1) != x.shape[3] or x.stride(0) != x.shape[1] * x.shape[3]
            or cos.shape != sin.shape or cos.shape[1:] != (1, 1, x.shape[3]) or cos.shape[0] not in (1, x.shape[0])
            or not cos.is_contiguous() or not sin.is_contiguous() or torch.is_grad_enabled()):
        return None
    b, h, _, hd = x.shape
    out = torch.empty(b, h, 1, hd, dtype=x.dtype)
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), int(x.dtype is torch.bfloat16), b, h, hd,
       hd if cos.shape[0] > 1 else 0)
    return out


def rope_prompt(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for a bf16 prompt in one call: ``x`` [B, H, T, hd] laid out as [B, T, H,
    hd] (the heads view of a projection), ``cos`` / ``sin`` [B, 1, T, hd] (or [1, 1, T, hd] for B == 1); the result
    has ``x``'s shape and layout, rounded as those ops round; None where it does not apply."""
    fn = _state.get("rope") if "fn" in _state else (_load() and _state.get("rope"))
    if (fn is None or 6 in _state["off"] or x.dtype is not torch.bfloat16 or x.device.type != "cpu" or x.dim() != 4
            or not (cos.dtype is sin.dtype is x.dtype) or torch.is_grad_enabled()):
        return None
    b, h, t, hd = x.shape
    if (hd % 32 or x.stride() != (t * h * hd, hd, h * hd, 1) or cos.shape != sin.shape
            or cos.shape != (b, 1, t, hd) or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    out = torch.empty(b, t, h, hd, dtype=x.dtype)
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), 1, b * t, h, hd, hd)
    return out.transpose(1, 2)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T`` for int8 ``qweight`` [N, K] and per-row ``scale`` [N] already in
    ``x.dtype`` (what ``_weight_int8pack_mm`` takes); output in ``x.dtype``. Single rows use the compiled kernel
    (exact products, fp32 sums, the scale applied to the finished dot product)."""
    if _usable(x, qweight) and scale.dtype is x.dtype and scale.is_contiguous():
        y = _call(2, qweight, x, scale, x.dtype)
        if y is not None:
            return y
    shape = x.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), qweight, scale)
    return y.reshape(*shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------- step programs


class NotProgrammable(Exception):
    """A layer (or this call's inputs) cannot be recorded into a :class:`StepProgram`; the caller runs its ops."""


_OPS = {"norm": 1, "gemv": 2, "add": 3, "silu_mul": 4, "conv": 5, "rope": 6, "kv_store": 7, "attn": 8, "deltanet": 9,
        "mamba2": 10, "embed": 11, "warm": 12}


def _bits(v: float) -> int:
    import struct

    return struct.unpack("<I", struct.pack("<f", v))[0]


class StepProgram:
    """A batch-1 decode step recorded once as a list of kernel calls over fixed buffers, run by one C call per token.

    The single-token ops of a decoder layer cost a few microseconds of Python each, about a tenth of a decode step
    of a 350M model once the products stream at memory bandwidth; a program removes all of it. Layers record
    themselves through the methods below (``x`` / ``out`` are tensors the program keeps alive; ``buffer`` makes
    scratch space). What changes per token -- the KV slot, the RoPE position, cache addresses that may move when a
    buffer grows -- lives in ``dyn``: words 0 and 1 are the slot and the position, and :meth:`dynamic` reserves more
    words, filled before every run by a callback. Every op is one of the kernels above, so a program computes what
    the per-op fast path computes (same kernels, same rounding points)."""

    def __init__(self, dtype: torch.dtype):
        if _load() is None or 8 in _state["off"]:
            raise NotProgrammable("the compiled kernels are unavailable or ZOO_DISABLE_STEP_PROGRAM is set")
        if dtype not in (torch.float32, torch.bfloat16):
            raise NotProgrammable(f"activations in {dtype}")
        self.dtype, self.bf = dtype, int(dtype is torch.bfloat16)
        self.ops: list[list[int]] = []
        self.keep: list[Any] = []  # tensors the program points into
        self.fillers: list[tuple[int, int, Any]] = []  # (first dyn word, count, callback(state) -> ints)
        self.after: list[Any] = []  # callbacks(state) once a run is done (cache bookkeeping)
        self.ndyn = 2
        self.watches: list[tuple[dict, str, Any]] = []  # (holder dict, attribute, weakref to the module or None)
        self.tensor_watches: list[tuple[dict, str, int]] = []  # (holder dict, attribute, tensor address)
        self.version_watches: list[tuple[Any, int]] = []  # (weakref to a tensor, its version when recorded)
        self.weight_slots: list[tuple[Any, str]] = []  # (owner, attribute) of the matrices, in the order they are read
        self.memo: dict[Any, Any] = {}  # what layers share (scratch buffers, RoPE words)

    # --------------------------------------------------------------- recording
    def buffer(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.zeros(*shape, dtype=dtype or self.dtype)
        self.keep.append(t)
        return t

    def scratch(self, name: Any, n: int) -> torch.Tensor:
        """A 1-D buffer of ``n`` activations shared by every layer that asks for ``name`` (layers run one by one)."""
        key = ("scratch", name, n)
        if key not in self.memo:
            self.memo[key] = self.buffer(n)
        return self.memo[key]

    def watch(self, owner: Any, *names: str) -> None:
        """Record ``owner.<name>`` (a submodule, tensor or None): :meth:`valid` turns False once it is replaced, or,
        for a tensor, once its storage moved (``.to()``, ``.data =``); in-place updates are read by the next run."""
        for name in names:
            v = getattr(owner, name)
            # the dict that holds the attribute (nn.Module keeps children, parameters and buffers in their own):
            # checking it directly keeps a whole model's check at tens of microseconds per step
            holder = next((d for d in (getattr(owner, a, None) for a in ("_parameters", "_buffers", "_modules"))
                           if isinstance(d, dict) and name in d), None)
            if holder is None:
                holder = owner.__dict__
            if isinstance(v, torch.Tensor):  # (a replaced or converted tensor is allocated before the old one
                self.tensor_watches.append((holder, name, v.data_ptr()))  # is freed: its address differs)
            else:  # a module (or None), by weak reference: the program must not keep replaced layers alive
                self.watches.append((holder, name, None if v is None else weakref.ref(v)))

    def watch_version(self, t: torch.Tensor) -> None:
        """Record ``t``'s in-place version: :meth:`valid` turns False once it is edited in place. For a tensor the
        program reads through a derived copy (an int8 scale converted to the activation dtype), which an in-place
        edit of ``t`` would not reach. Inference tensors keep no version (and are edited only in inference mode)."""
        if not t.is_inference():
            self.version_watches.append((weakref.ref(t), t._version))

    def _ptr(self, t: torch.Tensor | None, hold: bool = True) -> int:
        """The address of ``t``; ``hold=False`` for weights a module owns and the layer watches (the program must not
        keep replaced weights alive; a replaced weight fails :meth:`valid` before the next run)."""
        if t is None:
            return 0
        if t.device.type != "cpu" or not t.is_contiguous():
            raise NotProgrammable("a tensor is not a contiguous CPU tensor")
        if hold:
            self.keep.append(t)
        return t.data_ptr()

    def _emit(self, name: str, *words: int) -> None:
        self.ops.append([_OPS[name], *[int(w) for w in words]] + [0] * (15 - len(words)))

    def dynamic(self, n: int, fill=None) -> int:
        """Reserve ``n`` per-step words filled by ``fill(state) -> sequence of n ints`` before every run (``state``:
        what the caller passes to :meth:`run`; a fill may raise :class:`NotProgrammable` to refuse this step, so
        fills must not change anything the caller's fallback would see; changes go in :meth:`on_done`). Without
        ``fill`` the caller sets ``words[first + i]`` itself before :meth:`run`."""
        first = self.ndyn
        self.ndyn += n
        if fill is not None:
            self.fillers.append((first, n, fill))
        return first

    def on_done(self, fn) -> None:
        """Call ``fn(state)`` after every run."""
        self.after.append(fn)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
        k = weight.numel()
        if weight.dtype is not self.dtype:
            raise NotProgrammable("norm weight dtype")
        self._emit("norm", self._ptr(x), self._ptr(weight), self._ptr(out), self.bf, x.numel() // k, k,
                   _bits(eps))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, out_word: int | None = None) -> None:
        """out = x @ weight.T (+ bias); int8 ``weight`` with per-row ``scale`` (in the activation dtype). The caller
        owns ``weight`` and watches it (not held here). With ``out_word`` the result goes to the address the caller
        puts in ``words[out_word]`` before each run (``out`` only gives its size; no bias then)."""
        kind = _KIND.get(weight.dtype)
        if kind is None or kind in _state["off"] or (kind < 2 and weight.dtype is not self.dtype) or weight.dim() != 2:
            raise NotProgrammable(f"a {weight.dtype} weight")
        if (kind == 2) != (scale is not None) or (scale is not None and scale.dtype is not self.dtype):
            raise NotProgrammable("int8 weights need a per-row scale in the activation dtype")
        n, k = weight.shape
        if x.numel() != k or out.numel() != n:
            raise NotProgrammable("linear shapes")
        if out_word is not None and bias is not None:
            raise NotProgrammable("a bias on a product into a caller's buffer")
        if weight.numel() * weight.element_size() >= 2 << 20:
            use_hugepages(weight)
        self._emit("gemv", kind, self._ptr(weight, hold=False), self._ptr(x), self.bf, self._ptr(scale), self.bf,
                   self._ptr(out) if out_word is None else out_word, self.bf, n, k, int(out_word is not None))
        if bias is not None:
            self.add(out, bias.to(self.dtype), out)

    def embed(self, table: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor, token_word: int) -> None:
        """``out`` = row ``dyn[token_word]`` of ``table`` (fp32 / bf16 in the activation dtype, or int8 rows times
        their ``scale`` in the activation dtype, rounded once). The caller checks the token id and watches the table."""
        kind = _KIND.get(table.dtype)
        if kind is None or (kind < 2 and table.dtype is not self.dtype) or table.dim() != 2 \
                or (kind == 2) != (scale is not None) or (scale is not None and scale.dtype is not self.dtype) \
                or table.shape[1] != out.numel():
            raise NotProgrammable(f"a {table.dtype} embedding table")
        self._emit("embed", self._ptr(table, hold=False), self._ptr(scale), kind, self._ptr(out), self.bf,
                   out.numel(), token_word)

    def add(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        self._emit("add", self._ptr(a), self._ptr(b), self._ptr(out), out.numel(), self.bf)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
        self._emit("silu_mul", self._ptr(gate), self._ptr(up), self._ptr(out), out.numel(), self.bf)

    def conv(self, bcx: torch.Tensor, state_word: int, weight: torch.Tensor, bias: torch.Tensor | None,
             out: torch.Tensor) -> None:
        """LFM2's gated short conv (``conv_step``); ``dyn[state_word]``: the address of the [1, L-1, d] state."""
        d = out.numel()
        if weight.dtype is not self.dtype or (bias is not None and bias.dtype is not self.dtype):
            raise NotProgrammable("conv weight dtype")
        self._emit("conv", self._ptr(bcx), state_word, self._ptr(weight), self._ptr(bias), self._ptr(out),
                   self.bf, d, weight.numel() // d)

    def rope(self, x: torch.Tensor, rope_word: int, out: torch.Tensor, heads: int, head_dim: int) -> None:
        """RoPE of one position; ``dyn[rope_word]`` / ``dyn[rope_word + 1]``: addresses of its cos / sin rows."""
        self._emit("rope", self._ptr(x), rope_word, self._ptr(out), self.bf, heads, head_dim)

    def kv_store(self, k: torch.Tensor, v: torch.Tensor, kv_word: int, kv_heads: int, head_dim: int) -> None:
        self._emit("kv_store", self._ptr(k), self._ptr(v), kv_word, kv_heads, head_dim, self.bf)

    def attention(self, q: torch.Tensor, out: torch.Tensor, kv_word: int, heads: int, kv_heads: int, head_dim: int,
                  scale: float) -> None:
        self._emit("attn", self._ptr(q), self._ptr(out), kv_word, self.bf, heads, kv_heads, head_dim, _bits(scale))

    def deltanet(self, qkvb: torch.Tensor, state_word: int, conv_weights: list[torch.Tensor], out: torch.Tensor,
                 heads: int) -> None:
        """DeltaNet's decode step after its packed q|k|v|b product (``deltanet_step`` in the C source);
        ``dyn[state_word]`` / ``+1``: addresses of the conv state [1, L-1, 3d] and the fp32 state [1, H, hd, hd]."""
        if any(w.dtype is not self.dtype for w in conv_weights):
            raise NotProgrammable("conv weight dtype")
        d = out.numel()
        self._emit("deltanet", self._ptr(qkvb), state_word, *[self._ptr(w) for w in conv_weights], self._ptr(out),
                   self.bf, d, heads, conv_weights[0].shape[-1])

    def mamba2(self, zxbcdt: torch.Tensor, state_word: int, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
               dt_bias: torch.Tensor, a_log: torch.Tensor, d_skip: torch.Tensor, norm_weight: torch.Tensor,
               out: torch.Tensor, dims: dict, eps: float) -> None:
        """Mamba2's decode step after its in_proj product (``mamba2_step`` in the C source); ``dyn[state_word]`` /
        ``+1``: addresses of the conv state [1, L-1, conv_dim] and the fp32 state [1, H, P, N]."""
        pdt = {dt_bias.dtype, a_log.dtype, d_skip.dtype}
        if len(pdt) != 1 or next(iter(pdt)) not in (torch.float32, self.dtype) or conv_weight.dtype is not self.dtype \
                or norm_weight.dtype is not self.dtype or (conv_bias is not None and conv_bias.dtype is not self.dtype):
            raise NotProgrammable("Mamba2 parameter dtypes")
        words = torch.tensor([dims["d_inner"], dims["conv_dim"], dims["nheads"], dims["headdim"], dims["d_state"],
                              dims["ngroups"], conv_weight.shape[-1], _bits(eps)], dtype=torch.int64)
        self._emit("mamba2", self._ptr(zxbcdt), state_word, self._ptr(conv_weight), self._ptr(conv_bias),
                   self._ptr(dt_bias), self._ptr(a_log), self._ptr(d_skip), int(dt_bias.dtype is torch.bfloat16),
                   self._ptr(norm_weight), self._ptr(out), self.bf, self._ptr(words))

    def _warm_addresses(self) -> list[int]:
        """The memory :meth:`valid` reads, line by line: the watch tuples, holder dicts, names, weak references,
        watched tensors and, behind each tensor, its TensorImpl (``_cdata``) and StorageImpl. (CPython's ``id`` is
        the object's address. A stale address costs one useless prefetch: prefetches never fault.)"""
        lines: set[int] = set()

        def span(addr: int, nbytes: int) -> None:
            lines.update(range(addr & ~63, addr + nbytes, 64))

        span(id(self.watches), 32 + 8 * len(self.watches))
        span(id(self.tensor_watches), 32 + 8 * len(self.tensor_watches))
        for entry in self.watches:
            for o in (*entry, entry):
                span(id(o), 64)
        span(id(self.version_watches), 32 + 8 * len(self.version_watches))
        for entry in self.version_watches:  # (their tensors are watched by name too: the loop below adds them)
            span(id(entry), 64)
            span(id(entry[0]), 64)
        for entry in self.tensor_watches:
            holder, name, _ = entry
            t = holder.get(name)
            for o in (holder, name, entry, t):
                span(id(o), 64)
            impl = getattr(t, "_cdata", None) if isinstance(t, torch.Tensor) else None
            if isinstance(impl, int):  # (a PyTorch internal: left out if it ever goes)
                span(impl, 256)
                storage = getattr(t.untyped_storage(), "_cdata", None)
                if isinstance(storage, int):
                    span(storage, 128)
        return sorted(lines)

    def finish(self) -> "StepProgram":
        import ctypes

        self.watches, self.tensor_watches = tuple(self.watches), tuple(self.tensor_watches)  # (items inline)
        self.version_watches = tuple(self.version_watches)
        warm = self._warm_addresses()
        self.warm_lines = torch.tensor(warm, dtype=torch.int64)
        if warm:  # last: the weights have just streamed through every cache, and valid() runs first next step
            self._emit("warm", self._ptr(self.warm_lines), len(warm))
        flat = [w for op in self.ops for w in op]
        self._prog = (ctypes.c_int64 * len(flat))(*flat)
        self.words = (ctypes.c_int64 * self.ndyn)()
        return self

    # --------------------------------------------------------------- running
    def valid(self) -> bool:
        """False once a watched submodule or weight was replaced or moved (see :meth:`watch`), or a tensor read
        through a copy was edited in place (:meth:`watch_version`)."""
        # (checked every step, right after the weights streamed through the caches: kept to dict lookups and one
        # data_ptr call per weight, ~0.1-0.3 ms for a 350M model)
        for holder, name, ref in self.watches:
            v = holder.get(name)
            if (v is not None) if ref is None else (v is not ref()):
                return False
        for holder, name, ptr in self.tensor_watches:
            v = holder.get(name)
            if v is None or v.data_ptr() != ptr:
                return False
        for ref, version in self.version_watches:
            t = ref()
            if t is None or t._version != version:
                return False
        return True

    def run(self, slot: int, position: int, state: Any) -> None:
        """One step: ``slot`` (the KV position written, ``dyn[0]``), ``position`` (RoPE, ``dyn[1]``), ``state`` for
        the fills. Raises :class:`NotProgrammable` (before anything ran) when a fill refuses the step."""
        dyn = self.words
        dyn[0], dyn[1] = slot, position
        for first, n, fill in self.fillers:
            vals = fill(state)
            for i in range(n):
                dyn[first + i] = vals[i]
        _state["run"](self._prog, len(self.ops), dyn, torch.get_num_threads())
        for fn in self.after:
            fn(state)
