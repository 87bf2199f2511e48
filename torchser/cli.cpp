// The torchser command-line tool: inspect, verify, convert, pack, unpack.
//
//   torchser inspect PATH [--json]
//   torchser verify PATH
//   torchser convert SRC DST [--to safetensors|pickle] [--max-shard-size SIZE]
//                    [--dtype bf16|fp16|fp32] [--only-prefix P] [--strip-prefix
//                    P]
//                    [--rename REGEX=REPL] [--add-prefix P] [--key KEY]
//   torchser recover DIR
//   torchser pack FOLDER OUT.dduf
//   torchser unpack IN.dduf FOLDER

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/version.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <torchser/consolidate.h>
#include <torchser/constants.h>
#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/hub_cache.h>
#include <torchser/key_mapping.h>
#include <torchser/save.h>
#include <torchser/version.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/file.h"
#include "torchser/detail/hub_cache.h"
#include "torchser/detail/shared_tensors.h"
#include "torchser/detail/tensor_file.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

// A command line that parses but asks for something contradictory: exit 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string human(std::uint64_t bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1000.0 && unit < 4) {
    value /= 1000.0;
    ++unit;
  }
  char buffer[32];
  std::snprintf(
      buffer,
      sizeof buffer,
      unit == 0 ? "%.0f %s" : "%.2f %s",
      value,
      units[unit]);
  return buffer;
}

