/* The elementwise passes of a BitNet linear on CPU, reading each input row once from memory where inductor's code
 * reads the whole tensor two or three times: the per-row int8 quantization of an activation (also through the fused
 * RMSNorm), both quantizations of the output gradient, the scaled epilogue of an int8 matmul, and the weight's
 * ternary values. Each is the function of the same name in bitnet_ao.kernels.reference, float operation for float
 * operation (cpu_rows.h), so the results are torch's bit for bit (the RMSNorm's rstd, a sum, in float64: see
 * row_rstd). Rows are split over `threads` OpenMP threads. Every function returns nonzero
 * when it runs out of memory. */
#include <omp.h>
#include <stdlib.h>

#include "cpu_rows.h"

/* A thread's row buffer of n floats; sets *failed (for the whole team) when there is no memory for it. */
static float* row_buffer(int64_t n, int* failed) {
    float* y = (float*)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (y == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return y;
}

/* reference.quantize_rowwise of x (M, K) of dtype code x_code; with gain, of the RMSNorm of x first
 * (reference.rms_norm_quantize_rowwise: x * rstd[m] * gain[k] rounded to x's dtype, then to norm_code's), each
 * row's rstd (reference.rms_norm_rstd, with norm_eps) written to rstd. stream: q written around the caches
 * (quantize_span). */
int bitnet_quantize_rows(const void* x, int64_t x_code, const float* gain, double norm_eps, int64_t norm_code,
                         int64_t M, int64_t K, double eps, int8_t* q, float* scale, float* rstd, int64_t stream,
                         int64_t threads) {
    const float eps_f = (float)eps, norm_eps_f = (float)norm_eps;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = gain != NULL ? row_buffer(K, &failed) : NULL;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m)
            if (gain == NULL || y != NULL)
                scale[m] = quantize_input_row(x, x_code, m * K, K, gain, norm_eps_f, norm_code, eps_f, y, q + m * K,
                                              rstd != NULL ? rstd + m : NULL, (int)stream);
        free(y);
    }
    return failed;
}

/* reference.rms_norm of x (M, K) of dtype code x_code: out = x * rstd[m] * gain[k] rounded to x's dtype, and each
 * row's rstd (reference.rms_norm_rstd, with eps): the rows of the fused norm + quantization, written out, straight
 * into out where normalize_row writes x's dtype (AVX-512), else through a float32 row. */
int bitnet_rms_norm(const void* x, int64_t x_code, const float* gain, double eps, int64_t M, int64_t K, void* out,
                    float* rstd, int64_t threads) {
    const float eps_f = (float)eps;
    const size_t size = x_code == 0 ? 4 : 2;
    const int direct = normalized_code(x_code) == x_code;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = direct ? NULL : row_buffer(K, &failed);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (!direct && y == NULL) continue;
            rstd[m] = row_rstd(x, x_code, m * K, K, eps_f);
            normalize_row(x, m * K, K, x_code, rstd[m], gain, x_code,
                          direct ? (float*)((char*)out + (size_t)(m * K) * size) : y);
            if (!direct) store_row(y, K, x_code, out, m * K);
        }
        free(y);
    }
    return failed;
}

/* m[n] = max(m[n], |g[i * N + n] * r[i]|) over rows m0 <= i < m0 + rows, for n < N, on the bit patterns (absmax's
 * rule), g (.., N) of dtype code. A group of rows at a time, just read by their row pass and still in cache, in
 * registers 64 columns at a time: m is loaded and stored once per group, where a row at a time moved it through
 * L1 once per row (4 bytes for every 2 of a bfloat16 row). */
