// The only file that includes c10d (ATen's full headers come with it): the
// rest of torchser sees ProcessGroup and detail/collectives.h.

#include <torchser/process_group.h>

#include <signal.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <type_traits>

#include <ATen/ops/from_blob.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef TORCHSER_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <torchser/errors.h>

#include "torchser/detail/collectives.h"
#include "torchser/detail/torch_version.h"

#ifndef USE_C10D_GLOO
#error \
    "torchser/process_group.cpp needs USE_C10D_GLOO (set by torchser/CMakeLists.txt)"
#endif

namespace torchser {

// The collectives on whichever c10d class carries them: c10d::ProcessGroup
// (1.13's Gloo, any 2.x group) or c10d::Backend (2.x's Gloo and NCCL). Both
// declare the same virtual collectives.
struct ProcessGroup::Impl {
  virtual ~Impl() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  virtual c10::intrusive_ptr<c10d::Work> allgather(
      std::vector<std::vector<at::Tensor>>& out,
      std::vector<at::Tensor>& in,
      const c10d::AllgatherOptions& options) const = 0;
  virtual c10::intrusive_ptr<c10d::Work> broadcast(
      std::vector<at::Tensor>& tensors,
      const c10d::BroadcastOptions& options) const = 0;
  virtual c10::intrusive_ptr<c10d::Work> gather(
      std::vector<std::vector<at::Tensor>>& out,
      std::vector<at::Tensor>& in,
      const c10d::GatherOptions& options) const = 0;
  std::chrono::milliseconds timeout{kDefaultProcessGroupTimeout};
  // Where the bytes of a collective live: CPU for Gloo, CUDA for NCCL.
  c10::Device device{c10::kCPU};
};

namespace {

template <typename Group>
struct GroupImpl final : ProcessGroup::Impl {
  explicit GroupImpl(c10::intrusive_ptr<Group> g) : group(std::move(g)) {}
  int rank() const override {
    return group->getRank();
  }
  int size() const override {
    return group->getSize();
  }
  std::string backend() const override {
    return group->getBackendName();
  }
  c10::intrusive_ptr<c10d::Work> allgather(
      std::vector<std::vector<at::Tensor>>& out,
      std::vector<at::Tensor>& in,
      const c10d::AllgatherOptions& options) const override {
    return group->allgather(out, in, options);
  }
  c10::intrusive_ptr<c10d::Work> broadcast(
      std::vector<at::Tensor>& tensors,
      const c10d::BroadcastOptions& options) const override {
    return group->broadcast(tensors, options);
  }
  c10::intrusive_ptr<c10d::Work> gather(
      std::vector<std::vector<at::Tensor>>& out,
      std::vector<at::Tensor>& in,
      const c10d::GatherOptions& options) const override {
    return group->gather(out, in, options);
  }
  c10::intrusive_ptr<Group> group;
};

// Gloo's and the TCP store's sockets write without MSG_NOSIGNAL: a write to
// a peer that died raises SIGPIPE, whose default action kills this process
// silently where it should become a DistBackendError ("Connection closed by
// peer") on the ranks left. Python ignores SIGPIPE at startup, so PyTorch
// never meets it; a C++ program must. Only the default action is replaced: a
// handler or disposition the program chose stays.
void ignore_sigpipe() {
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) == 0 &&
      (current.sa_flags & SA_SIGINFO) == 0 && current.sa_handler == SIG_DFL) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    ::sigemptyset(&ignore.sa_mask);
    ::sigaction(SIGPIPE, &ignore, nullptr);
  }
}

template <typename Group>
std::shared_ptr<ProcessGroup::Impl> make_impl(
    const c10::intrusive_ptr<Group>& group, std::chrono::milliseconds timeout) {
  if (!group) {
    throw ValueError("torchser::ProcessGroup: the c10d group is null");
  }
  ignore_sigpipe();
  auto impl = std::make_shared<GroupImpl<Group>>(group);
  impl->timeout = timeout;
  if (impl->backend() == "nccl") {
    impl->device = c10::Device(c10::kCUDA);
  }
  return impl;
}

