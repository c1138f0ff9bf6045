// Fused CPU sampler step: the ext backend of sgld_update_ on CPU tensors. One parallel pass over the
// flat buffers does what the Triton kernel does on a GPU (same formulas, same Philox stream, same
// operation order); the math is documented in bif_fast/reference/sgld_update.py and philox.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>
#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BIF_FAST_X86 1
#include <immintrin.h>
#endif

namespace bif_fast {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr float kFltMax = 3.4028234663852886e38f;

inline float uniform(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f + 2.9802322387695312e-08f; }

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

#ifdef BIF_FAST_X86

// Eight Philox counters at once (AVX2): 32x32 -> 64-bit products of the even and the odd lanes, split
// back into the low and high words.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, uint32_t m, __m256i& hi, __m256i& lo) {
  const __m256i mm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(a, mm);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mm);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256 uniform8(__m256i x) {
  const __m256 f = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8));  // < 2^24: exact
  return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(5.9604644775390625e-08f)),
                       _mm256_set1_ps(2.9802322387695312e-08f));
}

// (x0 y0 x1 y1 ... x7 y7) into out[0 .. 16)
__attribute__((target("avx2"))) inline void store_interleaved8(float* out, __m256 x, __m256 y) {
  const __m256 lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

__attribute__((target("avx2"))) int64_t philox_uniforms_avx2(uint64_t seed, uint32_t chain, uint32_t step, int64_t g0,
                                                             int64_t G, float* a, float* b) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j0 = 0;
  for (; j0 + 8 <= G; j0 += 8) {
    const uint64_t g = static_cast<uint64_t>(g0 + j0);
    if ((g & 0xFFFFFFFFu) > 0xFFFFFFF7u) break;  // the low word would carry within the block: scalar tail
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(step));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(chain));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i hb, lb, ha, la;
      mulhilo8(c2, kRoundB, hb, lb);
      mulhilo8(c0, kRoundA, ha, la);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lb;
      c3 = la;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    store_interleaved8(a + 2 * j0, uniform8(c0), uniform8(c2));
    store_interleaved8(b + 2 * j0, uniform8(c1), uniform8(c3));
  }
  return j0;
}
#endif

// Philox words of groups [g0, g0 + G) as uniforms: a = (u0, u2) of each group (the radii), b = (u1, u3)
// (the angles). Eight groups per AVX2 instruction where the CPU has it (checked once), scalar otherwise.
void philox_uniforms(uint64_t seed, uint32_t chain, uint32_t step, int64_t g0, int64_t G, float* a, float* b) {
  int64_t j = 0;
#ifdef BIF_FAST_X86
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) j = philox_uniforms_avx2(seed, chain, step, g0, G, a, b);
#endif
  for (; j < G; ++j) {
    const uint64_t g = static_cast<uint64_t>(g0 + j);
    uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, chain};
    philox4x32(c, seed);
    a[2 * j] = uniform(c[0]);
    b[2 * j] = uniform(c[1]);
    a[2 * j + 1] = uniform(c[2]);
    b[2 * j + 1] = uniform(c[3]);
  }
}

// Scratch of one thread: uniforms, their transcendentals, and the noise of one chunk. Reused across
// calls, so a step of a small model allocates nothing.
struct Scratch {
  at::Tensor a, b, log_a, cos_b, sin_b;
  std::vector<float> z;
  void ensure(int64_t groups) {
    if (!a.defined() || a.numel() < 2 * groups) {
      for (at::Tensor* t : {&a, &b, &log_a, &cos_b, &sin_b}) *t = at::empty({2 * groups}, at::kFloat);
      z.resize(4 * groups);
    }
  }
};

