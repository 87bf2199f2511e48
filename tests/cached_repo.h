#pragma once

// A repo in a Hugging Face cache, laid out as huggingface_hub's
// file_download.py writes it: blobs named by digest, snapshots of symlinks
// into ../../blobs, refs/ holding commit hashes, .no_exist/ markers.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

#include <ATen/ops/full.h>

#include <torchser/save.h>

#include "test_utils.h"

namespace torchser::testing {

namespace fs = std::filesystem;

inline std::string shell(const std::string& command) {
  std::string out = run_command(command).output;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) {
    out.pop_back();
  }
  return out;
}

// The blob name huggingface_hub gives a file: the LFS sha256 for weights,
// the git blob sha1 (the etag) for small text files. Computed by coreutils
// and git, not by torchser.
inline std::string blob_name(const fs::path& file) {
  if (file.extension() == ".json") {
    return shell("git hash-object '" + file.string() + "'");
  }
  const std::string line = shell("sha256sum '" + file.string() + "'");
  return line.substr(0, 64);
}

inline const std::string kCommitA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
inline const std::string kCommitB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

// A state dict of a Linear(3, 2) whose values say which revision holds it.
inline StateDict linear_values(float value) {
  return StateDict{
      {"weight", at::full({2, 3}, value)}, {"bias", at::full({2}, value)}};
}

// Writes the files of `folder` into the cache as one snapshot of `repo`.
inline void add_snapshot(
    const fs::path& cache,
    const std::string& repo_folder,
    const std::string& commit,
    const fs::path& folder) {
  const fs::path repo = cache / repo_folder;
  fs::create_directories(repo / "blobs");
  for (const auto& entry : fs::recursive_directory_iterator(folder)) {
    if (!entry.is_regular_file()) {
      continue;
    }
    const fs::path relative = fs::relative(entry.path(), folder);
    const std::string blob = blob_name(entry.path());
    fs::copy_file(
        entry.path(), repo / "blobs" / blob, fs::copy_options::skip_existing);
    const fs::path link = repo / "snapshots" / commit / relative;
    fs::create_directories(link.parent_path());
    fs::path up;
    const auto depth = std::distance(relative.begin(), relative.end());
    for (std::ptrdiff_t i = 0; i <= depth; ++i) {
      up /= "..";
    }
    fs::create_symlink(up / "blobs" / blob, link);
  }
}

inline void add_ref(
    const fs::path& cache,
    const std::string& repo_folder,
    const std::string& name,
    const std::string& commit) {
  fs::create_directories((cache / repo_folder / "refs" / name).parent_path());
  write_file(cache / repo_folder / "refs" / name, commit); // no newline
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::optional<std::string>& value)
      : name_(name) {
    if (const char* old = std::getenv(name)) {
      old_ = old;
    }
    if (value) {
      ::setenv(name, value->c_str(), 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// org/tiny: main → commit A (one safetensors file, config.json), tag v1.0 →
// commit B (sharded, other values); .no_exist records pytorch_model.bin.
struct CachedRepo {
  TempDir dir;
  fs::path cache = dir / "hub";
  CachedRepo() {
    const fs::path a = dir / "a";
    const fs::path b = dir / "b";
    fs::create_directories(a);
    fs::create_directories(b);
    save_torch_state_dict(linear_values(1.0F), a);
    write_file(a / "config.json", "{\"model_type\": \"tiny\"}\n");
    save_torch_state_dict(
        linear_values(2.0F), b, SaveOptions().max_shard_size(1));
    add_snapshot(cache, "models--org--tiny", kCommitA, a);
    add_snapshot(cache, "models--org--tiny", kCommitB, b);
    add_ref(cache, "models--org--tiny", "main", kCommitA);
    add_ref(cache, "models--org--tiny", "v1.0", kCommitB);
    fs::create_directories(cache / "models--org--tiny/.no_exist" / kCommitA);
    write_file(
        cache / "models--org--tiny/.no_exist" / kCommitA / "pytorch_model.bin",
        "");
  }
};

} // namespace torchser::testing
