#pragma once
// Files that are never half-written, and the few folder operations scaletrain needs.
//
// Written on POSIX calls rather than std::filesystem: libtorch.so from the PyPI wheel exports
// its own copies of std::filesystem functions, which interpose libstdc++'s in any program
// linked with it, and some of them crash (std::filesystem::remove_all calls a null pointer).
#include <string>
#include <string_view>
#include <vector>

namespace scaletrain::core {

// Writes to a temporary file in the same folder, flushes it to disk, renames it over `path` and
// flushes the folder entry. Throws IOError naming `path` on any failure; the target is then
// unchanged.
void write_file_atomic(const std::string& path, std::string_view contents);
// The whole file; throws IOError naming `path` (missing, unreadable, not a regular file).
std::string read_file(const std::string& path);
// Creates the folder and its parents; throws IOError naming `path`.
void create_directories(const std::string& path);
// Removes a file or a folder with everything below it; absent is fine. Throws IOError.
void remove_tree(const std::string& path);
bool is_directory(const std::string& path);
// Whether anything is at `path`, a dangling link included (lstat).
bool path_exists(const std::string& path);
bool is_regular_file(const std::string& path);
// Names of the entries of a folder (without "." and ".."), sorted; throws IOError.
std::vector<std::string> list_directory(const std::string& path);
// Renames a file or folder in one step (POSIX rename: atomic within a filesystem; an existing
// target file or empty folder is replaced). Throws IOError naming both paths.
void rename_path(const std::string& from, const std::string& to);
// Flushes a folder's entries (created, renamed, removed names) to disk, so that a rename survives
// a power loss. Best effort: filesystems that refuse to sync a folder are ignored.
void fsync_directory(const std::string& path);
// "a/b/c.txt" -> "a/b"; "c.txt" -> "."
std::string parent_directory(const std::string& path);

}  // namespace scaletrain::core