// Noise of Philox groups [g0, g0 + G) into z[0 .. 4G): the words vectorised above, the transcendentals
// through ATen's vectorised CPU kernels (log, sin, cos run SIMD at any width the CPU has, where the C
// library's scalar calls would dominate the step).
const float* noise_groups(uint64_t seed, uint32_t chain, uint32_t step, int64_t g0, int64_t G, Scratch& s) {
  s.ensure(G);
  auto a = s.a.narrow(0, 0, 2 * G), b = s.b.narrow(0, 0, 2 * G);
  auto log_a = s.log_a.narrow(0, 0, 2 * G), cos_b = s.cos_b.narrow(0, 0, 2 * G), sin_b = s.sin_b.narrow(0, 0, 2 * G);
  philox_uniforms(seed, chain, step, g0, G, a.data_ptr<float>(), b.data_ptr<float>());
  at::log_out(log_a, a);
  b.mul_(6.283185307179586f);
  at::cos_out(cos_b, b);
  at::sin_out(sin_b, b);
  const float* lp = log_a.data_ptr<float>();
  const float* cp = cos_b.data_ptr<float>();
  const float* sp = sin_b.data_ptr<float>();
  float* z = s.z.data();
  for (int64_t q = 0; q < 2 * G; ++q) {
    const float r = std::sqrt(-2.0f * lp[q]);
    z[2 * q] = r * cp[q];
    z[2 * q + 1] = r * sp[q];
  }
  return z;
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

// Elements [i0, i1) with noise x[i]: one branch-free loop per (sampler, bounding box, out) so the compiler
// vectorises it. The operation order is the reference's (and -ffp-contract=off keeps it unfused).
template <typename T, int kSampler, bool kBox, bool kOut>
int update_range(float* __restrict w, const T* __restrict grad, const T* __restrict anchor, float* __restrict state,
                 const float* __restrict x, T* __restrict out, int64_t i0, int64_t i1, const Coefs& k) {
  int bad = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const float wi = w[i];
    const float gi = static_cast<float>(grad[i]);
    const float ai = static_cast<float>(anchor[i]);
    const float xi = x[i];
    const float drift = k.nbeta * gi + k.weight_decay * wi + k.localization * (wi - ai);
    float w_new;
    if constexpr (kSampler == 2) {
      float v = state[i];
      v = v - k.kick * drift;
      w_new = wi + k.half_lr * v;
      v = k.fric_c * v + k.fric_noise * xi;
      w_new = w_new + k.half_lr * v;
      state[i] = v;
    } else if constexpr (kSampler == 1) {
      float v = state[i];
      v = k.alpha * v + k.one_minus_alpha * gi * gi;
      const float precond = 1.0f / (std::sqrt(v) + k.eps);
      w_new = wi - (k.half_lr * precond) * drift + std::sqrt(k.lr * precond) * k.noise_level * xi;
      state[i] = v;
    } else {
      w_new = wi - k.half_lr * drift + k.noise_scale * xi;
    }
    if constexpr (kBox) w_new = std::fmin(std::fmax(w_new, ai - k.bbox), ai + k.bbox);
    w[i] = w_new;
    if constexpr (kOut) out[i] = static_cast<T>(w_new);
    bad += !(std::fabs(w_new) <= kFltMax);
  }
  return bad;
}

// Buffers of one call: `rows` chains stacked as rows of contiguous [rows, numel] buffers (a flat call is
// one row), row r keyed by chain chains[r]; anchor is shared by every row.
struct Rows {
  int64_t rows, numel, offset;
  const int64_t* chains;
};

// Work items are (row, chunk of kChunkGroups Philox groups) pairs, spread over the threads, so a batch of
// small chains and one large chain both use every thread; a row's result does not depend on the split.
template <typename Fn>
void for_row_chunks(const Rows& job, Fn&& fn) {
  const int64_t g_first = job.offset / 4;
  const int64_t g_last = (job.offset + job.numel - 1) / 4;
  const int64_t chunks = (g_last - g_first) / kChunkGroups + 1;
  at::parallel_for(0, job.rows * chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks;
      const int64_t cb = g_first + (item % chunks) * kChunkGroups;
      const int64_t ce = std::min(g_last + 1, cb + kChunkGroups);
      const int64_t i0 = std::max<int64_t>(0, 4 * cb - job.offset);
      const int64_t i1 = std::min<int64_t>(job.numel, 4 * ce - job.offset);
      fn(r, static_cast<uint32_t>(job.chains[r]), cb, ce, i0, i1, scratch);
    }
  });
}

