#include "scaletrain/dist/bucket_layout.h"

#include <stdexcept>
#include <string>

namespace scaletrain::dist {

namespace {

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

BucketLayout plan_buckets(const std::vector<int64_t>& numels, const std::vector<int64_t>& groups, int64_t bucket_numel,
                          int64_t world_size, int64_t align, const std::vector<int64_t>& units) {
  if (numels.size() != groups.size()) {
    throw std::invalid_argument("plan_buckets: numels and groups differ in length (" + std::to_string(numels.size()) +
                                " vs " + std::to_string(groups.size()) + ")");
  }
  if (world_size < 1) throw std::invalid_argument("plan_buckets: world_size " + std::to_string(world_size) + " (expected >= 1)");
  if (align < 1) throw std::invalid_argument("plan_buckets: align " + std::to_string(align) + " (expected >= 1)");
  if (bucket_numel < 1) {
    throw std::invalid_argument("plan_buckets: bucket_numel " + std::to_string(bucket_numel) + " (expected >= 1)");
  }
  if (!units.empty() && units.size() != numels.size()) {
    throw std::invalid_argument("plan_buckets: " + std::to_string(units.size()) + " units for " +
                                std::to_string(numels.size()) + " parameters (expected one per parameter, or none)");
  }
  auto unit_of = [&](size_t i) { return units.empty() ? int64_t{0} : units[i]; };
  for (size_t i = 0; i < numels.size(); ++i) {
    if (unit_of(i) < 0) {
      throw std::invalid_argument("plan_buckets: parameter " + std::to_string(i) + " in unit " +
                                  std::to_string(unit_of(i)) + " (expected >= 0)");
    }
    if (numels[i] < 1) {
      throw std::invalid_argument("plan_buckets: parameter " + std::to_string(i) + " has " + std::to_string(numels[i]) +
                                  " elements (expected >= 1)");
    }
    if (i > 0 && groups[i] < groups[i - 1]) {
      throw std::invalid_argument("plan_buckets: groups must not decrease (parameter " + std::to_string(i) + ")");
    }
  }
  BucketLayout layout;
  layout.world_size = world_size;
  layout.param_offset.assign(numels.size(), 0);
  layout.param_bucket.assign(numels.size(), 0);
  const int64_t multiple = world_size * align;
  auto close = [&](Bucket& bucket) {
    bucket.numel = round_up(bucket.used, multiple);
    layout.total_numel = bucket.offset + bucket.numel;
    layout.buckets.push_back(std::move(bucket));
  };
  // Param groups in order (the bulk, decayed weights, usually comes first), each back to front:
  // its buckets fill up during backward one after another. A small group (biases, norms) whose
  // first gradient comes last then holds up only its own buckets, launched after the others.
  std::vector<int64_t> order;
  for (size_t begin = 0; begin < numels.size();) {
    size_t end = begin;
    while (end < numels.size() && groups[end] == groups[begin]) ++end;
    for (size_t i = end; i > begin; --i) order.push_back(static_cast<int64_t>(i - 1));
    begin = end;
  }
  Bucket open;
  bool has_open = false;
  for (int64_t i : order) {
    const int64_t unit = unit_of(static_cast<size_t>(i));
    if (has_open &&
        (open.group != groups[i] || open.unit != unit || round_up(open.used, align) + numels[i] > bucket_numel)) {
      close(open);
      has_open = false;
    }
    if (!has_open) {
      open = Bucket{};
      open.offset = layout.total_numel;
      open.group = groups[i];
      open.unit = unit;
      has_open = true;
    }
    open.used = round_up(open.used, align);  // each parameter starts aligned (vector loads, GEMMs)
    layout.param_offset[i] = open.offset + open.used;
    layout.param_bucket[i] = static_cast<int64_t>(layout.buckets.size());
    open.params.push_back(i);
    open.used += numels[i];
  }
  if (has_open) close(open);
  return layout;
}

}  // namespace scaletrain::dist
