/* Float helpers shared by the CPU kernels that quantize rows (cpu_gemv.c, cpu_passes.c): every float operation is
 * the one bitnet_ao.kernels.reference performs, in the same order and rounding (the kernels are built with
 * -ffp-contract=off), so the results equal torch's bit for bit. Dtype codes: 0 float32, 1 bfloat16, 2 float16. */
#ifndef BITNET_AO_CPU_ROWS_H
#define BITNET_AO_CPU_ROWS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

/* v rounded to the dtype of code and back to float: round to nearest even, as c10::BFloat16 and _Float16. */
static inline float round_to(float v, int64_t code) {
    if (code == 1) {
        uint32_t u;
        memcpy(&u, &v, 4);
        u = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        memcpy(&v, &u, 4);
        return v;
    }
    if (code == 2) return (float)(_Float16)v;
    return v;
}

/* Element i of a tensor of dtype code, as float (exact: every such value is a float). */
static inline float load_value(const void* p, int64_t i, int64_t code) {
    if (code == 1) {
        const uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
        float v;
        memcpy(&v, &u, 4);
        return v;
    }
    if (code == 2) return (float)((const _Float16*)p)[i];
    return ((const float*)p)[i];
}

/* Store v, already rounded to the dtype of code (round_to), as element i. */
static inline void store(void* out, int64_t i, float v, int64_t code) {
    if (code == 1) {
        uint32_t u;
        memcpy(&u, &v, 4);
        ((uint16_t*)out)[i] = (uint16_t)(u >> 16);
    } else if (code == 2) {
        ((_Float16*)out)[i] = (_Float16)v;
    } else {
        ((float*)out)[i] = v;
    }
}

/* Elements off .. off + K of a tensor of dtype code, as floats in y; the dtype dispatch outside the loops, so that
 * the compiler vectorizes each. */
static inline void load_row(const void* p, int64_t off, int64_t K, int64_t code, float* y) {
    if (code == 1) {
        const uint16_t* h = (const uint16_t*)p + off;
        for (int64_t k = 0; k < K; ++k) {
            const uint32_t u = (uint32_t)h[k] << 16;
            memcpy(y + k, &u, 4);
        }
    } else if (code == 2) {
        const _Float16* h = (const _Float16*)p + off;
        for (int64_t k = 0; k < K; ++k) y[k] = (float)h[k];
    } else {
        memcpy(y, (const float*)p + off, (size_t)K * sizeof(float));
    }
}

/* round_to over a row. */
static inline void round_row(float* y, int64_t K, int64_t code) {
    if (code == 1) {
        for (int64_t k = 0; k < K; ++k) y[k] = round_to(y[k], 1);
    } else if (code == 2) {
        for (int64_t k = 0; k < K; ++k) y[k] = (float)(_Float16)y[k];
    }
}

/* A row of floats already rounded to the dtype of code (round_row), stored as elements off .. off + K. */
static inline void store_row(const float* y, int64_t K, int64_t code, void* out, int64_t off) {
    if (code == 1) {
        uint16_t* h = (uint16_t*)out + off;
        for (int64_t k = 0; k < K; ++k) {
            uint32_t u;
            memcpy(&u, y + k, 4);
            h[k] = (uint16_t)(u >> 16);
        }
    } else if (code == 2) {
        _Float16* h = (_Float16*)out + off;
        for (int64_t k = 0; k < K; ++k) h[k] = (_Float16)y[k];
    } else {
        memcpy((float*)out + off, y, (size_t)K * sizeof(float));
    }
}

/* max |y[k]|, NaN propagating like torch's amax: non-negative floats order as their bit patterns, and a NaN's
 * (sign cleared) is above every number's, so an integer max is exact. With AVX2 four chains of 8 lanes (the
 * compiler's own loop, one chain, ran at half the speed on a Zen 4 limited to AVX2). */
static inline float absmax(const float* y, int64_t K) {
    int64_t k = 0;
    uint32_t m = 0;
#if defined(__AVX2__)
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; ++j)
            a[j] = _mm256_max_epu32(a[j],
                                    _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(y + k + 8 * j)), magnitude));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i*)lanes, _mm256_max_epu32(_mm256_max_epu32(a[0], a[1]), _mm256_max_epu32(a[2], a[3])));
    for (int j = 0; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
#endif
    for (; k < K; ++k) {
        uint32_t u;
        memcpy(&u, y + k, 4);
        u &= 0x7fffffffu;
        m = u > m ? u : m;
    }
    float v;
    memcpy(&v, &m, 4);
    return v;
}

/* clamp(round(v / s), lo, hi) as int8: torch.round is round half to even, as nearbyintf. */
static inline int8_t quantize_value(float v, float s, float lo, float hi) {
    float q = nearbyintf(v / s);
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    return (int8_t)q;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* Elements p[off .. off + 16) of dtype code as floats. */
static inline __m512 load16(const void* p, int64_t off, int64_t code) {
    if (code == 1)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + off))), 16));
    if (code == 2) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + off)));
    return _mm512_loadu_ps((const float*)p + off);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* Elements src[off .. off + 64) of dtype code as floats in v[0..3]: in order, or with unpack (bfloat16 only) widened by
 * unpacking against zero, in-lane, one instruction for 16 values where the zero-extension and shift take two: v[2 h]
 * and v[2 h + 1] then hold the groups of four 8 g .. 8 g + 3 and 8 g + 4 .. 8 g + 7 of values 32 h .. 32 h + 31, lane
 * by 128-bit lane (the saturating packs and byte gathers after it restore the order). */