static void column_absmax(const void* g, int64_t code, int64_t m0, int64_t rows, int64_t N, const float* r,
                          uint32_t* m) {
    int64_t n = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    for (; n + 64 <= N; n += 64) {
        __m512i acc[4];
        for (int j = 0; j < 4; ++j) acc[j] = _mm512_loadu_si512(m + n + 16 * j);
        for (int64_t i = m0; i < m0 + rows; ++i) {
            const __m512 vr = _mm512_set1_ps(r[i]);
            for (int j = 0; j < 4; ++j) {
                const __m512 v = _mm512_mul_ps(load16(g, i * N + n + 16 * j, code), vr);
                acc[j] = _mm512_max_epu32(acc[j], _mm512_and_si512(_mm512_castps_si512(v), magnitude));
            }
        }
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(m + n + 16 * j, acc[j]);
    }
#endif
    for (int64_t i = m0; i < m0 + rows; ++i)
        for (int64_t k = n; k < N; ++k) {
            const float v = load_value(g, i * N + k, code) * r[i];
            uint32_t u;
            memcpy(&u, &v, 4);
            u &= 0x7fffffffu;
            m[k] = u > m[k] ? u : m[k];
        }
}

/* reference.quantize_grad_output of g (M, N): the per-row quantization (g_q, s_g) and the per-column one of
 * g * row_scale[:, None] (g_qc, s_gc). Each thread keeps the column maxima of its rows (a max is exact in any
 * order), updated every GROUP rows (column_absmax); then every row is read a second time for the per-column values.
 * stream: g_q and g_qc written around the caches (quantize_span). */
int bitnet_quantize_grad_output(const void* g, int64_t g_code, const float* row_scale, int64_t M, int64_t N,
                                double eps, int8_t* g_q, float* s_g, int8_t* g_qc, float* s_gc, int64_t stream,
                                int64_t threads) {
    enum { GROUP = 8 };
    const float eps_f = (float)eps;
    const int64_t nt = threads > 0 ? threads : 1;
    uint32_t* col_max = (uint32_t*)calloc((size_t)(nt * (N > 0 ? N : 1)), sizeof(uint32_t));
    float* inv_gc = (float*)malloc((size_t)(N > 0 ? N : 1) * sizeof(float)); /* 1 / s_gc, quantize_span's inv_s */
    if (col_max == NULL || inv_gc == NULL) {
        free(col_max);
        free(inv_gc);
        return 1;
    }
    int divide = 0;
#pragma omp parallel num_threads((int)nt)
    {
        uint32_t* mine = col_max + (int64_t)omp_get_thread_num() * N;
#pragma omp for schedule(static)
        for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
            const int64_t rows = m0 + GROUP < M ? GROUP : M - m0;
            for (int64_t m = m0; m < m0 + rows; ++m) {
                s_g[m] = row_scale_of(absmax_of(g, g_code, m * N, N), eps_f);
                quantize_span(g, g_code, m * N, 1.0f, NULL, s_g[m], NULL, N, -128.0f, 127.0f, g_q + m * N,
                              (int)stream);
            }
            column_absmax(g, g_code, m0, rows, N, row_scale, mine);
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            uint32_t u = 0;
            for (int64_t t = 0; t < nt; ++t) u = col_max[t * N + n] > u ? col_max[t * N + n] : u;
            float a;
            memcpy(&a, &u, 4);
            s_gc[n] = (a < eps_f ? eps_f : a) / 127.0f;
            inv_gc[n] = 1.0f / s_gc[n];
            if (!(s_gc[n] >= BITNET_RECIPROCAL_MIN && s_gc[n] <= BITNET_RECIPROCAL_MAX)) {
#pragma omp atomic write
                divide = 1;
            }
        }
        const float* inv = divide ? NULL : inv_gc; /* read after the loop's barrier */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m)
            quantize_span(g, g_code, m * N, row_scale[m], s_gc, 0.0f, inv, N, -128.0f, 127.0f, g_qc + m * N,
                          (int)stream);
    }
    free(col_max);
    free(inv_gc);
    return 0;
}

/* reference.scale_output: ((acc * row_scale[m]) * col_scale[n]) * scale in float32 (each factor optional), rounded
 * to out_code, plus bias (of out's dtype) added in that dtype. acc is int32, or float32 holding integers
 * (acc_float: the oneDNN and FP32 routes). */
