// Shared argument checks for the embedding-injection extension (CPU and CUDA).
// The Python wrapper already raises ValueError on bad dtypes/shapes; these are the C++ safety net.
#pragma once
#include <ATen/ATen.h>

namespace mmcoconut {

inline void check_forward_args(const at::Tensor& ids, const at::Tensor& weight,
                               const at::Tensor& sources, const at::Tensor& index) {
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong && index.scalar_type() == at::kLong,
                    "inject_embeddings: input_ids and source_index must be int64");
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.sizes() == index.sizes(),
                    "inject_embeddings: input_ids and source_index must be [B,T] of equal shape");
  TORCH_CHECK_VALUE(weight.dim() == 2 && sources.dim() == 2 && weight.size(1) == sources.size(1),
                    "inject_embeddings: weight [V,D] and sources [N,D] must share D");
  TORCH_CHECK_VALUE(weight.scalar_type() == sources.scalar_type(),
                    "inject_embeddings: weight and sources must have the same dtype");
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()),
                    "inject_embeddings: weight must be a floating-point tensor");
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& ids,
                                const at::Tensor& index) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == ids.size(0) &&
                        grad_out.size(1) == ids.size(1) && ids.sizes() == index.sizes(),
                    "inject_embeddings backward: grad_output must be [B,T,D]");
}

}  // namespace mmcoconut
