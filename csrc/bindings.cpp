// Python bindings of bif_fast._C. Argument checks raise ValueError (TORCH_CHECK_VALUE) with the
// argument's name; the Python wrapper in bif_fast/ops.py validates first and gives fuller messages.
#include <torch/extension.h>

#include <string>
#include <unordered_map>
#include <vector>

#include "running_cov.h"

namespace bif_fast {
void sgld_update_cpu_(torch::Tensor w, torch::Tensor grad, torch::Tensor anchor, c10::optional<torch::Tensor> state,
                      c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> out,
                      c10::optional<torch::Tensor> diverged, int64_t sampler, bool has_bbox, int64_t offset,
                      uint64_t seed, int64_t chain, int64_t step, const std::unordered_map<std::string, double>& coefs);
void philox_normal_cpu_(torch::Tensor out, uint64_t seed, int64_t chain, int64_t step, int64_t offset);
void sgld_update_rows_cpu_(torch::Tensor w, torch::Tensor grad, torch::Tensor anchor,
                           c10::optional<torch::Tensor> state, c10::optional<torch::Tensor> noise,
                           c10::optional<torch::Tensor> out, c10::optional<torch::Tensor> diverged, int64_t sampler,
                           bool has_bbox, int64_t offset, uint64_t seed, std::vector<int64_t> chains, int64_t step,
                           const std::unordered_map<std::string, double>& coefs);
void philox_normal_rows_cpu_(torch::Tensor out, uint64_t seed, std::vector<int64_t> chains, int64_t step,
                             int64_t offset);
}  // namespace bif_fast

#define CHECK_FLOAT_STATE(x)                                                                                  \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kDouble || (x).scalar_type() == at::kFloat,                      \
                    #x " must be float32 or float64, got ", (x).scalar_type())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, d) TORCH_CHECK_VALUE((x).dim() == (d), #x " must have ", d, " dims, got ", (x).dim())
