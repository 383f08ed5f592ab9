/* Multiply-free exact GEMM with a ternary right operand, for CPUs whose int8 multiplies are no faster than FP32:
 *
 *   c (M, N) int32 = a (M, K) int8 @ b (N, K).T,   b in {-1, 0, 1}   (both operands contiguous along K)
 *
 * The forward (x_q @ W_q.T) and grad_input (g_q @ W_q, with W_q written (K, N)) of a BitNet linear. A ternary
 * weight needs no multiplication: a * w is a with w's sign applied (AVX2 vpsignb: negate where w < 0, zero where
 * w == 0). The 32 int8 products of one instruction are summed without widening multiplies: flipping the sign bit
 * turns each product p into the unsigned byte p + 128, and vpsadbw (sum of absolute differences against zero) adds
 * eight such bytes into a 64-bit lane. Per 32 products: sign, xor, sad, add, four single-cycle ALU instructions
 * that run on every vector ALU pipe, where vpmaddubsw/vpmaddwd share the one multiply pipe (AMD Zen 1, whose
 * 128-bit datapaths give the int8 multiplies no edge over FP32 FMAs). Lanes are 64-bit: no overflow for any K.
 * The 128 added per product is subtracted at the end (128 per reduction step, zeros included).
 *
 * Exactness: vpsignb negates -128 to -128, so rows of `a` that hold -128 (BitNet's quantizers never write it:
 * |x / (absmax / 127)| <= 127) are computed again, exactly, by plain integer code.
 *
 * Blocking: a 2 x 4 tile of c in 8 accumulators (2 rows of a and one row of b in registers: 14 of the 16 ymm
 * registers), K in chunks of KC, c in blocks of MC x NC so that the KC-long rows of a block of a (MC x KC) and of
 * b (NC x KC) stay in L2 while a tile's two rows of a stay in L1; blocks are shared among the threads.
 *
 * Built for the machine (-march=native, or x86-64-v3): without AVX2, bitnet_sign_gemm_available() is 0 and the
 * route is not offered. */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX2__)
#include <immintrin.h>

#define MR 2
#define NR 4
#define KC 2048 /* a multiple of 32 */
#define MC 128
#define NC 96

int bitnet_sign_gemm_available(void) { return 1; }

static inline int64_t hsum_epi64(__m256i v) {
    const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* acc += the 32 products a .* sign(w), as four 64-bit partial sums of (product + 128). */
#define SIGN_ADD(acc, x, w) \
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(_mm256_sign_epi8(x, w), flip), zero))

/* out[i][j] = sum over k < len (a multiple of 32) of a_i[k] * b_j[k], for rows a0, a1 and b, b + ldb, ... */
static void tile_2x4(const int8_t* a0, const int8_t* a1, const int8_t* b, int64_t ldb, int64_t len,
                     int64_t out[MR][NR]) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    __m256i c00 = zero, c01 = zero, c02 = zero, c03 = zero, c10 = zero, c11 = zero, c12 = zero, c13 = zero;
    const int8_t *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb;
    for (int64_t k = 0; k < len; k += 32) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)(a0 + k));
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)(a1 + k));
        __m256i w = _mm256_loadu_si256((const __m256i*)(b0 + k));
        SIGN_ADD(c00, x0, w);
        SIGN_ADD(c10, x1, w);
        w = _mm256_loadu_si256((const __m256i*)(b1 + k));
        SIGN_ADD(c01, x0, w);
        SIGN_ADD(c11, x1, w);
        w = _mm256_loadu_si256((const __m256i*)(b2 + k));
        SIGN_ADD(c02, x0, w);
        SIGN_ADD(c12, x1, w);
        w = _mm256_loadu_si256((const __m256i*)(b3 + k));
        SIGN_ADD(c03, x0, w);
        SIGN_ADD(c13, x1, w);
    }
    const int64_t bias = 128 * len;
    out[0][0] = hsum_epi64(c00) - bias;
    out[0][1] = hsum_epi64(c01) - bias;
    out[0][2] = hsum_epi64(c02) - bias;
    out[0][3] = hsum_epi64(c03) - bias;
    out[1][0] = hsum_epi64(c10) - bias;
    out[1][1] = hsum_epi64(c11) - bias;
    out[1][2] = hsum_epi64(c12) - bias;
    out[1][3] = hsum_epi64(c13) - bias;
}