int bitnet_scale_output(const void* acc, int64_t acc_float, const float* row_scale, const float* col_scale,
                        const float* scale, const void* bias, int64_t out_code, void* out, int64_t M, int64_t N,
                        int64_t threads) {
    float* b = NULL;
    if (bias != NULL) {
        b = (float*)malloc((size_t)(N > 0 ? N : 1) * sizeof(float));
        if (b == NULL) return 1;
        load_row(bias, 0, N, out_code, b);
    }
    const size_t acc_size = acc_float ? sizeof(float) : sizeof(int32_t);
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = row_buffer(N, &failed);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (y == NULL) continue;
            scale_row((const char*)acc + (size_t)(m * N) * acc_size, acc_float,
                      row_scale != NULL ? row_scale + m : NULL, col_scale, scale, b, out_code, out, m * N, N, y);
        }
        free(y);
    }
    free(b);
    return failed;
}

/* reference.ternarize of w (N, K) of dtype code w_code: clamp(round(w / max(scale, eps)), -1, 1) as int8, (N, K),
 * or (K, N) when transpose, written tile by tile so that both sides stay in cache. */
int bitnet_ternarize(const void* w, int64_t w_code, float scale, double eps, int64_t transpose, int8_t* q, int64_t N,
                     int64_t K, int64_t threads) {
    enum { TILE = 128 };
    const float s = scale < (float)eps ? (float)eps : scale;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        int8_t* block = (int8_t*)malloc((size_t)TILE * (size_t)(K > 0 ? K : 1));
        if (block == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += TILE) {
            if (block == NULL) continue;
            const int64_t rows = n0 + TILE < N ? TILE : N - n0;
            for (int64_t i = 0; i < rows; ++i) {
                int8_t* out = transpose ? block + i * K : q + (n0 + i) * K;
                quantize_span(w, w_code, (n0 + i) * K, 1.0f, NULL, s, NULL, K, -1.0f, 1.0f, out, 0);
            }
            if (transpose) /* the block's rows are columns n0 .. n0 + rows of the (K, N) output */
                transpose_bytes(block, rows, K, K, q + n0, N);
        }
        free(block);
    }
    return failed;
}

/* reference.weight_stats of the n values of w (dtype code w_code): stats[0] = sum |w|, stats[1] = sum w, in float64.
 * Every float is exact as a double, so only the order of the additions can move the sums, in their last float64
 * bits, which the float32 scales made of them absorb (docs/numerics.md). That order is fixed whatever the thread
 * count: chunks of STATS_CHUNK values, each summed over 8 lanes (lane j takes values j, j + 8, ...) and then lane by
 * lane, and the chunks' sums added in order. */
int bitnet_weight_stats(const void* w, int64_t w_code, int64_t n, double* stats, int64_t threads) {
    enum { STATS_CHUNK = 1 << 14, LANES = 8 };
    const int64_t chunks = (n + STATS_CHUNK - 1) / STATS_CHUNK;
    double* partial = (double*)malloc((size_t)(chunks > 0 ? chunks : 1) * 2 * sizeof(double));
    if (partial == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = row_buffer(STATS_CHUNK, &failed);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            if (y == NULL) continue;
            const int64_t off = c * STATS_CHUNK, len = n - off < STATS_CHUNK ? n - off : STATS_CHUNK;
            const float* v = (const float*)w + off;
            if (w_code != 0) { /* bfloat16 / float16: each value as a float, exactly */
                load_row(w, off, len, w_code, y);
                v = y;
            }
            double abs_lanes[LANES] = {0}, sum_lanes[LANES] = {0};
            int64_t i = 0;
#if defined(__AVX512F__)
            __m512d a = _mm512_setzero_pd(), t = _mm512_setzero_pd();
            for (; i + LANES <= len; i += LANES) {
                const __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(v + i));
                a = _mm512_add_pd(a, _mm512_abs_pd(d));
                t = _mm512_add_pd(t, d);
            }
            _mm512_storeu_pd(abs_lanes, a);
            _mm512_storeu_pd(sum_lanes, t);
#endif
            for (; i < len; ++i) {
                abs_lanes[i % LANES] += fabs((double)v[i]);
                sum_lanes[i % LANES] += (double)v[i];
            }
            double abs_sum = 0.0, sum = 0.0;
            for (int j = 0; j < LANES; ++j) abs_sum += abs_lanes[j], sum += sum_lanes[j];
            partial[2 * c] = abs_sum;
            partial[2 * c + 1] = sum;
        }
        free(y);
    }
    double abs_sum = 0.0, sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) abs_sum += partial[2 * c], sum += partial[2 * c + 1];
    free(partial);
    stats[0] = abs_sum;
    stats[1] = sum;
    return failed;
}

