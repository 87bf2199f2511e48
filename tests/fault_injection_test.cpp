// Fault injection: saves that hit a file-size limit or a full file system,
// loads racing with saves in another process, files truncated while they are
// read. Each save must fail with a typed error naming the file, leave the old
// checkpoint byte for byte as it was, and leave no temporary file behind.
// (Killed saves: CrashSafetyTest in save_load_test.cpp.)

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/nn/module.h>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"
#include "torchser/detail/checkpoint_dir.h"

namespace torchser {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using torchser::testing::TempDir;

constexpr int kTensors = 12;

// kTensors tensors of `elements` floats: tensor i holds version + i.
StateDict version(float v, std::int64_t elements = 4096) {
  StateDict sd;
  for (int i = 0; i < kTensors; ++i) {
    sd.insert(
        "w" + std::to_string(i),
        at::full({elements}, v + static_cast<float>(i)));
  }
  return sd;
}

struct Twelve : torch::nn::Module {
  explicit Twelve(std::int64_t elements = 4096) {
    for (int i = 0; i < kTensors; ++i) {
      register_parameter("w" + std::to_string(i), at::zeros({elements}));
    }
  }
};

// The version a loaded module holds; fails the test on a mix of versions.
float loaded_version(const Twelve& model) {
  const StateDict sd = state_dict(model);
  const float base = sd["w0"][0].item<float>();
  for (int i = 0; i < kTensors; ++i) {
    const at::Tensor& t = sd["w" + std::to_string(i)];
    const float want = base + static_cast<float>(i);
    if (t.min().item<float>() != want || t.max().item<float>() != want) {
      ADD_FAILURE() << "tensor w" << i << " is not from version " << base
                    << ": a mix of checkpoints";
    }
  }
  return base;
}

// Every file of a directory, name → bytes.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    files[entry.path().filename().string()] =
        torchser::testing::read_file(entry.path());
  }
  return files;
}

