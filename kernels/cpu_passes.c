/* The elementwise passes of a BitNet linear on CPU, reading each input row once from memory where inductor's code
 * reads the whole tensor two or three times: the per-row int8 quantization of an activation (also through the fused
 * RMSNorm), both quantizations of the output gradient, the scaled epilogue of an int8 matmul, and the weight's
 * ternary values. Each is the function of the same name in bitnet_ao.kernels.reference, float operation for float
 * operation (cpu_rows.h), so the results are torch's bit for bit; the one reduction whose order matters, the
 * RMSNorm's rstd, comes from torch. Rows are split over `threads` OpenMP threads. Every function returns nonzero
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

/* reference.quantize_rowwise of x (M, K) of dtype code x_code; with rstd and gain, of the RMSNorm of x first
 * (reference.rms_norm_quantize_rowwise: x * rstd[m] * gain[k] rounded to x's dtype, then to norm_code's). */
int bitnet_quantize_rows(const void* x, int64_t x_code, const float* rstd, const float* gain, int64_t norm_code,
                         int64_t M, int64_t K, double eps, int8_t* q, float* scale, int64_t threads) {
    const float eps_f = (float)eps;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = row_buffer(K, &failed);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (y == NULL) continue;
            load_row(x, m * K, K, x_code, y);
            if (rstd != NULL) {
                const float r = rstd[m];
                for (int64_t k = 0; k < K; ++k) y[k] = y[k] * r * gain[k];
                round_row(y, K, x_code);
                round_row(y, K, norm_code);
            }
            scale[m] = quantize_row(y, K, eps_f, q + m * K);
        }
        free(y);
    }
    return failed;
}

/* reference.quantize_grad_output of g (M, N): the per-row quantization (g_q, s_g) and the per-column one of
 * g * row_scale[:, None] (g_qc, s_gc). Each thread keeps the column maxima of its rows (a max is exact in any
 * order), then every row is read a second time for the per-column values. */
int bitnet_quantize_grad_output(const void* g, int64_t g_code, const float* row_scale, int64_t M, int64_t N,
                                double eps, int8_t* g_q, float* s_g, int8_t* g_qc, float* s_gc, int64_t threads) {
    const float eps_f = (float)eps;
    const int64_t nt = threads > 0 ? threads : 1;
    uint32_t* col_max = (uint32_t*)calloc((size_t)(nt * (N > 0 ? N : 1)), sizeof(uint32_t));
    if (col_max == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads((int)nt)
    {
        float* y = row_buffer(N, &failed);
        uint32_t* mine = col_max + (int64_t)omp_get_thread_num() * N;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (y == NULL) continue;
            load_row(g, m * N, N, g_code, y);
            s_g[m] = quantize_row(y, N, eps_f, g_q + m * N);
            const float r = row_scale[m];
            for (int64_t n = 0; n < N; ++n) {
                const float v = y[n] * r;
                uint32_t u;
                memcpy(&u, &v, 4);
                u &= 0x7fffffffu;
                mine[n] = u > mine[n] ? u : mine[n];
            }
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            uint32_t u = 0;
            for (int64_t t = 0; t < nt; ++t) u = col_max[t * N + n] > u ? col_max[t * N + n] : u;
            float a;
            memcpy(&a, &u, 4);
            s_gc[n] = (a < eps_f ? eps_f : a) / 127.0f;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (y == NULL) continue;
            load_row(g, m * N, N, g_code, y);
            const float r = row_scale[m];
            int8_t* row = g_qc + m * N;
            quantize_span(y, r, s_gc, 0.0f, N, -128.0f, 127.0f, row);
        }
        free(y);
    }
    free(col_max);
    return failed;
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
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = row_buffer(N, &failed);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (y == NULL) continue;
            if (acc_float) {
                memcpy(y, (const float*)acc + m * N, (size_t)N * sizeof(float));
            } else {
                const int32_t* a = (const int32_t*)acc + m * N;
                for (int64_t n = 0; n < N; ++n) y[n] = (float)a[n];
            }
            if (row_scale != NULL) {
                const float r = row_scale[m];
                for (int64_t n = 0; n < N; ++n) y[n] = y[n] * r;
            }
            if (col_scale != NULL)
                for (int64_t n = 0; n < N; ++n) y[n] = y[n] * col_scale[n];
            if (scale != NULL) {
                const float s = scale[0];
                for (int64_t n = 0; n < N; ++n) y[n] = y[n] * s;
            }
            round_row(y, N, out_code);
            if (b != NULL) {
                for (int64_t n = 0; n < N; ++n) y[n] = y[n] + b[n];
                round_row(y, N, out_code);
            }
            store_row(y, N, out_code, out, m * N);
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
    enum { TILE = 64 };
    const float s = scale < (float)eps ? (float)eps : scale;
    int failed = 0;
#pragma omp parallel num_threads((int)threads)
    {
        float* y = (float*)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
        int8_t* block = (int8_t*)malloc((size_t)TILE * (size_t)(K > 0 ? K : 1));
        if (y == NULL || block == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += TILE) {
            if (y == NULL || block == NULL) continue;
            const int64_t rows = n0 + TILE < N ? TILE : N - n0;
            for (int64_t i = 0; i < rows; ++i) {
                load_row(w, (n0 + i) * K, K, w_code, y);
                int8_t* out = transpose ? block + i * K : q + (n0 + i) * K;
                quantize_span(y, 1.0f, NULL, s, K, -1.0f, 1.0f, out);
            }
            if (transpose) /* the block's rows are columns n0 .. n0 + rows of the (K, N) output */
                for (int64_t k = 0; k < K; ++k)
                    for (int64_t i = 0; i < rows; ++i) q[k * N + n0 + i] = block[i * K + k];
        }
        free(y);
        free(block);
    }
    return failed;
}
