/* Small-M (decode) BitNet matmul on CPU straight from the packed weight: acc = a @ W.T, exact in int32.
 *
 * a: (M, K) int8, row-major. packed: (N, kp) bytes, W packed along K (bitnet_ao.kernels.reference.pack_weight):
 *   bits = 2: value 4j+i of a row in bits 2i..2i+1 of byte j, two's complement (ternary {-1, 0, 1});
 *   bits = 1: value 8j+i of a row in bit i of byte j, 1 for +1 and 0 for -1 (binary).
 * acc: (M, N) int32.
 *
 * Each weight row is decoded once into unsigned codes u = w + 1 (ternary: {0, 1, 2}) or u = (w + 1) / 2 (binary:
 * {0, 1}), laid out as `per` planes of kp bytes (plane i holds values i, i + per, ...). The activations are laid
 * out the same way once per call, so the dot product is a plain u8 x s8 reduction the compiler vectorizes (VNNI
 * vpdpbusd with -march=native on AVX-512 VNNI, widening multiplies on AVX2), and reads the weight once:
 *   ternary: sum_k w a = sum_k u a - sum_k a;   binary: sum_k w a = 2 sum_k u a - sum_k a.
 * Padding values of the last byte decode to some u, but their activation plane entries are zero.
 * Plain C that builds, exact, for any CPU the compiler targets, plus one AVX2 dot product (dots_u8s8). */
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "cpu_rows.h"

/* The decoding loops shift by constants: x86 has no byte shifts, and with a variable shift the compiler widens
 * every byte to 32 bits (2x slower overall on AVX-512). */
static void decode_ternary(const uint8_t* row, uint8_t* u, int64_t kp) {
    for (int64_t j = 0; j < kp; ++j) u[j] = (uint8_t)((row[j] + 1) & 3);
    for (int64_t j = 0; j < kp; ++j) u[kp + j] = (uint8_t)(((row[j] >> 2) + 1) & 3);
    for (int64_t j = 0; j < kp; ++j) u[2 * kp + j] = (uint8_t)(((row[j] >> 4) + 1) & 3);
    for (int64_t j = 0; j < kp; ++j) u[3 * kp + j] = (uint8_t)(((row[j] >> 6) + 1) & 3);
}

static void decode_binary(const uint8_t* row, uint8_t* u, int64_t kp) {
    for (int64_t j = 0; j < kp; ++j) u[j] = (uint8_t)(row[j] & 1);
    for (int64_t j = 0; j < kp; ++j) u[kp + j] = (uint8_t)((row[j] >> 1) & 1);
    for (int64_t j = 0; j < kp; ++j) u[2 * kp + j] = (uint8_t)((row[j] >> 2) & 1);
    for (int64_t j = 0; j < kp; ++j) u[3 * kp + j] = (uint8_t)((row[j] >> 3) & 1);
    for (int64_t j = 0; j < kp; ++j) u[4 * kp + j] = (uint8_t)((row[j] >> 4) & 1);
    for (int64_t j = 0; j < kp; ++j) u[5 * kp + j] = (uint8_t)((row[j] >> 5) & 1);
    for (int64_t j = 0; j < kp; ++j) u[6 * kp + j] = (uint8_t)((row[j] >> 6) & 1);
    for (int64_t j = 0; j < kp; ++j) u[7 * kp + j] = (uint8_t)((row[j] >> 7) & 1);
}

/* dots[i] = sum_j u[j] * x_i[j] for the first `rows` (1 or 4) of x0..x3. With AVX2 (no VNNI), 32 products per
 * vpmaddubsw (u unsigned in {0, 1, 2}, x signed: a pair sums to at most 2 * 2 * 128 = 512, no saturation) and
 * vpmaddwd against ones into int32 lanes; the compiler's own code for the plain loop widens every byte to 16 bits
 * and multiplies with vpmullw, about 3x the instructions. With AVX-512 VNNI the plain loop becomes vpdpbusd. */
