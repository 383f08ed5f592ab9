/* The scaled int8 matmul of a BitNet linear with AVX-512 VNNI, its epilogue fused: the int32 sums of a tile stay in
 * registers and leave as the output dtype, never written to memory as int32 (route "vnni").
 *
 * a (M, K) int8 times b (K, N) int8. vpdpbusd multiplies unsigned by signed bytes, so b is packed shifted to unsigned
 * bytes, b + shift: shift 1 for a ternary b (0, 1, 2: the forward and grad_input of a BitNet linear), 128 for a
 * full-range b (grad_weight), and shift times each row's sum of a is subtracted again: sum (b + shift) a - shift
 * sum a = sum b a. vpdpbusd adds without saturating and int32 arithmetic wraps, so the result is exact wherever
 * the true sum fits in int32, as torch._int_mm's. The packed b is laid out for the kernel: panels of 64 columns, in
 * each panel groups of 4 rows of b, 64 x 4 bytes per group (one zmm: column j's 4 values at bytes 4j .. 4j + 3),
 * zero past K and N. The rows of a are read 4 bytes (one group of K) at a time: from row-major rows, or, where a is
 * the transposed view of a row-major (K, M) tensor (grad_weight's g.T), from a copy packed group-major
 * (bitnet_vnni_pack_columns: each group of 4 rows of the (K, M) tensor as M int32), which a plain transposition
 * would cost as much as. The epilogue is cpu_rows.h's scale_row on each tile row, the same float operations as
 * reference.scale_output. Row blocks are split over `threads` OpenMP threads. */
#include <omp.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_rows.h"

enum { PANEL = 64, GROUP = 4, ROWS = 6 };
/* 4 bytes of a row, read as one int32 wherever they lie. */
typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;

int bitnet_vnni_available(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* Whether the build has AMX-INT8 and the process may use it: Linux hands the tile state to a process only when asked
 * (arch_prctl ARCH_REQ_XCOMP_PERM for feature 18, XTILEDATA), once for all its threads; asked here. */
int bitnet_amx_available(void) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__) && defined(__linux__)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* out (M, K) row-major, the transpose of a_t (K, M) (rows lda apart): what AMX reads for grad_weight's g.T. Threads
 * split the columns of a_t in runs of 64, each transposed by cpu_rows.h's transpose_bytes (16 x 16 byte blocks
 * through SSE2 unpacks), reading whole cache lines of every row. */
void bitnet_transpose_i8(const int8_t* a_t, int64_t lda, int64_t K, int64_t M, int8_t* out, int64_t threads) {
    const int64_t runs = (M + 63) / 64;
#pragma omp parallel for schedule(static) num_threads((int)threads)
    for (int64_t run = 0; run < runs; ++run) {
        const int64_t m0 = run * 64, cols = M - m0 < 64 ? M - m0 : 64;
        transpose_bytes(a_t + m0, K, cols, lda, out + m0 * K, K);
    }
}

/* Each byte of x plus shift (1 or 128) modulo 256, without carries between bytes. */
static inline uint32_t bytes_plus(uint32_t x, uint8_t shift) {
    const uint32_t s = 0x01010101u * shift;
    return ((x & 0x7f7f7f7fu) + s) ^ (x & 0x80808080u);
}

/* Bytes j < cols of four rows interleaved, each plus shift modulo 256: out[j] = r0[j] | r1[j] << 8 | r2[j] << 16 |
 * r3[j] << 24 (the 4 values of one group of K of column j), 16 columns per step with SSE2. */
static inline void interleave4(const uint8_t* r0, const uint8_t* r1, const uint8_t* r2, const uint8_t* r3,
                               uint8_t shift, int64_t cols, uint32_t* out) {
    int64_t j = 0;
#if defined(__SSE2__)
    const __m128i s = _mm_set1_epi8((char)shift);
    for (; j + 16 <= cols; j += 16) {
        const __m128i a = _mm_add_epi8(_mm_loadu_si128((const __m128i*)(r0 + j)), s);
        const __m128i b = _mm_add_epi8(_mm_loadu_si128((const __m128i*)(r1 + j)), s);
        const __m128i c = _mm_add_epi8(_mm_loadu_si128((const __m128i*)(r2 + j)), s);
        const __m128i d = _mm_add_epi8(_mm_loadu_si128((const __m128i*)(r3 + j)), s);
        const __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
        const __m128i cd_lo = _mm_unpacklo_epi8(c, d), cd_hi = _mm_unpackhi_epi8(c, d);
        _mm_storeu_si128((__m128i*)(out + j), _mm_unpacklo_epi16(ab_lo, cd_lo));
        _mm_storeu_si128((__m128i*)(out + j + 4), _mm_unpackhi_epi16(ab_lo, cd_lo));
        _mm_storeu_si128((__m128i*)(out + j + 8), _mm_unpacklo_epi16(ab_hi, cd_hi));
        _mm_storeu_si128((__m128i*)(out + j + 12), _mm_unpackhi_epi16(ab_hi, cd_hi));
    }
#endif
    for (; j < cols; ++j)
        out[j] = (uint32_t)(uint8_t)(r0[j] + shift) | (uint32_t)(uint8_t)(r1[j] + shift) << 8 |
                 (uint32_t)(uint8_t)(r2[j] + shift) << 16 | (uint32_t)(uint8_t)(r3[j] + shift) << 24;
}

/* Pack b (K, N), element (k, n) at b[k * sk + n * sn], plus shift as described above, reading b along its
 * contiguous dimension: where b is contiguous along N (grad_input's W, grad_weight's x) threads split the groups of
 * K and each reads four whole rows into every panel; where it is contiguous along K (the forward's W.T) they split
 * the panels and each reads a column's groups in one sweep; otherwise byte by byte. */
