// One decode step of GPT-2 in one call: the new token of each sequence in, its next-token logits
// out, with the key/value cache updated in place. `gpt2ipu generate` runs every step after the
// prompt through it on CPU (gpt2ipu/generate/decode.py: FusedDecoder).
//
// Why by hand: a step reads every weight once, and with 1-byte weights GPT-2 small's whole
// matrix traffic takes about 3 ms; the same step through PyTorch's modules is some 200 operator
// calls, each waking the worker threads, which added 3-5 ms per token (measured:
// docs/measurements.md). Here one OpenMP region runs the whole step: each matrix's rows are
// split over the threads (matvec.h's loops), and a barrier (about a microsecond) separates the
// stages that need all of the previous one. Small vector work (LayerNorm, quantizing x) is
// repeated by every thread into its own buffer rather than shared, which saves a barrier.
//
// The math is GPT-2's, as gpt2ipu/model/gpt.py computes it in eval mode:
//   x = wte[id] + wpe[pos]
//   per layer: h = ln_1(x); q, k, v = h W_qkv^T + b; append k, v to the cache;
//              a = softmax(q k^T / sqrt(D), keys allowed by the mask) v per head;
//              x += a W_proj^T + b; h = ln_2(x); x += gelu_tanh(h W_fc^T + b) W_mproj^T + b
//   logits = ln_f(x) W_head^T
// Weights fp32, bf16, or int8 with per-row scales (then each matrix's input is rounded to int8
// per block of 64: matvec.h); everything else fp32, the cache too.
//
// Arguments (all contiguous, CPU):
//   ids [B] int64, positions [B] int64 (the position embedding row of each new token)
//   key_mask [B, length + 1] bool or None: which cached positions (and the new one) each row may
//     attend to; None: all of them
//   keys, values: per layer [B, H, capacity, D] fp32 with capacity > length; the new key and
//     value are written at index `length`
//   params: the weights in this order, with `scale` [out] after a matrix only for int8:
//     wte (scale), wpe, ln_f.weight, ln_f.bias, lm_head (scale),
//     then per layer: ln_1.weight, ln_1.bias, c_attn (scale), c_attn.bias, attn.c_proj (scale),
//     attn.c_proj.bias, ln_2.weight, ln_2.bias, c_fc (scale), c_fc.bias, mlp.c_proj (scale),
//     mlp.c_proj.bias
// Returns logits [B, V] fp32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/util/Optional.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstdint>
#include <vector>

#include "matvec.h"
#include "simd.h"

namespace {

using gpt2ipu::matvec::Format;
using gpt2ipu::matvec::PreparedX;

constexpr int64_t kMaxRows = 16;

// A weight matrix [out, in] in one of the three formats, and its per-row scale for int8.
struct Matrix {
  const void* data = nullptr;
  const float* scale = nullptr;
  int64_t out = 0, in = 0;
};

struct Layer {
  const float *ln1_w, *ln1_b, *qkv_b, *proj_b, *ln2_w, *ln2_b, *fc_b, *mproj_b;
  Matrix qkv, proj, fc, mproj;
};

struct Model {
  Format format = Format::kFp32;
  Matrix wte, head;
  const float *wpe = nullptr, *lnf_w = nullptr, *lnf_b = nullptr;
  std::vector<Layer> layers;
  int64_t C = 0, V = 0, H = 0;
};

at::ScalarType dtype_of(Format format) {
  return format == Format::kFp32 ? at::kFloat : format == Format::kBf16 ? at::kBFloat16 : at::kChar;
}

// Reads `params` in the documented order, checking each tensor's dtype and shape.
class ParamReader {
 public:
  ParamReader(at::TensorList params, Format format) : params_(params), format_(format) {}

  const float* vector(int64_t size, const char* what) {
    const at::Tensor& t = next(what);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == size && t.is_contiguous(), "decode_step: ", what,
                " must be a contiguous float32 tensor of ", size, " values, got ", t.scalar_type(), " ", t.sizes());
    return t.data_ptr<float>();
  }

  Matrix matrix(int64_t out, int64_t in, const char* what) {
    const at::Tensor& t = next(what);
    TORCH_CHECK(t.scalar_type() == dtype_of(format_) && t.dim() == 2 && t.is_contiguous() &&
                    (out < 0 || t.size(0) == out) && t.size(1) == in,
                "decode_step: ", what, " must be a contiguous ", dtype_of(format_), " [", out, ", ", in, "] matrix, got ",
                t.scalar_type(), " ", t.sizes());
    Matrix m{t.data_ptr(), nullptr, t.size(0), in};
    if (format_ == Format::kInt8) m.scale = vector(m.out, what);
    return m;
  }

  void done() const {
    TORCH_CHECK(index_ == static_cast<int64_t>(params_.size()), "decode_step: ", params_.size(),
                " parameter tensors given, ", index_, " expected");
  }

