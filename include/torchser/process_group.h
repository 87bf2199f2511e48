#pragma once

/// \file
/// The process group distributed saves and loads run on: LibTorch's own
/// torch.distributed engine (c10d), never a transport of torchser's.
///
/// Either create one as Python's `torch.distributed.init_process_group`
/// does (`init_process_group`, reading torchrun's variables for "env://"),
/// or wrap a c10d group the program already has. Gloo works with every
/// LibTorch build (Debian's needs the gloo headers of `libgloo-dev` at build
/// time only); NCCL needs a LibTorch built with CUDA and NCCL, and a build
/// without is told so when asked for it.
///
/// The one difference between LibTorch releases lives behind this handle:
/// LibTorch 1.13's `ProcessGroupGloo` is a `c10d::ProcessGroup`, 2.x's a
/// `c10d::Backend` that a `c10d::ProcessGroup` wraps. Both can be wrapped.
///
/// SIGPIPE: creating or wrapping a group sets SIGPIPE to ignored when its
/// action is still the default (as Python does at startup), so that a peer
/// that dies becomes a DistBackendError on the ranks left instead of killing
/// them silently in a socket write. A handler the program set stays.

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <c10/util/intrusive_ptr.h>
#include <torch/arg.h>

#include <torchser/export.h>

namespace c10d {
class ProcessGroup;
class Backend;
} // namespace c10d

namespace torchser {

/// Python's default process-group timeout (30 minutes): how long a
/// collective waits for the slowest rank before every rank fails.
inline constexpr std::chrono::milliseconds kDefaultProcessGroupTimeout =
    std::chrono::minutes(30);

/// Keyword arguments of `init_process_group`, with Python's defaults.
struct TORCHSER_API ProcessGroupOptions {
  /// "gloo" (CPU tensors; every build) or "nccl" (CUDA builds with NCCL).
  TORCH_ARG(std::string, backend) = "gloo";
  /// "env://" (torchrun's MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE),
  /// "tcp://HOST:PORT", or "file:///PATH" (a FileStore on a filesystem
  /// every rank sees; the file must not exist before the group forms).
  TORCH_ARG(std::string, init_method) = "env://";
  /// This process's rank; unset: the RANK variable.
  TORCH_ARG(std::optional<int>, rank) = std::nullopt;
  /// The number of processes; unset: the WORLD_SIZE variable.
  TORCH_ARG(std::optional<int>, world_size) = std::nullopt;
  /// How long any collective, and the rendezvous, waits for every rank.
  TORCH_ARG(std::chrono::milliseconds, timeout) = kDefaultProcessGroupTimeout;
  /// The address Gloo binds on this host; unset: MASTER_ADDR for env:// and
  /// tcp:// when it is a loopback address, otherwise this host's name.
  TORCH_ARG(std::optional<std::string>, hostname) = std::nullopt;
  /// NCCL only: this rank's CUDA device (Python's `device_id`); unset: the
  /// LOCAL_RANK variable when set (torchrun's one GPU per rank), else the
  /// current device. It becomes the current device.
  TORCH_ARG(std::optional<int>, device_id) = std::nullopt;
};

/// Whether this build offers NCCL process groups (`torch.distributed.
/// is_nccl_available()`): LibTorch with CUDA and NCCL, and torchser built
/// against it (CMake option TORCHSER_WITH_NCCL, AUTO by default).
TORCHSER_API bool is_nccl_available() noexcept;

/// A c10d process group as torchser uses it: its rank, its size, its
/// timeout, and the few collectives a distributed checkpoint needs. Copies
/// share the group.
class TORCHSER_API ProcessGroup {
 public:
  /// Wraps a c10d process group (LibTorch 1.13's `ProcessGroupGloo`, or a
  /// 2.x `c10d::ProcessGroup` with a backend for CPU tensors, or for CUDA
  /// tensors with NCCL). `timeout` bounds every collective torchser runs.
  explicit ProcessGroup(
      const c10::intrusive_ptr<c10d::ProcessGroup>& group,
      std::chrono::milliseconds timeout = kDefaultProcessGroupTimeout);
  /// Wraps a c10d backend (LibTorch 2.x's `ProcessGroupGloo`,
  /// `ProcessGroupNCCL`).
  explicit ProcessGroup(
      const c10::intrusive_ptr<c10d::Backend>& backend,
      std::chrono::milliseconds timeout = kDefaultProcessGroupTimeout);
  /// Releases this handle (the group lives while any copy does).
  ~ProcessGroup();
  /// Another handle on the same group.
  ProcessGroup(const ProcessGroup&);
  /// Another handle on the same group.
  ProcessGroup& operator=(const ProcessGroup&);

  /// This process's rank, 0 … size() − 1.
  int rank() const;
  /// The number of processes.
  int size() const;
  /// The bound on every collective.
  std::chrono::milliseconds timeout() const;
  /// "gloo", "nccl", ... as c10d names it.
  std::string backend() const;
  /// `torch.distributed.barrier()`: returns once every rank called it.
  /// DistBackendError when a rank does not come within the timeout.
  void barrier() const;

  /// Internal: the collectives, for torchser's distributed code.
  struct Impl;
  /// Internal.
  const Impl& impl() const {
    return *impl_;
  }

 private:
  std::shared_ptr<Impl> impl_;
};

/// `torch.distributed.init_process_group`: forms the group (every rank calls
/// it; rank 0 serves the TCP store for env:// and tcp://) and returns it.
/// Throws ValueError for a bad option or variable (naming it), and
/// DistBackendError when the rendezvous fails or times out.
///
/// Example (started by torchrun, or by examples/distributed_checkpoint's
/// run_local.sh):
/// ```
/// torchser::ProcessGroup group = torchser::init_process_group();
/// ```
TORCHSER_API ProcessGroup
init_process_group(const ProcessGroupOptions& options = {});

/// `init_process_group` with `init_method("env://")`: torchrun's RANK,
/// WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
TORCHSER_API ProcessGroup init_process_group_from_env(
    const std::string& backend = "gloo",
    std::chrono::milliseconds timeout = kDefaultProcessGroupTimeout);

} // namespace torchser
