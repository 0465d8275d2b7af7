// scaletrain._C.optim: the fused AdamW step as a function over lists of tensors, and the core of
// scaletrain.optim.ZeroAdamW (python/scaletrain/optim.py). Bindings only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "scaletrain/optim/adamw.h"
#include "scaletrain/optim/zero_adamw.h"
#include "scaletrain/core/error.h"
#include "scaletrain/train/zero_checkpoint.h"

namespace py = pybind11;

namespace scaletrain::python {

namespace {

// A checkpoint that cannot be written or read: OSError in Python (the GIL is held here).
[[noreturn]] void raise_os_error(const core::IOError& e) {
  PyErr_SetString(PyExc_OSError, e.what());
  throw py::error_already_set();
}

}  // namespace

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

  // Per param group: (params, lr, beta1, beta2, eps, weight_decay).
  using Group = std::tuple<std::vector<at::Tensor>, double, double, double, double, double>;
  // The destructor runs without the GIL: when it drops the last reference of a Gloo group (the script
  // destroyed the process group first), the group joins its threads, which may need the GIL to free
  // a finished collective's Python tensors.
  py::class_<optim::ZeroAdamW>(m, "ZeroAdamWCore", "the C++ ZeroAdamW behind scaletrain.optim.ZeroAdamW",
                               py::release_gil_before_calling_cpp_dtor())
      .def(py::init([](const std::vector<Group>& groups, int64_t stage, bool cpu_offload, bool overlap_forward,
                       double offload_fraction, double bucket_mb, double max_grad_norm, bool average_gradients, const py::object& process_group,
                       const std::string& device_type, const std::vector<int64_t>& units) {
             std::vector<torch::optim::OptimizerParamGroup> param_groups;
             for (const auto& [params, lr, beta1, beta2, eps, weight_decay] : groups) {
               param_groups.emplace_back(params, std::make_unique<optim::ZeroAdamWOptions>(
                                                     optim::ZeroAdamWOptions(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay)));
             }
             auto defaults = optim::ZeroAdamWOptions()
                                 .stage(stage)
                                 .cpu_offload(cpu_offload)
                                 .overlap_forward(overlap_forward)
                                 .offload_fraction(offload_fraction)
                                 .bucket_mb(bucket_mb)
                                 .max_grad_norm(max_grad_norm)
                                 .average_gradients(average_gradients);
             dist::ProcessGroup group;
             if (!process_group.is_none()) {
               group = dist::ProcessGroup::adopt(process_group.cast<c10::intrusive_ptr<c10d::ProcessGroup>>(), device_type);
             }
             try {
               return std::make_unique<optim::ZeroAdamW>(param_groups, defaults, group, units);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }),
           py::arg("groups"), py::arg("stage"), py::arg("cpu_offload"), py::arg("overlap_forward"),
           py::arg("offload_fraction"), py::arg("bucket_mb"), py::arg("max_grad_norm"),
           py::arg("average_gradients"), py::arg("process_group"), py::arg("device_type"),
           py::arg("units") = std::vector<int64_t>{})
      .def(
          "set_group",
          [](optim::ZeroAdamW& self, size_t index, double lr, double beta1, double beta2, double eps,
             double weight_decay) {
            auto& options = static_cast<optim::ZeroAdamWOptions&>(self.param_groups().at(index).options());
            options.lr(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay);
          },
          py::arg("index"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"))
      .def(
          "step",
          [](optim::ZeroAdamW& self, const std::optional<at::Tensor>& inv_scale) {
            py::gil_scoped_release release;  // collectives wait; autograd hooks of other threads may need the GIL
            auto result = self.step_scaled(inv_scale.value_or(at::Tensor()));
            return std::make_tuple(result.found_inf, result.norm);
          },
          py::arg("inv_scale") = py::none())
      .def("gather_state",
           [](const optim::ZeroAdamW& self) {
             std::vector<std::tuple<double, at::Tensor, at::Tensor, std::optional<at::Tensor>>> out;
             {
               py::gil_scoped_release release;
               for (auto& s : self.gather_state()) {
                 out.emplace_back(s.step, s.exp_avg, s.exp_avg_sq,
                                  s.master.defined() ? std::optional<at::Tensor>(s.master) : std::nullopt);
               }
             }
             return out;
           })
      .def(
          "scatter_state",
          [](optim::ZeroAdamW& self,
             const std::vector<std::tuple<double, at::Tensor, at::Tensor, std::optional<at::Tensor>>>& entries) {
            std::vector<optim::ZeroParamState> state;
            for (const auto& [step, exp_avg, exp_avg_sq, master] : entries) {
              state.push_back({step, exp_avg, exp_avg_sq, master.value_or(at::Tensor())});
            }
            try {
              py::gil_scoped_release release;
              self.scatter_state(state);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("state"))
      .def(
          "save_sharded",
          [](const optim::ZeroAdamW& self, const std::string& dir, int64_t step, const std::map<std::string, py::bytes>& files) {
            std::vector<std::pair<std::string, std::string>> contents;
            for (const auto& [name, data] : files) contents.emplace_back(name, std::string(data));
            try {
              py::gil_scoped_release release;  // collectives
              return train::save_sharded(train::CheckpointStore(dir), step, self, contents);
            } catch (const core::IOError& e) {
              raise_os_error(e);
            }
          },
          py::arg("dir"), py::arg("step"), py::arg("files"))
      .def(
          "load_sharded",
          [](optim::ZeroAdamW& self, const std::string& dir, std::optional<int64_t> step) {
            train::Checkpoint checkpoint;
            try {
              py::gil_scoped_release release;
              train::CheckpointStore store(dir);
              if (step) {
                checkpoint = store.load(*step);
              } else {
                auto latest = store.latest_valid();
                if (!latest) throw core::IOError("checkpoint folder '" + dir + "': no valid checkpoint");
                checkpoint = std::move(*latest);
              }
              train::load_sharded(checkpoint, self);
            } catch (const core::IOError& e) {
              raise_os_error(e);
            }
            py::dict files;
            for (const auto& [name, contents] : checkpoint.files) {
              if (!train::is_shard_file(name)) files[py::str(name)] = py::bytes(contents);
            }
            return py::make_tuple(checkpoint.step, files);
          },
          py::arg("dir"), py::arg("step") = py::none())
      .def("zero_grad", [](optim::ZeroAdamW& self) { self.zero_grad(); })
      // Stage 3: collectives (the GIL released: backward hooks of other threads may need it).
      .def("num_units", &optim::ZeroAdamW::num_units)
      .def("gather_unit", &optim::ZeroAdamW::gather_unit, py::arg("unit"), py::arg("prefetch") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def("release_unit", &optim::ZeroAdamW::release_unit, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("prepare_backward", &optim::ZeroAdamW::prepare_backward, py::arg("unit"), py::arg("prefetch") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def("gather_parameters", &optim::ZeroAdamW::gather_parameters, py::call_guard<py::gil_scoped_release>())
      .def("release_parameters", &optim::ZeroAdamW::release_parameters, py::call_guard<py::gil_scoped_release>())
      .def("wait_parameter", &optim::ZeroAdamW::wait_parameter, py::arg("index"),
           py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &optim::ZeroAdamW::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("set_gradient_sync", &optim::ZeroAdamW::set_gradient_sync, py::arg("sync"))
      .def("gradient_sync", &optim::ZeroAdamW::gradient_sync)
      .def("memory",
           [](const optim::ZeroAdamW& self) {
             auto memory = self.memory();
             py::dict d;
             d["parameter_bytes"] = memory.parameter_bytes;
             d["gradient_bytes"] = memory.gradient_bytes;
             d["optimizer_bytes"] = memory.optimizer_bytes;
             d["host_bytes"] = memory.host_bytes;
             return d;
           })
      .def("shard_numel", [](const optim::ZeroAdamW& self) { return self.layout().shard_numel(); })
      .def("total_numel", [](const optim::ZeroAdamW& self) { return self.layout().total_numel; })
      .def("bucket_count", [](const optim::ZeroAdamW& self) { return self.layout().buckets.size(); })
      .def("rank", [](const optim::ZeroAdamW& self) { return self.process_group().rank(); })
      .def("world_size", [](const optim::ZeroAdamW& self) { return self.process_group().size(); });
}

}  // namespace scaletrain::python