static void dots_u8s8(const uint8_t* u, const int8_t* x0, const int8_t* x1, const int8_t* x2, const int8_t* x3,
                      int64_t n, int rows, int32_t* dots) {
    const int8_t* xs[4] = {x0, x1, x2, x3};
    int64_t j = 0;
    int32_t d[4] = {0, 0, 0, 0};
#if defined(__AVX2__) && !defined(__AVX512VNNI__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (; j + 32 <= n; j += 32) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(u + j));
        for (int i = 0; i < rows; ++i) {
            const __m256i x = _mm256_loadu_si256((const __m256i*)(xs[i] + j));
            s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
        }
    }
    for (int i = 0; i < rows; ++i) {
        const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s[i]), _mm256_extracti128_si256(s[i], 1));
        const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        d[i] = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1)));
    }
#endif
    if (rows == 1) {
        for (; j < n; ++j) d[0] += (int32_t)u[j] * x0[j];
    } else {
        for (; j < n; ++j) {
            const int32_t w = u[j];
            d[0] += w * x0[j];
            d[1] += w * x1[j];
            d[2] += w * x2[j];
            d[3] += w * x3[j];
        }
    }
    for (int i = 0; i < rows; ++i) dots[i] = d[i];
}

#if defined(__AVX2__) && !defined(__AVX512VNNI__)
#define FUSED_TERNARY_DOTS 1
/* dots[i] = sum_k u_k x_i[k] for `rows` (1 or 4) activation rows in plane layout, straight from a packed ternary
 * row: the codes of 32 bytes (128 values) are decoded in registers, plane by plane, u = ((byte >> 2i) + 1) & 3
 * (a 16-bit shift leaks the neighbour byte's bits into bits 6..7 only, which the mask drops), and go into
 * vpmaddubsw as above. Four planes' pair sums add up to at most 4 * 512 in 16 bits, then vpmaddwd widens.
 * Against decode_ternary + dots_u8s8 this skips writing and reading back K bytes of codes per weight row. */
static void dots_packed_ternary(const uint8_t* row, const int8_t* x0, int64_t kp, int64_t kk, int rows,
                                int32_t* dots) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i one8 = _mm256_set1_epi8(1);
    const __m256i three = _mm256_set1_epi8(3);
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t j = 0;
    for (; j + 32 <= kp; j += 32) {
        const __m256i p = _mm256_loadu_si256((const __m256i*)(row + j));
        const __m256i w0 = _mm256_and_si256(_mm256_add_epi8(p, one8), three);
        const __m256i w1 = _mm256_and_si256(_mm256_add_epi8(_mm256_srli_epi16(p, 2), one8), three);
        const __m256i w2 = _mm256_and_si256(_mm256_add_epi8(_mm256_srli_epi16(p, 4), one8), three);
        const __m256i w3 = _mm256_and_si256(_mm256_add_epi8(_mm256_srli_epi16(p, 6), one8), three);
        for (int i = 0; i < rows; ++i) {
            const int8_t* x = x0 + i * kk + j;
            __m256i t = _mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i*)x));
            t = _mm256_add_epi16(t, _mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i*)(x + kp))));
            t = _mm256_add_epi16(t, _mm256_maddubs_epi16(w2, _mm256_loadu_si256((const __m256i*)(x + 2 * kp))));
            t = _mm256_add_epi16(t, _mm256_maddubs_epi16(w3, _mm256_loadu_si256((const __m256i*)(x + 3 * kp))));
            s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(t, ones));
        }
    }
    for (int i = 0; i < rows; ++i) {
        const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s[i]), _mm256_extracti128_si256(s[i], 1));
        const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        int32_t d = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1)));
        const int8_t* x = x0 + i * kk;
        for (int64_t t = j; t < kp; ++t) {
            for (int plane = 0; plane < 4; ++plane)
                d += (int32_t)(((row[t] >> (2 * plane)) + 1) & 3) * x[plane * kp + t];
        }
        dots[i] = d;
    }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FUSED_TERNARY_DOTS 1
/* The same with AVX-512 VNNI: 64 packed bytes (256 values) per step, each plane decoded in registers and multiplied
 * by vpdpbusd (u8 codes x s8 activations, four products per int32 lane, no saturation), one accumulator per
 * activation row and plane so that no dpbusd waits for another; the row's last bytes by masked loads (a masked
 * weight byte decodes to u = 1 but meets a zero activation). The compiler's code for the decoded-row loop of
 * dots_u8s8 ran the 2816 x 1024 decode matmul at ~20 GMAC/s per core on a Zen 4; this one reads the packed row once. */