 private:
  const at::Tensor& next(const char* what) {
    TORCH_CHECK(index_ < static_cast<int64_t>(params_.size()), "decode_step: parameter list ends before ", what);
    return params_[index_++];
  }
  at::TensorList params_;
  Format format_;
  int64_t index_ = 0;
};

Model read_model(at::TensorList params, int64_t n_layer, int64_t n_head) {
  TORCH_CHECK(!params.empty(), "decode_step: no parameters");
  Model model;
  const auto type = params[0].scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kChar,
              "decode_step: weights must be float32, bfloat16 or int8, got ", type);
  model.format = type == at::kFloat ? Format::kFp32 : type == at::kBFloat16 ? Format::kBf16 : Format::kInt8;
  TORCH_CHECK(params[0].dim() == 2, "decode_step: wte must be [vocab, n_embd]");
  const int64_t C = params[0].size(1);
  TORCH_CHECK(n_head > 0 && C % n_head == 0, "decode_step: n_embd ", C, " is not a multiple of n_head ", n_head);
  model.C = C;
  model.H = n_head;
  ParamReader read(params, model.format);
  model.wte = read.matrix(-1, C, "wte");
  model.V = model.wte.out;
  const at::Tensor& wpe = params[model.format == Format::kInt8 ? 2 : 1];
  model.wpe = read.vector(wpe.numel(), "wpe");
  TORCH_CHECK(wpe.dim() == 2 && wpe.size(1) == C, "decode_step: wpe must be [n_positions, n_embd]");
  model.lnf_w = read.vector(C, "ln_f.weight");
  model.lnf_b = read.vector(C, "ln_f.bias");
  model.head = read.matrix(-1, C, "lm_head");
  for (int64_t l = 0; l < n_layer; ++l) {
    Layer layer{};
    layer.ln1_w = read.vector(C, "ln_1.weight");
    layer.ln1_b = read.vector(C, "ln_1.bias");
    layer.qkv = read.matrix(3 * C, C, "attn.c_attn");
    layer.qkv_b = read.vector(3 * C, "attn.c_attn.bias");
    layer.proj = read.matrix(C, C, "attn.c_proj");
    layer.proj_b = read.vector(C, "attn.c_proj.bias");
    layer.ln2_w = read.vector(C, "ln_2.weight");
    layer.ln2_b = read.vector(C, "ln_2.bias");
    layer.fc = read.matrix(-1, C, "mlp.c_fc");
    layer.fc_b = read.vector(layer.fc.out, "mlp.c_fc.bias");
    layer.mproj = read.matrix(C, layer.fc.out, "mlp.c_proj");
    layer.mproj_b = read.vector(C, "mlp.c_proj.bias");
    model.layers.push_back(layer);
  }
  read.done();
  return model;
}

// This thread's share [begin, end) of n items split evenly over `threads`.
inline std::pair<int64_t, int64_t> share(int64_t n, int thread, int threads) {
  return {n * thread / threads, n * (thread + 1) / threads};
}

GPT2IPU_SIMD_CLONES void layer_norm(const float* x, const float* gamma, const float* beta, float eps, int64_t n, float* out) {
  float mean = 0.f;
#pragma omp simd reduction(+ : mean)
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  float var = 0.f;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
}

// GELU with the tanh approximation (Hugging Face's "gelu_new"), tanh from an exp of a
// non-positive argument so the loop vectorizes: tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|).
GPT2IPU_SIMD_CLONES void gelu_tanh(float* v, int64_t n) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i];
    const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
    const float e = gpt2ipu::exp_nonpositive(-2.f * std::fabs(u));
    const float t = (1.f - e) / (1.f + e);
    v[i] = 0.5f * x * (1.f + (u < 0.f ? -t : t));
  }
}

// y[b, r] (+)= (W[r] . x_b) * scale[r] + bias[r] for every row b, then GELU if asked. The rows go
// in chunks of about 32 KB of weights. Each thread first takes the chunks of its own contiguous
// share, in order (one sequential stream, which the prefetcher follows), then helps with what
// is left of the others' shares: `next` counts the chunks taken from each share.
template <typename W>
void matvec(const Matrix& m, const std::vector<PreparedX>& xs, const float* bias, float* y, bool accumulate,
            bool gelu, std::atomic<int64_t>* next, int thread, int threads, std::vector<float>& scratch) {
  const int64_t rows = std::max<int64_t>(16, (32 * 1024) / (m.in * static_cast<int64_t>(sizeof(W))));
  const int64_t chunks = (m.out + rows - 1) / rows;
  scratch.resize(rows);
  for (int k = 0; k < threads; ++k) {
    const int owner = (thread + k) % threads;
    const auto [first, last] = share(chunks, owner, threads);
    for (int64_t c = first + next[owner].fetch_add(1, std::memory_order_relaxed); c < last;
         c = first + next[owner].fetch_add(1, std::memory_order_relaxed)) {
      const int64_t begin = c * rows, end = std::min(m.out, begin + rows);
      for (size_t b = 0; b < xs.size(); ++b) {
        gpt2ipu::matvec::dot_rows(static_cast<const W*>(m.data) + begin * m.in, xs[b], scratch.data(), 1, 0,
                                  end - begin);
        float* yb = y + b * m.out + begin;
        for (int64_t r = 0; r < end - begin; ++r) {
          float v = scratch[r];
          if (m.scale != nullptr) v *= m.scale[begin + r];
          if (bias != nullptr) v += bias[begin + r];
          yb[r] = accumulate ? yb[r] + v : v;
        }
        if (gelu) gelu_tanh(yb, end - begin);
      }
    }
  }
}