// An exception's message; c10::Error's what() carries a C++ backtrace after
// it.
std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

// Waits for `work`, turning c10d's failures (a peer's closed connection, a
// timeout) into DistBackendError naming the step and this rank.
void wait(
    const c10::intrusive_ptr<c10d::Work>& work,
    const ProcessGroup::Impl& impl,
    const std::string& step) {
  const auto fail = [&](const std::string& why) {
    std::ostringstream msg;
    msg << "rank " << impl.rank() << " of " << impl.size() << ": " << step
        << " failed: " << why
        << " (another rank may have died, failed, or not reached this step "
           "within the group's timeout of "
        << impl.timeout.count() / 1000.0 << " s)";
    throw DistBackendError(msg.str());
  };
  try {
    if (!work->wait(impl.timeout)) {
      fail("timed out");
    }
  } catch (const DistBackendError&) {
    throw;
  } catch (const std::exception& e) {
    fail(message_of(e));
  }
}

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return std::nullopt;
  }
  return std::string(value);
}

int parse_int(const std::string& text, const std::string& what, int low) {
  std::size_t used = 0;
  long value = 0;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < low ||
      value > std::numeric_limits<int>::max()) {
    throw ValueError(
        "init_process_group: " + what + " is '" + text +
        "', which is not an integer ≥ " + std::to_string(low));
  }
  return static_cast<int>(value);
}

int required_int(
    const std::optional<int>& given,
    const char* variable,
    const std::string& option,
    int low) {
  if (given.has_value()) {
    if (*given < low) {
      throw ValueError(
          "init_process_group: " + option + " is " + std::to_string(*given) +
          ", which is below " + std::to_string(low));
    }
    return *given;
  }
  const auto text = env(variable);
  if (!text.has_value()) {
    throw ValueError(
        std::string("init_process_group: ") + option +
        " was not given and the environment variable " + variable +
        " is not set (torchrun sets it; so does "
        "examples/distributed_checkpoint/run_local.sh)");
  }
  return parse_int(
      *text, std::string("the environment variable ") + variable, low);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

} // namespace

ProcessGroup::ProcessGroup(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    std::chrono::milliseconds timeout)
    : impl_(make_impl(group, timeout)) {}

ProcessGroup::ProcessGroup(
    const c10::intrusive_ptr<c10d::Backend>& backend,
    std::chrono::milliseconds timeout)
    : impl_(make_impl(backend, timeout)) {}

ProcessGroup::~ProcessGroup() = default;
ProcessGroup::ProcessGroup(const ProcessGroup&) = default;
ProcessGroup& ProcessGroup::operator=(const ProcessGroup&) = default;

int ProcessGroup::rank() const {
  return impl_->rank();
}
int ProcessGroup::size() const {
  return impl_->size();
}
std::chrono::milliseconds ProcessGroup::timeout() const {
  return impl_->timeout;
}
std::string ProcessGroup::backend() const {
  return impl_->backend();
}
void ProcessGroup::barrier() const {
  detail::agree(*this, std::nullopt, "barrier");
}

bool is_nccl_available() noexcept {
#ifdef TORCHSER_WITH_NCCL
  return true;
#else
  return false;
#endif
}