template <typename T, int kSampler, bool kBox, bool kOut>
void run(float* w, const T* grad, const T* anchor, float* state, const float* noise, T* out, const Rows& job,
         uint64_t seed, uint32_t step, const Coefs& k, std::atomic<int>* bad_rows) {
  const int64_t n = job.numel;
  for_row_chunks(job, [&](int64_t r, uint32_t chain, int64_t cb, int64_t ce, int64_t i0, int64_t i1, Scratch& s) {
    // x[i] is the noise of element i of row r: the caller's, or this chunk's Philox noise shifted to
    // element indices.
    const float* x = noise == nullptr ? nullptr : noise + r * n;
    if (x == nullptr) x = noise_groups(seed, chain, step, cb, ce - cb, s) - (4 * cb - job.offset);
    const int bad = update_range<T, kSampler, kBox, kOut>(w + r * n, grad + r * n, anchor, state ? state + r * n : nullptr,
                                                          x, out ? out + r * n : nullptr, i0, i1, k);
    if (bad != 0) bad_rows[r].store(1, std::memory_order_relaxed);
  });
}

template <typename T>
void dispatch(int sampler, bool box, bool has_out, float* w, const T* grad, const T* anchor, float* state,
              const float* noise, T* out, const Rows& job, uint64_t seed, uint32_t step, const Coefs& k,
              std::atomic<int>* bad) {
#define BIF_FAST_RUN(S, B, O) run<T, S, B, O>(w, grad, anchor, state, noise, out, job, seed, step, k, bad)
#define BIF_FAST_RUN_SB(S, B) \
  if (has_out) BIF_FAST_RUN(S, B, true); \
  else BIF_FAST_RUN(S, B, false)
#define BIF_FAST_RUN_S(S) \
  if (box) { BIF_FAST_RUN_SB(S, true); } \
  else { BIF_FAST_RUN_SB(S, false); }
  if (sampler == 2) {
    BIF_FAST_RUN_S(2)
  } else if (sampler == 1) {
    BIF_FAST_RUN_S(1)
  } else {
    BIF_FAST_RUN_S(0)
  }
#undef BIF_FAST_RUN_S
#undef BIF_FAST_RUN_SB
#undef BIF_FAST_RUN
}

// Checks and launch shared by the flat and the row-batched entry points: w, grad, state, noise and out are
// [rows, numel] (a flat call passes rows = 1), anchor [numel], diverged [rows] int32.
void update_rows(const torch::Tensor& w, const torch::Tensor& grad, const torch::Tensor& anchor,
                 const c10::optional<torch::Tensor>& state, const c10::optional<torch::Tensor>& noise,
                 const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& diverged,
                 int64_t sampler, bool has_bbox, int64_t offset, uint64_t seed, const std::vector<int64_t>& chains,
                 int64_t step, const std::unordered_map<std::string, double>& coefs) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(),
                    "w must be a contiguous float32 CPU tensor");
  const int64_t rows = static_cast<int64_t>(chains.size());
  TORCH_CHECK_VALUE(rows >= 1 && w.numel() % rows == 0, "w must hold one row per chain (", rows, " chains)");
  const int64_t numel = w.numel() / rows;
  auto check = [&](const torch::Tensor& t, const char* name, int64_t expected) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous() && t.numel() == expected, name,
                      " must be a contiguous CPU tensor of ", expected, " elements");
  };
  check(grad, "grad", rows * numel);
  check(anchor, "anchor", numel);
  TORCH_CHECK_VALUE(grad.scalar_type() == anchor.scalar_type(), "grad and anchor must share a dtype");
  TORCH_CHECK_VALUE(sampler >= 0 && sampler <= 2, "sampler code must be 0, 1 or 2");
  float* state_ptr = nullptr;
  if (sampler != 0) {
    TORCH_CHECK_VALUE(state.has_value(), "this sampler needs a state tensor");
    check(*state, "state", rows * numel);
    TORCH_CHECK_VALUE(state->scalar_type() == at::kFloat, "state must be float32");
    state_ptr = state->data_ptr<float>();
  }
  const float* noise_ptr = nullptr;
  if (noise.has_value()) {
    check(*noise, "noise", rows * numel);
    TORCH_CHECK_VALUE(noise->scalar_type() == at::kFloat, "noise must be float32");
    noise_ptr = noise->data_ptr<float>();
  }
  if (out.has_value()) {
    check(*out, "out", rows * numel);
    TORCH_CHECK_VALUE(out->scalar_type() == anchor.scalar_type(), "out must have the anchor's dtype");
  }
  if (diverged.has_value()) {
    check(*diverged, "diverged", rows);
    TORCH_CHECK_VALUE(diverged->scalar_type() == at::kInt, "diverged must be int32");
  }
  for (const int64_t c : chains) TORCH_CHECK_VALUE(c >= 0 && c <= 0xFFFFFFFFll, "chain ids must fit in 32 bits");
  if (numel == 0) return;
  const Coefs k = read_coefs(coefs);
  std::unique_ptr<std::atomic<int>[]> bad(new std::atomic<int>[rows]);
  for (int64_t r = 0; r < rows; ++r) bad[r].store(0);
  const Rows job{rows, numel, offset, chains.data()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "sgld_update_cpu_", [&] {
    dispatch<scalar_t>(static_cast<int>(sampler), has_bbox, out.has_value(), w.data_ptr<float>(),
                       grad.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(), state_ptr, noise_ptr,
                       out.has_value() ? out->data_ptr<scalar_t>() : nullptr, job, seed,
                       static_cast<uint32_t>(step), k, bad.get());
  });
  if (diverged.has_value()) {
    int32_t* flags = diverged->data_ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r)
      if (bad[r].load() != 0) flags[r] = 1;
  }
}

