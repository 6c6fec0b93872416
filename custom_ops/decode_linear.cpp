// y = x W^T + b for the few rows of x that decoding feeds (one per sequence of the batch): the
// matrix-vector products of decoding, in the weights' own [out, in] layout, one op per weight
// format (fp32; bf16; int8 with one fp32 scale per output row). The loops are matvec.h's, split
// over ATen's threads by output rows. decode_step.cpp runs the same loops for a whole decode
// step in one call, which `gpt2ipu generate` uses where it can; these ops serve every other
// call of at most 16 rows (a short prompt, a step the fused op does not take).
//
// int8: x is quantized to int8 per block of 64 (matvec.h), so y is the exact integer sum of the
// quantized values times the two scales: what llama.cpp's q8_0 x q8_0 product computes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "matvec.h"

namespace {

using gpt2ipu::matvec::PreparedX;

constexpr int64_t kMaxRows = 16;  // more rows than this is a matrix product: F.linear's job

void check_shapes(const char* op, const at::Tensor& x, const at::Tensor& weight, at::ScalarType weight_type) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == weight_type, op, ": float32 only for x ",
              "(weight ", weight_type, "), got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              op, ": need x [rows, in] and weight [out, in], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) <= kMaxRows, op, ": at most ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous [out, in]");
}

// y = x W^T (times the row scales for int8), split over ATen's threads by output rows.
template <typename W>
at::Tensor run_rows(const at::Tensor& x, const W* weight, int64_t out, const float* row_scale) {
  const int64_t rows = x.size(0), in = x.size(1);
  const auto xc = x.contiguous();
  auto y = at::empty({rows, out}, x.options());
  std::vector<PreparedX> prepared(rows);
  for (int64_t m = 0; m < rows; ++m)
    prepared[m].prepare(xc.data_ptr<float>() + m * in, in, gpt2ipu::matvec::format_of<W>());
  float* yp = y.data_ptr<float>();
  // At least ~64 KB of weights per task, so small matrices do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, in * int64_t(sizeof(W))));
  // Every x row meets a block of weight rows while the block is in L1/L2 (about 32 KB), so the
  // weights come from memory once whatever the number of x rows.
  const int64_t block = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, in * int64_t(sizeof(W))));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += block) {
      const int64_t last = std::min(end, first + block);
      for (int64_t m = 0; m < rows; ++m) {
        gpt2ipu::matvec::dot_rows(weight, prepared[m], yp + m * out, 1, first, last);
        if (row_scale != nullptr)
          for (int64_t r = first; r < last; ++r) yp[m * out + r] *= row_scale[r];
      }
    }
  });
  return y;
}

void add_bias(const char* op, at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == y.size(1), op, ": bias must be [out]");
    y.add_(bias->to(at::kFloat));
  }
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear", x, weight, at::kFloat);
  auto y = run_rows(x, weight.data_ptr<float>(), weight.size(0), nullptr);
  add_bias("decode_linear", y, bias);
  return y;
}

at::Tensor decode_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear_bf16", x, weight, at::kBFloat16);
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto y = run_rows(x, wp, weight.size(0), nullptr);
  add_bias("decode_linear_bf16", y, bias);
  return y;
}

// weight int8 [out, in] and scale float32 [out]: y = (q8(x) W^T) * scale + b.
at::Tensor decode_linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear_int8", x, weight, at::kChar);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == weight.size(0) &&
                  scale.is_contiguous(),
              "decode_linear_int8: scale must be contiguous float32 [out], got ", scale.scalar_type(), " ",
              scale.sizes());
  auto y = run_rows(x, weight.data_ptr<int8_t>(), weight.size(0), scale.data_ptr<float>());
  add_bias("decode_linear_int8", y, bias);
  return y;
}

std::string decode_kernels() { return gpt2ipu::matvec::kernels_report(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2ipu, m) {
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_linear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("decode_kernels() -> str", &decode_kernels);
}

TORCH_LIBRARY_IMPL(gpt2ipu, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("decode_linear_bf16", &decode_linear_bf16);
  m.impl("decode_linear_int8", &decode_linear_int8);
}
