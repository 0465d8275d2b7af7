#pragma once
// Where each parameter lives in a flat buffer split into buckets, for sharded data parallelism.
//
// Parameters (and their gradients) are laid out param group by param group, each group back to
// front (the order backward produces its gradients), in buckets of about `bucket_numel` elements. A bucket holds whole parameters of
// one param group, each starting at a multiple of `align` elements, and is padded with zeros to a
// multiple of world_size x `align` elements so that
// it splits into world_size equal chunks: rank r owns chunk r of every bucket. A bucket's gradients
// are reduce-scattered as one call (rank r receives chunk r summed over ranks) and its parameters
// all-gathered as one call, straight from and into the flat buffer, with no copies in between
// (the layout of Megatron-Core's distributed optimizer and FSDP1's flat parameters).
//
//   auto layout = dist::plan_buckets(numels, groups, /*bucket_numel=*/25'000'000, world, 64);
//   layout.buckets[b].chunk_offset(rank)   // first element of this rank's chunk in the flat buffer
#include <cstdint>
#include <vector>

namespace scaletrain::dist {

struct Bucket {
  int64_t offset = 0;           // first element in the flat buffer
  int64_t numel = 0;            // elements including padding: a multiple of world_size x align
  int64_t used = 0;             // elements up to the end of the last parameter (the rest is padding)
  int64_t group = 0;            // param group of every parameter in it
  int64_t unit = 0;             // gather unit of every parameter in it (ZeRO-3; 0 when none are given)
  std::vector<int64_t> params;  // parameter indices, in layout order
  int64_t chunk_numel(int64_t world_size) const { return numel / world_size; }
  int64_t chunk_offset(int64_t rank, int64_t world_size) const { return offset + rank * chunk_numel(world_size); }
};

struct BucketLayout {
  std::vector<Bucket> buckets;        // in the order backward fills them
  std::vector<int64_t> param_offset;  // per parameter: its first element in the flat buffer
  std::vector<int64_t> param_bucket;  // per parameter: its bucket
  int64_t total_numel = 0;            // the flat buffer, padding included
  int64_t world_size = 1;
  // Elements of all of one rank's chunks (the same on every rank).
  int64_t shard_numel() const { return total_numel / world_size; }
};

// Lays out parameters with `numels[i]` elements in param group `groups[i]` (non-decreasing, as
// torch optimizers list them). `units` (empty, or one entry >= 0 per parameter) also keeps
// parameters of different units out of one bucket: a ZeRO-3 unit (a transformer block) is then
// gathered and freed as whole buckets. Throws std::invalid_argument on an empty or negative size,
// a world_size or align below 1, bucket_numel below 1, or a bad `units`.
BucketLayout plan_buckets(const std::vector<int64_t>& numels, const std::vector<int64_t>& groups, int64_t bucket_numel,
                          int64_t world_size, int64_t align, const std::vector<int64_t>& units = {});

}  // namespace scaletrain::dist
