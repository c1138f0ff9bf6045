// Raw-pointer launcher of the fused block-centring kernel (running_cov_cuda.cu). Kept free of ATen and
// cuBLAS headers so the .cu compiles with a bare CUDA toolkit (and can be compile-checked by nvcc alone).
#pragma once

#include <cstdint>

namespace bif_fast {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// For a block z: [k, d] (row stride ld elements, dtype in_dtype) and an accumulator of dtype acc_dtype
// (kFloat32 or kFloat64) with mean: [d], m2: [d], writes aug: [k + 1, d] (contiguous, acc_dtype):
//   aug[r, j] = z[r, j] - b[j]   (r < k, b = block mean)
//   aug[k, j] = scale * (b[j] - mean[j])
// and updates m2[j] += sum_r aug[r, j]^2 and mean[j] += mean_alpha * (b[j] - mean[j]).
// Returns 0 on success or a cudaError_t value.
int augment_block_cuda_launch(const void* z, DType in_dtype, DType acc_dtype, void* mean, void* m2, void* aug,
                              int64_t k, int64_t d, int64_t ld, double scale, double mean_alpha, void* stream);

}  // namespace bif_fast
