#pragma once

/// \file
/// Checkpoints in the local Hugging Face cache, found as huggingface_hub
/// lays it out (offline: torchser never uses the network). After
/// `huggingface-cli download org/name`, the files are in
/// `<cache>/models--org--name/snapshots/<commit>/`, as symlinks into
/// `blobs/`, and `refs/<branch or tag>` holds the commit a name points to.
///
/// Every loader and CLI command takes such a checkpoint by name: a path that
/// does not exist and reads as `ORG/NAME[@REVISION][/FILE]` (a repo id as the
/// Hub spells them, with a branch, tag or commit hash; `main` by default) is
/// looked up here when the cache holds that repo or a revision is given. A path
/// that exists always wins, as in transformers' from_pretrained. Revisions that
/// contain '/' (`refs/pr/1`) need cached_snapshot().

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include <torchser/export.h>

namespace torchser {

/// The cache folder, as huggingface_hub picks it: `HF_HUB_CACHE`, else
/// `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`
/// (with `~` and `$VAR` expanded, as Python's expanduser / expandvars do).
TORCHSER_API std::filesystem::path hf_hub_cache();

/// A checkpoint named by repo: `ORG/NAME[@REVISION][/FILE]`.
struct TORCHSER_API HubReference {
  std::string repo_id;           ///< "org/name" (or a legacy "name")
  std::string revision = "main"; ///< branch, tag or commit hash
  std::string filename;          ///< a file in the repo; empty: the snapshot
};

/// `text` as a HubReference, or std::nullopt when it cannot be one (an
/// absolute or dotted path, a name the Hub would reject: huggingface_hub's
/// validate_repo_id rules).
TORCHSER_API std::optional<HubReference> parse_hub_reference(
    std::string_view text);

/// `snapshot_download(repo_id, revision=…, local_files_only=True)`: the
/// snapshot folder of `revision` (a commit hash, or a branch or tag through
/// `refs/`). Every symlink in it must stay inside the repo's cache folder.
/// LocalEntryNotFoundError naming the repo, revision and cache folder when
/// it is not cached; OSError for a symlink leading elsewhere or nowhere.
TORCHSER_API std::filesystem::path cached_snapshot(
    const std::string& repo_id,
    const std::string& revision = "main",
    const std::optional<std::filesystem::path>& cache_dir = std::nullopt);

/// `hf_hub_download(repo_id, filename, revision=…, local_files_only=True)`:
/// the file in the snapshot (a symlink into `blobs/`). LocalEntryNotFoundError
/// when the repo, revision or file is not cached, saying so when the cache
/// records the file as absent (`.no_exist/`); OSError for a symlink that
/// leaves the repo's cache folder; ValueError for a filename with `..`.
TORCHSER_API std::filesystem::path cached_file(
    const std::string& repo_id,
    const std::string& filename,
    const std::string& revision = "main",
    const std::optional<std::filesystem::path>& cache_dir = std::nullopt);

/// What a loader reads for `path`: `path` itself when it exists or is no
/// HubReference, else the cached snapshot or file it names. A name without
/// '@' ("gpt2", "org/name") is looked up only when the cache holds that
/// repo, so a mistyped local path keeps its own error; with '@' a repo the
/// cache lacks is a LocalEntryNotFoundError.
TORCHSER_API std::filesystem::path resolve_hub_path(
    const std::filesystem::path& path);

} // namespace torchser
