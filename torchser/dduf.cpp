#include <torchser/dduf.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include <torchser/load.h>

#include "torchser/detail/file.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/load_file.h"
#include "torchser/detail/python_format.h"
#include "torchser/detail/shared_tensors.h"
#include "torchser/detail/tensor_file.h"
#include "torchser/detail/zip.h"

namespace torchser {
namespace {

// DDUF_ALLOWED_ENTRIES and DDUF_FOLDER_REQUIRED_ENTRIES, in source order.
const std::set<std::string> kAllowedExtensions = {
    ".json", ".model", ".safetensors", ".txt"};
const char* const kRequiredFolderEntries[] = {
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "scheduler_config.json"};
constexpr std::uint16_t kAlignmentPaddingId = 0xD935; // as Android's zipalign

// Python's type(x) repr for a JSON value.
std::string python_type(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::array:
      return "<class 'list'>";
    case nlohmann::json::value_t::string:
      return "<class 'str'>";
    case nlohmann::json::value_t::boolean:
      return "<class 'bool'>";
    case nlohmann::json::value_t::number_float:
      return "<class 'float'>";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
      return "<class 'int'>";
    case nlohmann::json::value_t::null:
      return "<class 'NoneType'>";
    default:
      return "<class 'dict'>";
  }
}

const std::string& entry_name(const std::string& name) {
  return name;
}
template <typename Item>
const std::string& entry_name(const Item& item) {
  return item.key();
}

// `_validate_dduf_structure`, folders in sorted order (the reference iterates a
// set; a sorted order makes errors reproducible). `has(name)` says whether the
// archive has an entry of that name.
template <typename Names, typename Has>
void validate_structure(
    const nlohmann::json& index, const Names& names, const Has& has) {
  if (!index.is_object()) {
    throw DDUFCorruptedFileError(
        "Invalid 'model_index.json' content. Must be a dictionary. Got " +
        python_type(index) + ".");
  }
  std::set<std::string> folders;
  for (const auto& item : names) {
    const std::string& name = entry_name(item);
    const std::size_t slash = name.find('/');
    if (slash != std::string::npos) {
      folders.insert(name.substr(0, slash));
    }
  }
  for (const std::string& folder : folders) {
    if (!index.contains(folder)) {
      throw DDUFCorruptedFileError(
          "Missing required entry '" + folder + "' in 'model_index.json'.");
    }
    const bool has_config = std::any_of(
        std::begin(kRequiredFolderEntries),
        std::end(kRequiredFolderEntries),
        [&](const char* required) { return has(folder + "/" + required); });
    if (!has_config) {
      std::string set = "{";
      for (const char* required : kRequiredFolderEntries) {
        set += (set.size() > 1 ? ", '" : "'") + std::string(required) + "'";
      }
      throw DDUFCorruptedFileError(
          "Missing required file in folder '" + folder +
          "'. Must contains at least one of " + set + "}.");
    }
  }
}

// A name as messages show it: raw when it is printable UTF-8, Python's repr
// otherwise (NUL bytes, invalid UTF-8).
std::string display_name(const std::string& name) {
  const bool printable =
      detail::utf8_error_position(name) == std::string::npos &&
      std::none_of(name.begin(), name.end(), [](char c) {
        return static_cast<unsigned char>(c) < 0x20;
      });
  return printable ? name : detail::python_repr(name);
}

// Stricter than the reference's reader, which accepts these because it never
// extracts: names that would escape a folder when unpacked (absolute, "..")
// and names that are not plain UTF-8 text.
void check_safe_name(const std::string& name) {
  if (detail::utf8_error_position(name) != std::string::npos) {
    throw DDUFInvalidEntryNameError(
        "Entry names must be UTF-8. Got " + detail::python_repr(name) + ".");
  }
  if (name.find('\0') != std::string::npos) {
    throw DDUFInvalidEntryNameError(
        "Entry names must not contain NUL bytes. Got " +
        detail::python_repr(name) + ".");
  }
  // The one rule of torchser for a name inside a folder (index shards, the
  // save journal, DDUF entries on both sides): no root, drive or "..".
  if (detail::escapes_directory(name)) {
    throw DDUFInvalidEntryNameError(
        "Entry names must stay inside the archive's folder (no root, drive or "
        "'..'). Got " +
        name + ".");
  }
}

// `_validate_dduf_entry_name` without allocating: the stripped name is a view
// of `entry_name`.
std::string_view validate_entry_name(std::string_view entry_name) {
  const std::size_t dot = entry_name.rfind('.');
  const std::string_view tail =
      dot == std::string_view::npos ? entry_name : entry_name.substr(dot + 1);
  const bool allowed = tail == "json" || tail == "model" ||
                       tail == "safetensors" || tail == "txt";
  if (!allowed) {
    throw DDUFInvalidEntryNameError(
        "File type not allowed: " + std::string(entry_name));
  }
  if (entry_name.find('\\') != std::string_view::npos) {
    throw DDUFInvalidEntryNameError(
        "Entry names must use UNIX separators ('/'). Got " +
        std::string(entry_name) + ".");
  }
  const std::size_t first = entry_name.find_first_not_of('/');
  const std::size_t last = entry_name.find_last_not_of('/');
  const std::string_view stripped =
      first == std::string_view::npos
          ? std::string_view()
          : entry_name.substr(first, last - first + 1);
  if (std::count(stripped.begin(), stripped.end(), '/') > 1) {
    throw DDUFInvalidEntryNameError(
        "DDUF only supports 1 level of directory. Got " +
        std::string(stripped) + ".");
  }
  return stripped;
}

nlohmann::json parse_model_index(const std::string& text) {
  return nlohmann::json::parse(text); // throws nlohmann::json::parse_error
}

} // namespace

