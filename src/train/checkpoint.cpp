#include "scaletrain/train/checkpoint.h"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <ctime>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/core/logging.h"

namespace scaletrain::train {
namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kFormat = "scaletrain-checkpoint";
constexpr int64_t kVersion = 1;
constexpr const char* kStepPrefix = "step_";
constexpr const char* kTemporaryPrefix = ".tmp-";

using Json = nlohmann::ordered_json;

std::string step_name(int64_t step) { return fmt::format("{}{:08d}", kStepPrefix, step); }

// The step of a folder named "step_<digits>", or -1.
int64_t parse_step_name(const std::string& name) {
  const std::string prefix = kStepPrefix;
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0 || name.size() > prefix.size() + 18)
    return -1;
  int64_t step = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::string base_name(const std::string& path) {
  std::string trimmed = path;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  auto slash = trimmed.rfind('/');
  return slash == std::string::npos ? trimmed : trimmed.substr(slash + 1);
}

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name.front() != '.' && name.find('/') == std::string::npos && name != kManifest;
}

std::string hex32(uint32_t value) { return fmt::format("{:08x}", value); }

std::string utc_now() {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

// The manifest's own checksum covers its compact serialisation without the checksum field, so a
// flipped bit in the step or a size is caught too, not only in the files.
std::string manifest_checksum(const Json& manifest_without_checksum) {
  return hex32(crc32_of(manifest_without_checksum.dump()));
}

// Parses and checks manifest.json; throws IOError through `fail`.
template <typename Fail>
Json parse_manifest(const std::string& text, const Fail& fail) {
  Json manifest;
  try {
    manifest = Json::parse(text);
  } catch (const Json::exception& e) {
    fail(fmt::format("{} is not valid JSON ({}): corrupt", kManifest, e.what()));
  }
  if (!manifest.is_object()) fail(fmt::format("{} is not a JSON object: corrupt", kManifest));
  const auto format = manifest.find("format");
  if (format == manifest.end() || !format->is_string() || format->get<std::string>() != kFormat)
    fail(fmt::format("{} is not a scaletrain checkpoint manifest", kManifest));
  auto checksum = manifest.find("manifest_crc32");
  if (checksum == manifest.end() || !checksum->is_string()) fail(fmt::format("{} has no manifest_crc32", kManifest));
  const std::string recorded = checksum->get<std::string>();
  manifest.erase("manifest_crc32");
  if (manifest_checksum(manifest) != recorded)
    fail(fmt::format("{}: checksum mismatch (corrupt): CRC-32 is {}, the manifest records {}", kManifest,
                     manifest_checksum(manifest), recorded));
  auto version = manifest.find("version");
  if (version == manifest.end() || !version->is_number_integer() || version->get<int64_t>() != kVersion) {
    fail(fmt::format("{} has format version {}, this build of scaletrain reads version {}", kManifest,
                     version == manifest.end() ? "(none)" : version->dump(), kVersion));
  }
  if (!manifest.contains("step") || !manifest["step"].is_number_integer() || manifest["step"].get<int64_t>() < 0)
    fail(fmt::format("{}: 'step' is missing or not a step number", kManifest));
  if (!manifest.contains("files") || !manifest["files"].is_array())
    fail(fmt::format("{}: 'files' is missing or not a list", kManifest));
  for (const auto& entry : manifest["files"]) {
    const bool ok = entry.is_object() && entry.contains("name") && entry["name"].is_string() &&
                    is_plain_file_name(entry["name"].get<std::string>()) && entry.contains("size") &&
                    entry["size"].is_number_unsigned() && entry.contains("crc32") && entry["crc32"].is_string();
    if (!ok) fail(fmt::format("{}: malformed file entry {}", kManifest, entry.dump()));
  }
  return manifest;
}

}  // namespace

const std::string& Checkpoint::file(const std::string& name) const {
  auto found = files.find(name);
  if (found == files.end())
    throw core::IOError(
        fmt::format("checkpoint '{}': holds no {} (written by another version of scaletrain?)", path, name));
  return found->second;
}