void philox_rows(const torch::Tensor& out, uint64_t seed, const std::vector<int64_t>& chains, int64_t step,
                 int64_t offset) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "out must be a contiguous float32 CPU tensor");
  const int64_t rows = static_cast<int64_t>(chains.size());
  TORCH_CHECK_VALUE(rows >= 1 && out.numel() % rows == 0, "out must hold one row per chain (", rows, " chains)");
  for (const int64_t c : chains) TORCH_CHECK_VALUE(c >= 0 && c <= 0xFFFFFFFFll, "chain ids must fit in 32 bits");
  const int64_t numel = out.numel() / rows;
  if (numel == 0) return;
  float* o = out.data_ptr<float>();
  const Rows job{rows, numel, offset, chains.data()};
  for_row_chunks(job, [&](int64_t r, uint32_t chain, int64_t cb, int64_t ce, int64_t i0, int64_t i1, Scratch& s) {
    const float* z = noise_groups(seed, chain, static_cast<uint32_t>(step), cb, ce - cb, s);
    std::copy(z + (i0 + offset - 4 * cb), z + (i1 + offset - 4 * cb), o + r * numel + i0);
  });
}

}  // namespace

void sgld_update_cpu_(torch::Tensor w, torch::Tensor grad, torch::Tensor anchor, c10::optional<torch::Tensor> state,
                      c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> out,
                      c10::optional<torch::Tensor> diverged, int64_t sampler, bool has_bbox, int64_t offset,
                      uint64_t seed, int64_t chain, int64_t step, const std::unordered_map<std::string, double>& coefs) {
  TORCH_CHECK_VALUE(w.dim() == 1, "w must be a 1-D tensor");
  TORCH_CHECK_VALUE(!diverged.has_value() || diverged->numel() == 1, "diverged must hold one flag");
  update_rows(w, grad, anchor, state, noise, out, diverged, sampler, has_bbox, offset, seed, {chain}, step, coefs);
}

void sgld_update_rows_cpu_(torch::Tensor w, torch::Tensor grad, torch::Tensor anchor,
                           c10::optional<torch::Tensor> state, c10::optional<torch::Tensor> noise,
                           c10::optional<torch::Tensor> out, c10::optional<torch::Tensor> diverged, int64_t sampler,
                           bool has_bbox, int64_t offset, uint64_t seed, std::vector<int64_t> chains, int64_t step,
                           const std::unordered_map<std::string, double>& coefs) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == static_cast<int64_t>(chains.size()),
                    "w must be [chains, N] with one row per chain id");
  update_rows(w, grad, anchor, state, noise, out, diverged, sampler, has_bbox, offset, seed, chains, step, coefs);
}

void philox_normal_cpu_(torch::Tensor out, uint64_t seed, int64_t chain, int64_t step, int64_t offset) {
  philox_rows(out, seed, {chain}, step, offset);
}

void philox_normal_rows_cpu_(torch::Tensor out, uint64_t seed, std::vector<int64_t> chains, int64_t step,
                             int64_t offset) {
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == static_cast<int64_t>(chains.size()),
                    "out must be [chains, N] with one row per chain id");
  philox_rows(out, seed, chains, step, offset);
}

}  // namespace bif_fast