static void dots_packed_ternary(const uint8_t* row, const int8_t* x0, int64_t kp, int64_t kk, int rows,
                                int32_t* dots) {
    const __m512i one8 = _mm512_set1_epi8(1), three = _mm512_set1_epi8(3);
    __m512i s[4][4];
    for (int i = 0; i < 4; ++i)
        for (int plane = 0; plane < 4; ++plane) s[i][plane] = _mm512_setzero_si512();
    for (int64_t j = 0; j < kp; j += 64) {
        const __mmask64 mask = j + 64 <= kp ? ~(__mmask64)0 : (((__mmask64)1 << (kp - j)) - 1);
        const __m512i p = _mm512_maskz_loadu_epi8(mask, row + j);
        const __m512i w[4] = {
            _mm512_and_si512(_mm512_add_epi8(p, one8), three),
            _mm512_and_si512(_mm512_add_epi8(_mm512_srli_epi16(p, 2), one8), three),
            _mm512_and_si512(_mm512_add_epi8(_mm512_srli_epi16(p, 4), one8), three),
            _mm512_and_si512(_mm512_add_epi8(_mm512_srli_epi16(p, 6), one8), three),
        };
        for (int i = 0; i < rows; ++i)
            for (int plane = 0; plane < 4; ++plane)
                s[i][plane] = _mm512_dpbusd_epi32(
                    s[i][plane], w[plane], _mm512_maskz_loadu_epi8(mask, x0 + i * kk + plane * kp + j));
    }
    for (int i = 0; i < rows; ++i)
        dots[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s[i][0], s[i][1]),
                                                           _mm512_add_epi32(s[i][2], s[i][3])));
}
#endif

#ifndef FUSED_TERNARY_DOTS
#define FUSED_TERNARY_DOTS 0
#endif

/* dots[i] = sum_k u_k x_i[k] of weight row `row` against `rows` (1 or 4) activation rows from x0 (plane layout,
 * kk apart): from the packed row itself (FUSED_TERNARY_DOTS), or from its codes `u` decoded beforehand. */
static void row_dots(const uint8_t* row, const uint8_t* u, const int8_t* x0, int64_t kp, int64_t kk, int64_t bits,
                     int rows, int32_t* dots) {
#if FUSED_TERNARY_DOTS
    if (bits == 2) {
        dots_packed_ternary(row, x0, kp, kk, rows, dots);
        return;
    }
#endif
    (void)row; /* read by the fused path only */
    (void)kp;
    (void)bits;
    dots_u8s8(u, x0, x0 + kk, x0 + 2 * kk, x0 + 3 * kk, kk, rows, dots);
}

/* acc = a @ W.T exactly; returns nonzero when out of memory. */
int bitnet_packed_gemv(const int8_t* a, const uint8_t* packed, int32_t* acc, int64_t M, int64_t N, int64_t K,
                       int64_t kp, int64_t bits, int64_t threads) {
    const int64_t per = 8 / bits;
    const int64_t kk = kp * per;
    const int32_t mult = bits == 2 ? 1 : 2;
    const int64_t M4 = (M + 3) / 4 * 4;  /* rows of activations, padded with zero rows to groups of 4 */
    int8_t* planes = (int8_t*)calloc((size_t)(M4 * kk), 1);
    int32_t* sums = (int32_t*)calloc((size_t)(M > 0 ? M : 1), sizeof(int32_t));
    if (planes == NULL || sums == NULL) {
        free(planes);
        free(sums);
        return 1;
    }
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* row = a + m * K;
        int8_t* plane = planes + m * kk;
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) {
            plane[(k % per) * kp + k / per] = row[k];
            s += row[k];
        }
        sums[m] = s;
    }
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        uint8_t* u = (uint8_t*)malloc((size_t)kk);
        if (u == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            if (u == NULL) continue;
            const uint8_t* row = packed + n * kp;
            if (bits == 1) {
                decode_binary(row, u, kp);
            } else if (!FUSED_TERNARY_DOTS) {
                decode_ternary(row, u, kp);
            }
            if (M == 1) {
                int32_t dot = 0;
                row_dots(row, u, planes, kp, kk, bits, 1, &dot);
                acc[n] = mult * dot - sums[0];
                continue;
            }
            /* Four activation rows per pass over the weight row: each weight load feeds four dot products. */
            for (int64_t m = 0; m < M; m += 4) {
                int32_t dots[4];
                row_dots(row, u, planes + m * kk, kp, kk, bits, 4, dots);
                for (int64_t i = 0; i < 4 && m + i < M; ++i) acc[(m + i) * N + n] = mult * dots[i] - sums[m + i];
            }
        }
        free(u);
    }
    free(planes);
    free(sums);
    return failed;
}

