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

} // namespace torchser::detail
