// Python bindings of the CPU extension fasttricks._C.
#include <torch/extension.h>

#include <array>

#include "fasttricks/table.h"
#include "host/device_table.h"
#include "host/plans.h"

namespace ftc = fasttricks::cpu;

namespace {

// The hyper-parameter records: namedtuples with these fields, in this order
// (exported as ADAM_HYPER_FIELDS / SGD_HYPER_FIELDS; tests/test_plan_cache.py
// holds them equal to fasttricks.ops' records).
constexpr std::array<const char*, 8> kAdamFields{"lr", "beta1", "beta2", "eps", "weight_decay", "maximize",
                                                 "grad_mul", "round_key"};
constexpr std::array<const char*, 7> kSgdFields{"lr", "weight_decay", "momentum", "dampening", "maximize",
                                                "grad_mul", "round_key"};

// Field i of a record: by position from a tuple of the right length (a
// getattr by name costs a string lookup per field, cold, every step), else
// by name, which fails loudly on a missing field.
template <size_t N>
py::object field(py::handle record, const std::array<const char*, N>& names, size_t i) {
  PyObject* r = record.ptr();
  if (PyTuple_Check(r) && static_cast<size_t>(PyTuple_GET_SIZE(r)) == N) {
    return py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(r, i));
  }
  return record.attr(names[i]);
}

template <size_t N>
py::tuple names_tuple(const std::array<const char*, N>& names) {
  py::tuple out(N);
  for (size_t i = 0; i < N; ++i) out[i] = py::str(names[i]);
  return out;
}

ftc::AdamHyper adam_hyper(py::handle h) {
  auto f = [&](size_t i) { return field(h, kAdamFields, i); };
  return {py::float_(f(0)), py::float_(f(1)), py::float_(f(2)), py::float_(f(3)), py::float_(f(4)),
          f(5).cast<bool>(), py::float_(f(6)), static_cast<uint32_t>(f(7).cast<uint64_t>())};
}

ftc::SgdHyper sgd_hyper(py::handle h) {
  auto f = [&](size_t i) { return field(h, kSgdFields, i); };
  return {py::float_(f(0)), py::float_(f(1)), py::float_(f(2)), py::float_(f(3)), f(4).cast<bool>(),
          py::float_(f(5)), static_cast<uint32_t>(f(6).cast<uint64_t>())};
}

// What both plan classes bind alike: step (reading the family's hyper
// record with `hyper`), set_averages, check and len; the constructor and
// family-only methods are added by the caller.
template <typename Plan, auto hyper>
py::class_<Plan> bind_plan(py::module_& m, const char* name) {
  return py::class_<Plan>(m, name, py::dynamic_attr())
      .def("step",
           [](Plan& plan, py::handle record, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, double avg_coef) {
             return plan.step(hyper(record), grad_scale, found_inf, avg_coef);
           },
           py::arg("hyper"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("avg_coef"))
      .def("set_averages", &Plan::set_averages)
      .def("check", &Plan::check)
      .def("__len__", &Plan::size);
}

}  // namespace

