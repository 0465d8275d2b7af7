// scaletrain._C.amp: the loss scaler's bookkeeping and the fused gradient pass. Bindings only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "scaletrain/amp/grad_check.h"
#include "scaletrain/amp/loss_scaler.h"

namespace py = pybind11;

namespace scaletrain::python {

void bind_amp(py::module_& parent) {
  py::module_ m = parent.def_submodule("amp", "mixed precision: loss scaling and the fused gradient pass");
  m.def(
      "unscale_check_clip_",
      [](const std::vector<at::Tensor>& grads, double inv_scale, double max_norm) {
        return amp::unscale_check_clip_(grads, inv_scale, max_norm).values;
      },
      py::arg("grads"), py::arg("inv_scale"), py::arg("max_norm") = 0.0,
      "Unscale gradients in place, detect inf/NaN and clip the global norm (max_norm > 0) in one fused pass. "
      "Returns a float tensor [found_inf, norm] on the gradients' device without synchronising.");
  m.def(
      "gradient_factor",
      [](const std::vector<at::Tensor>& grads, double inv_scale, double max_norm) {
        const auto r = amp::gradient_factor(grads, inv_scale, max_norm);
        return py::make_tuple(r.values, r.factor);
      },
      py::arg("grads"), py::arg("inv_scale"), py::arg("max_norm") = 0.0,
      "The checks of unscale_check_clip_ without writing the gradients (one read-only pass). Returns "
      "([found_inf, norm], factor): device tensors; factor = inv_scale * clip coefficient, for a fused optimizer "
      "to apply (scaletrain._C.optim.adamw_step_).");

  py::class_<amp::LossScaler>(m, "LossScalerCore",
                              "Scale bookkeeping of a dynamic loss scaler (scaletrain.amp.LossScaler wraps it).")
      .def(py::init([](double init_scale, double growth_factor, double backoff_factor, int64_t growth_interval,
                       int64_t hysteresis, double min_scale, double max_scale, bool dynamic) {
             try {
               return amp::LossScaler(amp::LossScalerOptions()
                                          .init_scale(init_scale)
                                          .growth_factor(growth_factor)
                                          .backoff_factor(backoff_factor)
                                          .growth_interval(growth_interval)
                                          .hysteresis(hysteresis)
                                          .min_scale(min_scale)
                                          .max_scale(max_scale)
                                          .dynamic(dynamic));
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }),
           py::arg("init_scale"), py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"),
           py::arg("hysteresis"), py::arg("min_scale"), py::arg("max_scale"), py::arg("dynamic"))
      .def("get_scale", &amp::LossScaler::get_scale)
      .def("skipped_steps", &amp::LossScaler::skipped_steps)
      .def("update", py::overload_cast<bool>(&amp::LossScaler::update), py::arg("found_inf"))
      .def("state", [](const amp::LossScaler& s) {
        auto st = s.state_dict();
        return py::make_tuple(st.scale, st.growth_tracker, st.hysteresis_tracker, st.skipped_steps);
      })
      .def(
          "load_state",
          [](amp::LossScaler& s, double scale, int64_t growth_tracker, int64_t hysteresis_tracker,
             int64_t skipped_steps) {
            try {
              s.load_state_dict({scale, growth_tracker, hysteresis_tracker, skipped_steps});
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("scale"), py::arg("growth_tracker"), py::arg("hysteresis_tracker"), py::arg("skipped_steps"));
}

}  // namespace scaletrain::python