static inline void load64(const void* src, int64_t code, int64_t off, int unpack, __m512 v[4]) {
    const __m512i zero = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
        if (!unpack) {
            v[j] = load16(src, off + 16 * j, code);
        } else if (j % 2 == 0) {
            const __m512i h = _mm512_loadu_si512((const uint16_t*)src + off + 16 * j);
            v[j] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, h));
            v[j + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, h));
        }
    }
}
#endif

#if defined(__AVX2__)
/* Elements p[off .. off + 8) of dtype code as floats. */
static inline __m256 load8(const void* p, int64_t off, int64_t code) {
    const __m128i* h = (const __m128i*)((const uint16_t*)p + off);
    if (code == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
    if (code == 2) return _mm256_cvtph_ps(_mm_loadu_si128(h));
    return _mm256_loadu_ps((const float*)p + off);
}
#endif

#if defined(__AVX2__)
/* round_to of 8 floats: bfloat16 on the bits (as round_to), float16 through F16C. */
static inline __m256 round8(__m256 v, int64_t code) {
    if (code == 1) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)),
                                           _mm256_set1_epi32((int)0xffff0000u));
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan);
    }
    if (code == 2) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

/* 8 floats already rounded to the dtype of code (round8) stored as elements off .. off + 8 of out. */
static inline void store8(__m256 v, int64_t code, void* out, int64_t off) {
    if (code == 1) { /* the upper halves, packed in order: packus works within 128-bit lanes */
        const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
        _mm_storeu_si128((__m128i*)((uint16_t*)out + off), _mm256_castsi256_si128(p));
    } else if (code == 2) {
        _mm_storeu_si128((__m128i*)((uint16_t*)out + off),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm256_storeu_ps((float*)out + off, v);
    }
}
#endif

/* The multiply-by-the-reciprocal shortcut of quantize_span is taken where t = v * inv, inv = 1/s rounded, lies
 * farther than 2^-15 from every half-integer. Where |v / s| <= 129 the true quotient rounded, v / s in IEEE
 * arithmetic, is within |v / s| * (3 * 2^-24 + 2^-48) < 2.31e-5 of t (two roundings in t, one in the quotient;
 * plus at most 2^-148 where a product is subnormal), so both round to the same integer; where |v / s| > 129 both
 * clamp alike. Elsewhere (true ties, near-ties) the lane is divided. The bound needs inv a normal float, and the
 * fixed point of quantize_span_fixed inv * 2^16 and r * 2^16 too, hence s within [2^-100, 2^100] (and r for the
 * fixed point); outside it every lane is divided. */
#define BITNET_RECIPROCAL_MIN 0x1p-100f
#define BITNET_RECIPROCAL_MAX 0x1p100f
#define BITNET_NEAR_TIE (0.5f - 0x1p-15f)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* round(v * inv) of 16 lanes as int32, with inv = 1/s rounded, and the lanes where that may differ from round(v / s)
 * (see BITNET_NEAR_TIE) added to *near. The distance to the nearest integer as t - roundscale(t): vreduceps, which
 * gives it in one instruction, made the pass 40% slower on a Zen 4. */
static inline __m512 round_product16(__m512 v, __m512 inv, __mmask16* near) {
    const __m512 t = _mm512_mul_ps(v, inv);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    *near |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(t, n)), _mm512_set1_ps(BITNET_NEAR_TIE), _CMP_GT_OQ);
    return n;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VBMI__)
/* quantize_span's blocks of 64 in the int8 range of an absmax quantization (lo = -128, hi = 127, |v_k / s_k| below
 * 127.5), scales and r within [BITNET_RECIPROCAL_MIN, BITNET_RECIPROCAL_MAX], in fixed point: T = round(t * 2^16) as
 * int32 plus 2^15 + 4, with t = v * inv as quantize_span's (the 2^16 folded, exactly, into inv for one scale, into r
 * for per-element scales), so T is t to within 2^-17. Outside the lanes near a rounding tie, where (T + 2^15 + 4)
 * mod 2^16 < 8 (within 2^-14 of a half-integer; t's own error bound, BITNET_NEAR_TIE's, is 2^-15.4), bits 16 and up
 * are round(v / s), the reference's; a vector with such a lane divides (the exact quotient, rounded, shifted to the
 * same bits). Byte 2 of every lane is then the int8 value: one byte permute per two vectors gathers them in order.
 * 3.9 against 5.2 cycles per 16 bfloat16 values on a Zen 4, in place of the rounding, compare and saturating packs.
 * With stream the blocks at a 64-byte boundary are stored around the caches (non-temporal stores, as memcpy's for
 * large copies): for outputs larger than the last-level cache, whose lines are otherwise read from memory before
 * they are written (kernels/cpu_passes.py streams). Returns the number of values done (a multiple of 64). */