// Progress on stderr: a bar redrawn in place on a terminal, quiet otherwise
// (logs stay readable): then one line when the work is done.
class ProgressBar {
 public:
  ProgressBar(std::string what, std::uint64_t total)
      : what_(std::move(what)), total_(total), tty_(::isatty(2) != 0) {}
  void set_total(std::uint64_t total) {
    total_ = total;
  }
  /// `done` bytes of the total are through, the last of them `item`.
  void step(const std::string& item, std::uint64_t done) {
    done_ = done;
    if (!tty_) {
      return;
    }
    const int width = 30;
    const int filled = total_ == 0
                           ? width
                           : static_cast<int>(
                                 width * std::min(
                                             1.0,
                                             static_cast<double>(done_) /
                                                 static_cast<double>(total_)));
    std::string label =
        item.size() > 40 ? "..." + item.substr(item.size() - 37) : item;
    std::fprintf(
        stderr,
        "\r%s [%s%s] %s / %s  %-40s",
        what_.c_str(),
        std::string(filled, '#').c_str(),
        std::string(width - filled, ' ').c_str(),
        human(done_).c_str(),
        human(total_).c_str(),
        label.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
  void finish() {
    if (drawn_) {
      std::fprintf(stderr, "\n");
      drawn_ = false;
    }
  }
  ~ProgressBar() {
    finish();
  }

 private:
  std::string what_;
  std::uint64_t total_;
  std::uint64_t done_ = 0;
  bool tty_;
  bool drawn_ = false;
};

// What the CLI calls a checkpoint: the library's rules (detail::
// resolve_checkpoint), with pickles and DDUF archives allowed, since the CLI
// reads pickles without running code and takes archives as a whole.
torchser::detail::Checkpoint resolve(const fs::path& path) {
  torchser::detail::ResolveOptions options;
  options.allow_pickle = true;
  options.allow_dduf = true;
  torchser::detail::Checkpoint checkpoint =
      torchser::detail::resolve_checkpoint(path, options);
  if (!checkpoint.note.empty()) {
    std::cerr << "torchser: " << checkpoint.note << "\n";
  }
  return checkpoint;
}

std::string shown(
    const torchser::detail::Checkpoint& checkpoint, const fs::path& file) {
  return checkpoint.kind == torchser::detail::Checkpoint::Kind::kSharded
             ? file.filename().string()
             : "";
}

// What the rows occupy on disk: each storage once (tensors sharing a storage
// in a .bin count it once; safetensors tensors each have bytes of their own).
std::uint64_t stored_bytes(
    const std::vector<std::pair<std::string, torchser::detail::TensorEntry>>&
        rows) {
  std::uint64_t total = 0;
  std::set<std::string> seen;
  for (const auto& [file, entry] : rows) {
    if (entry.storage.empty()) {
      total += entry.nbytes;
    } else if (seen.insert(file + "#" + entry.storage).second) {
      total += entry.storage_bytes;
    }
  }
  return total;
}

std::vector<std::pair<std::string, torchser::detail::TensorEntry>> dduf_tensors(
    const torchser::OrderedMap<torchser::DDUFEntry>& entries) {
  std::vector<std::pair<std::string, torchser::detail::TensorEntry>> rows;
  for (const auto& item : entries) {
    const torchser::DDUFEntry& entry = item.value();
    if (fs::path(entry.filename).extension() == ".safetensors") {
      const auto file = torchser::detail::open_tensor_file(
          entry.dduf_path,
          entry.offset,
          entry.length,
          entry.dduf_path.string() + ":" + entry.filename);
      for (const auto& tensor : file->entries()) {
        rows.emplace_back(entry.filename, tensor);
      }
    }
  }
  return rows;
}

int cmd_inspect(const fs::path& path, bool as_json) {
  const torchser::detail::Checkpoint checkpoint = resolve(path);
  std::string format;
  std::vector<std::pair<std::string, torchser::detail::TensorEntry>> rows;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<std::pair<std::string, std::uint64_t>> archive_entries;
  std::optional<std::string> interrupted;
  if (checkpoint.kind == torchser::detail::Checkpoint::Kind::kDDUF) {
    format = "dduf";
    const auto entries = torchser::read_dduf_file(checkpoint.files.front());
    for (const auto& item : entries) {
      archive_entries.emplace_back(item.key(), item.value().length);
    }
    rows = dduf_tensors(entries);
  } else {
    if (checkpoint.is_directory) {
      interrupted = torchser::detail::interrupted_save(checkpoint.directory);
    }
    metadata = checkpoint.index.other_metadata;
    metadata.insert(
        metadata.end(),
        checkpoint.index.metadata.begin(),
        checkpoint.index.metadata.end());
    for (const fs::path& path_of_file : checkpoint.files) {
      const auto file = torchser::detail::open_tensor_file(path_of_file);
      for (const std::string* said : {&file->note(), &file->selection()}) {
        if (!said->empty()) {
          std::cerr << "torchser: " << path_of_file.filename().string() << ": "
                    << *said << "\n";
        }
      }
      format = torchser::detail::format_name(file->format());
      if (checkpoint.kind == torchser::detail::Checkpoint::Kind::kFile &&
          file->metadata()) {
        metadata = *file->metadata();
      }
      for (const auto& entry : file->entries()) {
        rows.emplace_back(shown(checkpoint, path_of_file), entry);
      }
    }
  }
  const bool sharded =
      checkpoint.kind == torchser::detail::Checkpoint::Kind::kSharded;
  const std::uint64_t total = stored_bytes(rows);
  if (as_json) {
    json out;
    out["path"] = path.string();
    out["format"] = format;
    out["sharded"] = sharded;
    out["files"] = checkpoint.files.size();
    out["tensors"] = json::array();
    for (const auto& [file, entry] : rows) {
      out["tensors"].push_back(
          {{"name", entry.name},
           {"dtype", entry.dtype},
           {"shape", entry.shape},
           {"bytes", entry.nbytes},
           {"file", file}});
    }
    out["metadata"] = json::object();
    for (const auto& [key, value] : metadata) {
      out["metadata"][key] = value;
    }
    for (const auto& [key, text] : checkpoint.index.other_metadata) {
      out["metadata"][key] = json::parse(
          text, nullptr, /*allow_exceptions=*/false); // numbers stay numbers
    }
    if (!archive_entries.empty()) {
      out["entries"] = json::object();
      for (const auto& [name, length] : archive_entries) {
        out["entries"][name] = length;
      }
    }
    out["total_tensors"] = rows.size();
    out["total_bytes"] = total;
    if (interrupted) {
      out["interrupted_save"] = *interrupted;
    }
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << path.string() << ": " << format
            << (sharded
                    ? " (sharded, " + std::to_string(checkpoint.files.size()) +
                          " files)"
                    : "")
            << "\n";
  if (interrupted) {
    std::cout << "  INTERRUPTED SAVE: " << *interrupted << "\n";
  }
  for (const auto& [name, length] : archive_entries) {
    std::cout << "  entry " << name << "  " << human(length) << "\n";
  }
  for (const auto& [file, entry] : rows) {
    std::string shape = "[";
    for (std::size_t i = 0; i < entry.shape.size(); ++i) {
      shape += (i ? ", " : "") + std::to_string(entry.shape[i]);
    }
    std::cout << "  " << entry.name << "  " << entry.dtype << "  " << shape
              << "]  " << human(entry.nbytes)
              << (file.empty() ? "" : "  " + file) << "\n";
  }
  for (const auto& [key, value] : metadata) {
    std::cout << "  metadata " << key << " = " << value << "\n";
  }
  std::cout << rows.size() << " tensors, " << human(total) << "\n";
  return 0;
}

int cmd_verify(const fs::path& path) {
  const torchser::detail::Checkpoint checkpoint = resolve(path);
  // In the Hugging Face cache, each file's blob name is its digest, and a
  // `hf download --local-dir` folder records each file's etag: a file that
  // differs is said as such before any format rule is checked.
  std::vector<torchser::detail::BlobCheck> checks;
  std::vector<std::string> outdated;
  const char* where = nullptr;
  // An index names a checkpoint: its folder's files are checked, not the
  // index alone.
  const fs::path scope =
      checkpoint.kind == torchser::detail::Checkpoint::Kind::kSharded
          ? checkpoint.directory
          : path;
  if (!torchser::detail::snapshot_of(path).empty()) {
    checks = torchser::detail::check_cached_blobs(scope);
    where = "cached file(s) match their blob digests";
  } else if (const fs::path root = torchser::detail::local_dir_of(path);
             !root.empty()) {
    checks =
        torchser::detail::check_local_dir_downloads(root, scope, &outdated);
    where = "downloaded file(s) match the etags huggingface_hub recorded";
  }
  bool corrupted = false;
  for (const auto& check : checks) {
    if (!check.ok()) {
      corrupted = true;
      std::cout << "CORRUPTED: " << check.file.string() << ": its "
                << check.algorithm << " is " << check.actual << ", "
                << (torchser::detail::snapshot_of(path).empty()
                        ? "the download recorded "
                        : "the cache's blob name says ")
                << check.blob << " (download it again)\n";
    }
  }
  if (corrupted) {
    return 1;
  }
  for (const std::string& name : outdated) {
    std::cerr << "torchser: " << name
              << " changed after its download; its recorded etag is not "
                 "checked\n";
  }
  if (where != nullptr) {
    std::cerr << "torchser: " << checks.size() << " " << where << "\n";
  }
  if (checkpoint.kind == torchser::detail::Checkpoint::Kind::kDDUF) {
    const auto entries = torchser::read_dduf_file(
        checkpoint.files.front()); // every rule of the archive
    const auto tensors =
        dduf_tensors(entries); // and of its safetensors entries
    std::cout << "OK: " << checkpoint.files.front().string() << " (DDUF, "
              << entries.size() << " entries, " << tensors.size()
              << " tensors)\n";
    return 0;
  }
  if (checkpoint.is_directory) {
    if (const auto interrupted =
            torchser::detail::interrupted_save(checkpoint.directory)) {
      std::cout << "INTERRUPTED SAVE: " << *interrupted << "\n";
      return 1;
    }
  }
  const torchser::detail::VerifyReport report =
      torchser::detail::verify_checkpoint(checkpoint);
  for (const std::string& note : report.notes) {
    std::cerr << "torchser: " << note << "\n";
  }
  std::cout << "OK: " << path.string() << " (" << report.files << " file"
            << (report.files == 1 ? "" : "s") << ", " << report.tensors
            << " tensors)\n";
  return 0;
}

int cmd_recover(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    throw torchser::FileNotFoundError(
        "No checkpoint directory at '" + path.string() + "'.");
  }
  const auto interrupted = torchser::detail::interrupted_save(path);
  if (!interrupted) {
    std::cout << "Nothing to recover in " << path.string() << "\n";
    return 0;
  }
  if (!torchser::recover_interrupted_save(path)) {
    throw torchser::OSError(
        "Cannot recover '" + path.string() + "': " + *interrupted + ".");
  }
  std::cout << "Recovered " << path.string() << ": " << *interrupted << "\n";
  return 0;
}

bool ends_with(const std::string& name, const std::string& suffix) {
  return name.size() > suffix.size() &&
         name.compare(name.size() - suffix.size(), std::string::npos, suffix) ==
             0;
}

// What convert changes on the way: names, selection, dtype.
struct ConvertChanges {
  bool checksums = false;
  std::vector<std::string> only_prefixes;
  torchser::KeyMapping mapping;
  std::optional<c10::ScalarType> dtype;
};

// Whether `name` starts with one of `prefixes` (all names when empty).
bool selected_by(
    const std::vector<std::string>& prefixes, const std::string& name) {
  return prefixes.empty() ||
         std::any_of(
             prefixes.begin(), prefixes.end(), [&](const std::string& p) {
               return name.compare(0, p.size(), p) == 0;
             });
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "bf16" || name == "bfloat16") {
    return c10::ScalarType::BFloat16;
  }
  if (name == "fp16" || name == "float16" || name == "half") {
    return c10::ScalarType::Half;
  }
  if (name == "fp32" || name == "float32" || name == "float") {
    return c10::ScalarType::Float;
  }
  if (name == "fp64" || name == "float64" || name == "double") {
    return c10::ScalarType::Double;
  }
  throw UsageError("--dtype " + name + ": expected bf16, fp16, fp32 or fp64");
}

int cmd_convert(
    const fs::path& src,
    const fs::path& dst,
    std::string to,
    const std::string& max_shard_size,
    const std::optional<std::string>& key,
    const ConvertChanges& changes) {
  // Read as load_torch_model reads: under the directory's lock, after
  // completing any interrupted save (a journal's folder mixes two saves).
  std::error_code ec;
  std::optional<torchser::detail::DirectoryLock> lock;
  if (fs::is_directory(src, ec)) {
    lock.emplace(torchser::detail::lock_for_reading(src));
  } else if (ends_with(src.filename().string(), ".index.json")) {
    lock.emplace(torchser::detail::lock_for_reading(
        src.parent_path().empty() ? fs::path(".") : src.parent_path()));
  }
  const torchser::detail::Checkpoint checkpoint = resolve(src);
  if (checkpoint.kind == torchser::detail::Checkpoint::Kind::kDDUF) {
    throw torchser::ValueError(
        "Cannot convert '" + checkpoint.files.front().string() +
        "': a DDUF archive holds a pipeline; unpack it and convert one model "
        "folder.");
  }
  // DST ending in a format's extension is a file; anything else a folder.
  const std::string dst_name = dst.filename().string();
  const bool to_file =
      ends_with(dst_name, ".safetensors") || ends_with(dst_name, ".bin");
  if (to_file) {
    const std::string implied =
        ends_with(dst_name, ".bin") ? "pickle" : "safetensors";
    if (!to.empty() && to != implied) {
      throw UsageError(
          "--to " + to + " contradicts the destination '" + dst.string() + "'");
    }
    to = implied;
  }
  if (to.empty()) {
    to = "safetensors";
  }
  const bool safe = to != "pickle";

  // The source, on its mapped files: tensors are views, read as they are
  // written and released after (resident memory stays near one tensor).
  std::vector<std::unique_ptr<torchser::detail::TensorFile>> files;
  // Written name → the file holding it and its name there.
  std::map<
      std::string,
      std::pair<const torchser::detail::TensorFile*, std::string>>
      file_of;
  std::vector<std::pair<const torchser::detail::TensorFile*, std::string>>
      selected;
  torchser::StateDict all;
  std::vector<std::pair<std::string, std::string>> metadata =
      checkpoint.index.metadata;
  torchser::detail::TensorFileOptions open;
  open.key = key;
  for (const fs::path& path : checkpoint.files) {
    files.push_back(torchser::detail::open_tensor_file(path, open));
    const auto& file = *files.back();
    if (!file.note().empty()) {
      std::cerr << "torchser: " << file.note() << "\n";
    }
    if (file.ambiguous() && !key.has_value()) {
      throw torchser::ValueError(
          "Cannot convert '" + path.string() +
          "' unasked: " + file.selection() +
          ". Name the state dict to convert with --key KEY.");
    }
    if (!file.selection().empty()) {
      std::cerr << "torchser: " << path.filename().string() << ": "
                << file.selection() << "\n";
    }
    if (checkpoint.kind == torchser::detail::Checkpoint::Kind::kFile &&
        file.metadata()) {
      metadata = *file.metadata();
    }
    for (const auto& entry : file.entries()) {
      const bool wanted = selected_by(changes.only_prefixes, entry.name);
      if (wanted) {
        selected.emplace_back(&file, entry.name);
      }
    }
  }
  if (selected.empty()) {
    throw torchser::ValueError(
        "Nothing to convert: no tensor of '" + src.string() +
        "' starts with the --only-prefix given.");
  }
  {
    std::vector<std::string> names;
    for (const auto& item : selected) {
      names.push_back(item.second);
    }
    const auto mapped =
        torchser::map_keys(names, changes.mapping, "'" + src.string() + "'");
    std::map<std::string, std::string> written_name(
        mapped.begin(), mapped.end());
    for (const auto& [file, name] : selected) {
      const auto it = written_name.find(name);
      if (it == written_name.end()) {
        continue; // dropped by the mapping
      }
      all.insert(it->second, file->get(name));
      file_of[it->second] = {file, name};
    }
    // Alias records (alias → a tensor's name) follow their tensors' names,
    // or go with them; user metadata stays as it is.
    std::set<std::string> source_names;
    for (const auto& file : files) {
      for (const auto& entry : file->entries()) {
        source_names.insert(entry.name);
      }
    }
    std::vector<std::pair<std::string, std::string>> renamed_metadata;
    for (const auto& [alias, kept] : metadata) {
      if (source_names.count(kept) == 0) {
        renamed_metadata.emplace_back(alias, kept);
        continue;
      }
      const auto kept_name = written_name.find(kept);
      const bool alias_selected = selected_by(changes.only_prefixes, alias);
      const std::optional<std::string> alias_name =
          torchser::map_key(alias, changes.mapping);
      if (kept_name != written_name.end() && alias_selected &&
          alias_name.has_value()) {
        renamed_metadata.emplace_back(*alias_name, kept_name->second);
      }
    }
    metadata = std::move(renamed_metadata);
  }
  // Every source file is open and mapped: a save replacing them now (this
  // one, when DST is SRC's folder) renames new files in and leaves the
  // mapped ones whole, so the read lock has done its work.
  lock.reset();
  // Metadata and alias records travel: safetensors keeps them as metadata
  // (its writer records new aliases too); a torch.save file holds shared
  // storage itself, so the aliases become names on the kept tensors again.
  torchser::Metadata kept_metadata;
  if (!safe) {
    torchser::detail::retie_aliases(all, metadata);
  }
  for (const auto& [key, value] : metadata) {
    if (key == "format" || key == torchser::kChecksumMetadataKey ||
        (!safe && all.contains(key) && all.contains(value))) {
      continue;
    }
    kept_metadata.insert(key, value);
  }

  torchser::SaveOptions options;
  options.safe_serialization(safe)
      .metadata(kept_metadata)
      .dtype(changes.dtype)
      .checksums(changes.checksums);
  fs::path directory = dst;
  if (to_file) {
    directory = dst.parent_path().empty() ? fs::path(".") : dst.parent_path();
    // "<stem>{suffix}<ext>" in one shard: the file is DST, and the shards
    // and index of an earlier sharded checkpoint by that name are stale.
    const std::string ext =
        ends_with(dst_name, ".bin") ? ".bin" : ".safetensors";
    std::string stem;
    for (const char c : dst_name.substr(0, dst_name.size() - ext.size())) {
      stem += c == '{' ? "{{" : c == '}' ? "}}" : std::string(1, c);
    }
    options.filename_pattern(stem + "{suffix}" + ext)
        .max_shard_size(std::numeric_limits<std::int64_t>::max());
  } else {
    // Plain bytes ("1000000") as well as size strings ("2GB"), as the
    // library's ShardSize takes both.
    const bool digits =
        !max_shard_size.empty() &&
        std::all_of(max_shard_size.begin(), max_shard_size.end(), [](char c) {
          return c >= '0' && c <= '9';
        });
    options.max_shard_size(
        digits ? torchser::ShardSize(std::stoll(max_shard_size))
               : torchser::ShardSize(max_shard_size));
  }
  if (!safe && !checkpoint.files.empty() && to_file && !kept_metadata.empty()) {
    std::cerr
        << "torchser: a single torch.save file has no metadata; not kept:";
    for (const auto& item : kept_metadata) {
      std::cerr << " " << item.key();
    }
    std::cerr << "\n";
    options.metadata(torchser::Metadata());
  }
  std::uint64_t total = 0;
  ProgressBar progress("convert", 0);
  options.progress([&](const torchser::Progress& p) {
    progress.set_total(p.bytes_total);
    progress.step(p.file + ": " + p.tensor, p.bytes_done);
    if (const auto it = file_of.find(p.tensor); it != file_of.end()) {
      it->second.first->release(it->second.second);
    }
    total = p.bytes_total;
  });
  // A failed convert leaves no directory it created behind (and the save
  // itself commits nothing unless it completes).
  const bool created = !to_file && !fs::exists(dst, ec);
  try {
    if (!to_file) {
      fs::create_directories(dst);
    } else if (!fs::is_directory(directory, ec)) {
      throw torchser::FileNotFoundError(
          "Cannot write '" + dst.string() + "': no directory '" +
          directory.string() + "'.");
    }
    torchser::save_torch_state_dict(all, directory, options);
  } catch (...) {
    if (created) {
      fs::remove_all(dst, ec);
    }
    throw;
  }
  if (!safe && !to_file && !kept_metadata.empty() &&
      !fs::exists(directory / "pytorch_model.bin.index.json", ec)) {
    std::cerr << "torchser: the output is one torch.save file, which has no "
                 "metadata; not kept:";
    for (const auto& item : kept_metadata) {
      std::cerr << " " << item.key();
    }
    std::cerr << "\n";
  }
  progress.finish();
  std::cout << "Converted " << all.size() << " tensors (" << human(total)
            << ") from " << src.string() << " to " << dst.string() << " as "
            << to << "\n";
  return 0;
}

int cmd_consolidate(const fs::path& src, const fs::path& dst) {
  const torchser::ConsolidateResult result =
      torchser::consolidate_safetensors_files(src, dst);
  std::cout << "Consolidated " << result.tensors << " tensors ("
            << human(result.total_bytes) << ") from " << result.input_files
            << " DCP shard files into " << dst.string() << ": ";
  for (std::size_t i = 0; i < result.files.size(); ++i) {
    std::cout << (i == 0 ? "" : ", ") << result.files[i];
  }
  std::cout << "\n";
  return 0;
}

int cmd_pack(const fs::path& folder, const fs::path& out) {
  // export_folder_as_dduf leaves out what DDUF cannot hold, as
  // huggingface_hub does; a user packing a folder wants to hear about it
  // (an archive without its UNet weights is worse than no archive).
  if (fs::is_directory(folder)) {
    const auto left_out = torchser::detail::dduf_folder_files(folder).left_out;
    if (!left_out.empty()) {
      std::string list;
      for (const auto& name : left_out) {
        list += (list.empty() ? "" : ", ") + name.string();
      }
      throw torchser::ValueError(
          "Cannot pack '" + folder.string() + "': DDUF cannot hold " + list +
          " (entries must be .json, .model, .safetensors or .txt files, at "
          "most one folder "
          "deep). Convert or move them first; nothing was written.");
    }
  }
  torchser::export_folder_as_dduf(out, folder);
  const auto entries = torchser::read_dduf_file(out);
  std::cout << "Packed " << entries.size() << " entries into " << out.string()
            << " (" << human(fs::file_size(out)) << ")\n";
  return 0;
}

// Every component below `folder` that exists must be a real directory or
// file: unpack never writes through a symbolic link it finds in the target.
void refuse_symlinks(const fs::path& folder, const fs::path& relative) {
  fs::path at = folder;
  for (const auto& part : relative) {
    at /= part;
    if (fs::is_symlink(fs::symlink_status(at))) {
      throw torchser::OSError(
          "Cannot unpack into '" + at.string() +
          "': it is a symbolic link, which unpack does not follow or replace.");
    }
  }
}

int cmd_unpack(const fs::path& archive, const fs::path& folder) {
  const auto entries = torchser::read_dduf_file(
      archive); // names are validated: no '..', no absolute paths
  std::uint64_t total = 0;
  for (const auto& item : entries) {
    total += item.value().length;
    refuse_symlinks(folder, item.key());
  }
  ProgressBar progress("unpack", total);
  std::uint64_t done = 0;
  for (const auto& item : entries) {
    const fs::path target = folder / item.key();
    fs::create_directories(target.parent_path());
    const torchser::MappedBytes bytes = item.value().as_mmap();
    // A temporary beside the target, every write checked, then renamed over
    // it: a full disk or a file-size limit fails naming the file, and an
    // existing file is replaced whole or not at all.
    torchser::detail::AtomicFile file(target);
    file.preallocate(bytes.size());
    file.write(bytes.view().data(), bytes.size());
    file.commit(/*durable=*/true);
    done += item.value().length;
    progress.step(item.key(), done);
  }
  std::cout << "Unpacked " << entries.size() << " entries into "
            << folder.string() << "\n";
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "torchser " TORCHSER_VERSION
      ": inspect, verify and convert safetensors, PyTorch .bin and DDUF files"};
  app.require_subcommand(1);

