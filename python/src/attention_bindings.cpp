// scaletrain._C.attention: which flash attention kernels run. Bindings only (the operators
// themselves are registered with torch's dispatcher by the library).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scaletrain/attention/flash_attention.h"

namespace py = pybind11;

namespace scaletrain::python {

void bind_attention(py::module_& parent) {
  py::module_ m = parent.def_submodule("attention", "flash attention: which kernels run");
  m.def("cuda_hopper_kernels", &attention::cuda_hopper_kernels,
        "Whether CUDA calls on the current device run the Hopper kernels (a build for sm_90, a compute "
        "capability 9.0 device, SCALETRAIN_FLASH_SM90 not '0').");
  m.def("cuda_last_forward_kernel", &attention::cuda_last_forward_kernel,
        "The CUDA forward kernel this thread launched last: 'portable', 'cpasync', 'persistent/N' or "
        "'blocks/N' (N consumer warpgroups); '' before the first.");
}

}  // namespace scaletrain::python
