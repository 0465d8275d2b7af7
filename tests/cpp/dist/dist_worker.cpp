// One rank of a multi-process test (tests/cpp/dist/*_test.cpp start several of these over Gloo on
// loopback with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun would).
//
//   scaletrain_dist_worker collectives [fallback]
//       every collective of dist::ProcessGroup against values computed here from all ranks' inputs.
//   scaletrain_dist_worker zero STAGE ACCUM CLIP FALLBACK LOSS_SCALE [SKIP_AT [DEVICE [OFFLOAD]]]
//       10 steps of ZeroAdamW against torch::optim::AdamW (LibTorch's) on the whole global batch in
//       this process; SKIP_AT: rank 0's loss is inf on that step (every rank must skip it); DEVICE
//       cuda: NCCL, one GPU per rank.
//   scaletrain_dist_worker zero_checkpoint save|die|load DIR STAGE OFFLOAD
//       6 steps against torch::optim::AdamW: save writes a sharded checkpoint after step 3 (and
//       trains on); die saves after step 3, then the last rank kills itself (SIGKILL) during the
//       save after step 5; load resumes from the newest valid checkpoint in DIR (on any number of
//       ranks, stage, offload) and trains steps 4 to 6.
//   scaletrain_dist_worker die
//       the last rank kills itself (SIGKILL) during a collective loop: the others must fail.
// Exit code 0 when every check holds; 1 with a message on stderr otherwise; 3 on a DistError.
#include <csignal>
#include <cstdio>
#include <functional>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include "scaletrain/dist/process_group.h"
#include "scaletrain/optim/zero_adamw.h"
#include "scaletrain/train/checkpoint.h"
#include "scaletrain/train/zero_checkpoint.h"

namespace {

using scaletrain::dist::ProcessGroup;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "CHECK FAILED: %s\n", what.c_str());
    ++failures;
  }
}

ProcessGroup join(bool fallbacks, const std::string& device = "cpu") {
  scaletrain::dist::GroupOptions options;
  options.device = device;
  options.timeout = std::chrono::seconds(30);
  options.force_fallbacks = fallbacks;
  return ProcessGroup::from_env(options);
}

// Rank r's input for the collectives: distinct per rank and element.
at::Tensor rank_values(int rank, int64_t n) { return at::arange(n, at::kFloat) * 10 + rank * 1000 + 1; }

void collectives(bool fallbacks) {
  ProcessGroup group = join(fallbacks);
  const int rank = group.rank();
  const int world = group.size();
  const int64_t n = 6;
  at::Tensor everyone_sum = at::zeros({n * world}, at::kFloat);
  at::Tensor everyone_max = at::full({n * world}, -1e30, at::kFloat);
  for (int r = 0; r < world; ++r) {
    everyone_sum += rank_values(r, n * world);
    everyone_max = at::maximum(everyone_max, rank_values(r, n * world) * (r % 2 == 0 ? 1 : -1));
  }
  at::Tensor all = rank_values(rank, n * world);
  group.all_reduce(all).wait();
  expect(at::equal(all, everyone_sum), "all_reduce sum");
  at::Tensor signed_values = rank_values(rank, n * world) * (rank % 2 == 0 ? 1 : -1);
  group.all_reduce(signed_values, scaletrain::dist::ReduceOp::max).wait();
  expect(at::equal(signed_values, everyone_max), "all_reduce max");

  at::Tensor chunk = at::empty({n}, at::kFloat);
  group.reduce_scatter(chunk, rank_values(rank, n * world)).wait();
  expect(at::equal(chunk, everyone_sum.narrow(0, rank * n, n)), "reduce_scatter into a separate output");
  at::Tensor in_place = rank_values(rank, n * world);
  at::Tensor own = in_place.narrow(0, rank * n, n);
  group.reduce_scatter(own, in_place).wait();
  expect(at::equal(own, everyone_sum.narrow(0, rank * n, n)), "reduce_scatter into the own chunk of the input");

  at::Tensor expected_gather = at::cat([&] {
    std::vector<at::Tensor> parts;
    for (int r = 0; r < world; ++r) parts.push_back(rank_values(r, n));
    return parts;
  }());
  at::Tensor gathered = at::zeros({n * world}, at::kFloat);
  group.all_gather(gathered, rank_values(rank, n)).wait();
  expect(at::equal(gathered, expected_gather), "all_gather");
  at::Tensor gathered_in_place = at::full({n * world}, -7.0, at::kFloat);
  gathered_in_place.narrow(0, rank * n, n).copy_(rank_values(rank, n));
  at::Tensor mine = gathered_in_place.narrow(0, rank * n, n);
  group.all_gather(gathered_in_place, mine).wait();
  expect(at::equal(gathered_in_place, expected_gather), "all_gather in place");

  at::Tensor broadcast = rank_values(rank, n);
  group.broadcast(broadcast, world - 1).wait();
  expect(at::equal(broadcast, rank_values(world - 1, n)), "broadcast from the last rank");
  group.barrier();
  expect(world == 1 || group.native_reduce_scatter() == !fallbacks, "reduce_scatter path as asked");
  std::printf("rank %d of %d (%s): collectives done\n", rank, world, group.backend_name().c_str());
}