/* One product of the edges of c (rows or columns that do not fill a tile). */
static int64_t tile_1x1(const int8_t* a, const int8_t* b, int64_t len) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    __m256i c = zero;
    for (int64_t k = 0; k < len; k += 32) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(a + k));
        const __m256i w = _mm256_loadu_si256((const __m256i*)(b + k));
        SIGN_ADD(c, x, w);
    }
    return hsum_epi64(c) - 128 * len;
}

/* The exact sum of a[k] * b[k] for k in [from, to): the last K % 32 values, and rows holding -128. */
static int64_t plain_dot(const int8_t* a, const int8_t* b, int64_t from, int64_t to) {
    int64_t s = 0;
    for (int64_t k = from; k < to; ++k) s += b[k] > 0 ? a[k] : (b[k] < 0 ? -(int64_t)a[k] : 0);
    return s;
}

static void store(int32_t* c, int64_t v, int first) { *c = first ? (int32_t)v : *c + (int32_t)v; }

int bitnet_sign_gemm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t M, int64_t N,
                     int64_t K, int64_t threads) {
    const int64_t kv = K / 32 * 32; /* the part of K the vector loops cover */
    const int64_t m_blocks = (M + MC - 1) / MC, n_blocks = (N + NC - 1) / NC;
    char* has_min = (char*)calloc((size_t)(M > 0 ? M : 1), 1);
    if (has_min == NULL) return 1;
#pragma omp parallel num_threads((int)threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            char found = 0;
            for (int64_t k = 0; k < K; ++k) found |= a[m * lda + k] == -128;
            has_min[m] = found;
        }
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t jb = 0; jb < n_blocks; ++jb) {
            for (int64_t ib = 0; ib < m_blocks; ++ib) {
                const int64_t m_end = (ib + 1) * MC < M ? (ib + 1) * MC : M;
                const int64_t n_end = (jb + 1) * NC < N ? (jb + 1) * NC : N;
                for (int64_t k0 = 0; k0 < K; k0 += KC) {
                    const int64_t len = (k0 + KC < kv ? k0 + KC : kv) - k0;
                    const int first = k0 == 0, last = k0 + KC >= K;
                    for (int64_t m = ib * MC; m < m_end; m += MR) {
                        for (int64_t n = jb * NC; n < n_end; n += NR) {
                            if (m + MR <= m_end && n + NR <= n_end && len > 0) {
                                int64_t out[MR][NR];
                                tile_2x4(a + m * lda + k0, a + (m + 1) * lda + k0, b + n * ldb + k0, ldb, len, out);
                                for (int64_t i = 0; i < MR; ++i) {
                                    for (int64_t j = 0; j < NR; ++j) {
                                        const int64_t rest =
                                            last ? plain_dot(a + (m + i) * lda, b + (n + j) * ldb, kv, K) : 0;
                                        store(c + (m + i) * N + n + j, out[i][j] + rest, first);
                                    }
                                }
                                continue;
                            }
                            for (int64_t i = m; i < m + MR && i < m_end; ++i) {
                                for (int64_t j = n; j < n + NR && j < n_end; ++j) {
                                    const int64_t part =
                                        len > 0 ? tile_1x1(a + i * lda + k0, b + j * ldb + k0, len) : 0;
                                    const int64_t rest = last ? plain_dot(a + i * lda, b + j * ldb, kv, K) : 0;
                                    store(c + i * N + j, part + rest, first);
                                }
                            }
                        }
                    }
                }
            }
        }
        /* Rows holding -128, again, exactly. */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (!has_min[m]) continue;
            for (int64_t n = 0; n < N; ++n) c[m * N + n] = (int32_t)plain_dot(a + m * lda, b + n * ldb, 0, K);
        }
    }
    free(has_min);
    return 0;
}

#else /* no AVX2: the route is not offered */

int bitnet_sign_gemm_available(void) { return 0; }

int bitnet_sign_gemm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t M, int64_t N,
                     int64_t K, int64_t threads) {
    (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)M, (void)N, (void)K, (void)threads;
    return 2;
}

#endif