/* One row of bitnet_rms_norm_backward: dx in x's dtype, its dy * xhat added to the thread's block of gain-gradient
 * sums (dw, float32), xhat and dxhat (each K floats) as scratch. The row's sum runs over 16 lanes (lane j takes
 * elements j, j + 16, ...) and then in a fixed scalar order, the same on every build. With AVX-512 or AVX2 both
 * passes read x and dy again rather than scratch (two bf16 loads cost less than two float stores and loads; with
 * AVX2, float32 rows take 0.37x the time of the portable loops on a Zen 4); the tail of a row past a multiple of 16
 * and the portable code go through the scratch. */
static void rms_norm_backward_row(const void* dy, int64_t dy_code, const void* x, int64_t x_code, const float* w,
                                  float r, int64_t off, int64_t K, void* dx, float* dw, float* xhat, float* dxhat) {
    enum { LANES = 16 };
    float lanes[LANES] = {0};
    int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    {
        const __m512 vr = _mm512_set1_ps(r);
        __m512 acc = _mm512_setzero_ps();
        for (; k + LANES <= K; k += LANES) {
            const __m512 xh = _mm512_mul_ps(load16(x, off + k, x_code), vr);
            const __m512 g = load16(dy, off + k, dy_code);
            _mm512_storeu_ps(dw + k, _mm512_add_ps(_mm512_loadu_ps(dw + k), _mm512_mul_ps(g, xh))); /* dy * xhat */
            const __m512 dxh = _mm512_mul_ps(g, _mm512_loadu_ps(w + k));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(dxh, xh));
        }
        _mm512_storeu_ps(lanes, acc);
    }
#elif defined(__AVX2__) /* the same 16 lanes as two halves */
    {
        const __m256 vr = _mm256_set1_ps(r);
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; k + LANES <= K; k += LANES)
            for (int h = 0; h < 2; ++h) {
                const int64_t i = k + 8 * h;
                const __m256 xh = _mm256_mul_ps(load8(x, off + i, x_code), vr);
                const __m256 g = load8(dy, off + i, dy_code);
                _mm256_storeu_ps(dw + i, _mm256_add_ps(_mm256_loadu_ps(dw + i), _mm256_mul_ps(g, xh)));
                const __m256 dxh = _mm256_mul_ps(g, _mm256_loadu_ps(w + i));
                acc[h] = _mm256_add_ps(acc[h], _mm256_mul_ps(dxh, xh));
            }
        _mm256_storeu_ps(lanes, acc[0]);
        _mm256_storeu_ps(lanes + 8, acc[1]);
    }
#endif
    const int64_t done = k;
    if (k < K) {
        const int64_t rest = K - k;
        load_row(x, off + k, rest, x_code, xhat + k);
        load_row(dy, off + k, rest, dy_code, dxhat + k);
        for (int64_t j = k; j < K; ++j) xhat[j] = xhat[j] * r;
        for (int64_t j = k; j < K; ++j) dw[j] = dw[j] + dxhat[j] * xhat[j];
        for (int64_t j = k; j < K; ++j) dxhat[j] = dxhat[j] * w[j];
        for (; k + LANES <= K; k += LANES)
            for (int64_t j = 0; j < LANES; ++j) lanes[j] = lanes[j] + dxhat[k + j] * xhat[k + j];
    }
    float sum = 0.0f;
    for (; k < K; ++k) sum = sum + dxhat[k] * xhat[k];
    for (int64_t j = 0; j < LANES; ++j) sum = sum + lanes[j];
    const float mean = sum / (float)K;
    k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (x_code != 2) { /* float16, which has no 16-lane store here, takes the 8-lane loop below */
        const __m512 vr = _mm512_set1_ps(r), vm = _mm512_set1_ps(mean);
        for (; k + LANES <= done; k += LANES) {
            const __m512 xh = _mm512_mul_ps(load16(x, off + k, x_code), vr);
            const __m512 dxh = _mm512_mul_ps(load16(dy, off + k, dy_code), _mm512_loadu_ps(w + k));
            const __m512 v = _mm512_mul_ps(vr, _mm512_sub_ps(dxh, _mm512_mul_ps(xh, vm)));
            if (x_code == 1) {
                store_bf16x16(v, (uint16_t*)dx + off + k);
            } else {
                _mm512_storeu_ps((float*)dx + off + k, v);
            }
        }
    }
