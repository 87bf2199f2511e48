#pragma once

// The Hugging Face cache's own integrity record: a file's blob name is the
// SHA-256 of its content (LFS files) or its git blob SHA-1 (small files).
// Never installed; exported for the CLI's verify.

#include <filesystem>
#include <string>
#include <vector>

#include <torchser/export.h>

namespace torchser::detail {

struct TORCHSER_API BlobCheck {
  std::filesystem::path file; ///< the snapshot's file (a symlink)
  std::string blob;           ///< its blob's name: the digest expected
  std::string algorithm;      ///< "sha256" or "git-sha1"
  std::string actual;         ///< the digest of the content
  bool ok() const {
    return blob == actual;
  }
};

/// The snapshot folder `path` lies in (`…/models--org--name/snapshots/REV`),
/// or empty when it lies in none.
TORCHSER_API std::filesystem::path snapshot_of(
    const std::filesystem::path& path);

/// Each file of the folder `snapshot` (recursively), or `snapshot` itself
/// when it is a file, that links into `blobs/` under a digest name, checked
/// against it. Reads every such file once.
TORCHSER_API std::vector<BlobCheck> check_cached_blobs(
    const std::filesystem::path& snapshot);

/// The folder of a `hf download --local-dir` that `path` lies in (the one
/// holding `.cache/huggingface/download/`), or empty.
TORCHSER_API std::filesystem::path local_dir_of(
    const std::filesystem::path& path);

/// What huggingface_hub's _local_folder.py records per downloaded file
/// (`.cache/huggingface/download/FILE.metadata`: commit, etag, time): each
/// file under `path` (a folder or one file) inside the download folder
/// `local_dir` whose etag is a digest, checked against it. Files changed
/// after their download (mtime past the recorded time, as huggingface_hub
/// judges it) are not checked; their names go to `outdated`.
TORCHSER_API std::vector<BlobCheck> check_local_dir_downloads(
    const std::filesystem::path& local_dir,
    const std::filesystem::path& path,
    std::vector<std::string>* outdated);

} // namespace torchser::detail