  std::string path;
  bool as_json = false;
  auto* inspect_cmd = app.add_subcommand(
      "inspect", "List the tensors (dtype, shape, size, shard) and metadata");
  inspect_cmd
      ->add_option(
          "PATH",
          path,
          "a .safetensors, .bin or .dduf file, a checkpoint directory, or "
          "ORG/NAME[@REVISION][/FILE] in the Hugging Face cache")
      ->required();
  inspect_cmd->add_flag("--json", as_json, "machine-readable output");

  std::string verify_path;
  auto* verify_cmd = app.add_subcommand(
      "verify", "Check every rule of the format; exit 0 when valid");
  verify_cmd
      ->add_option(
          "PATH",
          verify_path,
          "a file, a checkpoint directory, or ORG/NAME[@REVISION][/FILE] in "
          "the Hugging Face cache")
      ->required();

  std::string src;
  std::string dst;
  std::string to;
  std::string max_shard_size = "5GB";
  auto* convert_cmd = app.add_subcommand(
      "convert", "Convert a checkpoint between pickle .bin and safetensors");
  convert_cmd
      ->add_option(
          "SRC",
          src,
          "a file, a checkpoint directory, or ORG/NAME[@REVISION][/FILE] in "
          "the Hugging Face cache")
      ->required();
  convert_cmd
      ->add_option(
          "DST",
          dst,
          "the output: a file when it ends in .safetensors or .bin, else a "
          "folder")
      ->required();
  convert_cmd
      ->add_option(
          "--to",
          to,
          "safetensors (default), or pickle (also: bin); implied by a file DST")
      ->check(CLI::IsMember({"safetensors", "pickle", "bin"}));
  std::string key;
  convert_cmd->add_option(
      "--key",
      key,
      "a torch.save file holding several state dicts: the top-level key to "
      "convert");
  convert_cmd->add_option(
      "--max-shard-size",
      max_shard_size,
      "largest shard, e.g. 2GB or 1000000 bytes (default 5GB)");
  std::string dtype;
  convert_cmd->add_option(
      "--dtype",
      dtype,
      "write floating-point tensors as bf16, fp16, fp32 or fp64 (integer and "
      "bool tensors keep theirs)");
  bool checksums = false;
  convert_cmd->add_flag(
      "--checksums",
      checksums,
      "record each tensor's CRC-32C in the safetensors metadata (checked by "
      "the loaders and verify)");
  std::vector<std::string> only_prefixes;
  convert_cmd->add_option(
      "--only-prefix",
      only_prefixes,
      "convert only the tensors whose names start with this (repeatable)");
  std::string strip_prefix;
  std::string add_prefix;
  std::vector<std::string> renames;
  convert_cmd->add_option(
      "--strip-prefix",
      strip_prefix,
      "remove this prefix from the names that have it (e.g. module.)");
  convert_cmd->add_option(
      "--rename",
      renames,
      "REGEX=REPLACEMENT, applied in order after --strip-prefix, like "
      "Python's re.sub (\\1 or $1 for groups; repeatable)");
  convert_cmd->add_option(
      "--add-prefix", add_prefix, "prepend this to every name (e.g. model.)");

