#pragma once

/// \file
/// DDUF: a whole diffusion pipeline in one uncompressed ZIP archive
/// (huggingface_hub's `read_dduf_file`, `export_entries_as_dduf`,
/// `export_folder_as_dduf`).
///
/// Rules (huggingface_hub `serialization/_dduf.py`):
/// 1. A ZIP archive (ZIP64 extensions allowed) whose entries are all stored,
///    never compressed.
/// 2. Entry names end in .json, .model, .safetensors or .txt, use `/`
///    separators, and have at most one directory level.
/// 3. `model_index.json` is required at the root and is a JSON object.
/// 4. Every folder is a key of `model_index.json` and holds at least one of
///    config.json, tokenizer_config.json, preprocessor_config.json,
///    scheduler_config.json.
///
/// torchser writes the reference's layout (ZIP64 extra in every local
/// header, deterministic timestamps) and also aligns every entry's data to 64
/// bytes with padding in the local header's extra field, so safetensors
/// entries can be memory-mapped and loaded without a copy. Exports are
/// written to a temporary file and renamed: a failed export leaves nothing.
/// The reader maps damaged archives and bad JSON to DDUFCorruptedFileError
/// and skips zip directory entries (`vae/`, as `zip -r` writes them).

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <torchser/errors.h>
#include <torchser/export.h>
#include <torchser/ordered_map.h>
#include <torchser/safetensors.h>
#include <torchser/state_dict.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser {

struct LoadOptions;
struct LoadResult;

/// A zero-copy view of bytes in a memory-mapped file, keeping the mapping
/// alive while the view exists.
class TORCHSER_API MappedBytes {
 public:
  /// `size` bytes at `data`, valid while `owner` (the mapping) lives.
  MappedBytes(
      std::shared_ptr<const void> owner,
      const std::uint8_t* data,
      std::size_t size)
      : owner_(std::move(owner)), data_(data), size_(size) {}
  /// The first byte.
  const std::uint8_t* data() const noexcept {
    return data_;
  }
  /// The number of bytes.
  std::size_t size() const noexcept {
    return size_;
  }
  /// The bytes as a string view (no copy).
  std::string_view view() const noexcept {
    return {reinterpret_cast<const char*>(data_), size_};
  }

 private:
  std::shared_ptr<const void> owner_;
  const std::uint8_t* data_;
  std::size_t size_;
};

/// `huggingface_hub.DDUFEntry`: where an entry's bytes are in the archive.
struct TORCHSER_API DDUFEntry {
  std::string
      filename; ///< the entry's name in the archive, e.g. "unet/config.json"
  std::uint64_t length =
      0; ///< its size in bytes (stored, so also its size in the file)
  std::uint64_t offset = 0;        ///< absolute, in the archive file
  std::filesystem::path dduf_path; ///< the archive

  /// The entry as UTF-8 text. Throws DDUFCorruptedFileError when it is not
  /// valid UTF-8 or the file is shorter than the entry says.
  std::string read_text() const;
  /// The entry's bytes, memory-mapped (zero-copy).
  MappedBytes as_mmap() const;
  /// Python's repr: `DDUFEntry(filename='model_index.json', length=14,
  /// offset=66)`.
  std::string repr() const;
};

/// `huggingface_hub.read_dduf_file`: the entries (raw names → entries, in
/// archive order; a repeated name keeps its first position and its last
/// entry). Only the central directory and the local headers are read.
///
/// Throws DDUFCorruptedFileError (compressed entries, bad names, no or bad
/// `model_index.json`, structure rules, damaged archives), FileNotFoundError.
TORCHSER_API OrderedMap<DDUFEntry> read_dduf_file(
    const std::filesystem::path& dduf_path);

/// One entry of an export: a name and where its content comes from.
struct TORCHSER_API DDUFExportEntry {
  /// Writes the content through the sink it is given, in any number of
  /// pieces; nothing is held in memory by torchser.
  using Producer = std::function<void(const ByteSink&)>;

  std::string filename; ///< the entry's name in the archive
  /// A file to copy, bytes, or a producer.
  std::variant<std::filesystem::path, std::string, Producer> content;

  /// The content of the file at `path`, copied when the archive is written.
  static DDUFExportEntry from_file(
      std::string filename, std::filesystem::path path);
  /// `bytes` as the content.
  static DDUFExportEntry from_bytes(std::string filename, std::string bytes);
  /// Whatever `producer` writes, streamed into the archive.
  static DDUFExportEntry from_producer(std::string filename, Producer producer);
  /// A safetensors file of `state_dict` as save_torch_state_dict writes one
  /// (metadata {"format": "pt"}, tied weights stored once and recorded as
  /// aliases), streamed into the archive one tensor at a time.
  static DDUFExportEntry from_state_dict(
      std::string filename, StateDict state_dict);
};

/// `huggingface_hub.export_entries_as_dduf`. Entries are written one at a
/// time, in order. Throws DDUFExportError (duplicate names, bad
/// `model_index.json`, bad structure) or DDUFInvalidEntryNameError's parent
/// DDUFExportError for bad names (message "Invalid entry name: ..."); on any
/// error the archive is not created (an existing file is left as it was).
TORCHSER_API void export_entries_as_dduf(
    const std::filesystem::path& dduf_path,
    const std::vector<DDUFExportEntry>& entries);

/// `huggingface_hub.export_folder_as_dduf`: every regular file of `folder`
/// with an allowed extension and at most one directory level, in sorted
/// order (the reference uses the filesystem's order).
TORCHSER_API void export_folder_as_dduf(
    const std::filesystem::path& dduf_path,
    const std::filesystem::path& folder);

/// The tensors of a safetensors entry, as views of the archive's mapping
/// (zero-copy when the entry's tensors are aligned, as in archives torchser
/// writes; a copy otherwise).
TORCHSER_API StateDict load_state_dict_from_dduf_entry(const DDUFEntry& entry);

/// `load_torch_model` from a safetensors entry of a DDUF archive: copies its
/// tensors into `model`'s parameters and buffers (keys, shapes, strictness
/// and re-tied aliases as for a single safetensors file).
TORCHSER_API LoadResult load_torch_model_from_dduf_entry(
    torch::nn::Module& model,
    const DDUFEntry& entry,
    const LoadOptions& options);

namespace detail {

/// `_validate_dduf_entry_name`: the name without leading / trailing slashes,
/// or DDUFInvalidEntryNameError.
TORCHSER_API std::string validate_dduf_entry_name(
    const std::string& entry_name);

/// A folder's files as export_folder_as_dduf sees them, relative and sorted:
/// those it packs, and those it leaves out (a file type DDUF does not allow,
/// or more than one folder deep), as huggingface_hub does.
struct TORCHSER_API DDUFFolderFiles {
  std::vector<std::filesystem::path> kept;     ///< packed, in this order
  std::vector<std::filesystem::path> left_out; ///< skipped
};

/// The files of `folder` export_folder_as_dduf packs and leaves out.
TORCHSER_API DDUFFolderFiles
dduf_folder_files(const std::filesystem::path& folder);

} // namespace detail

} // namespace torchser