// The model of the ZeroAdamW tests: odd sizes, so that buckets split unevenly and pad.
torch::nn::Sequential make_model() {
  torch::manual_seed(0);
  return torch::nn::Sequential(torch::nn::Linear(13, 37), torch::nn::Tanh(), torch::nn::Linear(37, 29),
                               torch::nn::Tanh(), torch::nn::Linear(29, 5));
}

// Weights (decayed) in group 0, biases (not decayed) in group 1.
template <typename Options>
std::vector<torch::optim::OptimizerParamGroup> groups_of(torch::nn::Sequential& model, Options options) {
  std::vector<at::Tensor> weights, biases;
  for (auto& named : model->named_parameters()) {
    (named.key().find("bias") != std::string::npos ? biases : weights).push_back(named.value());
  }
  auto decayed = std::make_unique<Options>(options);
  decayed->weight_decay(0.1);
  auto plain = std::make_unique<Options>(options);
  plain->weight_decay(0.0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(weights, std::move(decayed));
  groups.emplace_back(biases, std::move(plain));
  return groups;
}

// Stage 3's units: one per Linear (weight and bias), in forward order; groups_of lists the weights,
// then the biases.
std::vector<int64_t> units_of(torch::nn::Sequential& model) {
  std::vector<int64_t> units;
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t unit = 0; unit < 3; ++unit) units.push_back(unit);
  }
  expect(units.size() == model->parameters().size(), "one unit entry per parameter");
  return units;
}

// The model's forward; stage 3 runs each Linear as its unit (gathered, run, freed; backward gathers
// it again). `inside` sees the optimizer within each unit's forward.
at::Tensor forward(torch::nn::Sequential& model, scaletrain::optim::ZeroAdamW& adamw, at::Tensor x,
                   const std::function<void(int64_t)>& inside = {}) {
  int64_t unit = 0;
  for (size_t i = 0; i < model->size(); ++i) {
    auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(model->ptr(i));
    if (!linear) {
      x = at::tanh(x);
      continue;
    }
    const int64_t u = unit++;
    x = adamw.run_unit(u, [&] {
      if (inside) inside(u);
      return linear->forward(x);
    });
  }
  return x;
}

// The parameters' values (stage 3 gathers them for the copy).
std::vector<at::Tensor> values_of(torch::nn::Sequential& model, scaletrain::optim::ZeroAdamW& adamw) {
  adamw.gather_parameters();
  std::vector<at::Tensor> values;
  for (auto& p : model->parameters()) values.push_back(p.detach().clone());
  adamw.release_parameters();
  return values;
}

