#pragma once

// Runs the ranks of a distributed test: one dist_worker process per rank on
// 127.0.0.1 (FileStore rendezvous in a fresh temporary directory), each
// bounded in time and killed when past it.

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_utils.h"

namespace torchser::testing {

namespace fs = std::filesystem;

struct RankRun {
  int status = -1; // exit code; -SIGNAL when killed
  bool killed_by_harness = false;
  double seconds = 0; // from the start of all ranks to this one's end
  std::string output;
};

inline std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Starts `world` workers (rank r gets `extra(r)` after the common
// arguments, and runs under `wrapper(r)`'s command when given) and waits for
// them, at most `limit`; any still running then is killed and marked. Ranks
// in `hanging` (told to hang) are killed and marked as soon as every other
// rank has ended, so that a test waits for the others' timeouts, not for
// the harness's limit.
inline std::vector<RankRun> run_ranks(
    const std::string& scenario,
    const fs::path& dir,
    int world,
    const std::function<std::vector<std::string>(int)>& extra,
    std::chrono::seconds limit = std::chrono::seconds(120),
    const std::function<std::vector<std::string>(int)>& wrapper = {},
    const std::set<int>& hanging = {}) {
  const torchser::testing::TempDir temp;
  const fs::path work = temp.path();
  const std::string store = (work / "store").string();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> args =
        wrapper ? wrapper(r) : std::vector<std::string>{};
    args.insert(
        args.end(),
        {TORCHSER_DIST_WORKER,
         scenario,
         dir.string(),
         std::to_string(r),
         std::to_string(world),
         store});
    for (std::string& a : extra(r)) {
      args.push_back(std::move(a));
    }
    const std::string out = (work / ("rank" + std::to_string(r))).string();
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) {
        argv.push_back(a.data());
      }
      argv.push_back(nullptr);
      ::setenv("OMP_NUM_THREADS", "1", 1);
      ::execvp(argv[0], argv.data());
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<RankRun> runs(world);
  std::vector<bool> done(world, false);
  const auto started = std::chrono::steady_clock::now();
  const auto deadline = started + limit;
  const auto since_start = [&] {
    return std::chrono::duration<double>(
               std::chrono::steady_clock::now() - started)
        .count();
  };
  int left = world;
  while (left > 0) {
    for (int r = 0; r < world; ++r) {
      if (done[r]) {
        continue;
      }
      int status = 0;
      if (::waitpid(pids[r], &status, WNOHANG) == pids[r]) {
        done[r] = true;
        --left;
        runs[r].status =
            WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
        runs[r].seconds = since_start();
      }
    }
    bool others_ended = !hanging.empty();
    for (int r = 0; r < world; ++r) {
      if (!done[r] && hanging.count(r) == 0) {
        others_ended = false;
      }
    }
    if (left > 0 &&
        (others_ended || std::chrono::steady_clock::now() > deadline)) {
      for (int r = 0; r < world; ++r) {
        if (!done[r]) {
          ::kill(pids[r], SIGKILL);
          int status = 0;
          ::waitpid(pids[r], &status, 0);
          runs[r].status = -SIGKILL;
          runs[r].killed_by_harness = true;
          runs[r].seconds = since_start();
          done[r] = true;
        }
      }
      left = 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int r = 0; r < world; ++r) {
    runs[r].output = read_all(work / ("rank" + std::to_string(r)));
  }
  return runs;
}

inline std::string describe_runs(const std::vector<RankRun>& runs) {
  std::ostringstream out;
  for (std::size_t r = 0; r < runs.size(); ++r) {
    out << "--- rank " << r << " (status " << runs[r].status
        << (runs[r].killed_by_harness ? ", killed by the harness" : "")
        << ", ended after " << runs[r].seconds << " s)\n"
        << runs[r].output << "\n";
  }
  return out.str();
}

} // namespace torchser::testing
