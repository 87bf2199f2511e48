// The torchser command-line tool: inspect, verify, convert, pack, unpack.
//
//   torchser inspect PATH [--json]
//   torchser verify PATH
//   torchser convert SRC DST [--to safetensors|pickle] [--max-shard-size SIZE]
//   torchser pack FOLDER OUT.dduf
//   torchser unpack IN.dduf FOLDER

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <torch/version.h>
#include <nlohmann/json.hpp>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>
#include <torchser/storage.h>
#include <torchser/version.h>

#include "torchser/detail/file.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/zip.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

std::string human(std::uint64_t bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1000.0 && unit < 4) {
    value /= 1000.0;
    ++unit;
  }
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, unit == 0 ? "%.0f %s" : "%.2f %s", value, units[unit]);
  return buffer;
}

// Progress on stderr: a bar redrawn in place on a terminal, a line per step
// otherwise (logs stay readable).
class Progress {
 public:
  Progress(std::string what, std::uint64_t total) : what_(std::move(what)), total_(total), tty_(::isatty(2) != 0) {}
  void step(const std::string& item, std::uint64_t bytes) {
    done_ += bytes;
    if (tty_) {
      const int width = 30;
      const int filled = total_ == 0 ? width : static_cast<int>(width * static_cast<double>(done_) / static_cast<double>(total_));
      std::fprintf(stderr, "\r%s [%s%s] %s / %s", what_.c_str(), std::string(filled, '#').c_str(),
                   std::string(width - filled, ' ').c_str(), human(done_).c_str(), human(total_).c_str());
      std::fflush(stderr);
    } else {
      std::fprintf(stderr, "%s: %s (%s)\n", what_.c_str(), item.c_str(), human(bytes).c_str());
    }
  }
  ~Progress() {
    if (tty_) {
      std::fprintf(stderr, "\n");
    }
  }

 private:
  std::string what_;
  std::uint64_t total_;
  std::uint64_t done_ = 0;
  bool tty_;
};

struct Row {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t bytes;
  std::string file;
  /// The stored bytes this tensor views, once per storage: tensors sharing a
  /// storage (tied weights in a .bin) count it once in the totals. Empty
  /// for safetensors, where every tensor has bytes of its own.
  std::string storage;
  std::uint64_t storage_bytes = 0;
};

// What the rows occupy on disk: each storage once.
std::uint64_t stored_bytes(const std::vector<Row>& rows) {
  std::uint64_t total = 0;
  std::set<std::string> seen;
  for (const Row& row : rows) {
    if (row.storage.empty()) {
      total += row.bytes;
    } else if (seen.insert(row.storage).second) {
      total += row.storage_bytes;
    }
  }
  return total;
}

struct Inspection {
  std::string format;
  std::vector<Row> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<std::pair<std::string, std::uint64_t>> entries; // DDUF
};

void add_safetensors(Inspection& out, const torchser::SafeOpen& file, const std::string& label) {
  for (const auto& info : file.tensors()) {
    out.tensors.push_back({info.name, torchser::safetensors_dtype_name(info.dtype), info.shape, info.end - info.begin, label,
                           /*storage=*/"", 0});
  }
}

void add_state_dict(Inspection& out, const torchser::StateDict& sd, const std::string& label) {
  for (const auto& item : sd) {
    const at::Tensor& t = item.value();
    const auto id = torchser::get_torch_storage_id(t);
    const std::string storage =
        label + "#" + (id ? std::to_string(id->data_ptr) + ":" + std::to_string(id->nbytes) : item.key());
    out.tensors.push_back({item.key(), c10::toString(t.scalar_type()), t.sizes().vec(),
                           static_cast<std::uint64_t>(t.nbytes()), label, storage,
                           static_cast<std::uint64_t>(t.numel() == 0 ? 0 : t.storage().nbytes())});
  }
}

// The index of a checkpoint directory, if it has one.
std::optional<fs::path> find_index(const fs::path& dir) {
  for (const char* name : {"model.safetensors.index.json", "pytorch_model.bin.index.json"}) {
    if (fs::is_regular_file(dir / name)) {
      return dir / name;
    }
  }
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0) {
      return entry.path();
    }
  }
  return std::nullopt;
}