double relative_error(const at::Tensor& got, const at::Tensor& expected) {
  return (got - expected).abs().max().item<double>() / std::max(expected.abs().max().item<double>(), 1e-12);
}

void zero(int64_t stage, int64_t accum, double clip, bool fallbacks, double loss_scale, int skip_at,
          const std::string& device_name, int offload) {
  ProcessGroup group = join(fallbacks, device_name);
  // The group may be one process alone: the tensors' device is then the one asked for.
  at::Device device = device_name == "cpu" ? at::Device(at::kCPU) : at::Device(at::kCUDA, 0);
  const int64_t rank = group.rank();
  const int64_t world = group.size();
  const int64_t rows = 12;  // per micro-step, global: divisible by 1, 2, 3 and 4 ranks
  const int steps = 10;
  // Adam divides each gradient element by its own magnitude: an element that cancels to ~1e-7
  // (this model has some) turns the ~1e-9 rounding of a different summation order (ranks,
  // micro-steps) into a 1e-3 relative change of its update, in torch's AdamW as in ours. lr 1e-3
  // and eps 1e-5 keep that below the 1e-6 bar; a real error (a wrong average, clip, skip or shard
  // boundary) changes updates by O(lr), 1e-3 relative to the parameters.
  const double lr = 1e-3;
  const double eps = 1e-5;

  auto model = make_model();
  auto reference = make_model();
  model->to(device);
  reference->to(device);
  torch::optim::AdamW reference_adamw(groups_of(reference, torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(eps)));
  // Ranks but 0 start from other values: ZeroAdamW must copy rank 0's parameters.
  if (rank != 0) {
    at::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(1.0);
  }
  scaletrain::optim::ZeroAdamW adamw(
      groups_of(model, scaletrain::optim::ZeroAdamWOptions(lr).betas({0.9, 0.95}).eps(eps)),
      scaletrain::optim::ZeroAdamWOptions(lr).stage(stage).bucket_mb(0.002).max_grad_norm(clip).cpu_offload(offload > 0).overlap_forward(offload >= 2)
          .offload_fraction(offload == 3 ? 0.5 : 1.0),
      group, units_of(model));
  expect(adamw.layout().buckets.size() > 2, "the test model spans several buckets");
  // Stage 3: the parameter bytes a rank holds inside unit u's forward: its chunks, unit u and the
  // unit prefetched after it, no more (the units before are freed).
  const auto& layout_of = adamw.layout();
  auto unit_bytes = [&](int64_t u) {
    int64_t sum = 0;
    for (const auto& bucket : layout_of.buckets) {
      if (bucket.unit == u) sum += bucket.numel;
    }
    return 4 * sum;
  };
  int64_t worst_held = 0;
  auto inside = [&](int64_t u) {
    if (stage != 3) return;
    int64_t held = adamw.memory().parameter_bytes - 4 * layout_of.shard_numel();
    expect(held <= unit_bytes(u) + unit_bytes(u + 1),
           "unit " + std::to_string(u) + ": " + std::to_string(held) + " parameter bytes gathered (expected at most " +
               std::to_string(unit_bytes(u) + unit_bytes(u + 1)) + ")");
    expect(held >= unit_bytes(u), "unit " + std::to_string(u) + " gathered in its forward");
    worst_held = std::max(worst_held, held);
  };

  auto model_params = model->parameters();
  auto reference_params = reference->parameters();
  double worst = 0;
  double first_norm = 0;
  for (int step = 0; step < steps; ++step) {
    torch::manual_seed(100 + step);
    std::vector<at::Tensor> inputs, targets;
    for (int64_t micro = 0; micro < accum; ++micro) {
      inputs.push_back(at::randn({rows, 13}).to(device));
      targets.push_back(at::randn({rows, 5}).to(device));
    }
    bool skip = step == skip_at;
    // Reference: the whole global batch in one process, torch::optim::AdamW.
    reference_adamw.zero_grad();
    for (int64_t micro = 0; micro < accum; ++micro) {
      auto loss = at::mse_loss(reference->forward(inputs[micro]), targets[micro]) / static_cast<double>(accum);
      loss.backward();
    }
    double reference_norm = torch::nn::utils::clip_grad_norm_(
        reference->parameters(), clip > 0 ? clip : std::numeric_limits<double>::infinity());
    if (!skip) reference_adamw.step();

    // ZeroAdamW: this rank's rows of every micro-batch, gradients reduced on the last micro-step.
    const int64_t local = rows / world;
    for (int64_t micro = 0; micro < accum; ++micro) {
      adamw.set_gradient_sync(micro + 1 == accum);
      auto x = inputs[micro].narrow(0, rank * local, local);
      auto y = targets[micro].narrow(0, rank * local, local);
      auto loss = at::mse_loss(forward(model, adamw, x, inside), y) / static_cast<double>(accum) * loss_scale;
      if (skip && rank == 0 && micro == 0) loss = loss * std::numeric_limits<double>::infinity();
      loss.backward();
    }
    auto result = adamw.step_scaled(at::full({1}, 1.0 / loss_scale, at::TensorOptions().device(device)));
    adamw.zero_grad();
    // offload 2 (overlap_forward): the step runs behind step()'s return; C++ modules have no forward
    // hooks, so wait for each parameter's bucket before reading it (the next step would wait too).
    if (offload >= 2) {
      for (int64_t i = static_cast<int64_t>(model_params.size()); i-- > 0;) adamw.wait_parameter(i);
    }
    if (step == 0) first_norm = result.norm.item<double>();
    if (!skip) {
      double norm_error = std::abs(result.norm.item<double>() - reference_norm) / reference_norm;
      expect(norm_error <= 1e-5, "step " + std::to_string(step) + ": global gradient norm " +
                                     std::to_string(result.norm.item<double>()) + ", torch's " +
                                     std::to_string(reference_norm));
    }
    expect(result.found_inf.item<float>() == (skip ? 1.0f : 0.0f),
           "found_inf on step " + std::to_string(step) + " is " + std::to_string(result.found_inf.item<float>()));
    auto values = values_of(model, adamw);
    for (size_t i = 0; i < model_params.size(); ++i) {
      double error = relative_error(values[i], reference_params[i]);
      worst = std::max(worst, error);
      expect(error <= 1e-6, "step " + std::to_string(step) + " parameter " + std::to_string(i) + ": relative error " +
                                std::to_string(error));
    }
  }

  // ZeRO's accounting from the tensors held: parameters and (stage 1) gradients whole, the fp32
  // moments for this rank's chunks only; after the step stage 2 keeps only its gradient chunks.
  const auto& layout = adamw.layout();
  int64_t psi = 0;
  for (auto& p : model_params) psi += p.numel();
  auto memory = adamw.memory();
  int64_t shard = layout.shard_numel();
  int64_t buckets = static_cast<int64_t>(layout.buckets.size());
  expect(shard * world == layout.total_numel, "chunks add up to the flat buffer");
  expect(layout.total_numel >= psi && layout.total_numel <= psi + 64 * (world * buckets + 6),
         "padding is at most one alignment per parameter and world x alignment per bucket");
  // Stage 3 holds its chunks only, once every unit is released.
  expect(memory.parameter_bytes == 4 * (stage == 3 ? shard : layout.total_numel),
         "parameter bytes: " + std::to_string(memory.parameter_bytes) + " (stage 3: 4 x shard, else 4 x flat buffer)");
  expect(stage != 3 || worst_held > 0, "stage 3 gathered units in the forward");
  // Offload moves the moments to the host, with an fp32 master of the chunks (the step's values)
  // and the chunks' gradients; nothing of the optimizer stays on the model's device.
  // Offload 3 keeps half of the state on the device: each byte is on one side (8 per element on
  // the device, 16 on the host).
  int64_t expected_optimizer = offload == 0 ? 8 * shard + 4 * buckets : 0;
  int64_t expected_host = offload == 0 ? 0 : 16 * shard + 4 * buckets;
  if (offload == 3) {
    int64_t host_numel = (memory.host_bytes - (memory.host_bytes % 16)) / 16;  // the step counts: < 16 bytes per bucket
    expect(host_numel > 0 && host_numel < shard, "offload_fraction 0.5: some state on each side");
    expected_host = memory.host_bytes;
    expected_optimizer = memory.optimizer_bytes;
    expect(memory.optimizer_bytes >= 8 * (shard - host_numel), "the device's share of the state");
  }
  expect(memory.optimizer_bytes == expected_optimizer && memory.host_bytes == expected_host,
         "optimizer bytes " + std::to_string(memory.optimizer_bytes) + " (expected " + std::to_string(expected_optimizer) +
             "), host bytes " + std::to_string(memory.host_bytes) + " (expected " + std::to_string(expected_host) + ")");
  int64_t expected_gradients = stage == 1 ? 4 * layout.total_numel : (offload ? 0 : 4 * shard);
  if (offload == 3 && stage >= 2) expected_gradients = memory.gradient_bytes;  // the device's chunks
  expect(memory.gradient_bytes == expected_gradients, "gradient bytes after the step: got " +
                                                          std::to_string(memory.gradient_bytes) + ", expected " +
                                                          std::to_string(expected_gradients));
  std::printf(
      "rank %lld of %lld (%s): stage %lld%s accum %lld clip %g (first norm %.3g): worst relative error %.3g over %d "
      "steps, %lld buckets\n",
      static_cast<long long>(rank), static_cast<long long>(world), group.backend_name().c_str(), static_cast<long long>(stage),
      offload == 3 ? " offload 0.5 overlap_forward" : offload == 2 ? " offload overlap_forward" : offload ? " offload" : "",
      static_cast<long long>(accum), clip, first_norm, worst, steps, static_cast<long long>(buckets));
}