ProcessGroup init_process_group(const ProcessGroupOptions& options) {
  ignore_sigpipe(); // before the store's sockets, see ignore_sigpipe()
  const std::string& backend = options.backend();
  if (backend != "gloo" && backend != "nccl") {
    throw ValueError(
        "init_process_group: backend '" + backend +
        "' is not one torchser offers; use 'gloo' (CPU) or 'nccl' (CUDA)");
  }
#ifndef TORCHSER_WITH_NCCL
  if (backend == "nccl") {
    throw ValueError(
        "init_process_group: backend 'nccl' needs a LibTorch built with CUDA "
        "and NCCL, and torchser built against it; this build has Gloo only "
        "(use backend 'gloo')");
  }
#endif
  if (options.timeout().count() <= 0) {
    throw ValueError("init_process_group: the timeout must be positive");
  }
  const int world_size =
      required_int(options.world_size(), "WORLD_SIZE", "world_size", 1);
  const int rank = required_int(options.rank(), "RANK", "rank", 0);
  if (rank >= world_size) {
    throw ValueError(
        "init_process_group: rank " + std::to_string(rank) +
        " is not below the world size " + std::to_string(world_size));
  }

  const std::string& method = options.init_method();
  c10::intrusive_ptr<c10d::Store> store;
  std::string master;
  try {
    if (method.rfind("file://", 0) == 0) {
      const std::string path = method.substr(7);
      if (path.empty() || path[0] != '/') {
        throw ValueError(
            "init_process_group: init_method '" + method +
            "' must name an absolute path (file:///PATH)");
      }
      auto file_store = c10::make_intrusive<c10d::FileStore>(path, world_size);
      file_store->setTimeout(options.timeout());
      store = file_store;
    } else {
      std::string port_text;
      if (method == "env://") {
        const auto addr = env("MASTER_ADDR");
        const auto port = env("MASTER_PORT");
        if (!addr.has_value() || !port.has_value()) {
          throw ValueError(
              "init_process_group: init_method 'env://' needs the environment "
              "variables MASTER_ADDR and MASTER_PORT (torchrun sets them), "
              "and " +
              std::string(!addr.has_value() ? "MASTER_ADDR" : "MASTER_PORT") +
              " is not set");
        }
        master = *addr;
        port_text = *port;
      } else if (method.rfind("tcp://", 0) == 0) {
        const std::string rest = method.substr(6);
        const auto colon = rest.rfind(':');
        if (colon == std::string::npos || colon == 0) {
          throw ValueError(
              "init_process_group: init_method '" + method +
              "' is not tcp://HOST:PORT");
        }
        master = rest.substr(0, colon);
        port_text = rest.substr(colon + 1);
      } else {
        throw ValueError(
            "init_process_group: init_method '" + method +
            "' is not env://, tcp://HOST:PORT or file:///PATH");
      }
      const int port = parse_int(port_text, "the master port", 1);
      if (port > 65535) {
        throw ValueError(
            "init_process_group: the master port " + port_text +
            " is above 65535");
      }
      c10d::TCPStoreOptions store_options;
      store_options.port = static_cast<std::uint16_t>(port);
      store_options.isServer = rank == 0;
      store_options.numWorkers = static_cast<std::size_t>(world_size);
      store_options.waitWorkers = true;
      store_options.timeout = options.timeout();
      store = c10::make_intrusive<c10d::TCPStore>(master, store_options);
    }
  } catch (const ValueError&) {
    throw;
  } catch (const std::exception& e) {
    const std::string why = message_of(e);
    throw DistBackendError(
        "init_process_group: rank " + std::to_string(rank) + " of " +
        std::to_string(world_size) + " could not reach the rendezvous '" +
        (master.empty() ? method : master) + "': " + why);
  }

  try {
#ifdef TORCHSER_WITH_NCCL
    if (backend == "nccl") {
      // One GPU per rank, as torchrun lays them out: device_id, else
      // LOCAL_RANK, else the current device. The group's collectives use
      // the current device, so it is set before the group forms.
      std::optional<int> device = options.device_id();
      if (!device.has_value()) {
        if (const auto local = env("LOCAL_RANK")) {
          device = parse_int(*local, "the environment variable LOCAL_RANK", 0);
        }
      }
      if (device.has_value()) {
        const int count = static_cast<int>(c10::cuda::device_count());
        if (*device < 0 || *device >= count) {
          throw ValueError(
              "init_process_group: rank " + std::to_string(rank) +
              " would use CUDA device " + std::to_string(*device) +
              " (device_id or LOCAL_RANK), but this host has " +
              std::to_string(count) + " CUDA devices");
        }
        c10::cuda::set_device(static_cast<c10::DeviceIndex>(*device));
      }
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = options.timeout();
      using NcclBase = std::conditional_t<
          std::is_base_of_v<c10d::Backend, c10d::ProcessGroupNCCL>,
          c10d::Backend,
          c10d::ProcessGroup>;
      c10::intrusive_ptr<NcclBase> group =
          c10::make_intrusive<c10d::ProcessGroupNCCL>(
              store, rank, world_size, nccl_options);
      return ProcessGroup(group, options.timeout());
    }
#endif
    auto gloo_options =
        c10d::ProcessGroupGloo::Options::create(options.timeout());
    gloo_options->threads = 2;
    std::string host = options.hostname().value_or("");
    if (host.empty() && is_loopback(master)) {
      host = "127.0.0.1";
    }
    gloo_options->devices.push_back(
        host.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                     : c10d::ProcessGroupGloo::createDeviceForHostname(host));
    // 1.13's Gloo group is a ProcessGroup, 2.x's a Backend.
    using GlooBase = std::conditional_t<
        std::is_base_of_v<c10d::Backend, c10d::ProcessGroupGloo>,
        c10d::Backend,
        c10d::ProcessGroup>;
    c10::intrusive_ptr<GlooBase> group =
        c10::make_intrusive<c10d::ProcessGroupGloo>(
            store, rank, world_size, gloo_options);
    return ProcessGroup(group, options.timeout());
  } catch (const ValueError&) {
    throw;
  } catch (const std::exception& e) {
    const std::string why = message_of(e);
    throw DistBackendError(
        "init_process_group: rank " + std::to_string(rank) + " of " +
        std::to_string(world_size) + " could not form the " + backend +
        " group: " + why);
  }
}

