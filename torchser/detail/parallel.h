#pragma once

// The one work-sharing loop of the library: shard writes, checksum checks.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace torchser::detail {

/// Runs `body(i)` for every i in [0, n) on up to `max_threads` threads (the
/// caller's included), handing out indices in order. After a failure no new
/// index is handed out; once every thread has stopped, the exception of the
/// lowest failed index is rethrown.
template <typename Body>
void parallel_for(std::size_t n, std::size_t max_threads, const Body& body) {
  std::vector<std::exception_ptr> failures(n);
  std::atomic<std::size_t> next{0};
  const auto worker = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      try {
        body(i);
      } catch (...) {
        failures[i] = std::current_exception();
        next = n; // stop handing out work
      }
    }
  };
  const std::size_t threads = std::min(
      n,
      std::clamp<std::size_t>(
          std::min<std::size_t>(
              std::thread::hardware_concurrency(), max_threads),
          1,
          max_threads));
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) {
    pool.emplace_back(worker);
  }
  worker();
  for (std::thread& t : pool) {
    t.join();
  }
  for (const std::exception_ptr& failure : failures) {
    if (failure) {
      std::rethrow_exception(failure);
    }
  }
}

} // namespace torchser::detail
