// Fused CPU sampler step: the ext backend of sgld_update_ on CPU tensors. One parallel pass over the
// flat buffers does what the Triton kernel does on a GPU (same formulas, same Philox stream, same
// operation order); the math is documented in bif_fast/reference/sgld_update.py and philox.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>
#include <algorithm>

namespace bif_fast {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr float kFltMax = 3.4028234663852886e38f;

inline void philox4x32(uint32_t c[4], uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c[2];
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c[0];
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(pb);
    c[3] = static_cast<uint32_t>(pa);
    c[0] = n0;
    c[2] = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

inline float uniform(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f + 2.9802322387695312e-08f; }

// Noise of Philox groups [g0, g0 + G) into z[0 .. 4G): the Philox words in scalar code, the
// transcendentals through ATen's vectorised CPU kernels (log, sin, cos run SIMD at any width the CPU
// has, where the C library's scalar calls would dominate the step).
void noise_groups(uint64_t seed, uint32_t chain, uint32_t step, int64_t g0, int64_t G, float* z) {
  auto a = at::empty({2 * G}, at::kFloat);  // u0, u2 of each group: the radii
  auto b = at::empty({2 * G}, at::kFloat);  // u1, u3: the angles
  float* ap = a.data_ptr<float>();
  float* bp = b.data_ptr<float>();
  for (int64_t j = 0; j < G; ++j) {
    const uint64_t g = static_cast<uint64_t>(g0 + j);
    uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, chain};
    philox4x32(c, seed);
    ap[2 * j] = uniform(c[0]);
    bp[2 * j] = uniform(c[1]);
    ap[2 * j + 1] = uniform(c[2]);
    bp[2 * j + 1] = uniform(c[3]);
  }
  auto log_a = a.log();
  b.mul_(6.283185307179586f);
  auto cos_b = b.cos();
  auto sin_b = b.sin();
  const float* lp = log_a.data_ptr<float>();
  const float* cp = cos_b.data_ptr<float>();
  const float* sp = sin_b.data_ptr<float>();
  for (int64_t q = 0; q < 2 * G; ++q) {
    const float r = std::sqrt(-2.0f * lp[q]);
    z[2 * q] = r * cp[q];
    z[2 * q + 1] = r * sp[q];
  }
}

constexpr int64_t kChunkGroups = 8192;  // 32K elements: one chunk (and few ATen calls) for small models

struct Coefs {
  float half_lr, lr, nbeta, localization, weight_decay, noise_level, noise_scale, alpha, one_minus_alpha, eps, kick,
      fric_c, fric_noise, bbox;
};

Coefs read_coefs(const std::unordered_map<std::string, double>& k) {
  auto get = [&](const char* name) {
    auto it = k.find(name);
    TORCH_CHECK_VALUE(it != k.end(), "sgld_update_cpu_: missing coefficient ", name);
    return static_cast<float>(it->second);
  };
  return {get("half_lr"), get("lr"),    get("nbeta"),           get("localization"), get("weight_decay"),
          get("noise_level"), get("noise_scale"), get("alpha"), get("one_minus_alpha"), get("eps"),
          get("kick"),    get("fric_c"), get("fric_noise"),     get("bbox")};
}

template <typename T>
void run(float* w, const T* grad, const T* anchor, float* state, const float* noise, T* out, int64_t numel,
         int64_t offset, uint64_t seed, uint32_t chain, uint32_t step, int sampler, bool has_bbox, const Coefs& k,
         std::atomic<int>& bad_flag) {
  const int64_t g_first = offset / 4;
  const int64_t g_last = (offset + numel - 1) / 4;
  at::parallel_for(g_first, g_last + 1, kChunkGroups, [&](int64_t gb, int64_t ge) {
    bool bad = false;
    std::vector<float> zbuf(noise == nullptr ? 4 * kChunkGroups : 0);
    for (int64_t cb = gb; cb < ge; cb += kChunkGroups) {
      const int64_t ce = std::min(ge, cb + kChunkGroups);
      if (noise == nullptr) noise_groups(seed, chain, step, cb, ce - cb, zbuf.data());
      for (int64_t g = cb; g < ce; ++g) {
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = 4 * g + lane - offset;
          if (i < 0 || i >= numel) continue;
          const float wi = w[i];
          const float gi = static_cast<float>(grad[i]);
          const float ai = static_cast<float>(anchor[i]);
          const float xi = noise != nullptr ? noise[i] : zbuf[4 * (g - cb) + lane];
          const float drift = k.nbeta * gi + k.weight_decay * wi + k.localization * (wi - ai);
          float w_new;
          if (sampler == 2) {
            float v = state[i];
            v = v - k.kick * drift;
            w_new = wi + k.half_lr * v;
            v = k.fric_c * v + k.fric_noise * xi;
            w_new = w_new + k.half_lr * v;
            state[i] = v;
          } else if (sampler == 1) {
            float v = state[i];
            v = k.alpha * v + k.one_minus_alpha * gi * gi;
            const float precond = 1.0f / (std::sqrt(v) + k.eps);
            w_new = wi - (k.half_lr * precond) * drift + std::sqrt(k.lr * precond) * k.noise_level * xi;
            state[i] = v;
          } else {
            w_new = wi - k.half_lr * drift + k.noise_scale * xi;
          }
          if (has_bbox) w_new = std::fmin(std::fmax(w_new, ai - k.bbox), ai + k.bbox);
          w[i] = w_new;
          if (out != nullptr) out[i] = static_cast<T>(w_new);
          bad |= !(std::fabs(w_new) <= kFltMax);
        }
      }
    }
    if (bad) bad_flag.store(1, std::memory_order_relaxed);
  });
}

}  // namespace