// The model's parameters as one checkpoint file, and back.
std::string save_parameters(torch::nn::Sequential& model) {
  torch::serialize::OutputArchive archive;
  auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) archive.write("p" + std::to_string(i), params[i].detach().cpu());
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void load_parameters(torch::nn::Sequential& model, const std::string& contents) {
  torch::serialize::InputArchive archive;
  std::istringstream in(contents);
  archive.load_from(in);
  auto params = model->parameters();
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor value;
    archive.read("p" + std::to_string(i), value);
    params[i].copy_(value);
  }
}

void zero_checkpoint(const std::string& mode, const std::string& dir, int64_t stage, bool offload) {
  ProcessGroup group = join(false);
  const int64_t rank = group.rank();
  const int64_t world = group.size();
  const int64_t rows = 12;
  const int steps = 6;
  const int64_t saved_at = 3;
  const double lr = 1e-3;
  const double eps = 1e-5;
  // The reference: 6 steps of torch's AdamW on the whole global batch, the parameters after each.
  auto reference = make_model();
  torch::optim::AdamW reference_adamw(groups_of(reference, torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(eps)));
  auto batch = [&](int step) {
    torch::manual_seed(100 + step);
    auto x = at::randn({rows, 13});
    return std::make_pair(x, at::randn({rows, 5}));
  };
  std::vector<std::vector<at::Tensor>> expected;
  for (int step = 0; step < steps; ++step) {
    reference_adamw.zero_grad();
    auto [x, y] = batch(step);
    at::mse_loss(reference->forward(x), y).backward();
    torch::nn::utils::clip_grad_norm_(reference->parameters(), 0.2);
    reference_adamw.step();
    std::vector<at::Tensor> after;
    for (auto& p : reference->parameters()) after.push_back(p.detach().clone());
    expected.push_back(std::move(after));
  }

  auto model = make_model();
  scaletrain::optim::ZeroAdamW adamw(
      groups_of(model, scaletrain::optim::ZeroAdamWOptions(lr).betas({0.9, 0.95}).eps(eps)),
      scaletrain::optim::ZeroAdamWOptions(lr).stage(stage).bucket_mb(0.002).max_grad_norm(0.2).cpu_offload(offload),
      group, units_of(model));
  scaletrain::train::CheckpointStore store(dir);
  int first = 0;
  if (mode == "load") {
    auto checkpoint = store.latest_valid();
    expect(checkpoint.has_value() && checkpoint->step == saved_at, "the newest valid checkpoint is step 3's");
    if (!checkpoint) return;
    adamw.gather_parameters();  // stage 3: written whole, each rank keeps its chunks
    load_parameters(model, checkpoint->file("model.pt"));
    adamw.release_parameters();
    scaletrain::train::load_sharded(*checkpoint, adamw);
    first = static_cast<int>(checkpoint->step);
  }
  const int64_t local = rows / world;
  double worst = 0;
  for (int step = first; step < steps; ++step) {
    auto [x, y] = batch(step);
    at::mse_loss(forward(model, adamw, x.narrow(0, rank * local, local)), y.narrow(0, rank * local, local)).backward();
    adamw.step();
    adamw.zero_grad();
    auto params = values_of(model, adamw);
    for (size_t i = 0; i < params.size(); ++i) {
      double error = relative_error(params[i], expected[static_cast<size_t>(step)][i]);
      worst = std::max(worst, error);
      expect(error <= 1e-6, "step " + std::to_string(step + 1) + " parameter " + std::to_string(i) +
                                ": relative error " + std::to_string(error));
    }
    const bool save = (mode != "load" && step + 1 == saved_at) || (mode == "die" && step + 1 == 5);
    if (save) {
      auto dying = [&] {
        if (mode == "die" && step + 1 == 5 && rank == world - 1) std::raise(SIGKILL);
      };
      adamw.gather_parameters();
      std::string weights = save_parameters(model);
      adamw.release_parameters();
      scaletrain::train::save_sharded(store, step + 1, adamw, {{"model.pt", weights}}, dying);
    }
  }
  std::printf("rank %lld of %lld: %s stage %lld%s: steps %d to %d, worst relative error %.3g\n",
              static_cast<long long>(rank), static_cast<long long>(world), mode.c_str(), static_cast<long long>(stage),
              offload ? " offload" : "", first + 1, steps, worst);
}