namespace fasttricks {
namespace cpu {
void mixup_blend_rows(const at::Tensor& x, const at::Tensor& out, const at::Tensor& lam,
                      const std::optional<at::Tensor>& perm);
std::tuple<at::Tensor, at::Tensor> soft_ce_forward(const at::Tensor& logits, const at::Tensor& y_a,
                                                   const at::Tensor& y_b, const at::Tensor& lam, double on,
                                                   double off);
at::Tensor total_norm(const std::vector<at::Tensor>& tensors, double norm_type);
at::Tensor soft_ce_backward(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& y_a,
                            const at::Tensor& y_b, const at::Tensor& lam, const at::Tensor& grad_loss,
                            double on, double off);
}  // namespace cpu
}  // namespace fasttricks

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttricks fused CPU kernels (at::vec, one parallel region per step)";
  m.attr("simd") = py::str(
#if defined(CPU_CAPABILITY_AVX512)
      "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
      "avx2"
#else
      "default"
#endif
  );

  // NOTE [pointer table]: the C++ row numbers, for tests/test_plan_cache.py.
  {
    using A = fasttricks::table::adam;
    using S = fasttricks::table::sgd;
    py::dict rows;
    rows["chunk"] = fasttricks::table::kChunk;
    rows["adam"] = py::make_tuple(A::kParam, A::kGrad, A::kExpAvg, A::kExpAvgSq, A::kMaxExpAvgSq, A::kMaster,
                                  A::kAvg, A::kStep, A::kKey, A::kRows);
    rows["sgd"] = py::make_tuple(S::kParam, S::kGrad, S::kMomentumBuffer, S::kMaster, S::kAvg, S::kFirst, S::kKey,
                                 S::kRows);
    m.attr("TABLE") = rows;
    m.attr("ADAM_HYPER_FIELDS") = names_tuple(kAdamFields);
    m.attr("SGD_HYPER_FIELDS") = names_tuple(kSgdFields);
  }

  m.def("mixup_blend_rows", &ftc::mixup_blend_rows, py::arg("x"), py::arg("out"), py::arg("lam"),
        py::arg("perm") = py::none(),
        "Mixup blend of [B, D] rows: flip pairing (perm=None, may be in place; an odd middle row is not written) "
        "or a permutation");

  m.def("soft_ce_forward", &ftc::soft_ce_forward, py::arg("logits"), py::arg("y_a"), py::arg("y_b"),
        py::arg("lam"), py::arg("on"), py::arg("off"),
        "Cross-entropy against a factored mixup target: (loss[B], lse[B]) in float32, no B x C buffer");
  m.def("soft_ce_backward", &ftc::soft_ce_backward, py::arg("logits"), py::arg("lse"), py::arg("y_a"),
        py::arg("y_b"), py::arg("lam"), py::arg("grad_loss"), py::arg("on"), py::arg("off"),
        "Its gradient with respect to the logits, in their dtype");

  m.def("total_norm", &ftc::total_norm, py::arg("tensors"), py::arg("norm_type"),
        "The norm (2 or inf) of the tensors taken as one vector: float32 (float64 if one is), one parallel pass");

  bind_plan<ftc::AdamPlan, adam_hyper>(m, "AdamPlan")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, bool,
                    bool, std::vector<int64_t>, bool>(),
           py::arg("params"), py::arg("steps"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
           py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("amsgrad"), py::arg("decoupled"),
           py::arg("rounding") = std::vector<int64_t>{}, py::arg("stochastic_rounding") = false);

  bind_plan<ftc::SgdPlan, sgd_hyper>(m, "SgdPlan")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<bool>, bool, bool, std::vector<int64_t>, bool>(),
           py::arg("params"), py::arg("momentum_buffers"), py::arg("masters"),
           py::arg("first_step"), py::arg("nesterov"), py::arg("decoupled"),
           py::arg("rounding") = std::vector<int64_t>{}, py::arg("stochastic_rounding") = false)
      .def("first_step_flags", &ftc::SgdPlan::first_step_flags);

  py::class_<ftc::DeviceTable>(m, "DeviceTable")
      .def(py::init<std::string, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, int64_t,
                    int64_t, int64_t, std::vector<at::ScalarType>, int64_t>(),
           py::arg("op"), py::arg("params"), py::arg("rows"), py::arg("n_state_rows"), py::arg("step_row"),
           py::arg("n_flag_rows"), py::arg("row_dtypes"), py::arg("chunk"))
      .def("gather",
           [](ftc::DeviceTable& t) {
             auto packed = t.gather();
             py::object tables = packed.n ? py::cast(packed.tables) : py::none();
             return py::make_tuple(packed.n, tables, py::cast(packed.writeback), py::cast(packed.keep));
           },
           "(n, tables or None, writeback, keep): see fasttricks/ops/_device.py")
      .def("unbump_steps", &ftc::DeviceTable::unbump_steps)
      .def("set_row", &ftc::DeviceTable::set_row)
      .def("set_flags", &ftc::DeviceTable::set_flags)
      .def("flags", &ftc::DeviceTable::flags)
      .def("any_gathered_flag", &ftc::DeviceTable::any_gathered_flag)
      .def("clear_gathered_flags", &ftc::DeviceTable::clear_gathered_flags);
}
