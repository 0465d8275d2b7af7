// scaletrain._C.optim: the fused AdamW step as a function over lists of tensors. Bindings only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "scaletrain/optim/adamw.h"

namespace py = pybind11;

namespace scaletrain::python {

void bind_optim(py::module_& parent) {
  py::module_ m = parent.def_submodule("optim", "optimizer kernels");
  m.def(
      "adamw_step_",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
         const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& copies, double lr, double beta1,
         double beta2, double eps, double weight_decay, const std::optional<at::Tensor>& factor,
         const std::optional<at::Tensor>& found_inf) {
        const auto options =
            torch::optim::AdamWOptions(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay);
        try {
          optim::adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, copies, options,
                             optim::StepScale{factor.value_or(at::Tensor()), found_inf.value_or(at::Tensor())});
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
      py::arg("copies"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("factor") = py::none(), py::arg("found_inf") = py::none(),
      "One fused AdamW step (torch.optim.AdamW arithmetic) over fp32 params with fp32/bf16/fp16 grads, fp32 "
      "moments and one-element float32 step counts (incremented); copies (bf16/fp16, or []) receive the updated "
      "values. Each gradient is multiplied by factor; found_inf != 0 skips the step. Both are read on the device.");
}

}  // namespace scaletrain::python
