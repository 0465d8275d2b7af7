#include "scaletrain/train/zero_checkpoint.h"

#include <sstream>

#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <torch/serialize/archive.h>

#include "scaletrain/core/error.h"

namespace scaletrain::train {
namespace {

constexpr const char* kShardPrefix = "zero_rank";

std::string shard_name(int rank, int world) { return fmt::format("{}{:05d}_of{:05d}.pt", kShardPrefix, rank, world); }

// "zero_rank00002_of00004.pt" -> (2, 4); (-1, -1) for any other name.
std::pair<int, int> parse_shard_name(const std::string& name) {
  int rank = -1;
  int world = -1;
  char tail[8] = {};
  if (name.rfind(kShardPrefix, 0) != 0 ||
      std::sscanf(name.c_str() + std::string(kShardPrefix).size(), "%5d_of%5d%4s", &rank, &world, tail) != 3 ||
      std::string(tail) != ".pt" || name != shard_name(rank, world)) {
    return {-1, -1};
  }
  return {rank, world};
}

std::string serialize_shard(const std::vector<optim::ZeroParamSlice>& slices, int rank, int world, int64_t params) {
  torch::serialize::OutputArchive archive;
  archive.write("rank", at::scalar_tensor(static_cast<int64_t>(rank), at::kLong));
  archive.write("world", at::scalar_tensor(static_cast<int64_t>(world), at::kLong));
  archive.write("parameters", at::scalar_tensor(params, at::kLong));
  archive.write("slices", at::scalar_tensor(static_cast<int64_t>(slices.size()), at::kLong));
  for (size_t k = 0; k < slices.size(); ++k) {
    const auto& slice = slices[k];
    const std::string key = "slice_" + std::to_string(k) + "/";
    archive.write(key + "param", at::scalar_tensor(slice.param, at::kLong));
    archive.write(key + "start", at::scalar_tensor(slice.start, at::kLong));
    archive.write(key + "step", at::scalar_tensor(slice.step, at::kDouble));
    archive.write(key + "exp_avg", slice.exp_avg);
    archive.write(key + "exp_avg_sq", slice.exp_avg_sq);
    if (slice.master.defined()) archive.write(key + "master", slice.master);
  }
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

}  // namespace

std::string save_sharded(const CheckpointStore& store, int64_t step, const optim::ZeroAdamW& adamw,
                         const std::vector<std::pair<std::string, std::string>>& files,
                         const AfterShardWritten& after_shard_written) {
  const auto& group = adamw.process_group();
  const int rank = group.rank();
  const int world = group.size();
  int64_t params = 0;
  for (const auto& g : adamw.param_groups()) params += static_cast<int64_t>(g.params().size());
  // local_state() first: it waits for a step still running behind (overlap_forward), whose
  // all-gathers must not interleave with the barrier below.
  const auto slices = adamw.local_state();
  const std::string temporary = store.temporary_path(step, "zero");
  if (rank == 0) store.begin(step, "zero");
  group.barrier();  // the folder exists
  const std::string shard = serialize_shard(slices, rank, world, params);
  const auto written = CheckpointStore::write_into(temporary, shard_name(rank, world), shard);
  if (after_shard_written) after_shard_written();
  // Every rank's (size, CRC-32) to every rank; rank 0 writes the manifest.
  const auto device = group.device();
  at::Tensor mine = at::tensor({static_cast<int64_t>(written.size), static_cast<int64_t>(written.crc32)},
                               at::TensorOptions().dtype(at::kLong)).to(device);
  at::Tensor all = at::empty({2 * world}, at::TensorOptions().dtype(at::kLong).device(device));
  group.all_gather(all, mine).wait();
  if (rank == 0) {
    at::Tensor sizes = all.cpu();
    std::vector<CheckpointStore::WrittenFile> entries;
    for (int r = 0; r < world; ++r) {
      entries.push_back({shard_name(r, world), static_cast<uint64_t>(sizes[2 * r].item<int64_t>()),
                         static_cast<uint32_t>(sizes[2 * r + 1].item<int64_t>())});
    }
    for (const auto& [name, contents] : files) {
      if (is_shard_file(name)) {
        throw std::invalid_argument("checkpoint file name '" + name + "': reserved for the optimizer's shards");
      }
      entries.push_back(CheckpointStore::write_into(temporary, name, contents));
    }
    store.commit(step, temporary, entries);
  }
  group.barrier();  // the checkpoint is complete on every rank's return
  return store.path_of(step);
}

bool is_shard_file(const std::string& name) { return parse_shard_name(name).first >= 0; }

bool has_shards(const Checkpoint& checkpoint) {
  for (const auto& entry : checkpoint.files) {
    if (is_shard_file(entry.first)) return true;
  }
  return false;
}

void load_sharded(const Checkpoint& checkpoint, optim::ZeroAdamW& adamw) {
  auto fail = [&](const std::string& what) {
    throw core::IOError(fmt::format("checkpoint '{}': {}", checkpoint.path, what));
  };
  std::vector<at::Tensor> params;
  for (const auto& g : adamw.param_groups()) {
    for (const auto& p : g.params()) params.push_back(p);
  }
  // The shards present, and that they are all of one run.
  int world = -1;
  for (const auto& entry : checkpoint.files) {
    auto [rank, of] = parse_shard_name(entry.first);
    if (rank < 0) continue;
    if (world >= 0 && of != world) fail(fmt::format("holds shards of {} and of {} ranks", world, of));
    world = of;
  }
  if (world < 0) fail("holds no ZeroAdamW shards (zero_rank*_of*.pt)");
  std::vector<optim::ZeroParamState> state(params.size());
  std::vector<int64_t> covered(params.size(), 0);
  auto fp32 = at::TensorOptions().dtype(at::kFloat);
  for (size_t i = 0; i < params.size(); ++i) {
    state[i].exp_avg = at::zeros({params[i].numel()}, fp32);
    state[i].exp_avg_sq = at::zeros({params[i].numel()}, fp32);
  }
  for (int rank = 0; rank < world; ++rank) {
    const std::string name = shard_name(rank, world);
    if (!checkpoint.has(name)) fail(fmt::format("{} is missing (the shards are of {} ranks)", name, world));
    std::istringstream in(checkpoint.file(name));
    torch::serialize::InputArchive archive;
    try {
      archive.load_from(in);
      at::Tensor value;
      archive.read("parameters", value);
      if (value.item<int64_t>() != static_cast<int64_t>(params.size())) {
        fail(fmt::format("{} holds the state of {} parameters, the optimizer has {}", name, value.item<int64_t>(),
                         params.size()));
      }
      archive.read("slices", value);
      const int64_t slices = value.item<int64_t>();
      for (int64_t k = 0; k < slices; ++k) {
        const std::string key = "slice_" + std::to_string(k) + "/";
        at::Tensor param, start, step, exp_avg, exp_avg_sq, master;
        archive.read(key + "param", param);
        archive.read(key + "start", start);
        archive.read(key + "step", step);
        archive.read(key + "exp_avg", exp_avg);
        archive.read(key + "exp_avg_sq", exp_avg_sq);
        const bool has_master = archive.try_read(key + "master", master);
        const int64_t i = param.item<int64_t>();
        const int64_t from = start.item<int64_t>();
        const int64_t n = exp_avg.numel();
        if (i < 0 || i >= static_cast<int64_t>(params.size()) || from < 0 || from + n > params[static_cast<size_t>(i)].numel() ||
            exp_avg_sq.numel() != n || (has_master && master.numel() != n)) {
          fail(fmt::format("{}: slice {} (parameter {}, elements {} to {}) does not fit this optimizer's parameters",
                           name, k, i, from, from + n));
        }
        auto& target = state[static_cast<size_t>(i)];
        target.step = step.item<double>();
        target.exp_avg.narrow(0, from, n).copy_(exp_avg);
        target.exp_avg_sq.narrow(0, from, n).copy_(exp_avg_sq);
        if (has_master) {
          if (!target.master.defined()) target.master = at::zeros({params[static_cast<size_t>(i)].numel()}, fp32);
          target.master.narrow(0, from, n).copy_(master);
        }
        covered[static_cast<size_t>(i)] += n;
      }
    } catch (const c10::Error& e) {
      fail(fmt::format("{} is not a ZeroAdamW shard ({})", name, e.what_without_backtrace()));
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (covered[i] != params[i].numel()) {
      fail(fmt::format("the shards hold {} elements of parameter {}, which has {} (a checkpoint of another model?)",
                       covered[i], i, params[i].numel()));
    }
    if (state[i].master.defined()) state[i].master = state[i].master.view(params[i].sizes());
    state[i].exp_avg = state[i].exp_avg.view(params[i].sizes());
    state[i].exp_avg_sq = state[i].exp_avg_sq.view(params[i].sizes());
  }
  adamw.scatter_state(state);
}

}  // namespace scaletrain::train