void bitnet_vnni_pack(const int8_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t shift, uint8_t* packed,
                      int64_t threads) {
    const uint8_t sh = (uint8_t)shift;
    const int64_t panels = (N + PANEL - 1) / PANEL, groups = (K + GROUP - 1) / GROUP;
    uint32_t* const out = (uint32_t*)packed;
    if (sn == 1 && sk != 1) {
#pragma omp parallel for schedule(static) num_threads((int)threads)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k0 = g * GROUP;
            for (int64_t p = 0; p < panels; ++p) {
                uint32_t* dst = out + (p * groups + g) * PANEL;
                const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
                if (k0 + GROUP <= K) {
                    const uint8_t* r0 = (const uint8_t*)b + k0 * sk + p * PANEL;
                    interleave4(r0, r0 + sk, r0 + 2 * sk, r0 + 3 * sk, sh, cols, dst);
                } else {
                    for (int64_t j = 0; j < cols; ++j) {
                        uint8_t v[GROUP] = {0};
                        for (int64_t t = 0; k0 + t < K; ++t) v[t] = (uint8_t)(b[(k0 + t) * sk + p * PANEL + j] + sh);
                        memcpy(dst + j, v, 4);
                    }
                }
                for (int64_t j = cols; j < PANEL; ++j) dst[j] = 0;
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads((int)threads)
    for (int64_t p = 0; p < panels; ++p) {
        uint32_t* dst = out + p * groups * PANEL;
        const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        const int64_t whole = sk == 1 ? K / GROUP : 0; /* groups read 4 bytes at a time */
        for (int64_t j = 0; j < cols; ++j) {
            const int8_t* col = b + (p * PANEL + j) * sn;
            for (int64_t g = 0; g < whole; ++g) {
                uint32_t v;
                memcpy(&v, col + g * GROUP, 4);
                dst[g * PANEL + j] = bytes_plus(v, sh);
            }
            for (int64_t g = whole; g < groups; ++g) {
                uint8_t v[GROUP] = {0};
                for (int64_t t = 0; t < GROUP && g * GROUP + t < K; ++t)
                    v[t] = (uint8_t)(col[(g * GROUP + t) * sk] + sh);
                memcpy(dst + g * PANEL + j, v, 4);
            }
        }
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t j = cols; j < PANEL; ++j) dst[g * PANEL + j] = 0;
    }
}

/* The transpose A (M, K) of a_t (K, M) (rows lda apart) packed group-major for the kernel: for each group of 4 rows of
 * a_t, M int32 (column m's 4 bytes, zero past K); sums[m] = the sum of column m. Threads split the groups, reading
 * four whole rows each (every write is sequential too), and add their column sums at the end. Nonzero when out of
 * memory. */
int bitnet_vnni_pack_columns(const int8_t* a_t, int64_t lda, int64_t K, int64_t M, uint8_t* packed, int32_t* sums,
                             int64_t threads) {
    const int64_t groups = (K + GROUP - 1) / GROUP, nt = threads > 0 ? threads : 1;
    int32_t* partial = (int32_t*)calloc((size_t)(nt * (M > 0 ? M : 1)), sizeof(int32_t));
    if (partial == NULL) return 1;
#pragma omp parallel num_threads((int)nt)
    {
        int32_t* s = partial + (int64_t)omp_get_thread_num() * M;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            uint32_t* dst = (uint32_t*)(packed + g * M * GROUP);
            const int64_t rows = K - g * GROUP < GROUP ? K - g * GROUP : GROUP;
            const int8_t* r[GROUP];
            for (int t = 0; t < GROUP; ++t) r[t] = a_t + (g * GROUP + (t < rows ? t : 0)) * lda;
            if (rows == GROUP) {
                interleave4((const uint8_t*)r[0], (const uint8_t*)r[1], (const uint8_t*)r[2], (const uint8_t*)r[3], 0,
                            M, dst);
                for (int64_t m = 0; m < M; ++m) s[m] += r[0][m] + r[1][m] + r[2][m] + r[3][m];
            } else {
                for (int64_t m = 0; m < M; ++m) {
                    uint8_t v[GROUP] = {0};
                    for (int t = 0; t < rows; ++t) {
                        v[t] = (uint8_t)r[t][m];
                        s[m] += r[t][m];
                    }
                    memcpy(dst + m, v, 4);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            int32_t total = 0;
            for (int64_t t = 0; t < nt; ++t) total += partial[t * M + m];
            sums[m] = total;
        }
    }
    free(partial);
    return 0;
}

/* reference.ternarize of w (N, K) of dtype w_code, clamp(round(w / max(scale, eps)), -1, 1), written straight into
 * the two right operands of a BitNet linear as bitnet_vnni_pack packs them with shift 1: fwd, W.T (K, N) for the
 * forward, and gi, W (N, K) for grad_input, byte for byte the same; one read of the master weight instead of a
 * ternarization and two packings. Threads split blocks of 64 rows of w: one panel of fwd, 16 groups of gi each.
 * Nonzero when out of memory. */
int bitnet_vnni_ternarize_packed(const void* w, int64_t w_code, float scale, double eps, int64_t N, int64_t K,
                                 uint8_t* fwd, uint8_t* gi, int64_t threads) {
    const float s = scale < (float)eps ? (float)eps : scale;
    const int64_t blocks = (N + PANEL - 1) / PANEL, groups_k = (K + GROUP - 1) / GROUP;
    const int64_t panels_k = (K + PANEL - 1) / PANEL, groups_n = (N + GROUP - 1) / GROUP;
    uint32_t *const f = (uint32_t*)fwd, *const g = (uint32_t*)gi;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        int8_t* rows = (int8_t*)calloc((size_t)PANEL * (size_t)(K > 0 ? K : 1), 1); /* rows past N stay 0 */
        if (rows == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            if (rows == NULL) continue;
            const int64_t n0 = b * PANEL, count = N - n0 < PANEL ? N - n0 : PANEL;
            for (int64_t j = 0; j < count; ++j) {
                quantize_span(w, w_code, (n0 + j) * K, 1.0f, NULL, s, NULL, K, -1.0f, 1.0f, rows + j * K, 0);
            }
            /* fwd: panel b, row j of w is column j, its groups of 4 values along K: a transposition of 4-byte
             * groups, 4 rows x 4 groups at a time with SSE2 (two rounds of unpacks), the rest one group at a time */
            uint32_t* panel = f + b * groups_k * PANEL;
            int64_t rows4 = 0, groups4 = 0;
#if defined(__SSE2__)
            rows4 = count / 4 * 4, groups4 = K / GROUP / 4 * 4;
            for (int64_t j = 0; j < rows4; j += 4)
                for (int64_t gk = 0; gk < groups4; gk += 4) {
                    __m128i r[4];
                    for (int i = 0; i < 4; ++i)
                        r[i] = _mm_loadu_si128((const __m128i*)(rows + (j + i) * K + gk * GROUP));
                    const __m128i lo01 = _mm_unpacklo_epi32(r[0], r[1]), lo23 = _mm_unpacklo_epi32(r[2], r[3]);
                    const __m128i hi01 = _mm_unpackhi_epi32(r[0], r[1]), hi23 = _mm_unpackhi_epi32(r[2], r[3]);
                    const __m128i group[4] = {_mm_unpacklo_epi64(lo01, lo23), _mm_unpackhi_epi64(lo01, lo23),
                                              _mm_unpacklo_epi64(hi01, hi23), _mm_unpackhi_epi64(hi01, hi23)};
                    for (int i = 0; i < 4; ++i) /* each byte + 1, as bytes_plus */
                        _mm_storeu_si128((__m128i*)(panel + (gk + i) * PANEL + j),
                                         _mm_add_epi8(group[i], _mm_set1_epi8(1)));
                }
#endif
            for (int64_t j = 0; j < PANEL; ++j) {
                const int8_t* row = rows + j * K;
                for (int64_t gk = j < rows4 ? groups4 : 0; gk < groups_k; ++gk) {
                    uint32_t v = 0;
                    if (j < count && gk * GROUP + GROUP <= K) {
                        memcpy(&v, row + gk * GROUP, 4);
                        v = bytes_plus(v, 1);
                    } else if (j < count) {
                        uint8_t t[GROUP] = {0};
                        for (int64_t i = 0; gk * GROUP + i < K; ++i) t[i] = (uint8_t)(row[gk * GROUP + i] + 1);
                        memcpy(&v, t, 4);
                    }
                    panel[gk * PANEL + j] = v;
                }
            }
            /* gi: groups 16b .. of every panel along K, four rows of w interleaved */
            for (int64_t gn = b * (PANEL / GROUP); gn < groups_n && gn < (b + 1) * (PANEL / GROUP); ++gn) {
                const int64_t r0 = gn * GROUP - n0, valid = N - gn * GROUP < GROUP ? N - gn * GROUP : GROUP;
                for (int64_t pk = 0; pk < panels_k; ++pk) {
                    uint32_t* dst = g + (pk * groups_n + gn) * PANEL;
                    const int64_t cols = K - pk * PANEL < PANEL ? K - pk * PANEL : PANEL;
                    const uint8_t* r = (const uint8_t*)rows + r0 * K + pk * PANEL;
                    if (valid == GROUP) {
                        interleave4(r, r + K, r + 2 * K, r + 3 * K, 1, cols, dst);
                    } else {
                        for (int64_t j = 0; j < cols; ++j) {
                            uint8_t t[GROUP] = {0};
                            for (int64_t i = 0; i < valid; ++i) t[i] = (uint8_t)(r[i * K + j] + 1);
                            memcpy(dst + j, t, 4);
                        }
                    }
                    for (int64_t j = cols; j < PANEL; ++j) dst[j] = 0;
                }
            }
        }
        free(rows);
    }
    return failed;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* The int32 sums of ROWS rows of a (r: their first groups, each next group step bytes on) against the first `groups`
 * groups of one panel, into tile (ROWS x PANEL, row-major), each minus its row's shifted sum (sums: ROWS values).
 * The 24 accumulators are named one by one: with an array of them, or with the subtraction done on them, GCC 12
 * keeps them in memory and the loop runs at half speed. */
#define BITNET_VNNI_ROW(i)                                                                                          \
    a = _mm512_set1_epi32(*(const unaligned_i32*)(r##i + ka));                                                       \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, b0, a);                                                                  \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, b1, a);                                                                  \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, b2, a);                                                                  \
    c##i##3 = _mm512_dpbusd_epi32(c##i##3, b3, a);
#define BITNET_VNNI_STORE(i)                                                                                        \
    _mm512_storeu_si512(tile + i * PANEL, c##i##0);                                                                 \
    _mm512_storeu_si512(tile + i * PANEL + 16, c##i##1);                                                            \
    _mm512_storeu_si512(tile + i * PANEL + 32, c##i##2);                                                            \
    _mm512_storeu_si512(tile + i * PANEL + 48, c##i##3);
static __attribute__((noinline)) void tile_sums(const int8_t* const* r, int64_t groups, int64_t step,
                                                const uint8_t* panel, const int32_t* sums, int32_t* tile) {
    const int8_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5];
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m512i c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    __m512i c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    const uint8_t* bp = panel;
    for (int64_t ka = 0; ka < groups * step; ka += step, bp += PANEL * GROUP) {
        const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64);
        const __m512i b2 = _mm512_loadu_si512(bp + 128), b3 = _mm512_loadu_si512(bp + 192);
        __m512i a;
        BITNET_VNNI_ROW(0) BITNET_VNNI_ROW(1) BITNET_VNNI_ROW(2)
        BITNET_VNNI_ROW(3) BITNET_VNNI_ROW(4) BITNET_VNNI_ROW(5)
    }
    BITNET_VNNI_STORE(0) BITNET_VNNI_STORE(1) BITNET_VNNI_STORE(2)
    BITNET_VNNI_STORE(3) BITNET_VNNI_STORE(4) BITNET_VNNI_STORE(5)
    for (int i = 0; i < ROWS; ++i) /* apart from the accumulators: GCC 12 then keeps them all in registers */
        for (int j = 0; j < PANEL; ++j) tile[i * PANEL + j] -= sums[i];
}
#undef BITNET_VNNI_ROW
#undef BITNET_VNNI_STORE

/* Add the last, partial group of K (tail bytes of each row at r[i] + k; its packed bytes past K are zero) to tile:
 * apart from tile_sums so that its hot loop never reads past a row. */
static void tile_tail(const int8_t* const* r, int64_t k, int64_t tail, const uint8_t* group, int32_t* tile) {
    for (int i = 0; i < ROWS; ++i) {
        int32_t v = 0;
        memcpy(&v, r[i] + k, (size_t)tail);
        const __m512i ai = _mm512_set1_epi32(v);
        for (int j = 0; j < 4; ++j) {
            int32_t* t = tile + i * PANEL + j * 16;
            const __m512i b = _mm512_loadu_si512(group + j * 64);
            _mm512_storeu_si512(t, _mm512_dpbusd_epi32(_mm512_loadu_si512(t), b, ai));
        }
    }
}

/* The context of one scaled product: a (M, K) int8, row m's group g (4 values) at a + m * row + g * step, with its
 * row sums times the shift of b; the output and the epilogue's factors (row_scale (M), col_scale (N), the scalar
 * scale, bias (N floats of the output dtype), each optional: NULL);
 * out_code 3 writes the int32 sums, 0 / 1 / 2 reference.scale_output of them as float32 / bfloat16 / float16. */
typedef struct {
    const int8_t* a;
    int64_t row, step, M, K, N;
    const int32_t* row_sums;
    const float *row_scale, *col_scale, *scale, *bias;
    int64_t out_code;
    void* out;
} product;

/* The finished sums of rows m0 + first .. m0 + last against columns n0 .. n0 + cols (tile: rows of PANEL int32)
 * written out: as they are (out_code 3) or through the epilogue (y: PANEL floats of scratch). */
static void write_rows(const product* c, int64_t m0, int64_t first, int64_t last, int64_t n0, int64_t cols,
                       const int32_t* tile, float* y) {
    for (int64_t i = first; i < last; ++i) {
        const int64_t m = m0 + i;
        if (c->out_code == 3) {
            memcpy((int32_t*)c->out + m * c->N + n0, tile + i * PANEL, (size_t)cols * sizeof(int32_t));
            continue;
        }
        scale_row(tile + i * PANEL, 0, c->row_scale != NULL ? c->row_scale + m : NULL,
                  c->col_scale != NULL ? c->col_scale + n0 : NULL, c->scale, c->bias != NULL ? c->bias + n0 : NULL,
                  c->out_code, c->out, m * c->N + n0, cols, y);
    }
}

/* Rows m0 .. m0 + ROWS (fewer at the end) of the product against one packed panel (columns n0 ..), written out.
 * tile: ROWS x PANEL int32, y: PANEL floats of scratch. */
static void block_times_panel(const product* c, int64_t m0, const uint8_t* panel, int64_t n0, int32_t* tile,
                              float* y) {
    const int64_t rows = c->M - m0 < ROWS ? c->M - m0 : ROWS, cols = c->N - n0 < PANEL ? c->N - n0 : PANEL;
    const int8_t* r[ROWS]; /* a block of fewer rows repeats its last row */
    int32_t sums[ROWS];
    for (int i = 0; i < ROWS; ++i) {
        const int64_t m = m0 + (i < rows ? i : rows - 1);
        r[i] = c->a + m * c->row;
        sums[i] = c->row_sums[m];
    }
    const int64_t K = c->K;
    tile_sums(r, K / GROUP, c->step, panel, sums, tile);
    if (K % GROUP) tile_tail(r, K / GROUP * GROUP, K % GROUP, panel + K / GROUP * PANEL * GROUP, tile);
    write_rows(c, m0, 0, rows, n0, cols, tile, y);
}

/* The sum of the K int8 values at r. */
static inline int32_t row_sum(const int8_t* r, int64_t K) {
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), _mm512_loadu_si512(r + k));
    int32_t s = _mm512_reduce_add_epi32(acc);
    for (; k < K; ++k) s += r[k];
    return s;
}

/* Fill a product's row sums times shift (from a_sums where given, else summing row-major rows; none for shift 0)
 * and the bias as floats; nonzero when out of memory. */
static int product_setup(product* c, const int32_t* a_sums, int64_t shift, const void* bias, int64_t threads,
                         int32_t** row_sums, float** b) {
    *row_sums = (int32_t*)malloc((size_t)(c->M > 0 ? c->M : 1) * sizeof(int32_t));
    *b = NULL;
    if (bias != NULL) {
        *b = (float*)malloc((size_t)(c->N > 0 ? c->N : 1) * sizeof(float));
        if (*b != NULL) load_row(bias, 0, c->N, c->out_code, *b);
    }
    if (*row_sums == NULL || (bias != NULL && *b == NULL)) {
        free(*row_sums);
        free(*b);
        return 1;
    }
    const int8_t* a = c->a;
    const int64_t lda = c->row, K = c->K;
    int32_t* sums = *row_sums;
#pragma omp parallel for schedule(static) num_threads((int)threads) if (shift != 0)
    for (int64_t m = 0; m < (shift != 0 ? c->M : 0); ++m) {
        const int32_t s = a_sums != NULL ? a_sums[m] : row_sum(a + m * lda, K);
        sums[m] = (int32_t)((uint32_t)s * (uint32_t)shift); /* wraps as the sums do */
    }
    c->row_sums = sums;
    c->bias = *b;
    return 0;
}
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
/* Route "amx": the same product with Intel AMX tiles. A block of AMX_ROWS rows of a (row-major) against a panel, in
 * 2 x 2 tiles of 16 rows x 16 columns of int32 sums; each step of the reduction is 64 bytes of a row (16 groups of
 * 4), which tdpbsud multiplies, a's bytes signed by b's shifted unsigned ones, as vpdpbusd does. The packed panel is
 * already the tile layout: 16 groups of 16 columns are 16 rows of 64 bytes, PANEL * GROUP bytes apart. */
enum { AMX_ROWS = 32, AMX_STEP = 64, AMX_SPAN_BYTES = 512 * 1024 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3: the sums; 4-5: 16 rows x 64 bytes of a; 6-7: 16 groups of 16 columns of b. Every tile 16 x 64 bytes. */
static void amx_configure(void) {
    tile_config t;
    memset(&t, 0, sizeof t);
    t.palette = 1;
    for (int i = 0; i < 8; ++i) t.colsb[i] = 64, t.rows[i] = 16;
    /* GCC 12's _tile_loadconfig declares a read of 8 of its 64 bytes, so the stores above were dropped once this
     * was inlined (all tiles then unconfigured: a fault at the first tile instruction); the empty asm says t's
     * memory is read. */
    __asm__ __volatile__("" : : "r"(&t) : "memory");
    _tile_loadconfig(&t);
}

/* A finished tile of sums (AMX_ROWS x PANEL int32) whose rows are being written out, `done` of `rows` so far, while the
 * tiles of the next one are multiplied: tile == NULL for none. */
typedef struct {
    const int32_t* tile;
    int64_t m0, rows, n0, cols, done;
} tile_out;

/* Write out `count` more rows of w's tile (fewer where fewer are left). */
static inline void write_more(const product* c, tile_out* w, int64_t count, float* y) {
    if (w->tile == NULL) return;
    const int64_t last = w->done + count < w->rows ? w->done + count : w->rows;
    write_rows(c, w->m0, w->done, last, w->n0, w->cols, w->tile, y);
    w->done = last;
}

/* The sums of AMX_ROWS rows of a (lda apart) over the first `steps` steps of the reduction against one panel, each
 * minus its row's shifted sum, into tile (AMX_ROWS x PANEL int32). The accumulators start from those differences
 * (start: AMX_ROWS x 16 int32, row i all minus the shifted sum of row i), read as tiles; no pass subtracts them.
 * Between the steps the rows of the previous tile (w) are written out, a few at a time, so that the core runs the
 * epilogue while the tile unit multiplies (2048 x 1024 x 2816 to bfloat16, warm, alternated: 2.9-3.1 -> 2.6-3.0 ms). */
static void amx_block_sums(const int8_t* a, int64_t lda, int64_t steps, const uint8_t* panel, const int32_t* start,
                           int32_t* tile, const product* c, tile_out* w, float* y) {
    const int64_t ldb = PANEL * GROUP, ldt = PANEL * (int64_t)sizeof(int32_t), lds = 16 * sizeof(int32_t);
    const int64_t per_step = steps > 0 ? (AMX_ROWS + 2 * steps - 1) / (2 * steps) : AMX_ROWS;
    /* GCC 12's _tile_loadd declares no memory read: the stores into start, the pad and the panel must not move past
     * it. (_tile_stored clobbers memory, so the rows written out are read after it.) */
    __asm__ __volatile__("" : : : "memory");
    for (int h = 0; h < PANEL; h += 32) {
        _tile_loadd(0, start, lds);
        _tile_loadd(1, start, lds);
        _tile_loadd(2, start + 16 * 16, lds);
        _tile_loadd(3, start + 16 * 16, lds);
        const uint8_t* b = panel + h * GROUP;
        for (int64_t k = 0; k < steps * AMX_STEP; k += AMX_STEP, b += AMX_STEP / GROUP * ldb) {
            _tile_loadd(4, a + k, lda);
            _tile_loadd(5, a + 16 * lda + k, lda);
            _tile_loadd(6, b, ldb);
            _tile_loadd(7, b + 16 * GROUP, ldb);
            _tile_dpbsud(0, 4, 6);
            _tile_dpbsud(1, 4, 7);
            _tile_dpbsud(2, 5, 6);
            _tile_dpbsud(3, 5, 7);
            write_more(c, w, per_step, y);
        }
        _tile_stored(0, tile + h, ldt);
        _tile_stored(1, tile + h + 16, ldt);
        _tile_stored(2, tile + 16 * PANEL + h, ldt);
        _tile_stored(3, tile + 16 * PANEL + h + 16, ldt);
    }
    write_more(c, w, AMX_ROWS, y);
}

/* Add the groups of the reduction from g0 on (past the tiles' steps; the last group's bytes past K are zero in b and
 * not read in a) to `rows` rows of tile, with vpdpbusd. */
static void amx_block_tail(const int8_t* a, int64_t lda, int64_t rows, int64_t K, int64_t g0, const uint8_t* panel,
                           int32_t* tile) {
    const int64_t groups = (K + GROUP - 1) / GROUP;
    for (int64_t i = 0; i < rows; ++i) {
        int32_t* t = tile + i * PANEL;
        __m512i c0 = _mm512_loadu_si512(t), c1 = _mm512_loadu_si512(t + 16);
        __m512i c2 = _mm512_loadu_si512(t + 32), c3 = _mm512_loadu_si512(t + 48);
        for (int64_t g = g0; g < groups; ++g) {
            int32_t v = 0;
            memcpy(&v, a + i * lda + g * GROUP, (size_t)(K - g * GROUP < GROUP ? K - g * GROUP : GROUP));
            const __m512i ai = _mm512_set1_epi32(v);
            const uint8_t* bg = panel + g * PANEL * GROUP;
            c0 = _mm512_dpbusd_epi32(c0, _mm512_loadu_si512(bg), ai);
            c1 = _mm512_dpbusd_epi32(c1, _mm512_loadu_si512(bg + 64), ai);
            c2 = _mm512_dpbusd_epi32(c2, _mm512_loadu_si512(bg + 128), ai);
            c3 = _mm512_dpbusd_epi32(c3, _mm512_loadu_si512(bg + 192), ai);
        }
        _mm512_storeu_si512(t, c0);
        _mm512_storeu_si512(t + 16, c1);
        _mm512_storeu_si512(t + 32, c2);
        _mm512_storeu_si512(t + 48, c3);
    }
}

/* A thread's AMX state: two tile buffers (one multiplied into, one being written out: w), the accumulators' start
 * values, epilogue scratch, and a zero-padded buffer for a short last block of rows (tiles read 16 whole rows). */
typedef struct {
    int32_t *tiles, *start;
    float* y;
    int8_t* pad;
    tile_out w;
    int64_t cur;
} amx_thread;

/* Allocate a thread's state for reductions of K and configure its tiles; nonzero when out of memory. */
static int amx_thread_open(amx_thread* t, int64_t K) {
    t->tiles = (int32_t*)malloc(2 * AMX_ROWS * PANEL * sizeof(int32_t));
    t->start = (int32_t*)malloc(AMX_ROWS * 16 * sizeof(int32_t));
    t->y = (float*)malloc(PANEL * sizeof(float));
    t->pad = (int8_t*)calloc((size_t)AMX_ROWS * (size_t)(K > 0 ? K : 1), 1);
    t->w = (tile_out){NULL, 0, 0, 0, 0, 0};
    t->cur = 0;
    if (t->tiles == NULL || t->start == NULL || t->y == NULL || t->pad == NULL) return 1;
    amx_configure();
    return 0;
}

/* Write out the last tile, release the tiles and free the state (`opened`: amx_thread_open succeeded). */
static void amx_thread_close(const product* c, amx_thread* t, int opened) {
    if (opened) {
        write_more(c, &t->w, AMX_ROWS, t->y);
        _tile_release();
    }
    free(t->tiles);
    free(t->start);
    free(t->y);
    free(t->pad);
}

/* The block of rows m0 .. of a as the tiles read it (*a, rows *ld apart; copied into the pad when short), its
 * accumulators' start from the rows' shifted sums (sums: one per row of the block); returns the rows in it. */
static int64_t amx_block_rows(const product* c, amx_thread* t, int64_t m0, const int32_t* sums, const int8_t** a,
                              int64_t* ld) {
    const int64_t rows = c->M - m0 < AMX_ROWS ? c->M - m0 : AMX_ROWS, K = c->K;
    *a = c->a + m0 * c->row, *ld = c->row;
    if (rows < AMX_ROWS) {
        for (int64_t i = 0; i < rows; ++i) memcpy(t->pad + i * K, *a + i * c->row, (size_t)K);
        *a = t->pad, *ld = K;
    }
    for (int64_t i = 0; i < AMX_ROWS; ++i) /* minus the shifted sum, wrapping as the sums do */
        for (int j = 0; j < 16; ++j) t->start[i * 16 + j] = i < rows ? (int32_t)(0u - (uint32_t)sums[i]) : 0;
    return rows;
}

/* A block of rows (amx_block_rows) against panel p: its sums into the thread's next tile buffer while the previous
 * tile is written out, then the reduction's tail; the tile is then the one being written. */
static void amx_block_times_panel(const product* c, amx_thread* t, const int8_t* a, int64_t ld, int64_t m0,
                                  int64_t rows, const uint8_t* panel, int64_t p) {
    const int64_t K = c->K, steps = K / AMX_STEP, n0 = p * PANEL;
    int32_t* tile = t->tiles + t->cur * AMX_ROWS * PANEL;
    amx_block_sums(a, ld, steps, panel, t->start, tile, c, &t->w, t->y);
    if (steps * AMX_STEP < K) amx_block_tail(a, ld, rows, K, steps * (AMX_STEP / GROUP), panel, tile);
    t->w = (tile_out){tile, m0, rows, n0, c->N - n0 < PANEL ? c->N - n0 : PANEL, 0};
    t->cur ^= 1;
}

/* The product of a row-major a with AMX. Threads split the blocks of AMX_ROWS rows; the panels go in spans of about
 * AMX_SPAN_BYTES, each span against every block before the next, so that it stays in L2 while the blocks go by
 * (2048 x 1024 x 2816 on 2 cores of a Sapphire Rapids: 2.5 TOPS with all panels per block, 4.6 with spans). The last
 * block, when short, is copied into a zero-padded buffer: tiles read 16 whole rows. Each block's row sums times
 * shift start its accumulators (amx_block_sums); they are summed in the first span, into row_sums, and read in
 * the later ones by the same thread: a static schedule gives every loop of the same length the same split. Nonzero
 * when out of memory. */
static int amx_product(const product* c, const uint8_t* packed, int64_t shift, int32_t* row_sums, int64_t threads) {
    const int64_t M = c->M, K = c->K, N = c->N;
    const int64_t panels = (N + PANEL - 1) / PANEL, panel_bytes = (K + GROUP - 1) / GROUP * PANEL * GROUP;
    const int64_t blocks = (M + AMX_ROWS - 1) / AMX_ROWS;
    const int64_t fit = panel_bytes > 0 ? AMX_SPAN_BYTES / panel_bytes : panels; /* K = 0: no bytes at all */
    const int64_t span = fit > 0 ? fit : 1;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        amx_thread t;
        const int ready = !amx_thread_open(&t, K);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t p0 = 0; p0 < panels; p0 += span) {
#pragma omp for schedule(static) nowait
            for (int64_t blk = 0; blk < blocks; ++blk) {
                if (!ready) continue;
                const int64_t m0 = blk * AMX_ROWS;
                int32_t* sums = row_sums + m0; /* this block's, summed in the first span */
                for (int64_t i = 0; p0 == 0 && i < AMX_ROWS && m0 + i < M; ++i)
                    sums[i] = (int32_t)((uint32_t)row_sum(c->a + (m0 + i) * c->row, K) * (uint32_t)shift);
                const int8_t* a;
                int64_t ld;
                const int64_t rows = amx_block_rows(c, &t, m0, sums, &a, &ld);
                for (int64_t p = p0; p < p0 + span && p < panels; ++p)
                    amx_block_times_panel(c, &t, a, ld, m0, rows, packed + p * panel_bytes, p);
            }
        }
        amx_thread_close(c, &t, ready);
    }
    return failed;
}
#endif
#endif

/* a (M, K) int8 times b (K, N) packed with `shift` (bitnet_vnni_pack): out_code and the factors as in `product`. a is
 * row-major, rows lda apart, when a_sums is NULL; else a is packed group-major (bitnet_vnni_pack_columns) and a_sums
 * holds its row sums. Row blocks are split over `threads` OpenMP threads, each running every panel. With `amx`
 * (a row-major a only, and only where bitnet_amx_available) the tiles are summed by AMX (amx_product). Returns
 * nonzero when out of memory, or when the CPU build has no VNNI (no AMX, asked for AMX). */
int bitnet_vnni_scaled_mm(const int8_t* a, int64_t lda, const int32_t* a_sums, int64_t M, int64_t K,
                          const uint8_t* packed, int64_t N, int64_t shift, int64_t amx, const float* row_scale,
                          const float* col_scale, const float* scale, const void* bias, int64_t out_code, void* out,
                          int64_t threads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const int64_t groups = (K + GROUP - 1) / GROUP;
    /* Packed group-major, a has no tail: its last group is zero past K, as is b's. */
    product c = a_sums == NULL
                    ? (product){a, lda, GROUP, M, K, N, NULL, row_scale, col_scale, scale, NULL, out_code, out}
                    : (product){a, GROUP, M * GROUP, M, groups * GROUP, N, NULL, row_scale, col_scale, scale, NULL,
                                out_code, out};
    int32_t* row_sums;
    float* b;
    /* no AMX in the build, or no leave from the OS (AMX would fault): refused, as is a packed a */
    if (amx && (a_sums != NULL || !bitnet_amx_available())) return 1;
    /* AMX sums each block's rows itself, when it first reads them into tiles. */
    if (product_setup(&c, a_sums, amx ? 0 : shift, bias, threads, &row_sums, &b)) return 1;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (amx) {
        const int failed = amx_product(&c, packed, shift, row_sums, threads);
        free(row_sums);
        free(b);
        return failed;
    }
#endif
    const int64_t panels = (N + PANEL - 1) / PANEL;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        int32_t* tile = (int32_t*)malloc(ROWS * PANEL * sizeof(int32_t));
        float* y = (float*)malloc(PANEL * sizeof(float));
        if (tile == NULL || y == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        const int64_t blocks = (M + ROWS - 1) / ROWS;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            if (tile == NULL || y == NULL) continue;
            for (int64_t p = 0; p < panels; ++p)
                block_times_panel(&c, blk * ROWS, packed + p * groups * PANEL * GROUP, p * PANEL, tile, y);
        }
        free(tile);
        free(y);
    }
    free(row_sums);
    free(b);
    return failed;
#else
    (void)a, (void)lda, (void)a_sums, (void)M, (void)K, (void)packed, (void)N, (void)shift, (void)row_scale;
    (void)col_scale, (void)scale, (void)bias, (void)out_code, (void)out, (void)amx, (void)threads;
    return 1;
#endif
}

/* One panel of the kernel's layout from `cols` rows of a weight packed two bits per value (rows ldb bytes apart, their
 * first `groups` bytes, each one group of 4 values): panel[g * PANEL + j] = the 4 values of byte g of row j, each
 * plus 1 (-1 -> 0, 0 -> 1, 1 -> 2; expand: that of every byte), zero for j >= cols. With AVX-512, full panels go
 * by blocks of 16 rows x 16 bytes, transposed with four rounds of SSE2 unpacks, each byte's four 2-bit codes
 * spread into four bytes with shifts; the bytes left take a table lookup each (the whole product of 512 x 1024 x
 * 2816: 3.96 ms with lookups only, 3.60 ms with the blocks, Zen 4). */
static void expand_panel(const uint8_t* rows, int64_t ldb, int64_t cols, int64_t groups, const uint32_t* expand,
                         uint32_t* panel) {
    int64_t g0 = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (cols == PANEL) {
        const __m512i low2 = _mm512_set1_epi32(0x03030303), one = _mm512_set1_epi32(0x01010101);
        for (; g0 + 16 <= groups; g0 += 16)
            for (int64_t j0 = 0; j0 < PANEL; j0 += 16) {
                /* Round by round, each unpack pairs units of two rows (groups of rows) at the same bytes g; the
                 * low / high halves of rounds 1-3 are bits 3, 2, 1 of g, round 4's bit 0. */
                __m128i r[16], a[2][8], b[2][2][4], c[2][2][2][2];
                for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128((const __m128i*)(rows + (j0 + i) * ldb + g0));
                for (int i = 0; i < 8; ++i) {
                    a[0][i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
                    a[1][i] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
                }
                for (int x = 0; x < 2; ++x)
                    for (int i = 0; i < 4; ++i) {
                        b[x][0][i] = _mm_unpacklo_epi16(a[x][2 * i], a[x][2 * i + 1]);
                        b[x][1][i] = _mm_unpackhi_epi16(a[x][2 * i], a[x][2 * i + 1]);
                    }
                for (int x = 0; x < 2; ++x)
                    for (int y = 0; y < 2; ++y)
                        for (int i = 0; i < 2; ++i) {
                            c[x][y][0][i] = _mm_unpacklo_epi32(b[x][y][2 * i], b[x][y][2 * i + 1]);
                            c[x][y][1][i] = _mm_unpackhi_epi32(b[x][y][2 * i], b[x][y][2 * i + 1]);
                        }
                for (int g = 0; g < 16; ++g) {
                    const __m128i* h = c[g >> 3][(g >> 2) & 1][(g >> 1) & 1];
                    const __m128i column = g & 1 ? _mm_unpackhi_epi64(h[0], h[1]) : _mm_unpacklo_epi64(h[0], h[1]);
                    const __m512i d = _mm512_cvtepu8_epi32(column); /* byte g of rows j0 .. j0 + 15 */
                    const __m512i d6 = _mm512_or_si512(d, _mm512_slli_epi32(d, 6));
                    const __m512i spread = _mm512_or_si512(d6, _mm512_slli_epi32(d6, 12));
                    const __m512i codes = _mm512_and_si512(spread, low2); /* code i in byte i */
                    const __m512i values = _mm512_and_si512(_mm512_add_epi32(codes, one), low2); /* value + 1 */
                    _mm512_storeu_si512(panel + (g0 + g) * PANEL + j0, values);
                }
            }
    }
#endif
    for (int64_t j = 0; j < PANEL; ++j)
        for (int64_t g = j < cols ? g0 : 0; g < groups; ++g)
            panel[g * PANEL + j] = j < cols ? expand[rows[j * ldb + g]] : 0;
}

/* a (M, K) int8 times B.T for a weight B (N, K) packed two bits per value along K (reference.pack_i2_in_i8: rows of
 * ldb bytes, value 4j + i in bits 2i .. 2i + 1 of byte j, two's complement), the packed inference weight: the same
 * product as bitnet_vnni_scaled_mm of its unpacked values. Each thread expands whole panels of B into the kernel's
 * layout (expand_panel) and runs every row block against each, so B is never unpacked as a whole: reading it costs
 * 1/4 byte per value, and nothing is kept between calls. With `amx` (where bitnet_amx_available) the blocks are
 * AMX's, 32 rows each (amx_block_times_panel), against the same expanded panels. */
int bitnet_vnni_scaled_mm_i2(const int8_t* a, int64_t lda, int64_t M, int64_t K, const uint8_t* b_packed, int64_t ldb,
                             int64_t N, int64_t amx, const float* row_scale, const float* col_scale,
                             const float* scale, const void* bias, int64_t out_code, void* out, int64_t threads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (amx && !bitnet_amx_available()) return 1; /* no AMX in the build, or no leave from the OS */
    product c = {a, lda, GROUP, M, K, N, NULL, row_scale, col_scale, scale, NULL, out_code, out};
    int32_t* row_sums;
    float* b;
    if (product_setup(&c, NULL, 1, bias, threads, &row_sums, &b)) return 1;
    uint32_t expand[256]; /* four 2-bit two's-complement codes -> four bytes of value + 1 (-1 -> 0, 0 -> 1, 1 -> 2) */
    for (int v = 0; v < 256; ++v) {
        uint32_t e = 0;
        for (int i = 0; i < 4; ++i) e |= (uint32_t)((((v >> (2 * i)) & 3) + 1) & 3) << (8 * i);
        expand[v] = e;
    }
    const int64_t panels = (N + PANEL - 1) / PANEL, groups = (K + GROUP - 1) / GROUP;
    const int64_t blocks = (M + ROWS - 1) / ROWS;
    int failed = 0;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (amx) {
        const int64_t amx_blocks = (M + AMX_ROWS - 1) / AMX_ROWS;
#pragma omp parallel num_threads((int)threads)
        {
            amx_thread t;
            const int opened = !amx_thread_open(&t, K);
            uint32_t* panel = (uint32_t*)malloc((size_t)(groups > 0 ? groups : 1) * PANEL * sizeof(uint32_t));
            const int ready = opened && panel != NULL;
            if (!ready) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < panels; ++p) {
                if (!ready) continue;
                expand_panel(b_packed + p * PANEL * ldb, ldb, N - p * PANEL < PANEL ? N - p * PANEL : PANEL, groups,
                             expand, panel);
                for (int64_t blk = 0; blk < amx_blocks; ++blk) {
                    const int8_t* rows_of_a;
                    int64_t ld;
                    const int64_t m0 = blk * AMX_ROWS;
                    const int64_t rows = amx_block_rows(&c, &t, m0, row_sums + m0, &rows_of_a, &ld);
                    amx_block_times_panel(&c, &t, rows_of_a, ld, m0, rows, (const uint8_t*)panel, p);
                }
            }
            amx_thread_close(&c, &t, opened);
            free(panel);
        }
        free(row_sums);
        free(b);
        return failed;
    }
#endif
#pragma omp parallel num_threads((int)threads)
    {
        int32_t* tile = (int32_t*)malloc(ROWS * PANEL * sizeof(int32_t));
        float* y = (float*)malloc(PANEL * sizeof(float));
        uint32_t* panel = (uint32_t*)malloc((size_t)(groups > 0 ? groups : 1) * PANEL * sizeof(uint32_t));
        if (tile == NULL || y == NULL || panel == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; ++p) {
            if (tile == NULL || y == NULL || panel == NULL) continue;
            const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
            expand_panel(b_packed + p * PANEL * ldb, ldb, cols, groups, expand, panel);
            for (int64_t blk = 0; blk < blocks; ++blk)
                block_times_panel(&c, blk * ROWS, (const uint8_t*)panel, p * PANEL, tile, y);
        }
        free(tile);
        free(y);
        free(panel);
    }
    free(row_sums);
    free(b);
    return failed;
#else
    (void)a, (void)lda, (void)M, (void)K, (void)b_packed, (void)ldb, (void)N, (void)amx, (void)row_scale;
    (void)col_scale, (void)scale, (void)bias, (void)out_code, (void)out, (void)threads;
    return 1;
#endif
}
