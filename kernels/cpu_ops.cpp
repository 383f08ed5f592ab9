// The packed decode linear as an operator registered in C++ (torch.ops.bitnet_ao.packed_linear_cpu): the same
// computation as the Python op bitnet_ao::packed_linear takes for decode-sized CPU inputs (cpu_gemv.c's
// bitnet_packed_linear behind torch_backend.packed_linear), with no Python on the way. torch.compile's C++ wrapper
// and AOTInductor call an operator whose kernel is C++ directly; a Python kernel would take the GIL and run Python on
// every call, which costs more than the matmul of a decode step. Its fake (meta) implementation is in cpu_ops.py.
//
// The norm's one reduction, rstd, is the eager ATen expression of reference.rms_norm_rstd
// (rsqrt(mean(x.float() ** 2) + eps)), the one the Python path computes for these sizes: the same float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

extern "C" int bitnet_packed_linear(const void* x, int64_t x_in_code, const float* rstd, const float* norm_weight,
                                    int64_t x_code, int64_t norm_code, double eps, const uint8_t* packed,
                                    float w_scale, const float* bias, int64_t out_code, void* out, int64_t M,
                                    int64_t N, int64_t K, int64_t kp, int64_t bits, int64_t threads);

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

// The per-row activation eps of reference.quantize_rowwise (ACTIVATION_EPS), passed by the Python side at build time.
constexpr double kActivationEps = BITNET_AO_ACTIVATION_EPS;

at::Tensor packed_linear_cpu(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight, double norm_eps,
                             const at::Tensor& b_packed, int64_t k, int64_t bits, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
    TORCH_CHECK(x.device().is_cpu() && b_packed.device().is_cpu(), "bitnet_ao.packed_linear_cpu: CPU tensors only, got ",
                x.device(), " and ", b_packed.device());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "bitnet_ao.packed_linear_cpu: x must be (M, ", k, "), got ", x.sizes());
    TORCH_CHECK(bits == 1 || bits == 2, "bitnet_ao.packed_linear_cpu: bits must be 1 or 2, got ", bits);
    const int64_t per_byte = bits == 2 ? 4 : 8, kp = (k + per_byte - 1) / per_byte;
    TORCH_CHECK(b_packed.dim() == 2 && b_packed.size(1) == kp && b_packed.scalar_type() == at::kChar,
                "bitnet_ao.packed_linear_cpu: b_packed must be int8 (N, ", kp, ") for k=", k, ", bits=", bits, ", got ",
                b_packed.scalar_type(), " ", b_packed.sizes());
    TORCH_CHECK(scale.numel() == 1, "bitnet_ao.packed_linear_cpu: scale must hold one value, got ", scale.sizes());
    const int64_t x_code = code_of(x.scalar_type()), out_code = code_of(out_dtype);
    TORCH_CHECK(x_code >= 0 && out_code >= 0, "bitnet_ao.packed_linear_cpu: x and the output must be float32, bfloat16 "
                "or float16, got ", x.scalar_type(), " and ", out_dtype);
    // Every conversion below is skipped where the tensor already is what the C code reads: each is an operator call.
    const at::Tensor xc = x.contiguous();
    std::optional<at::Tensor> xf, rstd, gain;
    if (norm_weight.has_value()) {
        xf = xc.to(at::kFloat);
        rstd = at::rsqrt(xf->pow(2).mean(-1, /*keepdim=*/true) + norm_eps).contiguous();
        gain = norm_weight->to(at::kFloat).contiguous();
    }
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous())
                                                         : std::nullopt;
    const at::Tensor packed = b_packed.contiguous();
    const float w_scale = scale.scalar_type() == at::kFloat && scale.is_cpu() ? *scale.const_data_ptr<float>()
                                                                             : scale.item<float>();
    const int64_t m = x.size(0), n = packed.size(0);
    at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype));
    const void* x_data = xf ? xf->const_data_ptr() : xc.const_data_ptr();
    const int failed = bitnet_packed_linear(
        x_data, xf ? 0 : x_code, rstd ? rstd->data_ptr<float>() : nullptr, gain ? gain->data_ptr<float>() : nullptr,
        x_code, out_code, kActivationEps, reinterpret_cast<const uint8_t*>(packed.const_data_ptr<int8_t>()), w_scale,
        b ? b->data_ptr<float>() : nullptr, out_code, out.data_ptr(), m, n, k, kp, bits, at::get_num_threads());
    TORCH_CHECK(!failed, "bitnet_ao.packed_linear_cpu: out of memory for (", m, ", ", k, ") @ (", n, ", ", k, ").T");
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitnet_ao, m) {
    m.def(
        "packed_linear_cpu(Tensor x, Tensor? norm_weight, float norm_eps, Tensor b_packed, int k, int bits, "
        "Tensor scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitnet_ao, CPU, m) { m.impl("packed_linear_cpu", &packed_linear_cpu); }
