#include "scaletrain/plan/memory.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>

#include <fmt/format.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA

#ifdef SCALETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace scaletrain::plan {

double gpt_parameter_count(const model::GPTOptions& options) {
  const double vocab = static_cast<double>(options.padded_vocab_size());
  const double width = static_cast<double>(options.n_embd());
  const double bias = options.bias() ? 1 : 0;
  const double layer_norm = width * (1 + bias);
  // ln1, qkv (3E x E), attention proj (E x E), ln2, fc (4E x E), mlp proj (E x 4E)
  const double block = 2 * layer_norm + (3 * width * width + bias * 3 * width) + (width * width + bias * width) +
                       (4 * width * width + bias * 4 * width) + (4 * width * width + bias * width);
  const double embedding = vocab * width;
  const double head = options.tie_embeddings() ? 0 : vocab * width;  // lm_head has no bias
  return embedding + static_cast<double>(options.n_layer()) * block + layer_norm + head;
}

ModelStateBytes model_state_bytes(const model::GPTOptions& model, const amp::AmpOptions& amp, const ZeroPlan& zero) {
  ModelStateBytes bytes;
  bytes.parameters = gpt_parameter_count(model);
  const double n = bytes.parameters;
  const bool low = amp.low_precision_params() && amp.precision() != amp::Precision::fp32;
  const double element = low ? 2 : 4;
  bytes.buffers = 2.0 * static_cast<double>(model.block_size()) * static_cast<double>(model.head_dim() / 2) * 4;
  if (zero.stage == 0) {
    bytes.weights = n * element;
    bytes.gradients = n * element + (low ? n * 4 : 0);
    bytes.master = low ? n * 4 : 0;
    bytes.optimizer = n * 8;
    return bytes;
  }
  // ZeroAdamW: this rank's shard of the state (fp32 master with low-precision parameters; the
  // gradients reduced into the shard in the model's dtype, no fp32 copy), `off` of it on the host.
  const double shard = n / static_cast<double>(std::max<int64_t>(zero.world, 1));
  const double off = zero.cpu_offload ? zero.offload_fraction : 0.0;
  bytes.weights = (zero.stage == 3 ? shard : n) * element;
  bytes.gradients = zero.stage == 1 ? n * element : (1 - off) * shard * element;
  bytes.master = low ? (1 - off) * shard * 4 : 0;
  bytes.optimizer = (1 - off) * shard * 8;
  bytes.host = off * shard * 16;  // master, exp_avg, exp_avg_sq, gradient chunk and copy back
  return bytes;
}

namespace {

double host_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  double total = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0;
  // A container's limit (cgroup v2) is what the process can have.
  std::ifstream limit("/sys/fs/cgroup/memory.max");
  std::string text;
  if (limit >> text && text != "max") {
    try {
      const double cap = std::stod(text);
      if (cap > 0 && (total == 0 || cap < total)) total = cap;
    } catch (const std::exception&) {
    }
  }
  return total;
}

}  // namespace

double device_memory_bytes(const c10::Device& device) {
#ifdef SCALETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    try {
      return static_cast<double>(at::cuda::getDeviceProperties(device.has_index() ? device.index() : 0)->totalGlobalMem);
    } catch (const std::exception&) {
      return 0;
    }
  }
#endif
  return device.is_cpu() ? host_memory_bytes() : 0;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  size_t unit = 0;
  while (bytes >= 1024 && unit + 1 < sizeof(units) / sizeof(units[0])) bytes /= 1024, ++unit;
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, units[unit]);
}

void check_model_fits(const model::GPTOptions& model, const amp::AmpOptions& amp, const c10::Device& device,
                      const ZeroPlan& zero) {
  const ModelStateBytes bytes = model_state_bytes(model, amp, zero);
  auto refuse = [&](double needed, const char* what, const std::string& where, double available) {
    throw core::ConfigError(
        "model", fmt::format("model: {:.4g} parameters (model.n_layer {}, model.n_embd {}, model.vocab_size {}) need "
                             "{} for {}, but {} has {}; expected a smaller model",
                             bytes.parameters, model.n_layer(), model.n_embd(), model.vocab_size(),
                             format_bytes(needed), what, where, format_bytes(available)));
  };
  const double on_device = device_memory_bytes(device);
  if (on_device > 0 && bytes.total() > on_device)
    refuse(bytes.total(), "weights, gradients and AdamW state before any activation", device.str(), on_device);
  // The model is built in fp32 on the host, then moved: the host must hold that copy too.
  const double host = device_memory_bytes(c10::Device(c10::kCPU));
  const double built = bytes.parameters * 4 + bytes.buffers;
  if (!device.is_cpu() && host > 0 && built > host) refuse(built, "the fp32 weights built on the host", "the host", host);
  if (bytes.host > 0 && !device.is_cpu() && host > 0 && bytes.host > host)
    refuse(bytes.host, "AdamW state offloaded to the host (optim.offload_fraction)", "the host", host);
}

}  // namespace scaletrain::plan