ProcessGroup init_process_group_from_env(
    const std::string& backend, std::chrono::milliseconds timeout) {
  return init_process_group(
      ProcessGroupOptions().backend(backend).init_method("env://").timeout(
          timeout));
}

namespace detail {
namespace {

// Every rank's byte count, and the longest (at least 1: no empty tensors).
struct Sizes {
  std::vector<std::int64_t> each;
  std::int64_t longest = 1;
};

Sizes exchange_sizes(
    const ProcessGroup::Impl& impl, std::size_t mine, const std::string& step) {
  c10d::AllgatherOptions options;
  options.timeout = impl.timeout;
  std::vector<at::Tensor> in{
      at::full({1}, static_cast<std::int64_t>(mine), at::kLong)
          .to(impl.device)};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < impl.size(); ++r) {
    out[0].push_back(at::empty(
        {1}, at::TensorOptions().device(impl.device).dtype(at::kLong)));
  }
  wait(impl.allgather(out, in, options), impl, step);
  Sizes sizes;
  for (const at::Tensor& s : out[0]) {
    sizes.each.push_back(s.cpu().item<std::int64_t>());
    sizes.longest = std::max(sizes.longest, sizes.each.back());
  }
  return sizes;
}

// `bytes` in a tensor of `length` bytes on `device`.
at::Tensor padded(
    const std::string& bytes, std::int64_t length, c10::Device device) {
  at::Tensor out = at::zeros({length}, at::kByte);
  std::memcpy(out.data_ptr(), bytes.data(), bytes.size());
  return out.to(device);
}

// Each rank's bytes back from its padded tensor.
std::vector<std::string> unpadded(
    const std::vector<at::Tensor>& tensors,
    const std::vector<std::int64_t>& sizes) {
  std::vector<std::string> result;
  for (std::size_t r = 0; r < tensors.size(); ++r) {
    const at::Tensor bytes = tensors[r].cpu();
    result.emplace_back(
        static_cast<const char*>(bytes.data_ptr()),
        static_cast<std::size_t>(sizes[r]));
  }
  return result;
}

} // namespace

