#pragma once
// Helpers shared by the C++ tests.
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "scaletrain/core/fs.h"

// GPU tests run on a machine with CUDA and say why they skip elsewhere.
#define SCALETRAIN_REQUIRE_CUDA()                                                  \
  do {                                                                             \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: GPU test skipped"; \
  } while (0)

namespace scaletrain::testing {

// A fresh, empty folder under $TMPDIR (or /tmp), removed with its contents at destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/scaletrain-test-XXXXXX";
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = pattern;
  }
  ~TempDir() {
    try {
      core::remove_tree(path_);
    } catch (...) {
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The message of the exception `f` throws, or "no error".
inline std::string error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace scaletrain::testing