#endif
#if defined(__AVX2__)
    {
        const __m256 vr = _mm256_set1_ps(r), vm = _mm256_set1_ps(mean);
        for (; k + 8 <= done; k += 8) {
            const __m256 xh = _mm256_mul_ps(load8(x, off + k, x_code), vr);
            const __m256 dxh = _mm256_mul_ps(load8(dy, off + k, dy_code), _mm256_loadu_ps(w + k));
            const __m256 v = _mm256_mul_ps(vr, _mm256_sub_ps(dxh, _mm256_mul_ps(xh, vm)));
            store8(round8(v, x_code), x_code, dx, off + k);
        }
    }
#endif
    const int64_t rest = K - k;
    float* t = dxhat + k;
    for (int64_t j = 0; j < rest; ++j) t[j] = r * (t[j] - xhat[k + j] * mean);
    round_row(t, rest, x_code);
    store_row(t, rest, x_code, dx, off + k);
}

/* reference.rms_norm_backward of x, dy (M, K) of dtype codes x_code / dy_code, the float32 gain w (K) and rstd (M):
 * dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) in x's dtype, with xhat = x * rstd and dxhat = dy * w, and
 * dw = sum over rows of dy * xhat (float32). Every elementwise operation is the reference's; the two sums run in
 * this kernel's order: a row's in float32 (rms_norm_backward_row), the gain gradient's in float32 over blocks of
 * DW_BLOCK rows and across blocks in float64 per thread (a long float32 sum over thousands of rows would lose more
 * than torch's blocked one; a float64 add per element and row cost twice the rest of the row), rounded once at the
 * end. */
int bitnet_rms_norm_backward(const void* dy, int64_t dy_code, const void* x, int64_t x_code, const float* w,
                             const float* rstd, int64_t M, int64_t K, void* dx, float* dw, int64_t threads) {
    enum { DW_BLOCK = 32 };
    const int64_t nt = threads > 0 ? threads : 1;
    double* partial = (double*)calloc((size_t)(nt * (K > 0 ? K : 1)), sizeof(double));
    if (partial == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads((int)nt)
    {
        float* xhat = row_buffer(K, &failed);
        float* dxhat = row_buffer(K, &failed);
        float* block = row_buffer(K, &failed);
        double* mine = partial + (int64_t)omp_get_thread_num() * K;
        int64_t rows = 0;
        if (block != NULL) memset(block, 0, (size_t)K * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (xhat == NULL || dxhat == NULL || block == NULL) continue;
            rms_norm_backward_row(dy, dy_code, x, x_code, w, rstd[m], m * K, K, dx, block, xhat, dxhat);
            if (++rows == DW_BLOCK) {
                for (int64_t k = 0; k < K; ++k) mine[k] = mine[k] + (double)block[k];
                memset(block, 0, (size_t)K * sizeof(float));
                rows = 0;
            }
        }
        if (block != NULL && rows > 0)
            for (int64_t k = 0; k < K; ++k) mine[k] = mine[k] + (double)block[k];
        free(xhat);
        free(dxhat);
        free(block);
    }
    for (int64_t k = 0; k < K; ++k) {
        double s = 0.0;
        for (int64_t t = 0; t < nt; ++t) s = s + partial[t * K + k];
        dw[k] = (float)s;
    }
    free(partial);
    return failed;
}