namespace detail {

std::string validate_dduf_entry_name(const std::string& entry_name) {
  const std::string stripped(validate_entry_name(entry_name));
  check_safe_name(
      stripped); // what read_dduf_file would refuse is never written
  return stripped;
}

} // namespace detail

// ---------------------------------------------------------------------------
// DDUFEntry

std::string DDUFEntry::read_text() const {
  const MappedBytes bytes = as_mmap();
  const std::size_t bad = detail::utf8_error_position(bytes.view());
  if (bad != std::string_view::npos) {
    throw DDUFCorruptedFileError(
        "Entry '" + filename + "' of '" + dduf_path.string() +
        "' is not valid UTF-8 text (byte " + std::to_string(bad) + ").");
  }
  return std::string(bytes.view());
}

MappedBytes DDUFEntry::as_mmap() const {
  const detail::File file = detail::File::open_read(dduf_path);
  const auto mapping = detail::MappedFile::map(file);
  if (offset > mapping->size() || length > mapping->size() - offset) {
    throw DDUFCorruptedFileError(
        "Entry '" + filename + "' runs past the end of '" + dduf_path.string() +
        "'.");
  }
  if (length == 0) {
    return MappedBytes(mapping, nullptr, 0);
  }
  return MappedBytes(
      mapping, mapping->data() + offset, static_cast<std::size_t>(length));
}

std::string DDUFEntry::repr() const {
  return "DDUFEntry(filename=" + detail::python_repr(filename) +
         ", length=" + std::to_string(length) +
         ", offset=" + std::to_string(offset) + ")";
}

// ---------------------------------------------------------------------------
// Reading