std::vector<std::string> all_gather_bytes(
    const ProcessGroup& group,
    const std::string& mine,
    const std::string& step) {
  const ProcessGroup::Impl& impl = group.impl();
  const int n = impl.size();
  const auto on_device = at::TensorOptions().device(impl.device);
  c10d::AllgatherOptions options;
  options.timeout = impl.timeout;
  // Sizes first, then everyone's bytes padded to the longest.
  const Sizes sizes = exchange_sizes(impl, mine.size(), step);
  const std::int64_t longest = sizes.longest;
  std::vector<at::Tensor> in{padded(mine, longest, impl.device)};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < n; ++r) {
    out[0].push_back(at::empty({longest}, on_device.dtype(at::kByte)));
  }
  wait(impl.allgather(out, in, options), impl, step);
  return unpadded(out[0], sizes.each);
}

std::vector<std::string> gather_bytes(
    const ProcessGroup& group,
    const std::string& mine,
    int root,
    const std::string& step) {
  const ProcessGroup::Impl& impl = group.impl();
  const int n = impl.size();
  const auto on_device = at::TensorOptions().device(impl.device);
  // The sizes go to every rank (eight bytes each), so that all pad alike.
  const Sizes sizes = exchange_sizes(impl, mine.size(), step);
  const std::int64_t longest = sizes.longest;
  c10d::GatherOptions options;
  options.rootRank = root;
  options.timeout = impl.timeout;
  std::vector<at::Tensor> in{padded(mine, longest, impl.device)};
  std::vector<std::vector<at::Tensor>> out;
  if (impl.rank() != root) {
    wait(impl.gather(out, in, options), impl, step);
    return {};
  }
  out.emplace_back();
  for (int r = 0; r < n; ++r) {
    out[0].push_back(at::empty({longest}, on_device.dtype(at::kByte)));
  }
  wait(impl.gather(out, in, options), impl, step);
  return unpadded(out[0], sizes.each);
}

void broadcast_tensor(
    const ProcessGroup& group,
    const at::Tensor& data,
    int root,
    const std::string& step) {
  const ProcessGroup::Impl& impl = group.impl();
  c10d::BroadcastOptions options;
  options.rootRank = root;
  options.timeout = impl.timeout;
  if (impl.device.is_cpu()) {
    std::vector<at::Tensor> payload{data};
    wait(impl.broadcast(payload, options), impl, step);
    return;
  }
  std::vector<at::Tensor> payload{data.to(impl.device)};
  wait(impl.broadcast(payload, options), impl, step);
  data.copy_(payload[0]);
}

std::string broadcast_bytes(
    const ProcessGroup& group,
    const std::string& bytes,
    int root,
    const std::string& step) {
  std::int64_t n = static_cast<std::int64_t>(bytes.size());
  const at::Tensor size = at::from_blob(&n, {1}, at::kLong);
  broadcast_tensor(group, size, root, step);
  at::Tensor data = at::zeros({std::max<std::int64_t>(n, 1)}, at::kByte);
  if (group.rank() == root) {
    std::memcpy(data.data_ptr(), bytes.data(), bytes.size());
  }
  broadcast_tensor(group, data, root, step);
  return std::string(
      static_cast<const char*>(data.data_ptr()), static_cast<std::size_t>(n));
}

void agree(
    const ProcessGroup& group,
    const std::optional<std::string>& failure,
    const std::string& step) {
  // One byte says whether the rank failed; its message follows.
  const std::string mine = failure.has_value() ? "F" + *failure : "K";
  const std::vector<std::string> all = all_gather_bytes(group, mine, step);
  if (failure.has_value()) {
    return;
  }
  std::ostringstream msg;
  int failed = 0;
  for (std::size_t r = 0; r < all.size(); ++r) {
    if (!all[r].empty() && all[r][0] == 'F') {
      msg << (failed++ == 0 ? "" : "; ") << "rank " << r
          << " failed: " << all[r].substr(1);
    }
  }
  if (failed > 0) {
    throw DistError(
        step + " failed on " + std::to_string(failed) + " of " +
        std::to_string(all.size()) + " ranks, so rank " +
        std::to_string(group.rank()) + " stops too: " + msg.str());
  }
}

} // namespace detail
} // namespace torchser
