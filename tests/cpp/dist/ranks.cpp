#include "dist/ranks.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace scaletrain::testing {

namespace {

// A port the kernel says is free now (bound to port 0, then released).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throw std::runtime_error("free_port: cannot bind a loopback socket");
  }
  int port = ntohs(address.sin_port);
  ::close(fd);
  return port;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// One launch of `world` ranks whose store listens on `port`.
std::vector<RankResult> launch_ranks(int world, const std::vector<std::string>& args, double timeout_s, int port) {
  std::vector<pid_t> pids(static_cast<size_t>(world));
  std::vector<std::string> logs;
  std::vector<std::string> base_env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry = *e;
    for (const char* drop : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "MASTER_ADDR=", "MASTER_PORT=", "OMP_NUM_THREADS=",
                             "TORCHELASTIC_USE_AGENT_STORE="}) {
      if (entry.rfind(drop, 0) == 0) entry.clear();
    }
    if (!entry.empty()) base_env.push_back(entry);
  }
  auto start = std::chrono::steady_clock::now();
  for (int rank = 0; rank < world; ++rank) {
    std::vector<std::string> env = base_env;
    env.push_back("RANK=" + std::to_string(rank));
    env.push_back("LOCAL_RANK=" + std::to_string(rank));
    env.push_back("WORLD_SIZE=" + std::to_string(world));
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back("MASTER_PORT=" + std::to_string(port));
    env.push_back("OMP_NUM_THREADS=1");  // several ranks share this machine's cores
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> argv_strings{SCALETRAIN_DIST_WORKER};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    char log_template[] = "/tmp/scaletrain-rank-XXXXXX";
    int log_fd = ::mkstemp(log_template);
    logs.emplace_back(log_template);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 2);
    int rc = ::posix_spawn(&pids[static_cast<size_t>(rank)], argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    ::close(log_fd);
    if (rc != 0) throw std::runtime_error(std::string("run_ranks: cannot start ") + argv[0]);
  }
  std::vector<RankResult> results(static_cast<size_t>(world));
  std::vector<bool> done(static_cast<size_t>(world), false);
  int remaining = world;
  while (remaining > 0) {
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (int rank = 0; rank < world; ++rank) {
      auto r = static_cast<size_t>(rank);
      if (done[r]) continue;
      int status = 0;
      pid_t got = ::waitpid(pids[r], &status, WNOHANG);
      if (got == pids[r]) {
        done[r] = true;
        --remaining;
        results[r].seconds = elapsed;
        if (WIFEXITED(status)) results[r].exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) results[r].signal = WTERMSIG(status);
      } else if (elapsed > timeout_s) {
        ::kill(pids[r], SIGKILL);
        ::waitpid(pids[r], &status, 0);
        done[r] = true;
        --remaining;
        results[r].exit_code = -2;
        results[r].seconds = elapsed;
      }
    }
    if (remaining > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int rank = 0; rank < world; ++rank) {
    results[static_cast<size_t>(rank)].output = read_file(logs[static_cast<size_t>(rank)]);
    std::remove(logs[static_cast<size_t>(rank)].c_str());
  }
  return results;
}

}  // namespace

std::vector<RankResult> run_ranks(int world, const std::vector<std::string>& args, double timeout_s) {
  // The port was free when free_port() asked, but another test running beside this one may take
  // it before rank 0 listens: then launch again on another port.
  constexpr int kAttempts = 3;
  for (int attempt = 1;; ++attempt) {
    std::vector<RankResult> results = launch_ranks(world, args, timeout_s, free_port());
    const bool port_taken = std::any_of(results.begin(), results.end(), [](const RankResult& r) {
      return r.exit_code != 0 && r.output.find("EADDRINUSE") != std::string::npos;
    });
    if (!port_taken || attempt == kAttempts) return results;
  }
}

std::string outputs(const std::vector<RankResult>& results) {
  std::string text;
  for (size_t rank = 0; rank < results.size(); ++rank) {
    std::istringstream lines(results[rank].output);
    std::string line;
    while (std::getline(lines, line)) text += "[rank " + std::to_string(rank) + "] " + line + "\n";
    text += "[rank " + std::to_string(rank) + "] exit " + std::to_string(results[rank].exit_code) + " signal " +
            std::to_string(results[rank].signal) + "\n";
  }
  return text;
}

}  // namespace scaletrain::testing