static inline int64_t quantize_span_fixed(const void* src, int64_t code, int64_t off, float r, const float* s,
                                          float s0, const float* inv_s, int64_t K, int8_t* q, int stream) {
    /* The byte of value e (mod 32) of a block: in vector e / 16 at lane e % 16 when loaded in order; unpacked bfloat16
     * holds groups of four, 4 g .. 4 g + 3, in vector g % 2 at lanes 4 (g / 2) ..; bit 6 picks the second vector. */
    static const uint8_t in_order[64] = {
        2,  6,  10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54,  58,  62,  66,  70,  74,  78,  82,  86,
        90, 94, 98, 102, 106, 110, 114, 118, 122, 126, 2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46,
        50, 54, 58, 62, 66, 70, 74, 78, 82, 86, 90, 94, 98, 102, 106, 110, 114, 118, 122, 126};
    static const uint8_t unpacked[64] = {
        2,  6,  10, 14, 66, 70, 74, 78, 18, 22, 26, 30, 82, 86, 90, 94, 34, 38, 42, 46, 98, 102,
        106, 110, 50, 54, 58, 62, 114, 118, 122, 126, 2, 6, 10, 14, 66, 70, 74, 78, 18, 22, 26, 30,
        82, 86, 90, 94, 34, 38, 42, 46, 98, 102, 106, 110, 50, 54, 58, 62, 114, 118, 122, 126};
    const int unpack = code == 1 && s == NULL; /* per-element scales are read in order */
    const __m512i gather = _mm512_loadu_si512(unpack ? unpacked : in_order);
    const __m512 vr = _mm512_set1_ps(r), vs0 = _mm512_set1_ps(s0);
    /* t * 2^16 = v * (inv * 2^16) for one scale, (x * (r * 2^16)) * inv_k for per-element ones */
    const __m512 vinv16 = _mm512_set1_ps(s == NULL ? 65536.0f / s0 : 0.0f), vr16 = _mm512_set1_ps(r * 65536.0f);
    const __m512i half = _mm512_set1_epi32(32768 + 4), window = _mm512_set1_epi32(0xfff8);
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512 x[4];
        load64(src, code, off + k, unpack, x);
        __m512i t[4];
        for (int j = 0; j < 4; ++j) {
            const __m512 t16 =
                s == NULL ? _mm512_mul_ps(r != 1.0f ? _mm512_mul_ps(x[j], vr) : x[j], vinv16)
                          : _mm512_mul_ps(_mm512_mul_ps(x[j], vr16), _mm512_loadu_ps(inv_s + k + 16 * j));
            t[j] = _mm512_add_epi32(_mm512_cvt_roundps_epi32(t16, nearest), half);
            if (_mm512_testn_epi32_mask(t[j], window)) { /* near a tie: the quotient, rounded, in bits 16 and up */
                const __m512 v = r != 1.0f ? _mm512_mul_ps(x[j], vr) : x[j];
                const __m512 d = _mm512_div_ps(v, s != NULL ? _mm512_loadu_ps(s + k + 16 * j) : vs0);
                t[j] = _mm512_slli_epi32(_mm512_cvt_roundps_epi32(d, nearest), 16);
            }
        }
        const __m512i first = _mm512_permutex2var_epi8(t[0], gather, t[1]);
        const __m512i second = _mm512_permutex2var_epi8(t[2], gather, t[3]);
        const __m512i bytes = _mm512_mask_blend_epi8(0xffffffff00000000ULL, first, second);
        if (stream && ((uintptr_t)(q + k) & 63) == 0)
            _mm512_stream_si512((__m512i*)(q + k), bytes);
        else
            _mm512_storeu_si512(q + k, bytes);
    }
    if (stream) _mm_sfence(); /* the streamed stores ordered before whatever reads q next */
    return k;
}
#endif

/* clamp(round(v_k / s_k), lo, hi) as int8 for k < K, with v_k = element off + k of src (dtype code) times r (when
 * r != 1) and s_k = s[k] (s0 when s is NULL); inv_s, when not NULL, holds 1/s[k] rounded, each s[k] within
 * [BITNET_RECIPROCAL_MIN, BITNET_RECIPROCAL_MAX] (callers pass NULL otherwise). The hot loop of every quantization:
 * the values of quantize_value, the IEEE division included. In one pass over src that divides only the blocks
 * (64 values with AVX-512, 32 with AVX2) with a lane near a rounding tie (BITNET_NEAR_TIE; one block in ten on bf16
 * activations); written with intrinsics, because the compiler's own vector code for the clamp and the narrowing
 * spends more time on mask registers than on the arithmetic. A NaN, whose int8 value torch leaves undefined, may
 * differ. With lo = -128 and hi = 127 |v_k / s_k| must stay below 127.5 (quantize_span_fixed takes byte 2 of a
 * fixed-point value; elsewhere the clamp is the narrowing's saturation): the scale of an absmax quantization, which
 * every such caller passes, keeps it within 127 (1 + 2^-22). stream: q may be written around the caches (see
 * quantize_span_fixed). */
static inline void quantize_span(const void* src, int64_t code, int64_t off, float r, const float* s, float s0,
                                 const float* inv_s, int64_t K, float lo, float hi, int8_t* q, int stream) {
    int64_t k = 0;
    const int reciprocal = s != NULL ? inv_s != NULL : s0 >= BITNET_RECIPROCAL_MIN && s0 <= BITNET_RECIPROCAL_MAX;
    const float inv0 = reciprocal && s == NULL ? 1.0f / s0 : 0.0f;
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VBMI__)
    if (reciprocal && lo == -128.0f && hi == 127.0f && r >= BITNET_RECIPROCAL_MIN && r <= BITNET_RECIPROCAL_MAX)
        k = quantize_span_fixed(src, code, off, r, s, s0, inv_s, K, q, stream);