// What a user may name, resolved as the library resolves it: a folder whose
// only checkpoint is one .dduf archive stands for that archive.
fs::path resolve_target(const fs::path& path) {
  if (!fs::is_directory(path) || find_index(path)) {
    return path;
  }
  std::vector<fs::path> weights;
  std::vector<fs::path> archives;
  for (const auto& entry : fs::directory_iterator(path)) {
    const auto ext = entry.path().extension();
    if (entry.is_regular_file() && (ext == ".safetensors" || ext == ".bin")) {
      weights.push_back(entry.path());
    } else if (entry.is_regular_file() && ext == ".dduf") {
      archives.push_back(entry.path());
    }
  }
  return weights.empty() && archives.size() == 1 ? archives.front() : path;
}

// The files of a checkpoint: its shards (sorted) or its single file. An
// index names the shards (an index path stands for its folder); without
// one, a folder's single .safetensors file wins over a .bin, as in the
// library's load_torch_model (a Hub repository often holds both).
std::vector<fs::path> checkpoint_files(const fs::path& path, torchser::detail::IndexFile* index_out = nullptr) {
  const std::string given = path.filename().string();
  const bool index_given = fs::is_regular_file(path) && given.size() > 11 &&
                           given.compare(given.size() - 11, 11, ".index.json") == 0;
  if (!fs::is_directory(path) && !index_given) {
    return {path};
  }
  const fs::path dir = index_given ? path.parent_path() : path;
  if (const auto index_path = index_given ? std::optional<fs::path>(path) : find_index(dir)) {
    // The loader's own index reader: shard names that would leave the
    // directory are refused before any shard is opened.
    const std::string name = index_path->filename().string();
    const std::string extension = fs::path(name.substr(0, name.size() - 11)).extension().string();
    const torchser::detail::IndexFile index = torchser::detail::read_index(*index_path, extension);
    if (index_out != nullptr) {
      *index_out = index;
    }
    std::vector<fs::path> files;
    for (const auto& [shard, keys] : index.shards) {
      files.push_back(dir / shard);
    }
    return files;
  }
  std::vector<fs::path> safetensors;
  std::vector<fs::path> pickles;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto ext = entry.path().extension();
    if (entry.is_regular_file() && ext == ".safetensors") {
      safetensors.push_back(entry.path());
    } else if (entry.is_regular_file() && ext == ".bin") {
      pickles.push_back(entry.path());
    }
  }
  if (safetensors.size() == 1) {
    if (!pickles.empty()) {
      std::cerr << "torchser: using " << safetensors.front().filename().string() << "; " << dir.string()
                << " also holds " << pickles.front().filename().string() << " (as the library, safetensors first)\n";
    }
    return safetensors;
  }
  if (safetensors.empty() && pickles.size() == 1) {
    return pickles;
  }
  throw torchser::ValueError("Directory '" + dir.string() + "' holds no index and " +
                             std::to_string(safetensors.size()) + " .safetensors and " +
                             std::to_string(pickles.size()) +
                             " .bin files: name the file to use, or add the checkpoint's index.");
}

Inspection inspect(const fs::path& path) {
  Inspection out;
  if (path.extension() == ".dduf") {
    out.format = "dduf";
    for (const auto& item : torchser::read_dduf_file(path)) {
      const torchser::DDUFEntry& entry = item.value();
      out.entries.emplace_back(entry.filename, entry.length);
      if (fs::path(entry.filename).extension() == ".safetensors") {
        add_safetensors(out, torchser::SafeOpen(path, entry.offset, entry.length), entry.filename);
      }
    }
    return out;
  }
  torchser::detail::IndexFile index;
  const auto files = checkpoint_files(path, &index);
  out.metadata = index.other_metadata;
  out.metadata.insert(out.metadata.end(), index.metadata.begin(), index.metadata.end());
  for (const fs::path& file : files) {
    const std::string label = file != path ? file.filename().string() : "";
    if (file.extension() == ".safetensors") {
      out.format = "safetensors";
      const torchser::SafeOpen st(file);
      if (files.size() == 1 && st.metadata()) {
        out.metadata.assign(st.metadata()->begin(), st.metadata()->end());
      }
      add_safetensors(out, st, label);
    } else {
      out.format = "pickle";
      add_state_dict(out, torchser::extract_state_dict(torchser::torch_load(file)), label);
    }
  }
  if (files.size() > 1) {
    out.format += " (sharded, " + std::to_string(files.size()) + " files)";
  }
  return out;
}

