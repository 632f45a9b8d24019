// Fused embedding injection, CUDA.
//   out[r] = sources[index[r]] if index[r] >= 0 else weight[ids[r]]      (r = flattened (b, t))
// Forward: one warp per output row; the row is copied as raw bytes in the widest unit (16/8/4/2/1 bytes)
// that divides the row size and the base alignments, so odd D (e.g. 13 x fp32) falls back to narrower units.
// Backward, per destination table (weight: token rows, sources: injected rows), gradient in the table's dtype:
//   default       - fp32/fp64: warp per grad row, atomicAdd straight into the zeroed output; fp16/bf16: atomicAdd
//                   into an fp32 accumulator of which only the used rows are zeroed, read and cast into the zeroed
//                   output (no full-size fp32 fill or conversion). No host sync.
//   deterministic - stable sort of rows by destination, chunked two-level segmented sum in position order (its
//                   bookkeeping uses nonzero: one host sync per call, acceptable in that mode).
// No device->host reads in the default paths: out-of-range ids/indices never touch memory (the forward writes a
// zero row, the backward skips the row). With check_range (mmcoconut.kernels debug mode: MMCOCONUT_DEBUG=1 or
// set_debug) the forward records the first out-of-range row on the device and raises IndexError after the kernel,
// with the CPU op's message (one host read, debug mode only).
// Registered with TORCH_LIBRARY like the CPU op (torch.ops.mmcoconut_inject_cuda.{forward,backward}): no pybind11
// or torch/extension.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "inject_common.h"

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;

int64_t num_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20));  // grid-stride beyond
}

// ---------------------------------------------------------------- forward
template <typename Unit>
__global__ void inject_forward_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ index,
                                      const Unit* __restrict__ weight, const Unit* __restrict__ sources,
                                      Unit* __restrict__ out, int64_t rows, int64_t units, int64_t V,
                                      int64_t N, unsigned long long* __restrict__ first_bad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += stride) {
    const int64_t s = index[r];
    const Unit* src = nullptr;
    if (s >= 0) {
      if (s < N) src = sources + s * units;
    } else {
      const int64_t t = ids[r];  // token id read only at token positions
      if (t >= 0 && t < V) src = weight + t * units;
    }
    Unit* dst = out + r * units;
    if (src == nullptr) {  // out of range: a defined (zero) row; recorded only when checking (debug mode)
      if (first_bad != nullptr && lane == 0) atomicMin(first_bad, static_cast<unsigned long long>(r));
      for (int64_t u = lane; u < units; u += kWarp) dst[u] = Unit{};
      continue;
    }
    for (int64_t u = lane; u < units; u += kWarp) dst[u] = src[u];
  }
}

