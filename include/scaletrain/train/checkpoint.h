#pragma once
// Checkpoints on disk: a folder of named files that is either complete and verified or not there.
//
//   <dir>/step_00000040/           one checkpoint: the training state after 40 optimizer steps
//     model.pt optimizer.pt ...    the files handed to save()
//     manifest.json                format version, step, creation time, per file: name, size, CRC-32
//   <dir>/.tmp-step_00000043-<pid>/  a checkpoint being written (or left by a crash): ignored
//
// save() builds the folder under a temporary name, flushes every file to disk, writes the manifest
// last, flushes the folder, renames it to its final name in one step and flushes <dir>. A crash at
// any moment leaves either no new checkpoint or a complete one. load() re-reads every file and
// checks it against the manifest, so a truncated or corrupted checkpoint is an IOError that names
// the checkpoint, the file and what is wrong, never a half-restored run.
//
// The store knows nothing about training: the trainer decides which files make a checkpoint
// (see train_state.h).
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace scaletrain::train {

// A checkpoint read back and verified against its manifest.
struct Checkpoint {
  std::string path;  // the checkpoint folder
  int64_t step = 0;
  std::map<std::string, std::string> files;  // name -> contents

  // Contents of `name`; throws IOError naming the checkpoint when it holds no such file.
  const std::string& file(const std::string& name) const;
  bool has(const std::string& name) const { return files.count(name) > 0; }
};

// CRC-32 (zlib's, the polynomial of zip and PNG) of `data`.
uint32_t crc32_of(std::string_view data);

class CheckpointStore {
 public:
  // Checkpoints live in `dir` (created by the first save()).
  explicit CheckpointStore(std::string dir);

  const std::string& dir() const { return dir_; }
  // "<dir>/step_00000040"
  std::string path_of(int64_t step) const;

  // Writes the checkpoint of `step` atomically and returns its folder. File names are plain names
  // ("model.pt"; no '/', not "manifest.json", not starting with '.'). An existing checkpoint of the
  // same step is replaced; leftover temporary folders of earlier crashes are removed. Throws
  // IOError (and leaves no new checkpoint) when a write fails, std::invalid_argument for a bad name.
  std::string save(int64_t step, const std::vector<std::pair<std::string, std::string>>& files) const;

  // A checkpoint written by several processes (a sharded optimizer): one of them calls begin(),
  // every one writes its files with write_into() into the folder begin() returned, and the first
  // commits the manifest with what each wrote. Same guarantees as save(): until commit() renames
  // the folder, a crash leaves no new checkpoint. `tag` names the temporary folder (every process
  // computes the same path: temporary_path()).
  struct WrittenFile {
    std::string name;
    uint64_t size = 0;
    uint32_t crc32 = 0;
  };
  std::string temporary_path(int64_t step, const std::string& tag) const;
  // Removes leftovers of earlier crashes and creates temporary_path(step, tag).
  std::string begin(int64_t step, const std::string& tag) const;
  // Writes `contents` as `name` into `temporary` and flushes it to disk (any process).
  static WrittenFile write_into(const std::string& temporary, const std::string& name, const std::string& contents);
  // Writes the manifest of `files` (each written into `temporary`), flushes, renames the folder to
  // path_of(step) (replacing one of the same step) and returns that path. IOError (and the
  // temporary folder removed) when it fails.
  std::string commit(int64_t step, const std::string& temporary, const std::vector<WrittenFile>& files) const;

  // Steps of the checkpoint folders in dir (complete or not; verification is load's job),
  // newest first; empty when dir does not exist.
  std::vector<int64_t> list() const;

  // Steps whose folder name (path_of(step)) is taken by something that is not a folder: a file,
  // a named pipe, a link to a file or to nothing. save() of such a step would fail.
  std::vector<int64_t> blocked_steps() const;

  // Reads and verifies the checkpoint of `step`; throws IOError (see read()).
  Checkpoint load(int64_t step) const { return read(path_of(step)); }

  // The newest checkpoint that verifies, or nullopt when there is none. Each newer checkpoint
  // that fails verification is skipped with a warning saying which and why.
  std::optional<Checkpoint> latest_valid() const;

  // Removes all but the newest `keep` checkpoints (by step); `also_keep` (a step, -1 for none) is
  // never removed, so that a run resumed from an older checkpoint keeps the one it just wrote.
  // Each folder is first renamed to a temporary name, so that a crash midway leaves no half-removed
  // checkpoint behind.
  void prune(int64_t keep, int64_t also_keep = -1) const;

  // Reads and verifies the checkpoint folder at `path`: the manifest parses, has this format
  // version, every listed file exists with the listed size and CRC-32. Throws IOError
  // "checkpoint '<path>': model.pt is 1234 bytes, the manifest says 5678 (truncated?)".
  static Checkpoint read(const std::string& path);

 private:
  std::string dir_;
};

}  // namespace scaletrain::train