uint32_t crc32_of(std::string_view data) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  const auto* bytes = reinterpret_cast<const Bytef*>(data.data());
  size_t left = data.size();
  while (left > 0) {  // zlib takes 32-bit lengths
    const uInt chunk = static_cast<uInt>(std::min<size_t>(left, 1u << 30));
    crc = ::crc32(crc, bytes, chunk);
    bytes += chunk;
    left -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

CheckpointStore::CheckpointStore(std::string dir) : dir_(std::move(dir)) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

std::string CheckpointStore::path_of(int64_t step) const { return dir_ + "/" + step_name(step); }

std::string CheckpointStore::save(int64_t step, const std::vector<std::pair<std::string, std::string>>& files) const {
  if (step < 0) throw std::invalid_argument(fmt::format("checkpoint step {}: expected >= 0", step));
  std::vector<std::string> names;
  for (const auto& [name, contents] : files) {
    if (!is_plain_file_name(name))
      throw std::invalid_argument("checkpoint file name '" + name + "': expected a plain name, not manifest.json");
    if (std::find(names.begin(), names.end(), name) != names.end())
      throw std::invalid_argument("checkpoint file name '" + name + "' given twice");
    names.push_back(name);
  }
  const std::string temporary = begin(step, std::to_string(::getpid()));
  std::vector<WrittenFile> written;
  try {
    for (const auto& [name, contents] : files) written.push_back(write_into(temporary, name, contents));
  } catch (...) {
    try {
      core::remove_tree(temporary);
    } catch (const core::IOError&) {
    }
    throw;
  }
  return commit(step, temporary, written);
}

std::string CheckpointStore::temporary_path(int64_t step, const std::string& tag) const {
  return dir_ + "/" + kTemporaryPrefix + step_name(step) + "-" + tag;
}

std::string CheckpointStore::begin(int64_t step, const std::string& tag) const {
  if (step < 0) throw std::invalid_argument(fmt::format("checkpoint step {}: expected >= 0", step));
  if (!core::is_directory(dir_)) {
    core::create_directories(dir_);
    core::fsync_directory(core::parent_directory(dir_));
  }
  for (const auto& entry : core::list_directory(dir_))  // left by a crash (or a killed run)
    if (entry.rfind(kTemporaryPrefix, 0) == 0) core::remove_tree(dir_ + "/" + entry);
  const std::string temporary = temporary_path(step, tag);
  core::create_directories(temporary);
  return temporary;
}

CheckpointStore::WrittenFile CheckpointStore::write_into(const std::string& temporary, const std::string& name,
                                                         const std::string& contents) {
  if (!is_plain_file_name(name))
    throw std::invalid_argument("checkpoint file name '" + name + "': expected a plain name, not manifest.json");
  core::write_file_atomic(temporary + "/" + name, contents);  // flushed to disk before the manifest
  return {name, static_cast<uint64_t>(contents.size()), crc32_of(contents)};
}

std::string CheckpointStore::commit(int64_t step, const std::string& temporary,
                                    const std::vector<WrittenFile>& files) const {
  const std::string pid = std::to_string(::getpid());
  const std::string final_path = path_of(step);
  try {
    Json manifest{{"format", kFormat}, {"version", kVersion}, {"step", step}, {"created", utc_now()}};
    manifest["files"] = Json::array();
    for (const auto& file : files) {
      if (!is_plain_file_name(file.name))
        throw std::invalid_argument("checkpoint file name '" + file.name + "': expected a plain name");
      manifest["files"].push_back({{"name", file.name}, {"size", file.size}, {"crc32", hex32(file.crc32)}});
    }
    manifest["manifest_crc32"] = manifest_checksum(manifest);
    core::write_file_atomic(temporary + "/" + kManifest, manifest.dump(2) + "\n");
    core::fsync_directory(temporary);
    if (core::is_directory(final_path)) {
      // rename() does not replace a non-empty folder: move the old one aside first. A crash in
      // between leaves the older checkpoints, and the aside folder is a leftover like any other.
      const std::string aside = dir_ + "/" + kTemporaryPrefix + "replaced-" + step_name(step) + "-" + pid;
      core::rename_path(final_path, aside);
      core::rename_path(temporary, final_path);
      core::remove_tree(aside);
    } else {
      core::rename_path(temporary, final_path);
    }
    core::fsync_directory(dir_);
  } catch (...) {
    try {
      core::remove_tree(temporary);
    } catch (const core::IOError&) {
    }
    throw;
  }
  return final_path;
}

std::vector<int64_t> CheckpointStore::list() const {
  std::vector<int64_t> steps;
  if (!core::is_directory(dir_)) return steps;
  for (const auto& entry : core::list_directory(dir_)) {
    const int64_t step = parse_step_name(entry);
    if (step >= 0 && core::is_directory(dir_ + "/" + entry)) steps.push_back(step);
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

std::vector<int64_t> CheckpointStore::blocked_steps() const {
  std::vector<int64_t> steps;
  if (!core::is_directory(dir_)) return steps;
  for (const auto& entry : core::list_directory(dir_)) {
    const int64_t step = parse_step_name(entry);
    if (step >= 0 && entry == step_name(step) && !core::is_directory(dir_ + "/" + entry)) steps.push_back(step);
  }
  return steps;
}

std::optional<Checkpoint> CheckpointStore::latest_valid() const {
  for (int64_t step : list()) {
    try {
      return load(step);
    } catch (const core::IOError& e) {
      core::log_warn("skipping {}", e.what());
    }
  }
  return std::nullopt;
}

void CheckpointStore::prune(int64_t keep, int64_t also_keep) const {
  const std::vector<int64_t> steps = list();
  const std::string pid = std::to_string(::getpid());
  bool removed = false;
  for (size_t i = static_cast<size_t>(std::max<int64_t>(keep, 0)); i < steps.size(); ++i) {
    if (steps[i] == also_keep) continue;
    const std::string doomed = dir_ + "/" + kTemporaryPrefix + "removed-" + step_name(steps[i]) + "-" + pid;
    core::rename_path(path_of(steps[i]), doomed);
    core::remove_tree(doomed);
    removed = true;
  }
  if (removed) core::fsync_directory(dir_);
}

Checkpoint CheckpointStore::read(const std::string& path) {
  auto fail = [&](const std::string& what) { throw core::IOError(fmt::format("checkpoint '{}': {}", path, what)); };
  if (!core::is_directory(path)) fail("no such checkpoint folder");
  const std::string manifest_path = path + "/" + kManifest;
  if (!core::is_regular_file(manifest_path)) {
    const CheckpointStore inside(path);
    if (!inside.list().empty()) {
      fail(fmt::format("no {}: this is a folder of checkpoints, expected one of them ('{}') or --resume auto",
                       kManifest, inside.path_of(inside.list().front())));
    }
    fail(fmt::format("no {} (not a checkpoint, or one whose writing did not finish)", kManifest));
  }
  Json manifest;
  try {
    manifest = parse_manifest(core::read_file(manifest_path), fail);
  } catch (const Json::exception& e) {  // a field of the wrong JSON type that the checks above missed
    fail(fmt::format("{} is malformed ({}): corrupt", kManifest, e.what()));
  }

  Checkpoint checkpoint;
  checkpoint.path = path;
  checkpoint.step = manifest["step"].get<int64_t>();
  const int64_t named_step = parse_step_name(base_name(path));
  if (named_step >= 0 && named_step != checkpoint.step)
    fail(fmt::format("{} says step {}, the folder name says {}", kManifest, checkpoint.step, named_step));
  for (const auto& entry : manifest["files"]) {
    const std::string name = entry["name"].get<std::string>();
    const uint64_t size = entry["size"].get<uint64_t>();
    const std::string file_path = path + "/" + name;
    if (!core::is_regular_file(file_path)) fail(fmt::format("{} is missing (the manifest lists it)", name));
    std::string contents = core::read_file(file_path);
    if (contents.size() != size) {
      fail(fmt::format("{} is {} bytes, the manifest says {} ({})", name, contents.size(), size,
                       contents.size() < size ? "truncated?" : "changed after it was written?"));
    }
    const std::string crc = hex32(crc32_of(contents));
    if (crc != entry["crc32"].get<std::string>()) {
      fail(fmt::format("{}: checksum mismatch (corrupt): CRC-32 is {}, the manifest says {}", name, crc,
                       entry["crc32"].get<std::string>()));
    }
    checkpoint.files[name] = std::move(contents);
  }
  return checkpoint;
}

}  // namespace scaletrain::train