int cmd_inspect(const fs::path& path, bool as_json) {
  const Inspection info = inspect(path);
  const std::uint64_t total = stored_bytes(info.tensors);
  if (as_json) {
    json out;
    out["path"] = path.string();
    out["format"] = info.format;
    out["tensors"] = json::array();
    for (const Row& row : info.tensors) {
      out["tensors"].push_back({{"name", row.name}, {"dtype", row.dtype}, {"shape", row.shape}, {"bytes", row.bytes},
                                {"file", row.file}});
    }
    out["metadata"] = json::object();
    for (const auto& [key, value] : info.metadata) {
      out["metadata"][key] = value;
    }
    if (!info.entries.empty()) {
      out["entries"] = json::object();
      for (const auto& [name, length] : info.entries) {
        out["entries"][name] = length;
      }
    }
    out["total_tensors"] = info.tensors.size();
    out["total_bytes"] = total;
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << path.string() << ": " << info.format << "\n";
  for (const auto& [name, length] : info.entries) {
    std::cout << "  entry " << name << "  " << human(length) << "\n";
  }
  for (const Row& row : info.tensors) {
    std::string shape = "[";
    for (std::size_t i = 0; i < row.shape.size(); ++i) {
      shape += (i ? ", " : "") + std::to_string(row.shape[i]);
    }
    std::cout << "  " << row.name << "  " << row.dtype << "  " << shape << "]  " << human(row.bytes)
              << (row.file.empty() ? "" : "  " + row.file) << "\n";
  }
  for (const auto& [key, value] : info.metadata) {
    std::cout << "  metadata " << key << " = " << value << "\n";
  }
  std::cout << info.tensors.size() << " tensors, " << human(total) << "\n";
  return 0;
}

// Every record's CRC-32 against the ZIP directory: torch.load and the
// loaders map records without checking them, so a flipped byte in tensor
// data would load silently. Always on: ISA-L hashes at ~24 GB/s here, well
// above the disk, so it costs one read of the file.
void verify_zip_crcs(const fs::path& file) {
  const auto mapped = torchser::detail::MappedFile::map(torchser::detail::File::open_read(file));
  std::vector<torchser::detail::ZipEntry> entries;
  try {
    entries = torchser::detail::read_zip_directory(mapped->data(), mapped->size());
  } catch (const torchser::detail::ZipFormatError& e) {
    throw torchser::UnpicklingError("Cannot read '" + file.string() + "': " + e.what());
  }
  for (const auto& entry : entries) {
    if (entry.method != 0 || entry.is_directory()) {
      continue; // compressed records are refused by torch_load itself
    }
    if (entry.data_offset + entry.compressed_size > mapped->size()) {
      throw torchser::UnpicklingError("Record '" + entry.name + "' of '" + file.string() + "' runs past the file.");
    }
    const std::uint32_t crc =
        torchser::detail::crc32(0, mapped->data() + entry.data_offset, static_cast<std::size_t>(entry.compressed_size));
    if (crc != entry.crc32) {
      char buffer[64];
      std::snprintf(buffer, sizeof buffer, "CRC-32 %08x, the ZIP directory says %08x", crc, entry.crc32);
      throw torchser::UnpicklingError("Record '" + entry.name + "' of '" + file.string() + "' is corrupt: " + buffer +
                                      ".");
    }
  }
}

int cmd_verify(const fs::path& path) {
  if (path.extension() == ".dduf") {
    const auto entries = torchser::read_dduf_file(path);
    for (const auto& item : entries) {
      if (fs::path(item.key()).extension() == ".safetensors") {
        torchser::SafeOpen(path, item.value().offset, item.value().length); // every rule of the format
      }
    }
    std::cout << "OK: " << path.string() << " (DDUF, " << entries.size() << " entries)\n";
    return 0;
  }
  torchser::detail::IndexFile index;
  const auto files = checkpoint_files(path, &index);
  std::set<std::string> found;
  std::map<std::string, std::set<std::string>> held; // shard file name → the tensors it holds
  for (const fs::path& file : files) {
    if (!fs::is_regular_file(file)) {
      throw torchser::FileNotFoundError("Shard '" + file.string() + "' named by the index is missing.");
    }
    std::set<std::string>& names = held[file.filename().string()];
    if (file.extension() == ".safetensors") {
      // Named: tensors() refers into the reader, which must outlive the loop.
      const torchser::SafeOpen reader(file);
      for (const auto& info : reader.tensors()) {
        names.insert(info.name);
      }
    } else {
      verify_zip_crcs(file);
      for (const auto& item : torchser::extract_state_dict(torchser::torch_load(file))) {
        names.insert(item.key());
      }
    }
    found.insert(names.begin(), names.end());
  }
  // The index and the shards agree exactly: a loader follows the index, so a
  // tensor in another shard than it says, or one it does not list, is a
  // checkpoint that loads wrong or not at all.
  for (const auto& [shard, keys] : index.shards) {
    for (const std::string& key : keys) {
      if (held[shard].count(key) == 0) {
        std::string elsewhere;
        for (const auto& [other, names] : held) {
          if (names.count(key) != 0) {
            elsewhere = " (it is in '" + other + "')";
          }
        }
        throw torchser::ValueError("The index names tensor '" + key + "' in '" + shard +
                                   "', but that shard does not hold it" + elsewhere + ".");
      }
    }
  }
  if (!index.shards.empty()) {
    for (const auto& [shard, names] : held) {
      for (const std::string& name : names) {
        if (index.keys.count(name) == 0) {
          throw torchser::ValueError("Shard '" + shard + "' holds tensor '" + name +
                                     "', which the index does not list: loaders following the index skip it.");
        }
      }
    }
  }
  std::cout << "OK: " << path.string() << " (" << files.size() << " file" << (files.size() == 1 ? "" : "s") << ", "
            << found.size() << " tensors)\n";
  return 0;
}

int cmd_convert(const fs::path& src, const fs::path& dst, const std::string& to, const std::string& max_shard_size) {
  const auto files = checkpoint_files(src);
  torchser::StateDict all;
  for (const fs::path& file : files) {
    for (const auto& item : torchser::load_state_dict_from_file(file, torchser::LoadOptions().mmap(true))) {
      all.insert(item.key(), item.value());
    }
  }
  // Plain bytes ("1000000") as well as size strings ("2GB"), as the
  // library's ShardSize takes both.
  const bool digits = !max_shard_size.empty() &&
                      std::all_of(max_shard_size.begin(), max_shard_size.end(), [](char c) { return c >= '0' && c <= '9'; });
  const torchser::ShardSize shard_size =
      digits ? torchser::ShardSize(std::stoll(max_shard_size)) : torchser::ShardSize(max_shard_size);
  std::uint64_t total = 0;
  for (const auto& item : all) {
    total += static_cast<std::uint64_t>(item.value().nbytes());
  }
  // A failed convert leaves no directory it created behind.
  const bool created = !fs::exists(dst);
  try {
    fs::create_directories(dst);
    Progress progress("convert", total);
    torchser::save_torch_state_dict(
        all, dst, torchser::SaveOptions().safe_serialization(to != "pickle").max_shard_size(shard_size));
    progress.step(dst.string(), total);
  } catch (...) {
    if (created) {
      std::error_code ignored;
      fs::remove_all(dst, ignored);
    }
    throw;
  }
  std::cout << "Converted " << all.size() << " tensors (" << human(total) << ") from " << src.string() << " to "
            << dst.string() << " as " << (to == "pickle" ? "pickle" : "safetensors") << "\n";
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
      throw torchser::ValueError("Cannot pack '" + folder.string() + "': DDUF cannot hold " + list +
                                 " (entries must be .json, .model, .safetensors or .txt files, at most one folder "
                                 "deep). Convert or move them first; nothing was written.");
    }
  }
  torchser::export_folder_as_dduf(out, folder);
  const auto entries = torchser::read_dduf_file(out);
  std::cout << "Packed " << entries.size() << " entries into " << out.string() << " (" << human(fs::file_size(out))
            << ")\n";
  return 0;
}