#else
    (void)stream;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    if (reciprocal) {
        const __m512 vr = _mm512_set1_ps(r), vs0 = _mm512_set1_ps(s0), vinv0 = _mm512_set1_ps(inv0);
        const __m512 vhi = _mm512_set1_ps(hi);
        const __m512i vlo = _mm512_set1_epi8((char)lo);
        /* The saturating packs below interleave 128-bit lanes; these permutes restore the order, of elements
         * loaded in order, or of bfloat16 widened by unpacking (which interleaves them the other way: with one
         * scale for the span only, per-element scales being in order). */
        const int unpack = code == 1 && s == NULL;
        const __m512i order = unpack ? _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)
                                        : _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (; k + 64 <= K; k += 64) {
            __m512 v[4], n[4];
            __mmask16 near = 0;
            load64(src, code, off + k, unpack, v);
            for (int j = 0; j < 4; ++j) {
                if (r != 1.0f) v[j] = _mm512_mul_ps(v[j], vr);
                n[j] = round_product16(v[j], s != NULL ? _mm512_loadu_ps(inv_s + k + 16 * j) : vinv0, &near);
            }
            if (near)
                for (int j = 0; j < 4; ++j)
                    n[j] = _mm512_roundscale_ps(
                        _mm512_div_ps(v[j], s != NULL ? _mm512_loadu_ps(s + k + 16 * j) : vs0), nearest);
            __m512i i32[4];
            for (int j = 0; j < 4; ++j) /* min(hi, n): a NaN stays NaN, INT32_MIN, -128 like the portable code */
                i32[j] = _mm512_cvttps_epi32(hi < 127.0f ? _mm512_min_ps(vhi, n[j]) : n[j]);
            const __m512i w16 =
                _mm512_packs_epi16(_mm512_packs_epi32(i32[0], i32[1]), _mm512_packs_epi32(i32[2], i32[3]));
            __m512i w8 = _mm512_permutexvar_epi32(order, w16);
            if (lo > -128.0f) w8 = _mm512_max_epi8(w8, vlo);
            _mm512_storeu_si512(q + k, w8);
        }
    }
#endif
#if defined(__AVX2__)
    const __m256 vr = _mm256_set1_ps(r), vs0 = _mm256_set1_ps(s0), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    if (reciprocal) { /* the AVX-512 loop's method in blocks of 32: compares into vectors, the clamp as above */
        const __m256 vinv0 = _mm256_set1_ps(inv0), near_tie = _mm256_set1_ps(BITNET_NEAR_TIE);
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), vlo8 = _mm256_set1_epi8((char)lo);
        for (; k + 32 <= K; k += 32) {
            __m256 v[4], n[4], near = _mm256_setzero_ps();
            for (int j = 0; j < 4; ++j) {
                v[j] = load8(src, off + k + 8 * j, code);
                if (r != 1.0f) v[j] = _mm256_mul_ps(v[j], vr);
                const __m256 t = _mm256_mul_ps(v[j], s != NULL ? _mm256_loadu_ps(inv_s + k + 8 * j) : vinv0);
                n[j] = _mm256_round_ps(t, nearest);
                const __m256 frac = _mm256_and_ps(_mm256_sub_ps(t, n[j]), magnitude);
                near = _mm256_or_ps(near, _mm256_cmp_ps(frac, near_tie, _CMP_GT_OQ));
            }
            if (!_mm256_testz_ps(near, near))
                for (int j = 0; j < 4; ++j)
                    n[j] = _mm256_round_ps(_mm256_div_ps(v[j], s != NULL ? _mm256_loadu_ps(s + k + 8 * j) : vs0),
                                           nearest);
            __m256i i32[4];
            for (int j = 0; j < 4; ++j) i32[j] = _mm256_cvttps_epi32(hi < 127.0f ? _mm256_min_ps(vhi, n[j]) : n[j]);
            const __m256i w16 =
                _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
            __m256i w8 = _mm256_permutevar8x32_epi32(w16, order);
            if (lo > -128.0f) w8 = _mm256_max_epi8(w8, vlo8);
            _mm256_storeu_si256((__m256i*)(q + k), w8);
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 v = load8(src, off + k, code);
        if (r != 1.0f) v = _mm256_mul_ps(v, vr);
        __m256 t = _mm256_div_ps(v, s != NULL ? _mm256_loadu_ps(s + k) : vs0);
        t = _mm256_round_ps(t, nearest);
        t = _mm256_min_ps(_mm256_max_ps(t, vlo), vhi);
        const __m256i i = _mm256_cvttps_epi32(t);
        const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(h, h));
    }
#else
    (void)inv0;
    (void)nearest;
#endif
    for (; k < K; ++k) {
        float v = load_value(src, off + k, code);
        if (r != 1.0f) v = v * r;
        q[k] = quantize_value(v, s != NULL ? s[k] : s0, lo, hi);
    }
}

/* max |element| of src[off .. off + K) of dtype code, as absmax: for bfloat16 and float16, whose non-negative
 * values order as their bit patterns too, on the 16-bit patterns, without widening. */
