#include "scaletrain/train/profile.h"

#include <algorithm>
#include <map>
#include <set>
#include <stdexcept>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

#include "scaletrain/core/fs.h"

namespace scaletrain::train {
namespace {

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

const std::set<impl::ActivityType>& activities() {
  static const std::set<impl::ActivityType> kinds{impl::ActivityType::CUDA};
  return kinds;
}

impl::ProfilerConfig config() { return impl::ProfilerConfig(impl::ProfilerState::KINETO); }

void synchronize() {
  if (torch::cuda::is_available()) torch::cuda::synchronize();
}

}  // namespace

StepProfiler::StepProfiler(ProfileWindow window) : window_(std::move(window)) {
  if (window_.first_step < 0 || window_.steps < 1)
    throw std::invalid_argument("--profile-steps: got " + std::to_string(window_.first_step) + "," +
                                std::to_string(window_.steps) + ", expected FIRST,COUNT with FIRST >= 0 and COUNT >= 1");
}

void StepProfiler::check(int64_t from_step, int64_t max_steps) const {
  if (window_.path.empty()) return;
  const int64_t last = window_.first_step + window_.steps;
  if (window_.first_step < from_step || last > max_steps)
    throw std::invalid_argument("--profile-steps: steps " + std::to_string(window_.first_step) + " to " +
                                std::to_string(last - 1) + " are not all in this run (steps " +
                                std::to_string(from_step) + " to " + std::to_string(max_steps - 1) + ")");
  const std::string folder = core::parent_directory(window_.path);
  if (!folder.empty() && !core::path_exists(folder))
    throw std::invalid_argument("--profile: folder '" + folder + "' does not exist");
}

void StepProfiler::before_step(int64_t step) {
  if (window_.path.empty() || step != window_.first_step) return;
  synchronize();
  prof::prepareProfiler(config(), activities());
  prof::enableProfiler(config(), activities());
  active_ = true;
  start_ = std::chrono::steady_clock::now();
}

void StepProfiler::after_step(int64_t step) {
  if (!active_ || step != window_.first_step + window_.steps - 1) return;
  synchronize();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  const std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
  active_ = false;
  struct Total {
    int64_t count = 0;
    double ms = 0;
  };
  std::map<std::string, Total> kernels;
  for (const auto& event : result->events()) {
    if (event.deviceType() != c10::DeviceType::CUDA) continue;
    auto& total = kernels[event.name()];
    total.count += 1;
    total.ms += static_cast<double>(event.durationNs()) / 1e6;
  }
  std::vector<std::pair<std::string, Total>> sorted(kernels.begin(), kernels.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  nlohmann::ordered_json j{{"first_step", window_.first_step}, {"steps", window_.steps}, {"wall_ms", wall_ms}};
  auto& list = j["kernels"] = nlohmann::ordered_json::array();
  for (const auto& [name, total] : sorted) list.push_back({{"name", name}, {"count", total.count}, {"total_ms", total.ms}});
  core::write_file_atomic(window_.path, j.dump(1) + "\n");
}

}  // namespace scaletrain::train
