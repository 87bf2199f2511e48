#pragma once

// The collectives a distributed checkpoint needs, on bytes: every rank's
// description gathered to every rank, one rank's decision sent to all, and
// the agreement that ends each step (so that one rank's failure becomes a
// typed error on every rank instead of a hang in the next collective).
// Implemented in process_group.cpp, the one file that includes c10d.
// Never installed; exported only so that the tests can reach it.

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/export.h>
#include <torchser/process_group.h>

namespace torchser::detail {

/// Every rank's `mine`, indexed by rank. `step` names the collective in
/// errors ("exchanging the tensors' placements").
TORCHSER_API std::vector<std::string> all_gather_bytes(
    const ProcessGroup& group,
    const std::string& mine,
    const std::string& step);

/// Every rank's `mine` on `root` (indexed by rank); empty on the others.
TORCHSER_API std::vector<std::string> gather_bytes(
    const ProcessGroup& group,
    const std::string& mine,
    int root,
    const std::string& step);

/// `root`'s `bytes` on every rank.
TORCHSER_API std::string broadcast_bytes(
    const ProcessGroup& group,
    const std::string& bytes,
    int root,
    const std::string& step);

/// Broadcasts `data` (a contiguous CPU byte tensor, the same size on every
/// rank) from `root` in place: the root's bytes land in every rank's.
TORCHSER_API void broadcast_tensor(
    const ProcessGroup& group,
    const at::Tensor& data,
    int root,
    const std::string& step);

/// Ends a step on every rank: `failure` is this rank's error message, if it
/// failed. Returns on a rank that failed (its caller rethrows its own
/// exception, see run_step) and when none did; on the other ranks, when any
/// failed, throws DistError naming each failed rank and its message.
TORCHSER_API void agree(
    const ProcessGroup& group,
    const std::optional<std::string>& failure,
    const std::string& step);

/// Runs `work` on this rank, then agree()s: its own exception is rethrown
/// unchanged on this rank after the agreement, and the others learn of it.
template <typename Work>
void run_step(const ProcessGroup& group, const std::string& step, Work&& work) {
  std::exception_ptr error;
  std::optional<std::string> failure;
  try {
    work();
  } catch (const std::exception& e) {
    error = std::current_exception();
    failure = e.what();
  } catch (...) {
    error = std::current_exception();
    failure = "an exception that is not a std::exception";
  }
  agree(group, failure, step);
  if (error) {
    std::rethrow_exception(error);
  }
}

} // namespace torchser::detail