static inline float absmax_of(const void* src, int64_t code, int64_t off, int64_t K) {
    if (code == 0) return absmax((const float*)src + off, K);
    const uint16_t* h = (const uint16_t*)src + off;
    uint16_t m = 0;
    for (int64_t k = 0; k < K; ++k) {
        const uint16_t u = (uint16_t)(h[k] & 0x7fffu);
        m = u > m ? u : m;
    }
    if (code == 2) {
        _Float16 v;
        memcpy(&v, &m, 2);
        return (float)v;
    }
    const uint32_t u = (uint32_t)m << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* The per-row activation scale of reference.quantize_rowwise for the row's absmax m: max(m, eps) / 127 (clamp(min=eps)
 * keeps a NaN, as torch's). */
static inline float row_scale_of(float m, float eps) { return (m < eps ? eps : m) / 127.0f; }

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 floats as bfloat16 bits (round_to: to nearest even, a NaN to the quiet NaN 0x7fc0). */
static inline __m256i bf16_bits16(__m512 v) {
#if defined(__AVX512BF16__)
    /* vcvtneps2bf16 rounds to nearest even but keeps a NaN's sign and payload: NaNs are set to round_to's. */
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_set1_epi16(0x7fc0));
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

/* round_to of 16 floats. */
static inline __m512 round16(__m512 v, int64_t code) {
    if (code == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(v)), 16));
    if (code == 2) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 floats rounded to bfloat16 (round_to) and stored at out. */
static inline void store_bf16x16(__m512 v, uint16_t* out) { _mm256_storeu_si256((__m256i*)out, bf16_bits16(v)); }
#endif

/* One row of reference.scale_output: y[n] = ((acc[n] * *row) * col[n]) * *scale in float32 (each factor optional:
 * NULL), rounded to out_code, plus bias[n] (floats of out's dtype; NULL: none) added in that dtype, stored as
 * elements out_off .. out_off + N of out. acc is int32, or float32 holding integers (acc_float). y: N floats of
 * scratch. In registers, one pass: with AVX-512 for float32 / bfloat16 outputs without bias, with AVX2 for the rest
 * (float32 outputs in 0.35-0.45x the time of the portable loops on a Zen 4 limited to AVX2); the portable loops take
 * one pass per operation, the same operations in the same order. */
static inline void scale_row(const void* acc, int64_t acc_float, const float* row, const float* col,
                             const float* scale, const float* bias, int64_t out_code, void* out, int64_t out_off,
                             int64_t N, float* y) {
    int64_t n = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (bias == NULL && out_code != 2) {
        const __m512 vr = _mm512_set1_ps(row != NULL ? *row : 0.0f), vs = _mm512_set1_ps(scale != NULL ? *scale : 0.0f);
        for (; n + 16 <= N; n += 16) {
            __m512 v = acc_float ? _mm512_loadu_ps((const float*)acc + n)
                                 : _mm512_cvtepi32_ps(_mm512_loadu_si512((const int32_t*)acc + n));
            if (row != NULL) v = _mm512_mul_ps(v, vr);
            if (col != NULL) v = _mm512_mul_ps(v, _mm512_loadu_ps(col + n));
            if (scale != NULL) v = _mm512_mul_ps(v, vs);
            if (out_code == 1)
                store_bf16x16(v, (uint16_t*)out + out_off + n);
            else
                _mm512_storeu_ps((float*)out + out_off + n, v);
        }
    }
#endif
#if defined(__AVX2__) /* the same in 8 lanes, any output dtype and the bias (an AVX-512 row's rest, or all of it) */
    {
        const __m256 vr = _mm256_set1_ps(row != NULL ? *row : 0.0f), vs = _mm256_set1_ps(scale != NULL ? *scale : 0.0f);
        for (; n + 8 <= N; n += 8) {
            __m256 v = acc_float ? _mm256_loadu_ps((const float*)acc + n)
                                 : _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)((const int32_t*)acc + n)));
            if (row != NULL) v = _mm256_mul_ps(v, vr);
            if (col != NULL) v = _mm256_mul_ps(v, _mm256_loadu_ps(col + n));
            if (scale != NULL) v = _mm256_mul_ps(v, vs);
            v = round8(v, out_code);
            if (bias != NULL) v = round8(_mm256_add_ps(v, _mm256_loadu_ps(bias + n)), out_code);
            store8(v, out_code, out, out_off + n);
        }
    }
#endif
    const int64_t rest = N - n;
    if (rest == 0) return;
    if (acc_float) {
        memcpy(y, (const float*)acc + n, (size_t)rest * sizeof(float));
    } else {
        const int32_t* a = (const int32_t*)acc + n;
        for (int64_t j = 0; j < rest; ++j) y[j] = (float)a[j];
    }
    if (row != NULL) {
        const float r = *row;
        for (int64_t j = 0; j < rest; ++j) y[j] = y[j] * r;
    }
    if (col != NULL)
        for (int64_t j = 0; j < rest; ++j) y[j] = y[j] * col[n + j];
    if (scale != NULL) {
        const float s = *scale;
        for (int64_t j = 0; j < rest; ++j) y[j] = y[j] * s;
    }
    round_row(y, rest, out_code);
    if (bias != NULL) {
        for (int64_t j = 0; j < rest; ++j) y[j] = y[j] + bias[n + j];
        round_row(y, rest, out_code);
    }
    store_row(y, rest, out_code, out, out_off + n);
}