#define CHECK_SAME_DEVICE(x, ref) \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x " is on ", (x).device(), " but the state is on ", (ref).device())
#define CHECK_SIZE(x, d, expected) \
  TORCH_CHECK_VALUE((x).size(d) == (expected), #x ".size(", d, ") must be ", expected, ", got ", (x).size(d))
#define CHECK_FLOATING(x) \
  TORCH_CHECK_VALUE(at::isFloatingType((x).scalar_type()), #x " must be floating point, got ", (x).scalar_type())

namespace {

void check_state(const torch::Tensor& comoment, const torch::Tensor& mean_x, const torch::Tensor& mean_y,
                 const torch::Tensor& m2_x, const torch::Tensor& m2_y, int64_t count) {
  CHECK_FLOAT_STATE(comoment);
  CHECK_DIM(comoment, 2);
  CHECK_CONTIGUOUS(comoment);
  const int64_t n = comoment.size(0);
  const int64_t p = comoment.size(1);
  for (const auto* t : {&mean_x, &mean_y, &m2_x, &m2_y}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous(), "state vectors must be contiguous 1-D tensors");
    CHECK_SAME_DEVICE(*t, comoment);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kDouble, "state vectors (means, m2) must be float64, got ",
                      t->scalar_type());
  }
  CHECK_SIZE(mean_x, 0, n);
  CHECK_SIZE(m2_x, 0, n);
  CHECK_SIZE(mean_y, 0, p);
  CHECK_SIZE(m2_y, 0, p);
  TORCH_CHECK_VALUE(count >= 0, "count must be non-negative, got ", count);
}

void update(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y, torch::Tensor m2_x,
            torch::Tensor m2_y, int64_t count, const torch::Tensor& x, const torch::Tensor& y, bool fused) {
  check_state(comoment, mean_x, mean_y, m2_x, m2_y, count);
  CHECK_DIM(x, 2);
  CHECK_DIM(y, 2);
  CHECK_FLOATING(x);
  CHECK_FLOATING(y);
  CHECK_SAME_DEVICE(x, comoment);
  CHECK_SAME_DEVICE(y, comoment);
  CHECK_SIZE(x, 1, comoment.size(0));
  CHECK_SIZE(y, 1, comoment.size(1));
  TORCH_CHECK_VALUE(x.size(0) == y.size(0), "x and y must hold the same number of draws, got ", x.size(0), " and ",
                    y.size(0));
  bif_fast::running_cov_update_(comoment, mean_x, mean_y, m2_x, m2_y, count, x, y, fused);
}

void merge(torch::Tensor comoment, torch::Tensor mean_x, torch::Tensor mean_y, torch::Tensor m2_x,
           torch::Tensor m2_y, int64_t count, const torch::Tensor& o_comoment, const torch::Tensor& o_mean_x,
           const torch::Tensor& o_mean_y, const torch::Tensor& o_m2_x, const torch::Tensor& o_m2_y,
           int64_t o_count) {
  check_state(comoment, mean_x, mean_y, m2_x, m2_y, count);
  TORCH_CHECK_VALUE(o_comoment.sizes() == comoment.sizes(), "the other accumulator has shape ", o_comoment.sizes(),
                    ", expected ", comoment.sizes());
  for (const auto* t : {&o_comoment, &o_mean_x, &o_mean_y, &o_m2_x, &o_m2_y}) CHECK_SAME_DEVICE(*t, comoment);
  TORCH_CHECK_VALUE(o_count >= 0, "other count must be non-negative, got ", o_count);
  bif_fast::running_cov_merge_(comoment, mean_x, mean_y, m2_x, m2_y, count, o_comoment, o_mean_x, o_mean_y, o_m2_x,
                               o_m2_y, o_count);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bif_fast._C: device-resident running centred cross-covariance (rank-k Chan updates)";
  m.def("running_cov_update_", &update, "Rank-k in-place update of a running cross-covariance state",
        py::arg("comoment"), py::arg("mean_x"), py::arg("mean_y"), py::arg("m2_x"), py::arg("m2_y"), py::arg("count"),
        py::arg("x"), py::arg("y"), py::arg("fused") = false);
  m.def("running_cov_merge_", &merge, "In-place Chan merge of another state", py::arg("comoment"),
        py::arg("mean_x"), py::arg("mean_y"), py::arg("m2_x"), py::arg("m2_y"), py::arg("count"),
        py::arg("other_comoment"), py::arg("other_mean_x"), py::arg("other_mean_y"), py::arg("other_m2_x"),
        py::arg("other_m2_y"), py::arg("other_count"));
  m.def("running_cov_covariance", &bif_fast::running_cov_covariance, "Unbiased covariance from the co-moment",
        py::arg("comoment"), py::arg("count"));
  m.def("running_cov_correlation", &bif_fast::running_cov_correlation,
        "Pearson correlation from the state; 0 for constant streams", py::arg("comoment"), py::arg("mean_x"),
        py::arg("mean_y"), py::arg("m2_x"), py::arg("m2_y"), py::arg("count"));
  m.def("sgld_update_cpu_", &bif_fast::sgld_update_cpu_,
        "Fused CPU sampler step over flat buffers (sampler 0 sgld, 1 rmsprop-sgld, 2 baoab)", py::arg("w"),
        py::arg("grad"), py::arg("anchor"), py::arg("state"), py::arg("noise"), py::arg("out"), py::arg("diverged"),
        py::arg("sampler"), py::arg("has_bbox"), py::arg("offset"), py::arg("seed"), py::arg("chain"), py::arg("step"),
        py::arg("coefs"));
  m.def("philox_normal_cpu_", &bif_fast::philox_normal_cpu_, "Fill out with the sampler's Philox noise",
        py::arg("out"), py::arg("seed"), py::arg("chain"), py::arg("step"), py::arg("offset"));
  m.def("sgld_update_rows_cpu_", &bif_fast::sgld_update_rows_cpu_,
        "sgld_update_cpu_ for [C, N] buffers, row r keyed by chain chains[r] (one call for a batch of chains)",
        py::arg("w"), py::arg("grad"), py::arg("anchor"), py::arg("state"), py::arg("noise"), py::arg("out"),
        py::arg("diverged"), py::arg("sampler"), py::arg("has_bbox"), py::arg("offset"), py::arg("seed"),
        py::arg("chains"), py::arg("step"), py::arg("coefs"));
  m.def("philox_normal_rows_cpu_", &bif_fast::philox_normal_rows_cpu_,
        "philox_normal_cpu_ for [C, N] rows, row r keyed by chain chains[r]", py::arg("out"), py::arg("seed"),
        py::arg("chains"), py::arg("step"), py::arg("offset"));
  m.def("built_with_cuda", &bif_fast::built_with_cuda, "Whether the fused CUDA kernels were compiled in");
}
