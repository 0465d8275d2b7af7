// Run and checkpoint folders are checked before the first step. References: the paths made
// unusable here by hand (a file where a folder goes, a folder where a file goes, a file or a link
// where a checkpoint goes), and the training that must not start.
#include <unistd.h>

#include <fstream>

#include <gtest/gtest.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/train/run_folders.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

RunConfig run_in(const std::string& out_dir) {
  RunConfig c;
  c.model.n_layer(1).n_head(2).n_embd(16).block_size(224);
  c.data.train_examples(64).val_examples(8);
  c.train.max_steps(5).batch_size(2).out_dir(out_dir).device(DeviceChoice::cpu);
  c.eval.examples(0).before_training(false).loss_batches(1);
  return c;
}

void touch(const std::string& path) { std::ofstream(path) << "in the way\n"; }

std::string error_of(const RunConfig& config, int64_t first_step = 0) {
  try {
    prepare_run_folders(config, first_step);
  } catch (const core::ConfigError& e) {
    return e.key() + " | " + e.what();
  }
  return "";
}

TEST(RunFolders, CreatesTheFoldersOfAGoodRun) {
  testing::TempDir dir;
  RunConfig config = run_in(dir.file("a/b/run"));
  config.checkpoint.every(2);
  EXPECT_EQ(error_of(config), "");
  EXPECT_TRUE(core::is_directory(dir.file("a/b/run/checkpoints")));
  EXPECT_EQ(core::list_directory(dir.file("a/b/run/checkpoints")).size(), 0u);  // the write test leaves nothing
}

TEST(RunFolders, AFileWhereAFolderGoes) {
  testing::TempDir dir;
  touch(dir.file("file"));
  EXPECT_NE(error_of(run_in(dir.file("file"))).find("train.out_dir | train.out_dir: the folder"), std::string::npos);
  EXPECT_NE(error_of(run_in(dir.file("file/run"))).find("cannot be written"), std::string::npos);
  RunConfig config = run_in(dir.file("run"));
  config.checkpoint.every(2).dir(dir.file("file/checkpoints"));
  EXPECT_NE(error_of(config).find("checkpoint.dir | checkpoint.dir: the folder '" + dir.file("file/checkpoints")),
            std::string::npos);
}

TEST(RunFolders, AFolderWhereAFileGoes) {
  testing::TempDir dir;
  core::create_directories(dir.file("run/model.pt"));
  EXPECT_NE(error_of(run_in(dir.file("run"))).find("train.save_model | train.save_model: '" + dir.file("run/model.pt")),
            std::string::npos);
  RunConfig without_model = run_in(dir.file("run"));
  without_model.train.save_model(false);
  EXPECT_EQ(error_of(without_model), "");
  core::create_directories(dir.file("run2/summary.json"));
  EXPECT_NE(error_of(run_in(dir.file("run2"))).find("summary.json' is a folder"), std::string::npos);
}

TEST(RunFolders, ACheckpointNameTakenByAFileOrALink) {
  testing::TempDir dir;
  RunConfig config = run_in(dir.file("run"));
  config.checkpoint.every(2);  // saves steps 2, 4 and 5
  core::create_directories(dir.file("run/checkpoints"));
  touch(dir.file("run/checkpoints/step_00000004"));
  EXPECT_NE(error_of(config).find("'" + dir.file("run/checkpoints/step_00000004") +
                                  "' is not a folder (a file or a link), and this run writes its step 4 checkpoint"),
            std::string::npos);
  EXPECT_EQ(error_of(config, /*first_step=*/4), "");  // resumed at step 4: writes only step 5
  ::unlink(dir.file("run/checkpoints/step_00000004").c_str());
  ASSERT_EQ(::symlink(dir.file("nowhere").c_str(), dir.file("run/checkpoints/step_00000005").c_str()), 0);
  EXPECT_NE(error_of(config).find("its step 5 checkpoint"), std::string::npos);
  touch(dir.file("run/checkpoints/step_00000003"));  // a step this run never saves
  ::unlink(dir.file("run/checkpoints/step_00000005").c_str());
  EXPECT_EQ(error_of(config), "");
}

TEST(RunFolders, TheTrainerStopsBeforeTheFirstStep) {
  testing::TempDir dir;
  RunConfig config = run_in(dir.file("run"));
  config.checkpoint.every(2);
  core::create_directories(dir.file("run/checkpoints"));
  touch(dir.file("run/checkpoints/step_00000002"));
  Trainer trainer(config);
  EXPECT_THROW(trainer.fit(), core::ConfigError);
  EXPECT_FALSE(core::path_exists(dir.file("run/metrics.jsonl")));  // no step was spent
}

}  // namespace
}  // namespace scaletrain::train
