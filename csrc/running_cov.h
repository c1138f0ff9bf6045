// Running centred cross-covariance: declarations shared by the ATen core, the CUDA kernel and the bindings.
// The math (Chan's rank-k update with an appended correction row) is documented once, in
// bif_fast/reference/running_cov.py; this file and its .cpp/.cu implement the same signatures.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace bif_fast {

// In-place rank-k update of the state with k new draws x: [k, n], y: [k, p]. When `fused` is true and
// the tensors live on a CUDA device of a CUDA build, the centring of the incoming blocks, the mean and
// m2 updates and the cast to the accumulator dtype run in one kernel per stream; the co-moment update is
// always one GEMM (addmm_) with inner dimension k + 1.
void running_cov_update_(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y,
                         torch::Tensor m2_x, torch::Tensor m2_y, int64_t count, const torch::Tensor& x,
                         const torch::Tensor& y, bool fused);

// In-place Chan merge of another accumulator's state.
void running_cov_merge_(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y,
                        torch::Tensor m2_x, torch::Tensor m2_y, int64_t count,
                        const torch::Tensor& other_comoment, const torch::Tensor& other_mean_x,
                        const torch::Tensor& other_mean_y, const torch::Tensor& other_m2_x,
                        const torch::Tensor& other_m2_y, int64_t other_count);

torch::Tensor running_cov_covariance(const torch::Tensor& comoment, int64_t count);

torch::Tensor running_cov_correlation(const torch::Tensor& comoment, const torch::Tensor& mean_x,
                                      const torch::Tensor& mean_y, const torch::Tensor& m2_x,
                                      const torch::Tensor& m2_y, int64_t count);

bool built_with_cuda();

}  // namespace bif_fast
