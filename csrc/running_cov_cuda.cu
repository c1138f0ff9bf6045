// Fused preparation of an incoming block for the rank-k co-moment GEMM: one pass computes the block
// mean, writes the centred rows and the Chan correction row in the accumulator dtype, and updates the
// running mean and m2. It replaces a cast, a reduction, two subtractions, a square, a second reduction
// and two axpys (and their temporaries) by one launch per stream. See reference/running_cov.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "running_cov_cuda.h"

namespace bif_fast {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ double to_float(double v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename TAcc, typename T>
__device__ __forceinline__ TAcc load_as(const T* p) {
  return static_cast<TAcc>(to_float(*p));
}

// One thread per column j; consecutive threads read consecutive columns of each row (coalesced).
// Indices are 64-bit: k * d may exceed 2^31.
template <typename TIn, typename TAcc>
__global__ void augment_block_kernel(const TIn* __restrict__ z, TAcc* __restrict__ mean, TAcc* __restrict__ m2,
                                     TAcc* __restrict__ aug, int64_t k, int64_t d, int64_t ld, TAcc scale,
                                     TAcc mean_alpha) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  TAcc sum = 0;
  for (int64_t r = 0; r < k; ++r) sum += load_as<TAcc>(z + r * ld + j);
  const TAcc block_mean = sum / static_cast<TAcc>(k);
  TAcc ss = 0;
  for (int64_t r = 0; r < k; ++r) {
    const TAcc c = load_as<TAcc>(z + r * ld + j) - block_mean;
    aug[r * d + j] = c;
    ss += c * c;
  }
  const TAcc delta = block_mean - mean[j];
  const TAcc corr = scale * delta;
  aug[k * d + j] = corr;
  m2[j] += ss + corr * corr;
  mean[j] += mean_alpha * delta;
}

template <typename TIn, typename TAcc>
int launch_typed(const void* z, void* mean, void* m2, void* aug, int64_t k, int64_t d, int64_t ld, double scale,
                 double mean_alpha, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (d + kThreads - 1) / kThreads;
  augment_block_kernel<TIn, TAcc><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const TIn*>(z), static_cast<TAcc*>(mean), static_cast<TAcc*>(m2), static_cast<TAcc*>(aug), k, d,
      ld, static_cast<TAcc>(scale), static_cast<TAcc>(mean_alpha));
  return static_cast<int>(cudaGetLastError());
}

template <typename TAcc>
int dispatch_input(const void* z, DType in_dtype, void* mean, void* m2, void* aug, int64_t k, int64_t d, int64_t ld,
                   double scale, double mean_alpha, cudaStream_t stream) {
  switch (in_dtype) {
    case DType::kFloat32:
      return launch_typed<float, TAcc>(z, mean, m2, aug, k, d, ld, scale, mean_alpha, stream);
    case DType::kFloat64:
      return launch_typed<double, TAcc>(z, mean, m2, aug, k, d, ld, scale, mean_alpha, stream);
    case DType::kFloat16:
      return launch_typed<__half, TAcc>(z, mean, m2, aug, k, d, ld, scale, mean_alpha, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, TAcc>(z, mean, m2, aug, k, d, ld, scale, mean_alpha, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int augment_block_cuda_launch(const void* z, DType in_dtype, DType acc_dtype, void* mean, void* m2, void* aug,
                              int64_t k, int64_t d, int64_t ld, double scale, double mean_alpha, void* stream) {
  if (d == 0 || k == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (acc_dtype == DType::kFloat64)
    return dispatch_input<double>(z, in_dtype, mean, m2, aug, k, d, ld, scale, mean_alpha, s);
  if (acc_dtype == DType::kFloat32)
    return dispatch_input<float>(z, in_dtype, mean, m2, aug, k, d, ld, scale, mean_alpha, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace bif_fast