template <typename Unit>
void launch_forward(const at::Tensor& ids, const at::Tensor& index, const at::Tensor& weight,
                    const at::Tensor& sources, at::Tensor& out, int64_t row_bytes, unsigned long long* first_bad) {
  const int64_t rows = ids.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  inject_forward_kernel<Unit><<<num_blocks(rows), kThreads, 0, stream>>>(
      ids.data_ptr<int64_t>(), index.data_ptr<int64_t>(), static_cast<const Unit*>(weight.data_ptr()),
      static_cast<const Unit*>(sources.data_ptr()), static_cast<Unit*>(out.data_ptr()), rows,
      row_bytes / static_cast<int64_t>(sizeof(Unit)), weight.size(0), sources.size(0), first_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor inject_forward(const at::Tensor& ids_in, const at::Tensor& weight_in, const at::Tensor& sources_in,
                          const at::Tensor& index_in, bool check_range) {
  mmcoconut::check_forward_args(ids_in, weight_in, sources_in, index_in);
  TORCH_CHECK_VALUE(weight_in.is_cuda() && ids_in.device() == weight_in.device() &&
                        sources_in.device() == weight_in.device() && index_in.device() == weight_in.device(),
                    "inject_embeddings: all tensors must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const auto ids = ids_in.contiguous();
  const auto index = index_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto sources = sources_in.contiguous();
  const int64_t B = ids.size(0), T = ids.size(1), D = weight.size(1);
  auto out = at::empty({B, T, D}, weight.options());
  if (B * T == 0 || D == 0) return out;

  const int64_t row_bytes = D * static_cast<int64_t>(weight.element_size());
  const auto aligned = [&](int64_t a) {
    return row_bytes % a == 0 && reinterpret_cast<uintptr_t>(weight.data_ptr()) % a == 0 &&
           reinterpret_cast<uintptr_t>(sources.data_ptr()) % a == 0 &&
           reinterpret_cast<uintptr_t>(out.data_ptr()) % a == 0;
  };
  const int64_t rows = B * T;
  // debug mode: the first out-of-range row (atomicMin), `rows` if none
  at::Tensor first_bad;
  unsigned long long* bad_p = nullptr;
  if (check_range) {
    first_bad = at::full({1}, rows, ids.options());
    bad_p = reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>());
  }
  if (aligned(16)) launch_forward<uint4>(ids, index, weight, sources, out, row_bytes, bad_p);
  else if (aligned(8)) launch_forward<uint2>(ids, index, weight, sources, out, row_bytes, bad_p);
  else if (aligned(4)) launch_forward<uint32_t>(ids, index, weight, sources, out, row_bytes, bad_p);
  else if (aligned(2)) launch_forward<uint16_t>(ids, index, weight, sources, out, row_bytes, bad_p);
  else launch_forward<uint8_t>(ids, index, weight, sources, out, row_bytes, bad_p);
  if (check_range) {
    const int64_t bad = first_bad.item<int64_t>();  // host read: debug mode only
    if (bad < rows) {
      const int64_t id = ids.view({-1})[bad].item<int64_t>(), src = index.view({-1})[bad].item<int64_t>();
      TORCH_CHECK_INDEX(false, "inject_embeddings: out-of-range index at flat position ", bad, " (input_id=", id,
                        ", source_index=", src, ", V=", weight.size(0), ", N=", sources.size(0), ")");
    }
  }
  return out;
}

// ---------------------------------------------------------------- backward
// keys[r] = destination row of grad row r in the table being reduced, or -1 (row belongs to the other one).
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ keys,
                                   acc_t* __restrict__ buf, int64_t rows, int64_t D, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += stride) {
    const int64_t k = keys[r];
    if (k < 0 || k >= K) continue;
    const scalar_t* g = grad + r * D;
    acc_t* dst = buf + k * D;
    for (int64_t d = lane; d < D; d += kWarp) atomicAdd(dst + d, static_cast<acc_t>(g[d]));
  }
}

// Half-precision default path: zero, then (after the atomics) cast, exactly the accumulator rows that receive
// gradient. Several warps may zero or copy the same row (same values): benign.
template <typename acc_t>
__global__ void zero_used_rows_kernel(const int64_t* __restrict__ keys, acc_t* __restrict__ buf, int64_t rows,
                                      int64_t D, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += stride) {
    const int64_t k = keys[r];
    if (k < 0 || k >= K) continue;
    for (int64_t d = lane; d < D; d += kWarp) buf[k * D + d] = acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cast_used_rows_kernel(const int64_t* __restrict__ keys, const acc_t* __restrict__ buf,
                                      scalar_t* __restrict__ out, int64_t rows, int64_t D, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += stride) {
    const int64_t k = keys[r];
    if (k < 0 || k >= K) continue;
    for (int64_t d = lane; d < D; d += kWarp) out[k * D + d] = static_cast<scalar_t>(buf[k * D + d]);
  }
}

// Deterministic path, two levels so that a hot key (e.g. padding repeated thousands of times) is not summed
// by one warp: rows sorted by key (stable) are cut into chunks of at most kChunkRows rows of one key;
// (1) a warp per chunk sums its rows in position order into partial[chunk] (opmath);
// (2) a warp per segment (= key) sums its chunks' partials in order and writes out[key].
constexpr int64_t kChunkRows = 32;

template <typename scalar_t, typename acc_t>
__global__ void chunk_sum_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ sorted_keys,
                                 const int64_t* __restrict__ perm, const int64_t* __restrict__ chunk_starts,
                                 acc_t* __restrict__ partial, int64_t chunks, int64_t rows, int64_t D,
                                 int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; c < chunks;
       c += stride) {
    const int64_t begin = chunk_starts[c];
    if (sorted_keys[begin] >= K) continue;  // rows that belong to the other table (sorted last)
    const int64_t end = c + 1 < chunks ? chunk_starts[c + 1] : rows;
    for (int64_t d = lane; d < D; d += kWarp) {
      acc_t acc = 0;
      for (int64_t j = begin; j < end; ++j) acc += static_cast<acc_t>(grad[perm[j] * D + d]);
      partial[c * D + d] = acc;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_reduce_kernel(const acc_t* __restrict__ partial, const int64_t* __restrict__ sorted_keys,
                                      const int64_t* __restrict__ seg_starts,
                                      const int64_t* __restrict__ seg_first_chunk, scalar_t* __restrict__ out,
                                      int64_t segments, int64_t chunks, int64_t D, int64_t K) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; s < segments;
       s += stride) {
    const int64_t key = sorted_keys[seg_starts[s]];
    if (key >= K) continue;
    const int64_t c0 = seg_first_chunk[s], c1 = s + 1 < segments ? seg_first_chunk[s + 1] : chunks;
    for (int64_t d = lane; d < D; d += kWarp) {
      acc_t acc = 0;
      for (int64_t c = c0; c < c1; ++c) acc += partial[c * D + d];
      out[key * D + d] = static_cast<scalar_t>(acc);
    }
  }
}

