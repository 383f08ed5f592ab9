// The CPU kernels registered in C++ for decoding: the kernel of the op bitnet_ao::packed_linear for CPU tensors
// (its schema, fake and other devices' kernels are Python's: kernels/ops.py), and one query's attention over a KV
// cache (torch.ops.bitnet_ao.decode_attention, defined here).
//
// torch.compile's C++ wrapper and AOTInductor call an operator through the dispatcher; a kernel in Python would take
// the GIL and run Python on every call, which costs more than the matmul of a decode step. With this library loaded a
// packed linear on CPU runs with no Python on the way for decode-sized inputs: the one C call of cpu_gemv.c
// (bitnet_packed_linear), exactly where the Python implementation takes the same call
// (torch_backend.decode_linear_applies, whose limits arrive here as build-time defines). Larger inputs (prefill)
// compose the ops bitnet_ao::quantize_rowwise / rms_norm_quantize_rowwise and scaled_int8_mm_packed through the
// dispatcher, as the Python implementation does: a GEMM of milliseconds, for which their Python costs nothing.
// Fake (meta) implementations are Python's (ops.py, cpu_ops.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

extern "C" int bitnet_packed_linear(const void* x, int64_t x_code, const float* norm_weight, double norm_eps,
                                    int64_t norm_code, double eps, const uint8_t* packed, float w_scale,
                                    const float* bias, int64_t out_code, void* out, int64_t M, int64_t N, int64_t K,
                                    int64_t kp, int64_t bits, int64_t threads);

namespace {

// The dtype codes of cpu_rows.h; -1 for a dtype without one.
int64_t code_of(at::ScalarType t) {
    switch (t) {
        case at::kFloat:
            return 0;
        case at::kBFloat16:
            return 1;
        case at::kHalf:
            return 2;
        default:
            return -1;
    }
}

// Constants of the Python side, passed at build time (cpu_ops.py): the per-row activation eps of
// reference.quantize_rowwise (ACTIVATION_EPS), and the inputs that take the one C call (torch_backend.
// decode_linear_applies): at most cpu_gemv.MAX_M rows, 0 < k <= cpu_gemv.MAX_K.
constexpr double kActivationEps = BITNET_AO_ACTIVATION_EPS;
constexpr int64_t kDecodeMaxM = BITNET_AO_DECODE_MAX_M, kDecodeMaxK = BITNET_AO_DECODE_MAX_K;

bool one_call_applies(const at::Tensor& x, int64_t k, at::ScalarType out_dtype) {
    return x.size(0) > 0 && x.size(0) <= kDecodeMaxM && k > 0 && k <= kDecodeMaxK && code_of(x.scalar_type()) >= 0 &&
           code_of(out_dtype) >= 0;
}

// The op `name` (an op of ops.py) called through the dispatcher on `stack`; its outputs.
std::vector<c10::IValue> call_op(const char* name, std::vector<c10::IValue> stack) {
    c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(&stack);
    return stack;
}

// The packed linear of ops._packed_linear composed of ops: (RMSNorm +) per-row quantization, the packed matmul.
at::Tensor composed_packed_linear(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight, double norm_eps,
                                  const at::Tensor& b_packed, int64_t k, int64_t bits, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
    const std::vector<c10::IValue> quantized =
        norm_weight.has_value()
            ? call_op("bitnet_ao::rms_norm_quantize_rowwise", {x, *norm_weight, norm_eps, out_dtype, kActivationEps})
            : call_op("bitnet_ao::quantize_rowwise", {x, kActivationEps});
    return call_op("bitnet_ao::scaled_int8_mm_packed", {quantized[0], b_packed, k, true, quantized[1], c10::IValue(),
                                                       scale, bias, out_dtype, bits})[0]
        .toTensor();
}

at::Tensor packed_linear(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight, double norm_eps,
                         const at::Tensor& b_packed, int64_t k, int64_t bits, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "bitnet_ao.packed_linear: x must be (M, ", k, "), got ", x.sizes());
    TORCH_CHECK(bits == 1 || bits == 2, "bitnet_ao.packed_linear: bits must be 1 or 2, got ", bits);
    const int64_t per_byte = bits == 2 ? 4 : 8, kp = (k + per_byte - 1) / per_byte;
    TORCH_CHECK(b_packed.dim() == 2 && b_packed.size(1) == kp && b_packed.scalar_type() == at::kChar,
                "bitnet_ao.packed_linear: b_packed must be int8 (N, ", kp, ") for k=", k, ", bits=", bits, ", got ",
                b_packed.scalar_type(), " ", b_packed.sizes());
    TORCH_CHECK(scale.numel() == 1, "bitnet_ao.packed_linear: scale must hold one value, got ", scale.sizes());
    TORCH_CHECK(!norm_weight.has_value() || (norm_weight->dim() == 1 && norm_weight->size(0) == k &&
                                             at::isFloatingType(norm_weight->scalar_type())),
                "bitnet_ao.packed_linear: the norm weight must be 1-D with one float per column of x (", k,
                "), got ", norm_weight.has_value() ? norm_weight->sizes() : at::IntArrayRef{});
    if (!one_call_applies(x, k, out_dtype))
        return composed_packed_linear(x, norm_weight, norm_eps, b_packed, k, bits, scale, bias, out_dtype);
    const int64_t x_code = code_of(x.scalar_type()), out_code = code_of(out_dtype);
    // Every conversion below is skipped where the tensor already is what the C code reads: each is an operator call.
    const at::Tensor xc = x.contiguous();
    const std::optional<at::Tensor> gain =
        norm_weight.has_value() ? std::optional<at::Tensor>(norm_weight->to(at::kFloat).contiguous()) : std::nullopt;
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous())
                                                         : std::nullopt;
    const at::Tensor packed = b_packed.contiguous();
    const float w_scale = scale.scalar_type() == at::kFloat && scale.is_cpu() ? *scale.const_data_ptr<float>()
                                                                             : scale.item<float>();
    const int64_t m = x.size(0), n = packed.size(0);
    at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype));
    const int failed = bitnet_packed_linear(
        xc.const_data_ptr(), x_code, gain ? gain->data_ptr<float>() : nullptr, norm_eps, out_code, kActivationEps,
        reinterpret_cast<const uint8_t*>(packed.const_data_ptr<int8_t>()), w_scale, b ? b->data_ptr<float>() : nullptr,
        out_code, out.data_ptr(), m, n, k, kp, bits, at::get_num_threads());
    TORCH_CHECK(!failed, "bitnet_ao.packed_linear: out of memory for (", m, ", ", k, ") @ (", n, ", ", k, ").T");
    return out;
}

