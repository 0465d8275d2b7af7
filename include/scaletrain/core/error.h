#pragma once
// Errors that scaletrain raises for bad input. Each message is one line that names the
// argument and says what was expected; the CLI prints it and exits with code 2.
#include <stdexcept>
#include <string>

namespace scaletrain::core {

// Base class of every input error scaletrain reports to a user.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A configuration value, key or file is wrong. `key()` is the dotted key path ("train.batch_size"),
// empty when the whole file is at fault.
class ConfigError : public Error {
 public:
  ConfigError(std::string key, const std::string& message)
      : Error(message), key_(std::move(key)) {}
  const std::string& key() const { return key_; }

 private:
  std::string key_;
};

// A command-line argument is malformed.
class UsageError : public Error {
 public:
  using Error::Error;
};

// A dataset file is missing, unreadable or in the wrong format.
class DataError : public Error {
 public:
  using Error::Error;
};

// A file could not be written or read back (run folders, saved models).
class IOError : public Error {
 public:
  using Error::Error;
};

}  // namespace scaletrain::core