at::Tensor reduce_rows(const at::Tensor& grad, const at::Tensor& keys, int64_t K, bool deterministic) {
  const int64_t rows = grad.size(0), D = grad.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = num_blocks(rows);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  if (deterministic) {
    auto out = at::zeros({K, D}, grad.options());
    if (rows == 0 || K == 0 || D == 0) return out;
    // Segment/chunk bookkeeping with ATen ops (nonzero synchronises; acceptable in deterministic mode).
    const auto keyed = at::where(keys < 0, at::scalar_tensor(K, keys.options()), keys);
    const auto sorted = at::sort(keyed, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto sorted_keys = std::get<0>(sorted).contiguous();
    const auto perm = std::get<1>(sorted).contiguous();
    auto is_start = at::ones({rows}, keys.options().dtype(at::kBool));
    if (rows > 1) is_start.slice(0, 1).copy_(sorted_keys.slice(0, 1) != sorted_keys.slice(0, 0, rows - 1));
    const auto seg_starts = at::nonzero(is_start).view({-1});
    const auto seg_id = at::cumsum(is_start, 0, at::kLong) - 1;
    const auto pos_in_seg = at::arange(rows, keys.options()) - seg_starts.index_select(0, seg_id);
    const auto chunk_starts = at::nonzero(at::remainder(pos_in_seg, kChunkRows) == 0).view({-1});
    const auto seg_first_chunk = at::nonzero(is_start.index_select(0, chunk_starts)).view({-1});
    const int64_t chunks = chunk_starts.numel(), segments = seg_starts.numel();
    auto partial = at::empty({chunks, D}, grad.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "inject_segment_sum", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      chunk_sum_kernel<scalar_t, acc_t><<<num_blocks(chunks), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), sorted_keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
          chunk_starts.data_ptr<int64_t>(), partial.data_ptr<acc_t>(), chunks, rows, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      segment_reduce_kernel<scalar_t, acc_t><<<num_blocks(segments), kThreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), sorted_keys.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
          seg_first_chunk.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), segments, chunks, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  auto out = at::zeros({K, D}, grad.options());  // the gradient, in the table's dtype
  if (rows == 0 || K == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "inject_scatter_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {  // fp32 / fp64: accumulate in the output itself
      scatter_add_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), rows, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {  // fp16 / bf16: fp32 accumulator, only its used rows are written and read
      auto buf = at::empty({K, D}, grad.options().dtype(acc_type));
      zero_used_rows_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(keys.data_ptr<int64_t>(),
                                                                    buf.data_ptr<acc_t>(), rows, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scatter_add_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), buf.data_ptr<acc_t>(), rows, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cast_used_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          keys.data_ptr<int64_t>(), buf.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), rows, D, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// Returns [grad_weight [V,D] or None, grad_sources [N,D] or None].
std::vector<at::Tensor> inject_backward(const at::Tensor& grad_out, const at::Tensor& ids_in,
                                        const at::Tensor& index_in, int64_t V, int64_t N, bool need_weight,
                                        bool need_sources, bool deterministic) {
  mmcoconut::check_backward_args(grad_out, ids_in, index_in);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t rows = ids_in.numel(), D = grad_out.size(2);
  const auto grad = grad_out.contiguous().view({rows, D});
  const auto ids = ids_in.reshape({rows});
  const auto index = index_in.reshape({rows});
  const auto minus_one = at::scalar_tensor(-1, ids.options());
  at::Tensor grad_weight, grad_sources;
  if (need_weight) {
    const auto keys = at::where(index < 0, ids, minus_one).contiguous();
    grad_weight = reduce_rows(grad, keys, V, deterministic);
  }
  if (need_sources) {
    const auto keys = at::where(index >= 0, index, minus_one).contiguous();
    grad_sources = reduce_rows(grad, keys, N, deterministic);
  }
  return {grad_weight, grad_sources};
}

}  // namespace

TORCH_LIBRARY(mmcoconut_inject_cuda, m) {
  m.def("forward", &inject_forward);
  m.def("backward", &inject_backward);
}
