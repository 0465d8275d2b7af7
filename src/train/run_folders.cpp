#include "scaletrain/train/run_folders.h"

#include <unistd.h>

#include <string>

#include <fmt/format.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/train/checkpoint.h"

namespace scaletrain::train {
namespace {

// Creates `dir` and writes (then removes) a small file in it.
void require_writable_folder(const std::string& key, const std::string& dir) {
  try {
    core::create_directories(dir);
    const std::string probe = dir + "/.scaletrain-write-test-" + std::to_string(::getpid());
    core::write_file_atomic(probe, "");
    core::remove_tree(probe);
  } catch (const core::IOError& e) {
    throw core::ConfigError(key, fmt::format("{}: the folder '{}' cannot be written: {}", key, dir, e.what()));
  }
}

// A file the run writes by renaming a temporary over it: anything but a file (or a link to one)
// in its place makes that rename fail.
void require_file_slot(const std::string& key, const std::string& path) {
  if (core::path_exists(path) && !core::is_regular_file(path)) {
    throw core::ConfigError(key, fmt::format("{}: '{}' is a folder or another non-file, where the run writes a file "
                                             "(expected it absent or a file; move it away)",
                                             key, path));
  }
}

}  // namespace

void prepare_run_folders(const RunConfig& config, int64_t first_step) {
  const std::string out_dir = config.train.out_dir();
  if (!out_dir.empty()) {
    require_writable_folder("train.out_dir", out_dir);
    for (const char* name : {"config.yaml", "metrics.jsonl", "summary.json"})
      require_file_slot("train.out_dir", out_dir + "/" + name);
    if (config.train.save_model()) require_file_slot("train.save_model", out_dir + "/model.pt");
  }
  const int64_t every = config.checkpoint.every(), last = config.train.max_steps();
  if (every <= 0) return;
  const std::string key = config.checkpoint.dir().empty() ? "train.out_dir" : "checkpoint.dir";
  const std::string dir = config.checkpoint_dir();
  require_writable_folder(key, dir);
  const CheckpointStore store(dir);
  for (int64_t step : store.blocked_steps()) {
    const bool saved_by_this_run = step > first_step && step <= last && (step % every == 0 || step == last);
    if (!saved_by_this_run) continue;
    throw core::ConfigError(key, fmt::format("{}: '{}' is not a folder (a file or a link), and this run writes its "
                                             "step {} checkpoint there (expected it absent or a checkpoint; move "
                                             "it away)",
                                             key, store.path_of(step), step));
  }
}

}  // namespace scaletrain::train