/* reference.rms_norm_rstd of row x[off .. off + K) of dtype code: 1 / sqrt(float(sum(x^2) / K) + eps). Each square
 * of a float is exact in double and the sum runs in double, so its order (lanes here, torch's or inductor's) moves
 * only double-precision last bits, which the rounding to float absorbs (docs/numerics.md#rmsnorm).
 * With AVX-512 a bfloat16 or float32 value becomes a double without a conversion (vcvtps2pd, 1.7 cycles a vector on
 * a Zen 4, bounded the pass): its magnitude bits shifted into a double's exponent and fraction fields, with 512 added
 * to the exponent (one bit set), are the value times 2^-384 exactly. Every square is then exact and a normal double,
 * and so is the sum, scaled back by 2^768 exactly; a zero or a subnormal becomes a tiny nonzero value there, whose
 * square (below 2^-251 scaled back) is under 2^-100 of the sum of any row whose mean square is a nonzero float. Inf
 * and NaN, which would become finite, send the row to the scalar loop. bfloat16 3.9 against 4.9 cycles per 16 values
 * on a Zen 4, the same bits. */
static inline float row_rstd(const void* x, int64_t code, int64_t off, int64_t K, float eps) {
    int64_t k = 0;
    double sum = 0.0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    __m512d a[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    double scale = 1.0;
    if (code == 0 || code == 1) { /* each value's double built from its bits, without a conversion (see above) */
        /* the magnitude bits' place in a float64 (exponent at 52-59, fraction below): bfloat16's 15, float32's 31 */
        const __m512i field = _mm512_set1_epi64(code == 1 ? 0x0fffe00000000000LL : 0x0fffffffe0000000LL);
        const __m512i bias = _mm512_set1_epi64(1LL << 61);
        __m512i top = _mm512_setzero_si512(); /* each value's bits shifted left by one: Inf / NaN at the top */
        for (; k + 32 <= K; k += 32) {
            __m512i d[4];
            if (code == 1) { /* 32 values in one vector, four to a 64-bit lane */
                const __m512i h = _mm512_loadu_si512((const uint16_t*)x + off + k);
                top = _mm512_max_epu16(top, _mm512_add_epi16(h, h));
                d[0] = _mm512_slli_epi64(h, 45), d[1] = _mm512_slli_epi64(h, 29);
                d[2] = _mm512_slli_epi64(h, 13), d[3] = _mm512_srli_epi64(h, 3);
            } else { /* two to a 64-bit lane */
                const __m512i f0 = _mm512_loadu_si512((const float*)x + off + k);
                const __m512i f1 = _mm512_loadu_si512((const float*)x + off + k + 16);
                top = _mm512_max_epu32(top, _mm512_max_epu32(_mm512_add_epi32(f0, f0), _mm512_add_epi32(f1, f1)));
                d[0] = _mm512_slli_epi64(f0, 29), d[1] = _mm512_srli_epi64(f0, 3);
                d[2] = _mm512_slli_epi64(f1, 29), d[3] = _mm512_srli_epi64(f1, 3);
            }
            for (int j = 0; j < 4; ++j) { /* (d & field) | bias: one value's magnitude, in place, times 2^-384 */
                const __m512d v = _mm512_castsi512_pd(_mm512_ternarylogic_epi64(d[j], field, bias, 0xea));
                a[j] = _mm512_fmadd_pd(v, v, a[j]); /* the square is exact and normal: one rounding, as a + v * v */
            }
        }
        const int special = code == 1 ? _mm512_cmpge_epu16_mask(top, _mm512_set1_epi16((short)0xff00)) != 0
                                      : _mm512_cmpge_epu32_mask(top, _mm512_set1_epi32((int)0xff000000u)) != 0;
        if (!special) {
            scale = 0x1p768; /* exact: the sum of the scaled squares is a normal double */
        } else { /* an Inf or a NaN, which became a finite double above: the row summed one value at a time below */
            k = 0;
            for (int j = 0; j < 4; ++j) a[j] = _mm512_setzero_pd();
        }
    } else {
        /* four chains of fused multiply-adds: their latency, not their number, bounds a row */
        for (; k + 32 <= K; k += 32)
            for (int j = 0; j < 2; ++j) {
                const __m512 v = load16(x, off + k + 16 * j, code);
                const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
                a[2 * j] = _mm512_fmadd_pd(lo, lo, a[2 * j]); /* the product is exact: one rounding, as a + lo * lo */
                a[2 * j + 1] = _mm512_fmadd_pd(hi, hi, a[2 * j + 1]);
            }
    }
    sum = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a[0], a[1]), _mm512_add_pd(a[2], a[3]))) * scale;
#elif defined(__AVX2__)
    __m256d a[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (; k + 16 <= K; k += 16) /* four chains, as above */
        for (int j = 0; j < 2; ++j) {
            const __m256 v = load8(x, off + k + 8 * j, code);
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            a[2 * j] = _mm256_add_pd(a[2 * j], _mm256_mul_pd(lo, lo)); /* exact product: one rounding too */
            a[2 * j + 1] = _mm256_add_pd(a[2 * j + 1], _mm256_mul_pd(hi, hi));
        }
    const __m256d all = _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3]));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(all), _mm256_extractf128_pd(all, 1));
    sum = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
    for (; k < K; ++k) {
        const double v = (double)load_value(x, off + k, code);
        sum += v * v;
    }
    return 1.0f / sqrtf((float)(sum / (double)K) + eps);
}

