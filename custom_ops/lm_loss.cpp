// Fused LM-head cross-entropy: mean loss, argmax accuracy and (on request) both gradients of
// cross_entropy(hidden @ weight.T, labels, ignore_index=-100), without the [N, V] logits: for GPT-2
// those (206 MB per 1024 tokens in fp32), their log-softmax and their gradient are the largest
// tensors of a training step.
//
// The tokens go in blocks of `block_tokens` rows (the Python side picks about 128 MB of logits).
// Per block: one matmul gives its logits [block, V]; one parallel loop over its tokens sweeps each
// row through the vocabulary in chunks of `chunk_size` columns (a few KB, in L1) with an online
// log-sum-exp (running max, running sum of exp, target logit, argmax), so the row is read once, and
// then, when gradients are wanted, overwrites it with (softmax - onehot) / n_valid; two matmuls turn
// that into the block's rows of grad_hidden and its share of grad_weight. The loss is the last node
// of the graph, so d loss / d logits is known in forward up to the scalar that backward multiplies
// in: nothing is recomputed (three [N, d] x [d, V]-sized matmuls, as PyTorch's own loss does; a
// version that recomputed each vocabulary chunk's logits in backward needs four, and measured 1.09x
// the time of PyTorch's linear + cross_entropy). Few, large parallel regions on purpose: on a
// shared machine every region waits for its slowest thread (custom_ops/README.md has the numbers).
//
// The matmuls are ATen's (MKL / oneDNN, multithreaded); the row loops are vectorized by the
// compiler (simd.h).

// Per-operator headers rather than <ATen/ATen.h>: a third less compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kIgnoreIndex = -100;

GPT2IPU_SIMD_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

GPT2IPU_SIMD_CLONES float row_sum_exp(const float* x, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += gpt2ipu::exp_nonpositive(x[j] - shift);
  return sum;
}

// x[j] <- exp(x[j] - lse) * scale: the row's softmax times the token's weight in the mean.
GPT2IPU_SIMD_CLONES void row_softmax_scaled(float* x, int64_t n, float lse, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = gpt2ipu::exp_nonpositive(x[j] - lse) * scale;
}

int64_t first_index_of(const float* x, int64_t n, float value) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == value) return j;
  return 0;  // only for a NaN row
}

// Per token of a block: the online log-sum-exp state and the argmax so far.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;
  float target = 0.f;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_index = 0;

  void update(const float* x, int64_t n, int64_t lo, int64_t label) {
    const float chunk_max = row_max(x, n);
    if (chunk_max > best) {  // strict: ties keep the first index, as argmax does
      best = chunk_max;
      best_index = lo + first_index_of(x, n, chunk_max);
    }
    if (label >= lo && label < lo + n) target = x[label - lo];
    const float new_max = std::max(max, chunk_max);
    sum = sum * gpt2ipu::exp_nonpositive(max - new_max) + row_sum_exp(x, n, new_max);
    max = new_max;
  }
  float lse() const { return max + std::log(sum); }
};

int64_t count_valid_labels(const at::Tensor& labels, int64_t vocab) {
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < labels.numel(); ++i) {
    if (y[i] == kIgnoreIndex) continue;
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < vocab, "lm_loss: label ", y[i], " out of range [0, ", vocab,
                      ") (and not the ignore index -100)");
    ++n_valid;
  }
  return n_valid;
}

// out = a @ b, straight into `out` when the dtypes match, else through a temporary.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(at::mm(a, b));
  }
}