// The lanes of a dot product: element d goes to lane d % kLanes, the lanes add up in order at the end (the order the
// compiler's vector code keeps: it may not reassociate float sums).
constexpr int64_t kLanes = 16;

// softmax(q k^T * scale) v for one query per (batch, head) against every key given: q (B, H, 1, D), keys and values
// (B, H, L, D) with each row of D contiguous (a cache's buffers or views of them). Every sum runs in float32 in a
// fixed order (a dot product over kLanes lanes, the softmax's and the weighted sum of values over keys in index
// order), then the output rounds once to q's dtype: one definition that eager code and compiled graphs, which both
// call this operator, share bit for bit. Against torch's flash-attention kernel, which spends tens of microseconds
// setting up blocks for a single query, it is a loop over the keys.
template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale,
                             at::Tensor& out) {
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), L = keys.size(2);
    const T* qp = q.const_data_ptr<T>();
    const T* kp = keys.const_data_ptr<T>();
    const T* vp = values.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    const float s = static_cast<float>(scale);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf(D), acc(D), p(L);
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const T* qr = qp + b * q.stride(0) + h * q.stride(1);
            for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qr[d]);
            float top = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < L; ++j) {
                const T* kr = kp + b * keys.stride(0) + h * keys.stride(1) + j * keys.stride(2);
                float lanes[kLanes] = {};
                int64_t d = 0;
                for (; d + kLanes <= D; d += kLanes)
                    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += qf[d + l] * static_cast<float>(kr[d + l]);
                float dot = 0.0f;
                for (; d < D; ++d) dot += qf[d] * static_cast<float>(kr[d]);
                for (int64_t l = 0; l < kLanes; ++l) dot += lanes[l];
                p[j] = dot * s;
                top = std::max(top, p[j]);
            }
            float total = 0.0f;
            for (int64_t j = 0; j < L; ++j) {
                p[j] = std::exp(p[j] - top);
                total += p[j];
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < L; ++j) {
                const T* vr = vp + b * values.stride(0) + h * values.stride(1) + j * values.stride(2);
                for (int64_t d = 0; d < D; ++d) acc[d] += p[j] * static_cast<float>(vr[d]);
            }
            T* orow = op + (b * H + h) * D;
            for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] / total);
        }
    });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && keys.dim() == 4 && values.sizes() == keys.sizes() &&
                    keys.size(0) == q.size(0) && keys.size(1) == q.size(1) && keys.size(3) == q.size(3),
                "bitnet_ao.decode_attention: q (B, H, 1, D) and keys / values (B, H, L, D) expected, got ", q.sizes(),
                ", ", keys.sizes(), ", ", values.sizes());
    TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(),
                "bitnet_ao.decode_attention: q, keys and values must share a dtype, got ", q.scalar_type(), ", ",
                keys.scalar_type(), ", ", values.scalar_type());
    TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
                "bitnet_ao.decode_attention: each row of D must be contiguous");
    at::Tensor out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
        decode_attention_kernel<scalar_t>(q, keys, values, scale, out);
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitnet_ao, m) {
    m.def("decode_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitnet_ao, CPU, m) {
    m.impl("packed_linear", &packed_linear);
    m.impl("decode_attention", &decode_attention);
}