  std::string folder;
  std::string archive;
  auto* pack_cmd =
      app.add_subcommand("pack", "Pack a pipeline folder into a DDUF archive");
  pack_cmd->add_option("FOLDER", folder, "the pipeline folder")->required();
  pack_cmd->add_option("OUT", archive, "the .dduf file to write")->required();
  std::string unpack_archive;
  std::string unpack_folder;
  auto* unpack_cmd =
      app.add_subcommand("unpack", "Unpack a DDUF archive into a folder");
  unpack_cmd->add_option("IN", unpack_archive, "the .dduf file")->required();
  unpack_cmd->add_option("FOLDER", unpack_folder, "the folder to write")
      ->required();

  std::string consolidate_src;
  std::string consolidate_dst;
  auto* consolidate_cmd = app.add_subcommand(
      "consolidate",
      "Turn PyTorch DCP's sharded layout (shard-*-model-*-of-*.safetensors) "
      "into model-*-of-*.safetensors files and their index");
  consolidate_cmd
      ->add_option("SRC", consolidate_src, "the folder of DCP shard files")
      ->required();
  consolidate_cmd
      ->add_option("DST", consolidate_dst, "the folder to write (may be SRC)")
      ->required();

  std::string recover_path;
  auto* recover_cmd = app.add_subcommand(
      "recover", "Complete or undo an interrupted save of a checkpoint folder");
  recover_cmd->add_option("DIR", recover_path, "the checkpoint folder")
      ->required();