/* The dtype code normalize_row writes its row in, for norm_code: norm_code's with AVX-512, float32 otherwise. */
static inline int64_t normalized_code(int64_t norm_code) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return norm_code;
#else
    (void)norm_code;
    return 0;
#endif
}

/* The RMSNorm of row x[off .. off + K) of dtype x_code, x * r * gain[k] with r the row's rstd, rounded to x's dtype
 * and then to norm_code's (reference.rms_norm_quantize_rowwise), written to y in the dtype of
 * normalized_code(norm_code): norm_code's with AVX-512 (in registers, one pass: bfloat16 and float16 rows take half
 * the bytes to read back), float32 with AVX2 (in registers, one pass: for float32 rows a fifth of the time of the
 * portable loops on a Zen 4 limited to AVX2) and in the portable loops (one pass each). y holds K values of that
 * dtype (K floats are always enough). Returns the absmax of the row (absmax's NaN rule). */
static inline float normalize_row(const void* x, int64_t off, int64_t K, int64_t x_code, float r, const float* gain,
                                  int64_t norm_code, float* y) {
    int64_t k = 0;
    uint32_t m = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 vr = _mm512_set1_ps(r);
    if (norm_code == 0) {
        const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
        __m512i vm = _mm512_setzero_si512();
        for (; k + 16 <= K; k += 16) {
            const __m512 xr = _mm512_mul_ps(load16(x, off + k, x_code), vr);
            const __m512 v = round16(_mm512_mul_ps(xr, _mm512_loadu_ps(gain + k)), x_code);
            _mm512_storeu_ps(y + k, v);
            vm = _mm512_max_epu32(vm, _mm512_and_si512(_mm512_castps_si512(v), magnitude));
        }
        m = (uint32_t)_mm512_reduce_max_epu32(vm);
    } else { /* 16-bit patterns, whose magnitudes order as the values (absmax_of) */
        uint16_t* h = (uint16_t*)y;
        const __m256i magnitude = _mm256_set1_epi16(0x7fff);
        __m256i vm = _mm256_setzero_si256();
#if defined(__AVX512BF16__)
        if ((x_code == 0 || x_code == 1) && norm_code == 1) { /* 32 a step: 3.1-4.7 against 4.4-4.6 cycles per 16 */
            /* bfloat16 to float in order by one two-source permute each (the high words of x, low words of zero) */
            const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512i widen_lo = _mm512_or_si512(_mm512_set1_epi32(32), _mm512_slli_epi32(iota, 16));
            const __m512i widen_hi = _mm512_add_epi32(widen_lo, _mm512_set1_epi32(16 << 16));
            const __m512i zero = _mm512_setzero_si512(), magnitude32 = _mm512_set1_epi16(0x7fff);
            __m512i vm32 = _mm512_setzero_si512();
            for (; k + 32 <= K; k += 32) {
                __m512 lo, hi;
                if (x_code == 1) {
                    const __m512i b = _mm512_loadu_si512((const uint16_t*)x + off + k);
                    lo = _mm512_castsi512_ps(_mm512_permutex2var_epi16(b, widen_lo, zero));
                    hi = _mm512_castsi512_ps(_mm512_permutex2var_epi16(b, widen_hi, zero));
                } else { /* float32 rows round once, to bfloat16 */
                    lo = _mm512_loadu_ps((const float*)x + off + k);
                    hi = _mm512_loadu_ps((const float*)x + off + k + 16);
                }
                /* one conversion of both halves, in order (as below, a NaN keeps a NaN's pattern of its own) */
                const __m512i n = (__m512i)_mm512_cvtne2ps_pbh(
                    _mm512_mul_ps(_mm512_mul_ps(hi, vr), _mm512_loadu_ps(gain + k + 16)),
                    _mm512_mul_ps(_mm512_mul_ps(lo, vr), _mm512_loadu_ps(gain + k)));
                _mm512_storeu_si512(h + k, n);
                vm32 = _mm512_max_epu16(vm32, _mm512_and_si512(n, magnitude32));
            }
            vm = _mm256_max_epu16(_mm512_castsi512_si256(vm32), _mm512_extracti64x4_epi64(vm32, 1));
        }
#endif
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(x, off + k, x_code), vr), _mm512_loadu_ps(gain + k));
            if (x_code != norm_code) v = round16(v, x_code); /* rounding twice to one dtype is rounding once */
#if defined(__AVX512BF16__) /* a NaN keeps a NaN's pattern of its own: only the quantization reads these */
            const __m256i b = norm_code == 1 ? (__m256i)_mm512_cvtneps_pbh(v)
                                             : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
            const __m256i b = norm_code == 1 ? bf16_bits16(v)
                                             : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
            _mm256_storeu_si256((__m256i*)(h + k), b);
            vm = _mm256_max_epu16(vm, _mm256_and_si256(b, magnitude));
        }
        uint16_t lanes[16], top = 0;
        _mm256_storeu_si256((__m256i*)lanes, vm);
        for (int j = 0; j < 16; ++j) top = lanes[j] > top ? lanes[j] : top;
        const float head = absmax_of(&top, norm_code, 0, 1);
        memcpy(&m, &head, 4);
    }
    for (; k < K; ++k) {
        const float v = round_to(round_to(load_value(x, off + k, x_code) * r * gain[k], x_code), norm_code);
        store(y, k, v, norm_code);
        uint32_t u;
        memcpy(&u, &v, 4);
        u &= 0x7fffffffu;
        m = u > m ? u : m;
    }
