// The temporaries outputs are written through (a file or a staging
// directory beside the output, renamed over it when complete), and the ones
// killed runs leave behind. A writer holds an advisory lock (flock) on its
// temporary while it writes it; the kernel drops the lock when the process
// ends however it ends, so a temporary of a name only moeforge gives that
// nobody holds is what a killed run (SIGKILL, Ctrl-C, out of memory) left:
// for a 7B model's export, gigabytes in a hidden directory no later run
// would otherwise find. (On NFS, where flock is emulated by POSIX locks and
// an exclusive one needs a file open for writing, no lock is taken: nothing
// is then removed, and nothing is protected by one either.)
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <string>

namespace moeforge::detail {

/// An exclusive lock (flock) on a file or directory, held while alive; not
/// held when another open file holds one (busy) or it cannot be taken (the
/// file is gone, the file system has no locks).
class held_lock {
 public:
  held_lock() = default;
  // (O_NONBLOCK: opening a FIFO of such a name must not wait for a writer.)
  explicit held_lock(const std::filesystem::path& path) : fd_(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)) {
    if (fd_ >= 0 && ::flock(fd_, LOCK_EX | LOCK_NB) != 0) busy_ = errno == EWOULDBLOCK, release();
  }
  held_lock(held_lock&& o) noexcept : fd_(o.fd_), busy_(o.busy_) { o.fd_ = -1; }
  held_lock& operator=(held_lock&& o) noexcept {
    if (this != &o) release(), fd_ = o.fd_, busy_ = o.busy_, o.fd_ = -1;
    return *this;
  }
  held_lock(const held_lock&) = delete;
  held_lock& operator=(const held_lock&) = delete;
  ~held_lock() { release(); }
  bool held() const { return fd_ >= 0; }
  /// Another open file holds the lock: a writer is at work.
  bool busy() const { return busy_; }

 private:
  void release() {
    if (fd_ >= 0) ::close(fd_);  // (closing the last descriptor drops the lock)
    fd_ = -1;
  }
  int fd_ = -1;
  bool busy_ = false;
};

/// How long a temporary may go unlocked after it is made before it counts
/// as abandoned: its writer locks it right after creating it.
constexpr std::chrono::seconds abandoned_after{60};

/// Whether `name` is `prefix` followed by a process ID (1 to Linux's largest, 2^22).
inline bool named_for_a_process(const std::string& name, const std::string& prefix) {
  const std::size_t digits = name.size() - std::min(name.size(), prefix.size());
  if (digits == 0 || digits > 7 || name.compare(0, prefix.size(), prefix) != 0) return false;
  if (!std::all_of(name.end() - std::ptrdiff_t(digits), name.end(), [](unsigned char c) { return std::isdigit(c) != 0; })) return false;
  const long pid = std::stol(name.substr(prefix.size()));
  return pid >= 1 && pid <= (1L << 22);
}

/// Removes the entries of `dir` of `type` (a directory, a regular file)
/// named `prefix` followed by a process ID that nobody holds locked and
/// nobody touched for abandoned_after: what killed runs left. Best effort:
/// what cannot be read, locked or removed stays as it was.
inline void remove_abandoned(const std::filesystem::path& dir, const std::string& prefix, std::filesystem::file_type type) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto now = fs::file_time_type::clock::now();
  for (fs::directory_iterator it(dir.empty() ? fs::path(".") : dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!named_for_a_process(it->path().filename().string(), prefix)) continue;
    std::error_code entry_ec;
    if (it->symlink_status(entry_ec).type() != type) continue;
    const auto touched = fs::last_write_time(it->path(), entry_ec);
    if (entry_ec || now - touched < abandoned_after) continue;
    const held_lock lock(it->path());
    if (lock.held()) fs::remove_all(it->path(), entry_ec);
  }
}

}  // namespace moeforge::detail