// Every component below `folder` that exists must be a real directory or
// file: unpack never writes through a symbolic link it finds in the target.
void refuse_symlinks(const fs::path& folder, const fs::path& relative) {
  fs::path at = folder;
  for (const auto& part : relative) {
    at /= part;
    if (fs::is_symlink(fs::symlink_status(at))) {
      throw torchser::OSError("Cannot unpack into '" + at.string() +
                              "': it is a symbolic link, which unpack does not follow or replace.");
    }
  }
}

int cmd_unpack(const fs::path& archive, const fs::path& folder) {
  const auto entries = torchser::read_dduf_file(archive); // names are validated: no '..', no absolute paths
  std::uint64_t total = 0;
  for (const auto& item : entries) {
    total += item.value().length;
    refuse_symlinks(folder, item.key());
  }
  Progress progress("unpack", total);
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
    progress.step(item.key(), item.value().length);
  }
  std::cout << "Unpacked " << entries.size() << " entries into " << folder.string() << "\n";
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"torchser " TORCHSER_VERSION ": inspect, verify and convert safetensors, PyTorch .bin and DDUF files"};
  app.require_subcommand(1);

  std::string path;
  bool as_json = false;
  auto* inspect_cmd = app.add_subcommand("inspect", "List the tensors (dtype, shape, size, shard) and metadata");
  inspect_cmd->add_option("PATH", path, "a .safetensors, .bin or .dduf file, or a checkpoint directory")->required();
  inspect_cmd->add_flag("--json", as_json, "machine-readable output");

  std::string verify_path;
  auto* verify_cmd = app.add_subcommand("verify", "Check every rule of the format; exit 0 when valid");
  verify_cmd->add_option("PATH", verify_path, "a file or a checkpoint directory")->required();

  std::string src;
  std::string dst;
  std::string to = "safetensors";
  std::string max_shard_size = "5GB";
  auto* convert_cmd = app.add_subcommand("convert", "Convert a checkpoint between pickle .bin and safetensors");
  convert_cmd->add_option("SRC", src, "a file or a checkpoint directory")->required();
  convert_cmd->add_option("DST", dst, "the output directory")->required();
  convert_cmd->add_option("--to", to, "safetensors (default), or pickle (also: bin)")
      ->check(CLI::IsMember({"safetensors", "pickle", "bin"}));
  convert_cmd->add_option("--max-shard-size", max_shard_size, "largest shard, e.g. 2GB or 1000000 bytes (default 5GB)");

  std::string folder;
  std::string archive;
  auto* pack_cmd = app.add_subcommand("pack", "Pack a pipeline folder into a DDUF archive");
  pack_cmd->add_option("FOLDER", folder, "the pipeline folder")->required();
  pack_cmd->add_option("OUT", archive, "the .dduf file to write")->required();
  std::string unpack_archive;
  std::string unpack_folder;
  auto* unpack_cmd = app.add_subcommand("unpack", "Unpack a DDUF archive into a folder");
  unpack_cmd->add_option("IN", unpack_archive, "the .dduf file")->required();
  unpack_cmd->add_option("FOLDER", unpack_folder, "the folder to write")->required();

  app.set_version_flag("--version", std::string("torchser ") + TORCHSER_VERSION + " (LibTorch " + TORCH_VERSION + ")");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; usage errors exit 2, as command-line tools do.
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (to == "bin") {
    to = "pickle";
  }
  try {
    if (inspect_cmd->parsed()) {
      return cmd_inspect(resolve_target(path), as_json);
    }
    if (verify_cmd->parsed()) {
      return cmd_verify(resolve_target(verify_path));
    }
    if (convert_cmd->parsed()) {
      return cmd_convert(src, dst, to, max_shard_size);
    }
    if (pack_cmd->parsed()) {
      return cmd_pack(folder, archive);
    }
    return cmd_unpack(unpack_archive, unpack_folder);
  } catch (const std::exception& e) {
    std::cerr << "torchser: " << e.what() << "\n";
    return 1;
  }
}