at::Tensor scalar(double value) { return at::scalar_tensor(value, at::kFloat); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_loss(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& labels_in, int64_t chunk_size,
    int64_t block_tokens, at::ScalarType compute_dtype, bool hidden_grad, bool weight_grad) {
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && labels_in.dim() == 1 &&
                  hidden_in.size(1) == weight_in.size(1) && hidden_in.size(0) == labels_in.size(0),
              "lm_loss: expected hidden [N, d], weight [V, d], labels [N]; got ", hidden_in.sizes(), ", ",
              weight_in.sizes(), ", ", labels_in.sizes());
  TORCH_CHECK(hidden_in.device().is_cpu() && weight_in.device().is_cpu() && labels_in.device().is_cpu(),
              "lm_loss: the compiled op takes CPU tensors only");
  TORCH_CHECK(compute_dtype == at::kFloat || compute_dtype == at::kBFloat16,
              "lm_loss: the compute dtype must be float32 or bfloat16");
  TORCH_CHECK(chunk_size > 0 && block_tokens > 0, "lm_loss: chunk_size and block_tokens must be positive");
  const int64_t tokens = hidden_in.size(0), vocab = weight_in.size(0), dim = hidden_in.size(1);
  const auto labels = labels_in.to(at::kLong).contiguous();
  const int64_t n_valid = count_valid_labels(labels, vocab);
  const auto hidden = hidden_in.to(compute_dtype).contiguous();
  const auto weight = weight_in.to(compute_dtype).contiguous();
  const int64_t chunk = std::min(chunk_size, std::max<int64_t>(vocab, 1));
  const int64_t block = std::min(block_tokens, std::max<int64_t>(tokens, 1));
  const float scale = n_valid ? 1.f / static_cast<float>(n_valid) : 0.f;  // d mean / d loss_i
  const int64_t* y = labels.data_ptr<int64_t>();

  auto buffer = at::empty({block * vocab}, at::kFloat);  // one block's logits, then its gradient
  at::Tensor grad_hidden, grad_weight;
  if (hidden_grad) grad_hidden = at::empty_like(hidden_in, at::MemoryFormat::Contiguous);
  if (weight_grad) grad_weight = at::zeros({vocab, dim}, at::kFloat);  // summed over blocks: fp32
  double loss_sum = 0.0;
  int64_t correct = 0;

  std::vector<float> row_loss(block);
  std::vector<uint8_t> row_correct(block);
  for (int64_t r0 = 0; r0 < tokens; r0 += block) {
    const int64_t n_rows = std::min(block, tokens - r0);
    const auto h = hidden.narrow(0, r0, n_rows);
    auto logits = buffer.narrow(0, 0, n_rows * vocab).view({n_rows, vocab});
    mm_into(logits, h, weight.t());
    float* x = logits.data_ptr<float>();
    const int64_t* yb = y + r0;
    at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* row = x + i * vocab;
        const int64_t label = yb[i];
        RowState state;
        for (int64_t lo = 0; lo < vocab; lo += chunk) state.update(row + lo, std::min(chunk, vocab - lo), lo, label);
        const float lse = state.lse();
        row_loss[i] = label == kIgnoreIndex ? 0.f : lse - state.target;
        row_correct[i] = label != kIgnoreIndex && state.best_index == label;
        if (!hidden_grad && !weight_grad) continue;
        if (label == kIgnoreIndex) {
          std::memset(row, 0, sizeof(float) * vocab);
        } else {
          row_softmax_scaled(row, vocab, lse, scale);
          row[label] -= scale;
        }
      }
    });
    for (int64_t i = 0; i < n_rows; ++i) {  // in token order, so the sum does not depend on threads
      loss_sum += row_loss[i];
      correct += row_correct[i];
    }
    if (!hidden_grad && !weight_grad) continue;
    const auto grad_logits = compute_dtype == at::kFloat ? logits : logits.to(compute_dtype);
    if (hidden_grad) mm_into(grad_hidden.narrow(0, r0, n_rows), grad_logits, weight);
    if (weight_grad) {
      if (compute_dtype == at::kFloat) {
        grad_weight.addmm_(grad_logits.t(), h);
      } else {
        grad_weight.add_(at::mm(grad_logits.t(), h));
      }
    }
  }
  if (weight_grad) grad_weight = grad_weight.to(weight_in.scalar_type());
  if (!hidden_grad) grad_hidden = at::empty({0}, hidden_in.options());
  if (!weight_grad) grad_weight = at::empty({0}, weight_in.options());
  // 0 / 0 = NaN when every label is ignored, as F.cross_entropy gives; the gradients are then 0.
  const double denominator = static_cast<double>(n_valid);
  return {scalar(loss_sum / denominator), scalar(correct / denominator), grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2ipu, m) {
  m.def(
      "lm_loss(Tensor hidden, Tensor weight, Tensor labels, int chunk_size, int block_tokens, "
      "ScalarType compute_dtype, bool hidden_grad, bool weight_grad) "
      "-> (Tensor loss, Tensor accuracy, Tensor grad_hidden, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(gpt2ipu, CPU, m) { m.impl("lm_loss", &lm_loss); }