void sgld_update_cpu_(torch::Tensor w, torch::Tensor grad, torch::Tensor anchor, c10::optional<torch::Tensor> state,
                      c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> out,
                      c10::optional<torch::Tensor> diverged, int64_t sampler, bool has_bbox, int64_t offset,
                      uint64_t seed, int64_t chain, int64_t step, const std::unordered_map<std::string, double>& coefs) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1,
                    "w must be a contiguous 1-D float32 CPU tensor");
  const int64_t numel = w.numel();
  auto check = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous() && t.numel() == numel, name,
                      " must be a contiguous CPU tensor of ", numel, " elements");
  };
  check(grad, "grad");
  check(anchor, "anchor");
  TORCH_CHECK_VALUE(grad.scalar_type() == anchor.scalar_type(), "grad and anchor must share a dtype");
  TORCH_CHECK_VALUE(sampler >= 0 && sampler <= 2, "sampler code must be 0, 1 or 2");
  float* state_ptr = nullptr;
  if (sampler != 0) {
    TORCH_CHECK_VALUE(state.has_value(), "this sampler needs a state tensor");
    check(*state, "state");
    TORCH_CHECK_VALUE(state->scalar_type() == at::kFloat, "state must be float32");
    state_ptr = state->data_ptr<float>();
  }
  const float* noise_ptr = nullptr;
  if (noise.has_value()) {
    check(*noise, "noise");
    TORCH_CHECK_VALUE(noise->scalar_type() == at::kFloat, "noise must be float32");
    noise_ptr = noise->data_ptr<float>();
  }
  if (out.has_value()) {
    check(*out, "out");
    TORCH_CHECK_VALUE(out->scalar_type() == anchor.scalar_type(), "out must have the anchor's dtype");
  }
  if (numel == 0) return;
  const Coefs k = read_coefs(coefs);
  std::atomic<int> bad{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "sgld_update_cpu_", [&] {
    run<scalar_t>(w.data_ptr<float>(), grad.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(), state_ptr, noise_ptr,
                  out.has_value() ? out->data_ptr<scalar_t>() : nullptr, numel, offset, seed,
                  static_cast<uint32_t>(chain), static_cast<uint32_t>(step), static_cast<int>(sampler), has_bbox, k,
                  bad);
  });
  if (diverged.has_value() && bad.load() != 0) diverged->fill_(1);
}

void philox_normal_cpu_(torch::Tensor out, uint64_t seed, int64_t chain, int64_t step, int64_t offset) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "out must be a contiguous float32 CPU tensor");
  const int64_t numel = out.numel();
  if (numel == 0) return;
  float* o = out.data_ptr<float>();
  at::parallel_for(offset / 4, (offset + numel - 1) / 4 + 1, kChunkGroups, [&](int64_t gb, int64_t ge) {
    std::vector<float> zbuf(4 * kChunkGroups);
    for (int64_t cb = gb; cb < ge; cb += kChunkGroups) {
      const int64_t ce = std::min(ge, cb + kChunkGroups);
      noise_groups(seed, static_cast<uint32_t>(chain), static_cast<uint32_t>(step), cb, ce - cb, zbuf.data());
      for (int64_t g = cb; g < ce; ++g) {
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = 4 * g + lane - offset;
          if (i >= 0 && i < numel) o[i] = zbuf[4 * (g - cb) + lane];
        }
      }
    }
  });
}

}  // namespace bif_fast