// Runs `body` in a forked child and returns what it reported: "ok", or
// "typed: <message>" for a torchser::Error, "untyped: <message>" for any other
// exception, "skip: <reason>" when the child could not set up its fault.
std::string in_child(const std::function<std::string()>& body) {
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) {
    return "untyped: pipe failed";
  }
  const pid_t child = ::fork();
  if (child == 0) {
    // LibTorch's OpenMP pool, started by an earlier test in the parent, has
    // no threads in the child: a parallel kernel there would wait forever.
    at::set_num_threads(1);
    ::close(pipe_fds[0]);
    std::string report;
    try {
      report = body();
    } catch (const torchser::Error& e) {
      report = std::string("typed: ") + e.what();
    } catch (const std::exception& e) {
      report = std::string("untyped: ") + e.what();
    }
    const char* p = report.data();
    std::size_t left = report.size();
    while (left > 0) {
      const ssize_t n = ::write(pipe_fds[1], p, left);
      if (n <= 0) {
        break;
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string report;
  char buffer[4096];
  ssize_t n = 0;
  while ((n = ::read(pipe_fds[0], buffer, sizeof buffer)) > 0) {
    report.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (!WIFEXITED(status)) {
    return "crashed (signal " + std::to_string(WTERMSIG(status)) +
           "): " + report;
  }
  return report;
}

// The savers under test: each writes `sd` into `dir` its own way.
struct Saver {
  const char* name;
  std::function<void(const StateDict&, const fs::path&)> save;
};
std::vector<Saver> savers() {
  return {
      {"sharded safetensors",
       [](const StateDict& sd, const fs::path& dir) {
         save_torch_state_dict(
             sd, dir, SaveOptions().max_shard_size(int64_t{40000}));
       }},
      {"sharded pickle",
       [](const StateDict& sd, const fs::path& dir) {
         save_torch_state_dict(
             sd,
             dir,
             SaveOptions()
                 .max_shard_size(int64_t{40000})
                 .safe_serialization(false));
       }},
      {"save_file",
       [](const StateDict& sd, const fs::path& dir) {
         save_file(sd, dir / "model.safetensors");
       }},
      {"torch_save",
       [](const StateDict& sd, const fs::path& dir) {
         torch_save(sd, dir / "model.bin");
       }},
      {"export_entries_as_dduf",
       [](const StateDict& sd, const fs::path& dir) {
         export_entries_as_dduf(
             dir / "pipe.dduf",
             {DDUFExportEntry::from_bytes("model_index.json", R"({"unet": 1})"),
              DDUFExportEntry::from_bytes("unet/config.json", "{}"),
              DDUFExportEntry::from_state_dict("unet/model.safetensors", sd)});
       }},
  };
}

TEST(FaultInjectionTest, FileSizeLimitFailsCleanlyAndKeepsTheOldCheckpoint) {
  for (const Saver& saver : savers()) {
    SCOPED_TRACE(saver.name);
    TempDir dir;
    saver.save(version(1, 256), dir.path()); // 12 KiB
    const auto before = snapshot(dir.path());
    const std::string report = in_child([&] {
      // 64 KiB per file; SIGXFSZ ignored, so writes past it fail with EFBIG.
      ::signal(SIGXFSZ, SIG_IGN);
      const rlimit limit{64 << 10, 64 << 10};
      if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) {
        return std::string("skip: setrlimit failed");
      }
      saver.save(version(100, 16384), dir.path()); // 768 KiB
      return std::string("ok");
    });
    EXPECT_THAT(report, HasSubstr("typed: "));
    EXPECT_THAT(report, HasSubstr("File too large"));
    EXPECT_THAT(report, HasSubstr(dir.path().string())); // names the file
    EXPECT_EQ(snapshot(dir.path()), before)
        << "the old checkpoint changed, or temporary files were left";
  }
}

TEST(FaultInjectionTest, FullFileSystemFailsCleanlyAndKeepsTheOldCheckpoint) {
  TempDir dir;
  const fs::path mount_point = dir.path() / "small";
  fs::create_directories(mount_point);
  for (const Saver& saver : savers()) {
    SCOPED_TRACE(saver.name);
    const std::string report = in_child([&]() -> std::string {
      // A 1 MiB tmpfs of this child's own (a mount namespace, and a user
      // namespace when not root): no privileges or cleanup needed.
      const uid_t uid = ::geteuid();
      const gid_t gid = ::getegid();
      if (::unshare(CLONE_NEWNS | (uid == 0 ? 0 : CLONE_NEWUSER)) != 0) {
        return "skip: unshare: " + std::string(std::strerror(errno));
      }
      if (uid != 0) {
        std::ofstream("/proc/self/setgroups") << "deny";
        std::ofstream("/proc/self/uid_map") << "0 " << uid << " 1";
        std::ofstream("/proc/self/gid_map") << "0 " << gid << " 1";
      }
      if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
          ::mount("tmpfs", mount_point.c_str(), "tmpfs", 0, "size=1m") != 0) {
        return "skip: mount: " + std::string(std::strerror(errno));
      }
      saver.save(version(1, 1024), mount_point); // 48 KiB fits
      const auto before = snapshot(mount_point);
      try {
        saver.save(version(100, 65536), mount_point); // 3 MiB does not
        return "the save into a full file system succeeded";
      } catch (const torchser::Error& e) {
        if (snapshot(mount_point) != before) {
          return "the old checkpoint changed, or temporary files were left";
        }
        return std::string("typed: ") + e.what();
      }
    });
    if (report.rfind("skip: ", 0) == 0) {
      GTEST_SKIP() << "no private tmpfs here (" << report
                   << "); FileSizeLimit covers write errors";
    }
    EXPECT_THAT(report, HasSubstr("typed: "));
    EXPECT_THAT(report, HasSubstr("No space left on device"));
    EXPECT_THAT(report, HasSubstr(mount_point.string()));
  }
}

// A checkpoint folder that is a mount point cannot be swapped (a rename
// never crosses filesystems): the journal commits there.
TEST(FaultInjectionTest, AMountPointCommitsThroughTheJournal) {
  TempDir dir;
  const fs::path mount_point = dir.path() / "mounted";
  fs::create_directories(mount_point);
  const std::string report = in_child([&]() -> std::string {
    const uid_t uid = ::geteuid();
    const gid_t gid = ::getegid();
    if (::unshare(CLONE_NEWNS | (uid == 0 ? 0 : CLONE_NEWUSER)) != 0) {
      return "skip: unshare: " + std::string(std::strerror(errno));
    }
    if (uid != 0) {
      std::ofstream("/proc/self/setgroups") << "deny";
      std::ofstream("/proc/self/uid_map") << "0 " << uid << " 1";
      std::ofstream("/proc/self/gid_map") << "0 " << gid << " 1";
    }
    if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("tmpfs", mount_point.c_str(), "tmpfs", 0, "size=4m") != 0) {
      return "skip: mount: " + std::string(std::strerror(errno));
    }
    StateDict sd;
    for (int i = 0; i < 6; ++i) {
      sd.insert(
          "w" + std::to_string(i), at::full({1024}, static_cast<float>(i)));
    }
    save_torch_state_dict(sd, mount_point, SaveOptions().max_shard_size(8000));
    {
      const detail::CheckpointCommit commit(mount_point, 2, /*durable=*/false);
      if (commit.mode() != detail::CheckpointCommit::Mode::kJournal) {
        return std::string("not the journal");
      }
    }
    for (auto& item : sd) {
      item.value().add_(100);
    }
    save_torch_state_dict(sd, mount_point, SaveOptions().max_shard_size(8000));
    const float w5 =
        load_file(mount_point / "model-00006-of-00006.safetensors")["w5"][0]
            .item<float>();
    return w5 == 105.0F ? std::string("ok") : "w5 is " + std::to_string(w5);
  });
  if (report.rfind("skip: ", 0) == 0) {
    GTEST_SKIP() << "no private tmpfs here (" << report << ")";
  }
  EXPECT_EQ(report, "ok");
}

