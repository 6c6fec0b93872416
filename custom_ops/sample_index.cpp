// Sample index of Megatron's GPT dataset: where each sample of seq_length + 1 tokens starts in the
// stream of documents doc_idx[0], doc_idx[1], ... (gpt2ipu.train_data.build_sample_idx documents
// the layout; this returns the same values and dtype).
//
// One pass over the stream, like Megatron's helpers.cpp, but a document at a time instead of a token
// run at a time, with no per-sample inner loop over documents: about 2 ns per document (the random
// read of its size). Single-threaded on purpose: a two-pass parallel version (block sums, then a
// walk per block) measured slower on two shared cores, where waking the second thread costs more
// than the whole walk (a few milliseconds for 1e6 documents).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace {

template <typename DocIndex, typename Out>
void fill_sample_idx(const int32_t* sizes, int64_t num_docs, const DocIndex* doc_idx, int64_t stream_docs,
                     int64_t seq_length, int64_t num_samples, Out* out) {
  out[0] = 0;
  out[1] = 0;
  int64_t k = 1, position = seq_length, doc_start = 0;  // sample k starts at stream token k * seq_length
  for (int64_t p = 0; p < stream_docs && k <= num_samples; ++p) {
    const int64_t doc = static_cast<int64_t>(doc_idx[p]);
    TORCH_CHECK_INDEX(doc >= 0 && doc < num_docs, "build_sample_idx: doc_idx[", p, "] = ", doc,
                      " is not a document of sizes (", num_docs, " documents)");
    const int64_t doc_end = doc_start + sizes[doc];
    // A position at a document's end belongs to the next non-empty document.
    for (; k <= num_samples && position < doc_end; ++k, position += seq_length) {
      out[2 * k] = static_cast<Out>(p);
      out[2 * k + 1] = static_cast<Out>(position - doc_start);
    }
    doc_start = doc_end;
  }
  // Every sample placed means the last one's last token exists too (it lies before doc_end).
  TORCH_CHECK_VALUE(k > num_samples, "build_sample_idx: doc_idx holds ", doc_start, " tokens, too few for ",
                    num_samples, " samples of ", seq_length, " + 1 tokens (num_epochs * tokens_per_epoch "
                    "is more than doc_idx holds)");
}

at::Tensor build_sample_idx(const at::Tensor& sizes_in, const at::Tensor& doc_idx_in, int64_t seq_length,
                            int64_t num_samples) {
  TORCH_CHECK_VALUE(seq_length >= 1 && num_samples >= 0, "build_sample_idx: need seq_length >= 1 and "
                    "num_samples >= 0, got ", seq_length, ", ", num_samples);
  TORCH_CHECK(sizes_in.dim() == 1 && doc_idx_in.dim() == 1, "build_sample_idx: sizes and doc_idx must be 1-D");
  auto sizes = sizes_in.to(at::kInt).contiguous();
  auto doc_idx = doc_idx_in.scalar_type() == at::kInt ? doc_idx_in.contiguous() : doc_idx_in.to(at::kLong).contiguous();
  const int64_t stream_docs = doc_idx.numel();
  // The dtype rule of the numpy reference: int32 while every position in doc_idx fits.
  const bool narrow = stream_docs <= std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(stream_docs > 0, "build_sample_idx: doc_idx is empty");
  auto out = at::empty({num_samples + 1, 2}, narrow ? at::kInt : at::kLong);
  AT_DISPATCH_INDEX_TYPES(doc_idx.scalar_type(), "build_sample_idx", [&] {
    const auto* docs = doc_idx.data_ptr<index_t>();
    if (narrow) {
      fill_sample_idx(sizes.data_ptr<int32_t>(), sizes.numel(), docs, stream_docs, seq_length, num_samples,
                      out.data_ptr<int32_t>());
    } else {
      fill_sample_idx(sizes.data_ptr<int32_t>(), sizes.numel(), docs, stream_docs, seq_length, num_samples,
                      out.data_ptr<int64_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2ipu, m) {
  m.def("build_sample_idx(Tensor sizes, Tensor doc_idx, int seq_length, int num_samples) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2ipu, CPU, m) { m.impl("build_sample_idx", &build_sample_idx); }