/* Unpack W (N rows of kp bytes, as above) into its (N, K) int8 values, row-major: a byte decodes to its 4 (or 8)
 * values with one table lookup. */
void bitnet_unpack(const uint8_t* packed, int8_t* out, int64_t N, int64_t K, int64_t kp, int64_t bits,
                   int64_t threads) {
    const int64_t per = 8 / bits;
    const int64_t kk = kp * per;
    int8_t table[256][8];
    for (int b = 0; b < 256; ++b) {
        for (int64_t i = 0; i < per; ++i) {
            const int code = (b >> (bits * i)) & ((1 << bits) - 1);
            table[b][i] = (int8_t)(bits == 2 ? code - ((code & 2) << 1) : 2 * code - 1);
        }
    }
#pragma omp parallel num_threads((int)threads)
    {
        int8_t* row_values = (int8_t*)malloc((size_t)kk);  /* a row with its padding values */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            if (row_values == NULL) continue;
            const uint8_t* row = packed + n * kp;
            if (bits == 2) {
                for (int64_t j = 0; j < kp; ++j) memcpy(row_values + 4 * j, table[row[j]], 4);
            } else {
                for (int64_t j = 0; j < kp; ++j) memcpy(row_values + 8 * j, table[row[j]], 8);
            }
            memcpy(out + n * K, row_values, (size_t)K);
        }
        free(row_values);
    }
}

/* --- the whole inference forward of a packed linear for a few rows (decode) -------------------------------
 * y = ((acc * s_x[m]) * s_w) rounded to the output dtype, + bias, where acc is the exact int32 product of the
 * per-row int8 activation and the packed weight, and the activation is x, or x normalized by an RMSNorm
 * (norm_weight, norm_eps; rounded to x's dtype, then to norm_code's). Every float operation is the one
 * bitnet_ao.kernels.reference performs, in the same order and rounding (built with -ffp-contract=off), and the row
 * is quantized by the training forward's own C (cpu_rows.h quantize_input_row), so the outputs equal the training
 * forward's bit for bit. Dtype codes: 0 float32, 1 bfloat16, 2 float16. */

int bitnet_packed_linear(const void* x, int64_t x_code, const float* norm_weight, double norm_eps, int64_t norm_code,
                         double eps, const uint8_t* packed, float w_scale, const float* bias, int64_t out_code,
                         void* out, int64_t M, int64_t N, int64_t K, int64_t kp, int64_t bits, int64_t threads) {
    int8_t* x_q = (int8_t*)malloc((size_t)(M * K > 0 ? M * K : 1));
    float* s_x = (float*)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    float* y = (float*)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
    int32_t* acc = (int32_t*)malloc((size_t)(M * N > 0 ? M * N : 1) * sizeof(int32_t));
    int failed = x_q == NULL || s_x == NULL || y == NULL || acc == NULL;
    const float eps_f = (float)eps;
    for (int64_t m = 0; m < M && !failed; ++m) {
        float rstd;
        s_x[m] = quantize_input_row(x, x_code, m * K, K, norm_weight, (float)norm_eps, norm_code, eps_f, y, x_q + m * K,
                                    &rstd, 0); /* x_q is read right away, by the gemv */
    }
    if (!failed) failed = bitnet_packed_gemv(x_q, packed, acc, M, N, K, kp, bits, threads);
    for (int64_t m = 0; m < M && !failed; ++m) {
        for (int64_t n = 0; n < N; ++n) {
            float v = round_to((float)acc[m * N + n] * s_x[m] * w_scale, out_code);
            if (bias != NULL) v = round_to(v + round_to(bias[n], out_code), out_code);
            store(out, m * N + n, v, out_code);
        }
    }
    free(x_q);
    free(s_x);
    free(y);
    free(acc);
    return failed;
}