OrderedMap<DDUFEntry> read_dduf_file(const std::filesystem::path& dduf_path) {
  // One mapping for the directory, the local headers and model_index.json:
  // a thousand entries cost no system call each.
  const detail::File file = detail::File::open_read(dduf_path);
  const auto mapping = detail::MappedFile::map(file);
  std::vector<detail::ZipEntry> zip_entries;
  try {
    zip_entries = detail::read_zip_directory(mapping->data(), mapping->size());
  } catch (const detail::ZipFormatError& e) {
    // Python leaks zipfile.BadZipFile here; torchser says
    // DDUFCorruptedFileError.
    throw DDUFCorruptedFileError(
        "Invalid DDUF file '" + dduf_path.string() + "': " + e.what());
  }
  // Each entry's bytes belong to it alone: overlapping entries are how
  // polyglot files and zip bombs are built.
  std::vector<const detail::ZipEntry*> by_offset;
  for (const detail::ZipEntry& z : zip_entries) {
    by_offset.push_back(&z);
  }
  std::sort(
      by_offset.begin(),
      by_offset.end(),
      [](const detail::ZipEntry* a, const detail::ZipEntry* b) {
        return a->data_offset < b->data_offset;
      });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    const detail::ZipEntry& previous = *by_offset[i - 1];
    if (by_offset[i]->local_header_offset <
        previous.data_offset + previous.compressed_size) {
      throw DDUFCorruptedFileError(
          "Invalid DDUF file '" + dduf_path.string() + "': entries '" +
          display_name(previous.name) + "' and '" +
          display_name(by_offset[i]->name) + "' overlap.");
    }
  }
  OrderedMap<DDUFEntry> entries;
  entries.reserve(zip_entries.size());
  for (detail::ZipEntry& z : zip_entries) {
    if (z.method != 0) {
      throw DDUFCorruptedFileError(
          "Data must not be compressed in DDUF file. (entry '" +
          display_name(z.name) + "', file '" + dduf_path.string() + "')");
    }
    if (z.is_directory()) {
      continue; // `zip -r` writes these; they hold nothing, and the reference
                // skips them too
    }
    try {
      validate_entry_name(z.name);
      check_safe_name(z.name);
    } catch (const DDUFInvalidEntryNameError& e) {
      throw DDUFCorruptedFileError(
          "Invalid entry name in DDUF file: " + display_name(z.name) + " (" +
          e.what() + "; file '" + dduf_path.string() + "')");
    }
    std::string key = z.name;
    const auto [slot, inserted] = entries.try_insert(
        std::move(key),
        DDUFEntry{
            std::move(z.name), z.uncompressed_size, z.data_offset, dduf_path});
    if (!inserted) { // Python's dict: the first position, the last entry
      slot->length = z.uncompressed_size;
      slot->offset = z.data_offset;
    }
  }
  const DDUFEntry* index_entry = entries.find("model_index.json");
  if (index_entry == nullptr) {
    throw DDUFCorruptedFileError(
        "Missing required 'model_index.json' entry in DDUF file. (file '" +
        dduf_path.string() + "')");
  }
  const std::string_view index_text(
      reinterpret_cast<const char*>(mapping->data() + index_entry->offset),
      static_cast<std::size_t>(index_entry->length));
  if (detail::utf8_error_position(index_text) != std::string_view::npos) {
    throw DDUFCorruptedFileError(
        "'model_index.json' of '" + dduf_path.string() +
        "' is not valid UTF-8.");
  }
  nlohmann::json index;
  try {
    index = parse_model_index(std::string(index_text));
  } catch (const nlohmann::json::exception& e) {
    // Python leaks json.JSONDecodeError here; torchser says
    // DDUFCorruptedFileError.
    throw DDUFCorruptedFileError(
        "Invalid JSON in 'model_index.json' of '" + dduf_path.string() +
        "': " + e.what());
  }
  try {
    validate_structure(index, entries, [&](const std::string& name) {
      return entries.contains(name);
    });
  } catch (const DDUFCorruptedFileError& e) {
    // The reference's text, then which archive it is about.
    throw DDUFCorruptedFileError(
        std::string(e.what()) + " (file '" + dduf_path.string() + "')");
  }
  return entries;
}

// ---------------------------------------------------------------------------
// Writing

DDUFExportEntry DDUFExportEntry::from_file(
    std::string filename, std::filesystem::path path) {
  return {std::move(filename), std::move(path)};
}
DDUFExportEntry DDUFExportEntry::from_bytes(
    std::string filename, std::string bytes) {
  return {std::move(filename), std::move(bytes)};
}
DDUFExportEntry DDUFExportEntry::from_producer(
    std::string filename, Producer producer) {
  return {std::move(filename), std::move(producer)};
}
DDUFExportEntry DDUFExportEntry::from_state_dict(
    std::string filename, StateDict state_dict) {
  // As save_torch_state_dict writes a file: tied weights stored once, the
  // other names recorded as aliases (load_torch_model re-ties them).
  SafetensorsMetadata metadata{{"format", "pt"}};
  detail::DroppedAliases tied = detail::drop_aliases(state_dict);
  for (const auto& [alias, kept] : tied.aliases) {
    metadata.emplace(alias, kept);
  }
  return from_producer(
      std::move(filename),
      [sd = std::move(tied.kept), metadata](const ByteSink& sink) {
        SafetensorsWriter(sd, metadata, /*force_contiguous=*/true).write(sink);
      });
}

namespace {

// Streams an entry's content into `sink`.
void produce_content(const DDUFExportEntry& entry, const ByteSink& sink) {
  if (const auto* path = std::get_if<std::filesystem::path>(&entry.content)) {
    const detail::File file = detail::File::open_read(*path);
    const std::uint64_t size = file.size();
    constexpr std::size_t kChunk = std::size_t{8}
                                   << 20; // the reference's 8 MiB
    std::vector<char> buffer(
        static_cast<std::size_t>(std::min<std::uint64_t>(size, kChunk)));
    for (std::uint64_t done = 0; done < size;) {
      const auto n = static_cast<std::size_t>(
          std::min<std::uint64_t>(size - done, kChunk));
      file.pread_exact(buffer.data(), n, done);
      sink(buffer.data(), n);
      done += n;
    }
  } else if (const auto* bytes = std::get_if<std::string>(&entry.content)) {
    if (!bytes->empty()) {
      sink(bytes->data(), bytes->size());
    }
  } else {
    std::get<DDUFExportEntry::Producer>(entry.content)(sink);
  }
}

} // namespace