#elif defined(__AVX2__) /* float32 rows, in registers, one pass */
    const __m256 vr = _mm256_set1_ps(r);
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i vm = _mm256_setzero_si256();
    for (; k + 8 <= K; k += 8) {
        const __m256 xr = _mm256_mul_ps(load8(x, off + k, x_code), vr);
        __m256 v = round8(_mm256_mul_ps(xr, _mm256_loadu_ps(gain + k)), x_code);
        if (norm_code != x_code) v = round8(v, norm_code); /* rounding twice to one dtype is rounding once */
        _mm256_storeu_ps(y + k, v);
        vm = _mm256_max_epu32(vm, _mm256_and_si256(_mm256_castps_si256(v), magnitude));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i*)lanes, vm);
    for (int j = 0; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
    for (; k < K; ++k) {
        y[k] = round_to(round_to(load_value(x, off + k, x_code) * r * gain[k], x_code), norm_code);
        uint32_t u;
        memcpy(&u, y + k, 4);
        u &= 0x7fffffffu;
        m = u > m ? u : m;
    }
#else
    load_row(x, off, K, x_code, y);
    for (; k < K; ++k) y[k] = y[k] * r * gain[k];
    round_row(y, K, x_code);
    round_row(y, K, norm_code);
    const float all = absmax(y, K);
    memcpy(&m, &all, 4);
#endif
    float v;
    memcpy(&v, &m, 4);
    return v;
}

/* One row of reference.quantize_rowwise of x[off .. off + K) (dtype x_code), or with gain of
 * reference.rms_norm_quantize_rowwise (its rstd written to *rstd; y: K floats of scratch): the int8 values to q
 * (stream: as quantize_span's), the scale returned. */
static inline float quantize_input_row(const void* x, int64_t x_code, int64_t off, int64_t K, const float* gain,
                                       float norm_eps, int64_t norm_code, float eps, float* y, int8_t* q, float* rstd,
                                       int stream) {
    if (gain == NULL) {
        const float s = row_scale_of(absmax_of(x, x_code, off, K), eps);
        quantize_span(x, x_code, off, 1.0f, NULL, s, NULL, K, -128.0f, 127.0f, q, stream);
        return s;
    }
    *rstd = row_rstd(x, x_code, off, K, norm_eps);
    const float s = row_scale_of(normalize_row(x, off, K, x_code, *rstd, gain, norm_code, y), eps);
    quantize_span(y, normalized_code(norm_code), 0, 1.0f, NULL, s, NULL, K, -128.0f, 127.0f, q, stream);
    return s;
}

#if defined(__SSE2__)
/* dst[c * ld + j] = src[j * ls + c] for j, c < 16: four rounds of interleaving row j with row j + 8 (a perfect
 * shuffle of the 16 rows; after four, row c holds column c). */
static inline void transpose16(const int8_t* src, int64_t ls, int8_t* dst, int64_t ld) {
    __m128i a[16], b[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm_loadu_si128((const __m128i*)(src + j * ls));
    for (int round = 0; round < 4; ++round) {
        for (int j = 0; j < 8; ++j) {
            b[2 * j] = _mm_unpacklo_epi8(a[j], a[j + 8]);
            b[2 * j + 1] = _mm_unpackhi_epi8(a[j], a[j + 8]);
        }
        memcpy(a, b, sizeof a);
    }
    for (int c = 0; c < 16; ++c) _mm_storeu_si128((__m128i*)(dst + c * ld), a[c]);
}
#endif

/* dst[k * ld + i] = src[i * ls + k] for i < rows, k < K: a (rows, K) byte matrix (rows ls apart) transposed into
 * rows ld apart. With SSE2 in 16 x 16 tiles, 64 columns of src at a time: the 64 rows of dst they become are written
 * whole (every one of the rows) before the next 64 columns (8 x 8 tiles with the rows outermost wrote each line of
 * dst eight times, from L2); the edges byte by byte. */
static inline void transpose_bytes(const int8_t* src, int64_t rows, int64_t K, int64_t ls, int8_t* dst, int64_t ld) {
    int64_t rows16 = 0, K16 = 0;
#if defined(__SSE2__)
    rows16 = rows & ~(int64_t)15;
    K16 = K & ~(int64_t)15;
    for (int64_t k1 = 0; k1 < K16; k1 += 64)
        for (int64_t i0 = 0; i0 < rows16; i0 += 16)
            for (int64_t k0 = k1; k0 < k1 + 64 && k0 < K16; k0 += 16)
                transpose16(src + i0 * ls + k0, ls, dst + k0 * ld + i0, ld);
#endif
    for (int64_t k = 0; k < K; ++k)
        for (int64_t i = k < K16 ? rows16 : 0; i < rows; ++i) dst[k * ld + i] = src[i * ls + k];
}

#endif