// Attention of row b, head h over positions 0 .. length (the new one included).
GPT2IPU_SIMD_CLONES void attend(const float* q, const float* keys, const float* values, const bool* allowed, int64_t length, int64_t D,
            float* scores, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float top = -INFINITY;
  for (int64_t t = 0; t <= length; ++t) {
    if (allowed != nullptr && t < length && !allowed[t]) {  // the new position always sees itself
      scores[t] = -INFINITY;
      continue;
    }
    const float* k = keys + t * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
    scores[t] = s * scale;
    top = std::max(top, scores[t]);
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t <= length; ++t) {
    scores[t] = scores[t] == -INFINITY ? 0.f : gpt2ipu::exp_nonpositive(scores[t] - top);
    total += scores[t];
  }
  std::fill(out, out + D, 0.f);
  for (int64_t t = 0; t <= length; ++t) {
    const float p = scores[t] / total;
    if (p == 0.f) continue;
    const float* v = values + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
}

struct Step {
  const Model& model;
  const int64_t* ids;
  const int64_t* positions;
  const bool* key_mask;  // [B, length + 1] or null
  std::vector<float*> keys, values;
  int64_t B, length, capacity;
  float eps;
  // shared buffers
  std::vector<float> x, qkv, att, hidden;
  float* logits;
  std::unique_ptr<std::atomic<int64_t>[]> chunk_counters;  // per matrix product, per thread's share

  template <typename W>
  void run(int thread, int threads) {
    const int64_t C = model.C, H = model.H, D = C / H;
    std::vector<PreparedX> xs(B);  // this thread's prepared matrix inputs
    std::vector<float> normed(C), scores(length + 1), scratch;
    const Format format = model.format;
    auto prepare_from = [&](const float* rows, int64_t n) {
      for (int64_t b = 0; b < B; ++b) xs[b].prepare(rows + b * n, n, format);
    };
    auto prepare_normed = [&](const float* gamma, const float* beta) {
      for (int64_t b = 0; b < B; ++b) {
        layer_norm(x.data() + b * C, gamma, beta, eps, C, normed.data());
        xs[b].prepare(normed.data(), C, format);
      }
    };

    {  // x = wte[id] + wpe[pos], columns split over the threads
      const auto [c0, c1] = share(C, thread, threads);
      for (int64_t b = 0; b < B; ++b) {
        const float* pos = model.wpe + positions[b] * C;
        float* xb = x.data() + b * C;
        const int64_t row = ids[b] * C;
        for (int64_t c = c0; c < c1; ++c) {
          float e;
          if (format == Format::kFp32) {
            e = static_cast<const float*>(model.wte.data)[row + c];
          } else if (format == Format::kBf16) {
            e = gpt2ipu::matvec::bf16_to_float(static_cast<const uint16_t*>(model.wte.data)[row + c]);
          } else {
            e = static_cast<float>(static_cast<const int8_t*>(model.wte.data)[row + c]) * model.wte.scale[ids[b]];
          }
          xb[c] = e + pos[c];
        }
      }
    }
#pragma omp barrier
    for (size_t l = 0; l < model.layers.size(); ++l) {
      const Layer& layer = model.layers[l];
      std::atomic<int64_t>* next = chunk_counters.get() + 4 * l * threads;
      prepare_normed(layer.ln1_w, layer.ln1_b);
      matvec<W>(layer.qkv, xs, layer.qkv_b, qkv.data(), false, false, next, thread, threads, scratch);
#pragma omp barrier
      {  // heads of every row split over the threads; each writes its own cache slice
        const auto [p0, p1] = share(B * H, thread, threads);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / H, h = p % H;
          const float* row = qkv.data() + b * 3 * C;
          const int64_t slot = (b * H + h) * capacity * D;
          float* k = keys[l] + slot;
          float* v = values[l] + slot;
          std::copy(row + C + h * D, row + C + (h + 1) * D, k + length * D);
          std::copy(row + 2 * C + h * D, row + 2 * C + (h + 1) * D, v + length * D);
          attend(row + h * D, k, v, key_mask == nullptr ? nullptr : key_mask + b * (length + 1), length, D,
                 scores.data(), att.data() + b * C + h * D);
        }
      }
#pragma omp barrier
      prepare_from(att.data(), C);
      matvec<W>(layer.proj, xs, layer.proj_b, x.data(), true, false, next + threads, thread, threads, scratch);
#pragma omp barrier
      prepare_normed(layer.ln2_w, layer.ln2_b);
      matvec<W>(layer.fc, xs, layer.fc_b, hidden.data(), false, true, next + 2 * threads, thread, threads,
                scratch);
#pragma omp barrier
      prepare_from(hidden.data(), layer.fc.out);
      matvec<W>(layer.mproj, xs, layer.mproj_b, x.data(), true, false, next + 3 * threads, thread, threads,
                scratch);
#pragma omp barrier
    }
    prepare_normed(model.lnf_w, model.lnf_b);
    matvec<W>(model.head, xs, nullptr, logits, false, false, chunk_counters.get() + 4 * model.layers.size() * threads, thread,
              threads, scratch);
  }
};

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const c10::optional<at::Tensor>& key_mask,
                       at::TensorList keys, at::TensorList values, int64_t length, at::TensorList params,
                       int64_t n_head, double eps) {
  const int64_t n_layer = static_cast<int64_t>(keys.size());
  const Model model = read_model(params, n_layer, n_head);
  const int64_t B = ids.numel(), C = model.C, D = C / model.H;
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "decode_step: 1 to ", kMaxRows, " sequences, got ", B);
  TORCH_CHECK(ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && positions.numel() == B &&
                  ids.is_contiguous() && positions.is_contiguous(),
              "decode_step: ids and positions must be contiguous int64 [B]");
  TORCH_CHECK(values.size() == keys.size(), "decode_step: as many value tensors as key tensors");
  const int64_t n_positions = model.V > 0 ? params[model.format == Format::kInt8 ? 2 : 1].size(0) : 0;
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < model.V, "decode_step: token id ", id[b], " outside the vocabulary");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < n_positions, "decode_step: position ", pos[b], " outside the model's ",
                n_positions);
  }
  int64_t capacity = -1;
  Step step{model, id, pos, nullptr, {}, {}, B, length, 0, static_cast<float>(eps), {}, {}, {}, {}, nullptr, nullptr};
  for (int64_t l = 0; l < n_layer; ++l) {
    for (const at::Tensor* t : {&keys[l], &values[l]}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous() && t->size(0) == B &&
                      t->size(1) == model.H && t->size(3) == D && t->size(2) > length,
                  "decode_step: layer ", l, "'s cache must be contiguous float32 [", B, ", ", model.H,
                  ", capacity > ", length, ", ", D, "], got ", t->sizes());
      TORCH_CHECK(capacity < 0 || t->size(2) == capacity, "decode_step: every cache tensor needs the same capacity");
      capacity = t->size(2);
    }
    step.keys.push_back(keys[l].data_ptr<float>());
    step.values.push_back(values[l].data_ptr<float>());
  }
  step.capacity = capacity;
  at::Tensor mask;
  if (key_mask.has_value() && key_mask->defined()) {
    mask = key_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == length + 1,
                "decode_step: key_mask must be bool [", B, ", ", length + 1, "]");
    step.key_mask = mask.data_ptr<bool>();
  }
  int64_t hidden = 0;
  for (const Layer& layer : model.layers) hidden = std::max(hidden, layer.fc.out);
  step.x.assign(B * C, 0.f);
  step.qkv.assign(B * 3 * C, 0.f);
  step.att.assign(B * C, 0.f);
  step.hidden.assign(B * hidden, 0.f);
  auto logits = at::empty({B, model.V}, ids.options().dtype(at::kFloat));
  step.logits = logits.data_ptr<float>();
  const int threads = std::max(1, at::get_num_threads());
  const size_t products = 4 * model.layers.size() + 1;
  step.chunk_counters.reset(new std::atomic<int64_t>[products * threads]);
  for (size_t i = 0; i < products * threads; ++i) step.chunk_counters[i].store(0);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    switch (model.format) {
      case Format::kFp32: step.run<float>(thread, team); break;
      case Format::kBf16: step.run<uint16_t>(thread, team); break;
      case Format::kInt8: step.run<int8_t>(thread, team); break;
    }
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2ipu, m) {
  m.def("decode_step(Tensor ids, Tensor positions, Tensor? key_mask, Tensor[] keys, Tensor[] values, int length, "
        "Tensor[] params, int n_head, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2ipu, CPU, m) { m.impl("decode_step", &decode_step); }