void export_entries_as_dduf(
    const std::filesystem::path& dduf_path,
    const std::vector<DDUFExportEntry>& entries) {
  detail::AtomicFile file(dduf_path);
  detail::ZipWriter::Options zip_options;
  zip_options.alignment = 64;
  zip_options.padding_id = kAlignmentPaddingId;
  zip_options.python_zip64_layout = true;
  detail::ZipWriter zip(
      {[&](const void* d, std::size_t n) { file.write(d, n); },
       [&](const void* d, std::size_t n, std::uint64_t at) {
         file.patch(d, n, at);
       },
       {}},
      zip_options);
  std::set<std::string> raw_names;
  std::optional<nlohmann::json> index;
  for (const DDUFExportEntry& entry : entries) {
    if (!raw_names.insert(entry.filename).second) {
      throw DDUFExportError("Can't add duplicate entry: " + entry.filename);
    }
    if (entry.filename == "model_index.json") {
      std::string text;
      produce_content(entry, [&](const void* d, std::size_t n) {
        text.append(static_cast<const char*>(d), n);
      });
      try {
        index = parse_model_index(text);
      } catch (const nlohmann::json::exception& e) {
        throw DDUFExportError(
            "Failed to parse 'model_index.json'. (" + std::string(e.what()) +
            ")");
      }
    }
    std::string name;
    try {
      name = detail::validate_dduf_entry_name(entry.filename);
    } catch (const DDUFInvalidEntryNameError& e) {
      throw DDUFExportError(
          "Invalid entry name: " + entry.filename + " (" + e.what() + ")");
    }
    zip.add_streaming(
        name, [&](const std::function<void(const void*, std::size_t)>& sink) {
          produce_content(entry, sink);
        });
  }
  if (!index.has_value()) {
    throw DDUFExportError(
        "Missing required 'model_index.json' entry in DDUF file.");
  }
  try {
    validate_structure(*index, raw_names, [&](const std::string& name) {
      return raw_names.count(name) != 0;
    });
  } catch (const DDUFCorruptedFileError& e) {
    throw DDUFExportError(
        "Invalid DDUF file structure. (" + std::string(e.what()) + ")");
  }
  zip.finish();
  file.commit(/*durable=*/true);
}

namespace detail {

DDUFFolderFiles dduf_folder_files(const std::filesystem::path& folder) {
  DDUFFolderFiles out;
  for (const auto& item :
       std::filesystem::recursive_directory_iterator(folder)) {
    if (!item.is_regular_file()) {
      continue;
    }
    const std::filesystem::path relative =
        item.path().lexically_relative(folder);
    const std::string suffix = [&] {
      // Python's Path.suffix
      const std::string name = item.path().filename().string();
      const std::size_t dot = name.rfind('.');
      return (dot == std::string::npos || dot == 0 || dot + 1 == name.size())
                 ? std::string()
                 : name.substr(dot);
    }();
    // A file type DDUF does not allow, or nested directories.
    const bool allowed = kAllowedExtensions.count(suffix) != 0 &&
                         std::distance(relative.begin(), relative.end()) < 3;
    (allowed ? out.kept : out.left_out).push_back(relative);
  }
  std::sort(out.kept.begin(), out.kept.end());
  std::sort(out.left_out.begin(), out.left_out.end());
  return out;
}

} // namespace detail

void export_folder_as_dduf(
    const std::filesystem::path& dduf_path,
    const std::filesystem::path& folder) {
  std::vector<DDUFExportEntry> entries;
  for (const auto& relative : detail::dduf_folder_files(folder).kept) {
    entries.push_back(DDUFExportEntry::from_file(
        relative.generic_string(), folder / relative));
  }
  export_entries_as_dduf(dduf_path, entries);
}

// ---------------------------------------------------------------------------
// Loading from an entry

StateDict load_state_dict_from_dduf_entry(const DDUFEntry& entry) {
  return detail::read_all(*detail::open_tensor_file(
      entry.dduf_path,
      entry.offset,
      entry.length,
      entry.dduf_path.string() + ":" + entry.filename));
}

LoadResult load_torch_model_from_dduf_entry(
    torch::nn::Module& model,
    const DDUFEntry& entry,
    const LoadOptions& options) {
  detail::TensorFileOptions open;
  open.backend = options.backend();
  const auto file = detail::open_tensor_file(
      entry.dduf_path,
      entry.offset,
      entry.length,
      entry.dduf_path.string() + ":" + entry.filename,
      open);
  return detail::load_tensor_file_into(model, *file, options);
}

} // namespace torchser
