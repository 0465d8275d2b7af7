#include "scaletrain/core/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "scaletrain/core/error.h"

namespace scaletrain::core {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what, int error = errno) {
  throw IOError("'" + path + "': " + what + " (" + std::strerror(error) + ")");
}

// Closes `fd`, removes `temporary` and throws, keeping the errno of the failure.
[[noreturn]] void abandon(int fd, const std::string& temporary, const std::string& path, const std::string& what) {
  const int saved = errno;
  if (fd >= 0) ::close(fd);
  ::unlink(temporary.c_str());
  fail(path, what, saved);
}

}  // namespace

void write_file_atomic(const std::string& path, std::string_view contents) {
  // Unique per process and call, so concurrent writers of one path never share a temporary.
  static std::atomic<uint64_t> counter{0};
  const std::string temporary = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, "cannot create " + temporary);
  const char* data = contents.data();
  size_t left = contents.size();
  while (left > 0) {
    ssize_t written = ::write(fd, data, left);
    if (written < 0 && errno == EINTR) continue;
    if (written == 0) errno = EIO;
    if (written <= 0) abandon(fd, temporary, path, "write failed");
    data += written;
    left -= static_cast<size_t>(written);
  }
  if (::fsync(fd) != 0) abandon(fd, temporary, path, "flush failed");
  if (::close(fd) != 0) abandon(-1, temporary, path, "close failed");
  if (::rename(temporary.c_str(), path.c_str()) != 0) abandon(-1, temporary, path, "rename failed");
  fsync_directory(parent_directory(path));
}

std::string read_file(const std::string& path) {
  // O_NONBLOCK: opening a named pipe with no writer would otherwise wait forever (it is refused
  // below as not a regular file); for a regular file the flag changes nothing.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open");
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(info.st_mode)    ? "a folder"
                       : S_ISFIFO(info.st_mode) ? "a named pipe"
                       : S_ISSOCK(info.st_mode) ? "a socket"
                                                : "a device or special file";
    throw IOError("'" + path + "': not a regular file (" + kind + "; expected a file)");
  }
  std::string contents;
  char buffer[1 << 16];
  while (true) {
    ssize_t got = ::read(fd, buffer, sizeof(buffer));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int saved = errno;
      ::close(fd);
      fail(path, "read failed", saved);
    }
    if (got == 0) break;
    contents.append(buffer, static_cast<size_t>(got));
  }
  ::close(fd);
  return contents;
}

void create_directories(const std::string& path) {
  if (path.empty() || is_directory(path)) return;
  const std::string parent = parent_directory(path);
  if (parent != path && parent != ".") create_directories(parent);
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) fail(path, "cannot create folder");
  if (!is_directory(path)) throw IOError("'" + path + "': cannot create folder (a file is in the way)");
}

void remove_tree(const std::string& path) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) return;
    fail(path, "cannot remove");
  }
  auto remove_entry = [](const char* entry, const struct stat*, int, struct FTW*) { return ::remove(entry); };
  if (::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0) fail(path, "cannot remove");
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) fail(from, "cannot rename to '" + to + "'");
}

void fsync_directory(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // some filesystems refuse: the rename itself is still atomic
  ::fsync(fd);
  ::close(fd);
}

bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

bool path_exists(const std::string& path) {
  struct stat info {};
  return ::lstat(path.c_str(), &info) == 0;
}

bool is_regular_file(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

std::vector<std::string> list_directory(const std::string& path) {
  DIR* dir = ::opendir(path.c_str());
  if (!dir) fail(path, "cannot list folder");
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string parent_directory(const std::string& path) {
  std::string trimmed = path;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  auto slash = trimmed.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return trimmed.substr(0, slash);
}

}  // namespace scaletrain::core