  app.set_version_flag(
      "--version",
      std::string("torchser ") + TORCHSER_VERSION + " (LibTorch " +
          TORCH_VERSION + ")");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; usage errors exit 2, as command-line tools
    // do.
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (to == "bin") {
    to = "pickle";
  }
  try {
    // Inputs may name a checkpoint in the Hugging Face cache (hub_cache.h).
    for (std::string* input :
         {&path, &verify_path, &src, &folder, &unpack_archive}) {
      if (!input->empty()) {
        const fs::path resolved = torchser::resolve_hub_path(*input);
        std::error_code ec;
        if (const auto repo = torchser::parse_hub_reference(*input);
            repo.has_value() && !fs::exists(resolved, ec)) {
          // Neither a path nor a cached repo: say both (this throws).
          torchser::cached_snapshot(repo->repo_id, repo->revision);
        }
        *input = resolved.string();
      }
    }
    if (inspect_cmd->parsed()) {
      return cmd_inspect(path, as_json);
    }
    if (verify_cmd->parsed()) {
      return cmd_verify(verify_path);
    }
    if (convert_cmd->parsed()) {
      ConvertChanges changes;
      changes.checksums = checksums;
      changes.only_prefixes = only_prefixes;
      changes.mapping.strip_prefix(strip_prefix).add_prefix(add_prefix);
      for (const std::string& rename : renames) {
        // Keys hold no '=', patterns may ("(?=x)"): split at the last one.
        const std::size_t eq = rename.rfind('=');
        if (eq == std::string::npos) {
          throw UsageError(
              "--rename " + rename + ": expected REGEX=REPLACEMENT");
        }
        changes.mapping.rename(rename.substr(0, eq), rename.substr(eq + 1));
      }
      if (!dtype.empty()) {
        changes.dtype = parse_dtype(dtype);
      }
      return cmd_convert(
          src,
          dst,
          to,
          max_shard_size,
          key.empty() ? std::nullopt : std::optional<std::string>(key),
          changes);
    }
    if (recover_cmd->parsed()) {
      return cmd_recover(recover_path);
    }
    if (consolidate_cmd->parsed()) {
      return cmd_consolidate(consolidate_src, consolidate_dst);
    }
    if (pack_cmd->parsed()) {
      return cmd_pack(folder, archive);
    }
    return cmd_unpack(unpack_archive, unpack_folder);
  } catch (const UsageError& e) {
    std::cerr << "torchser: " << e.what() << "\n";
    return 2; // a usage error found after parsing
  } catch (const std::exception& e) {
    std::cerr << "torchser: " << e.what() << "\n";
    return 1;
  }
}