void die() {
  ProcessGroup group = join(false);
  for (int i = 0; i < 1000; ++i) {
    if (i == 3 && group.rank() == group.size() - 1) std::raise(SIGKILL);
    at::Tensor t = at::ones({1024});
    group.all_reduce(t).wait();
  }
  expect(false, "the collective loop finished although a rank died");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty()) {
      std::fprintf(stderr, "usage: scaletrain_dist_worker collectives|zero|die ...\n");
      return 1;
    }
    if (args[0] == "collectives") {
      collectives(args.size() > 1 && args[1] == "fallback");
    } else if (args[0] == "zero" && args.size() >= 6) {
      zero(std::stoll(args[1]), std::stoll(args[2]), std::stod(args[3]), args[4] == "1", std::stod(args[5]),
           args.size() > 6 ? std::stoi(args[6]) : -1, args.size() > 7 ? args[7] : "cpu", args.size() > 8 ? std::stoi(args[8]) : 0);
    } else if (args[0] == "zero_checkpoint" && args.size() == 5) {
      zero_checkpoint(args[1], args[2], std::stoll(args[3]), args[4] == "1");
    } else if (args[0] == "die") {
      die();
    } else {
      std::fprintf(stderr, "unknown scenario\n");
      return 1;
    }
  } catch (const scaletrain::dist::DistError& e) {
    std::fprintf(stderr, "DistError: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
