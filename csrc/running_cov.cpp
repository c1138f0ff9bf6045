// ATen implementation of the running cross-covariance. Device-agnostic: on CPU tensors it runs on the
// CPU BLAS; in a build against CUDA torch the same code runs on CUDA tensors through cuBLAS, and with
// BIF_FAST_WITH_CUDA the block preparation can use the fused kernel of running_cov_cuda.cu.
#include "running_cov.h"

#include <cmath>
#include <limits>

#ifdef BIF_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "running_cov_cuda.h"
#endif

namespace bif_fast {
namespace {

// A stream whose std is at most this many ulps of |mean| is treated as constant (correlation 0).
constexpr double kConstantUlps = 16.0;

// Centre a [k, d] block, append the Chan correction row scale * (block_mean - mean) and fold the
// block into mean and m2. Returns the augmented [k + 1, d] block in the accumulator dtype.
torch::Tensor augment_block_aten(const torch::Tensor& z_in, torch::Tensor& mean, torch::Tensor& m2, double scale,
                                 double mean_alpha) {
  const int64_t k = z_in.size(0);
  const int64_t d = z_in.size(1);
  auto z = z_in.to(mean.scalar_type());
  auto block_mean = z.mean(0);  // [d]
  auto aug = torch::empty({k + 1, d}, mean.options());
  auto centred = aug.narrow(0, 0, k);  // [k, d]
  auto correction = aug.select(0, k);  // [d]
  at::sub_out(centred, z, block_mean);
  auto delta = block_mean.sub_(mean);  // [d], reuses block_mean's storage
  at::mul_out(correction, delta, scale);
  m2.add_(aug.square().sum(0));
  mean.add_(delta, mean_alpha);
  return aug;
}

#ifdef BIF_FAST_WITH_CUDA
DType to_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "bif_fast: unsupported dtype ", t, " for the fused CUDA path");
  }
}

torch::Tensor augment_block_fused(const torch::Tensor& z_in, torch::Tensor& mean, torch::Tensor& m2, double scale,
                                  double mean_alpha) {
  const int64_t k = z_in.size(0);
  const int64_t d = z_in.size(1);
  // Rows may be strided (e.g. a slice of a larger batch); columns must be unit stride.
  auto z = z_in.stride(1) == 1 ? z_in : z_in.contiguous();
  auto aug = torch::empty({k + 1, d}, mean.options());
  const c10::cuda::CUDAGuard guard(z.device());
  auto stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const int err = augment_block_cuda_launch(z.data_ptr(), to_dtype_code(z.scalar_type()),
                                            to_dtype_code(mean.scalar_type()), mean.data_ptr(), m2.data_ptr(),
                                            aug.data_ptr(), k, d, z.stride(0), scale, mean_alpha, stream);
  TORCH_CHECK(err == 0, "bif_fast: augment_block kernel launch failed with CUDA error ", err);
  return aug;
}
#endif

torch::Tensor augment_block(const torch::Tensor& z, torch::Tensor& mean, torch::Tensor& m2, double scale,
                            double mean_alpha, bool fused) {
#ifdef BIF_FAST_WITH_CUDA
  if (fused && z.is_cuda()) return augment_block_fused(z, mean, m2, scale, mean_alpha);
#else
  (void)fused;
#endif
  return augment_block_aten(z, mean, m2, scale, mean_alpha);
}

// 1/std of each stream from its float64 m2, or 0 for a numerically constant stream: std at most
// kConstantUlps ulps of |mean| in the accumulator's dtype.
torch::Tensor inv_sqrt_or_zero(const torch::Tensor& m2, const torch::Tensor& mean, int64_t count,
                               at::ScalarType dtype) {
  const double eps = dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                                          : std::numeric_limits<float>::epsilon();
  const double tiny = std::numeric_limits<double>::min();
  const double c = kConstantUlps * eps;
  auto constant = m2.le(mean.square() * (c * c * static_cast<double>(count)));
  return m2.clamp_min(tiny).rsqrt_().masked_fill_(constant, 0.0).to(dtype);
}

}  // namespace

void running_cov_update_(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y, torch::Tensor m2_x,
                         torch::Tensor m2_y, int64_t count, const torch::Tensor& x, const torch::Tensor& y,
                         bool fused) {
  const int64_t k = x.size(0);
  if (k == 0) return;
  const double total = static_cast<double>(count + k);
  const double scale = std::sqrt(static_cast<double>(count) * static_cast<double>(k) / total);
  const double mean_alpha = static_cast<double>(k) / total;
  auto xa = augment_block(x, mean_x, m2_x, scale, mean_alpha, fused);  // [k + 1, n]
  auto ya = augment_block(y, mean_y, m2_y, scale, mean_alpha, fused);  // [k + 1, p]
  // The blocks are centred in float64 (the state vectors' dtype); a float32 co-moment takes them rounded.
  const auto cd = comoment.scalar_type();
  comoment.addmm_(xa.to(cd).t(), ya.to(cd));
}

void running_cov_merge_(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y, torch::Tensor m2_x,
                        torch::Tensor m2_y, int64_t count, const torch::Tensor& other_comoment,
                        const torch::Tensor& other_mean_x, const torch::Tensor& other_mean_y,
                        const torch::Tensor& other_m2_x, const torch::Tensor& other_m2_y, int64_t other_count) {
  if (other_count == 0) return;
  const auto cd = comoment.scalar_type();
  const double total = static_cast<double>(count + other_count);
  const double coef = static_cast<double>(count) * static_cast<double>(other_count) / total;
  const double alpha = static_cast<double>(other_count) / total;
  auto dx = other_mean_x.to(at::kDouble) - mean_x;
  auto dy = other_mean_y.to(at::kDouble) - mean_y;
  comoment.add_(other_comoment.to(cd));
  comoment.addr_(dx.to(cd), dy.to(cd), 1.0, coef);
  m2_x.add_(other_m2_x.to(at::kDouble)).add_(dx.square(), coef);
  m2_y.add_(other_m2_y.to(at::kDouble)).add_(dy.square(), coef);
  mean_x.add_(dx, alpha);
  mean_y.add_(dy, alpha);
}

torch::Tensor running_cov_covariance(const torch::Tensor& comoment, int64_t count) {
  return comoment / static_cast<double>(count - 1);
}

torch::Tensor running_cov_correlation(const torch::Tensor& comoment, const torch::Tensor& mean_x,
                                      const torch::Tensor& mean_y, const torch::Tensor& m2_x,
                                      const torch::Tensor& m2_y, int64_t count) {
  auto inv_x = inv_sqrt_or_zero(m2_x, mean_x, count, comoment.scalar_type());  // [n]
  auto inv_y = inv_sqrt_or_zero(m2_y, mean_y, count, comoment.scalar_type());  // [p]
  auto out = comoment * inv_x.unsqueeze(1);
  out.mul_(inv_y.unsqueeze(0));
  return out.clamp_(-1.0, 1.0);
}

bool built_with_cuda() {
#ifdef BIF_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace bif_fast
