// Atomic file writes and folder helpers. References: std::ifstream and POSIX stat/opendir.
#include <dirent.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "test_util.h"

namespace scaletrain {
namespace {

bool posix_is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

int posix_entries(const std::string& path) {
  int count = 0;
  DIR* dir = ::opendir(path.c_str());
  while (dirent* e = dir ? ::readdir(dir) : nullptr) count += std::string(e->d_name) != "." && std::string(e->d_name) != "..";
  if (dir) ::closedir(dir);
  return count;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Fs, WritesAndReplacesAtomicallyWithoutLeftovers) {
  testing::TempDir dir;
  const std::string path = dir.file("summary.json");
  std::string big(1 << 20, 'x');
  core::write_file_atomic(path, big);
  EXPECT_EQ(slurp(path), big);
  core::write_file_atomic(path, "second");
  EXPECT_EQ(slurp(path), "second");
  EXPECT_EQ(core::read_file(path), "second");
  EXPECT_EQ(posix_entries(dir.path()), 1);  // no temporary file left behind
  EXPECT_EQ(core::list_directory(dir.path()), std::vector<std::string>{"summary.json"});
}

TEST(Fs, FailureLeavesTargetAndNamesPath) {
  testing::TempDir dir;
  const std::string missing = dir.file("no/such/folder/file.txt");
  try {
    core::write_file_atomic(missing, "data");
    FAIL() << "no error";
  } catch (const core::IOError& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/folder/file.txt"), std::string::npos) << e.what();
  }
  // A folder where the file should go: the rename fails and the folder stays.
  const std::string target = dir.file("taken");
  ::mkdir(target.c_str(), 0755);
  ::mkdir((target + "/inside").c_str(), 0755);
  EXPECT_THROW(core::write_file_atomic(target, "data"), core::IOError);
  EXPECT_TRUE(posix_is_directory(target + "/inside"));
  EXPECT_EQ(posix_entries(dir.path()), 1);
  EXPECT_THROW(core::read_file(dir.file("absent")), core::IOError);
}

TEST(Fs, CreateDirectories) {
  testing::TempDir dir;
  core::create_directories(dir.file("a/b/c/"));
  EXPECT_TRUE(posix_is_directory(dir.file("a/b/c")));
  core::create_directories(dir.file("a/b/c"));  // exists: fine
  std::ofstream(dir.file("plain")) << "x";
  EXPECT_THROW(core::create_directories(dir.file("plain/sub")), core::IOError);
  EXPECT_THROW(core::create_directories(dir.file("plain")), core::IOError);
}

TEST(Fs, RemoveTreeAndPaths) {
  testing::TempDir dir;
  core::create_directories(dir.file("t/x/y"));
  std::ofstream(dir.file("t/x/y/f")) << "1";
  std::ofstream(dir.file("t/g")) << "2";
  core::remove_tree(dir.file("t"));
  EXPECT_FALSE(posix_is_directory(dir.file("t")));
  core::remove_tree(dir.file("t"));  // absent: fine
  EXPECT_EQ(core::parent_directory("a/b/c.txt"), "a/b");
  EXPECT_EQ(core::parent_directory("c.txt"), ".");
  EXPECT_EQ(core::parent_directory("/c"), "/");
  EXPECT_EQ(core::parent_directory("a/b/"), "a");
  EXPECT_TRUE(core::is_regular_file(dir.file("..")) == false);
}

}  // namespace
}  // namespace scaletrain