TEST(FaultInjectionTest, ConcurrentLoadsNeverSeeAPartialCheckpoint) {
  // One process saves new versions over the same shard names in a loop;
  // this one loads in a loop: every load is one whole version.
  for (const bool safe : {true, false}) {
    SCOPED_TRACE(safe ? "safetensors" : "pickle");
    TempDir dir;
    const auto options = SaveOptions()
                             .max_shard_size(int64_t{40000})
                             .safe_serialization(safe)
                             .durable(false);
    save_torch_state_dict(version(0), dir.path(), options);
    const pid_t saver = ::fork();
    if (saver == 0) {
      at::set_num_threads(1); // as in in_child()
      for (int v = 1;; ++v) {
        save_torch_state_dict(
            version(static_cast<float>(v * 100)), dir.path(), options);
      }
    }
    std::set<float> seen;
    int loads = 0;
    for (const auto start = std::chrono::steady_clock::now();
         std::chrono::steady_clock::now() - start < std::chrono::seconds(2);) {
      Twelve model;
      for (const auto backend :
           {LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect}) {
        const auto result = load_torch_model(
            model,
            dir.path(),
            LoadOptions().strict(true).safe(safe).backend(backend));
        ASSERT_TRUE(
            result.missing_keys.empty() && result.unexpected_keys.empty());
        seen.insert(loaded_version(model));
        ++loads;
      }
      if (::testing::Test::HasFailure()) {
        break;
      }
    }
    ::kill(saver, SIGKILL);
    ::waitpid(saver, nullptr, 0);
    std::cout << "[fault] " << (safe ? "safetensors" : "pickle") << ": "
              << loads << " loads saw " << seen.size() << " versions\n";
    EXPECT_GT(seen.size(), 2u); // the loads really raced with the saves
  }
}

TEST(FaultInjectionTest, PreadBackendTurnsAFileTruncatedUnderItIntoAnError) {
  TempDir dir;
  const fs::path st = dir.path() / "model.safetensors";
  save_file(version(1), st);
  const SafeOpen file(st, SafeOpenOptions().backend(LoadBackend::kPread));
  fs::resize_file(st, 1000); // rewritten in place by another tool
  EXPECT_THROW_CONTAINS(
      (void)file.get_tensor("w11"),
      OSError,
      "was it truncated while being read?");
  EXPECT_THROW_CONTAINS((void)file.get_tensor("w11"), OSError, st.string());

  const fs::path bin = dir.path() / "model.bin";
  torch_save(version(1, 65536), bin);
  const auto size = fs::file_size(bin);
  // torch_load without mmap reads with pread: a file cut short is an error.
  fs::resize_file(bin, size / 2);
  EXPECT_THROW((void)torch_load(bin, TorchLoadOptions().mmap(false)), Error);
}

TEST(FaultInjectionTest, MmapBackendFaultsOnAFileTruncatedUnderIt) {
  // What load_backend.h documents: the lost pages of a mapped file fault.
  // (Pinned so that a change of behaviour is noticed, and the docs with it.)
  TempDir dir;
  const fs::path st = dir.path() / "model.safetensors";
  save_file(version(1, 65536), st);
  EXPECT_DEATH(
      {
        const StateDict sd = load_file(st);
        fs::resize_file(st, 4096);
        float sum = 0;
        for (const auto& item : sd) {
          sum += item.value()[65535].item<float>();
        }
        std::printf("%f\n", sum);
      },
      "");
}

} // namespace
} // namespace torchser
