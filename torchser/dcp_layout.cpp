#include "torchser/detail/dcp_layout.h"

#include <algorithm>
#include <cerrno>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include <torchser/errors.h>

#include "torchser/detail/python_format.h"
#include "torchser/detail/safetensors_format.h"

namespace torchser::detail {
namespace {

// The names HuggingFaceStorageWriter gives the files (`_hf_utils.py`).
const std::regex kShardName(
    R"(shard-(\d{5,})-model-(\d{5,})-of-(\d{5,})\.safetensors)");
constexpr const char* kShardingInfoKey = "DCP_SHARDING_INFO";

std::string quoted(const std::filesystem::path& p) {
  return "'" + p.string() + "'";
}

// The shard files of `directory`, sorted, with the numbers of their names.
std::vector<DcpShardFile> shard_files(const std::filesystem::path& directory) {
  std::vector<DcpShardFile> files;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!std::regex_match(name, m, kShardName)) {
      continue;
    }
    const auto number = [&](int group) {
      const std::string text = m[group].str();
      if (text.size() > 9) {
        throw ValueError(
            "'" + name + "': the number " + text + " is too large");
      }
      return std::stoi(text);
    };
    DcpShardFile file;
    file.path = entry.path();
    file.shard = number(1);
    file.model_index = number(2);
    file.largest = number(3);
    files.push_back(std::move(file));
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) {
    return a.path < b.path;
  });
  if (files.empty()) {
    throw ValueError(
        "'" + directory.string() +
        "' holds no shard files of PyTorch DCP's sharded layout "
        "(shard-NNNNN-model-NNNNN-of-NNNNN.safetensors, as "
        "HuggingFaceStorageWriter(save_distributed=True) writes them)");
  }
  // Every writing rank's files are here: the shard numbers run 1 … R. (A
  // missing last rank whose pieces all sit at the ends of their tensors
  // cannot be told from a smaller tensor; DCP records no world size here.)
  std::set<int> shards;
  for (const DcpShardFile& file : files) {
    shards.insert(file.shard);
  }
  for (int expect = 1; expect <= *shards.rbegin(); ++expect) {
    if (shards.count(expect) == 0) {
      throw ValueError(
          "'" + directory.string() + "' has shard files of ranks up to " +
          std::to_string(*shards.rbegin()) + " but none of shard " +
          std::to_string(expect) + " (shard-" + std::to_string(expect) +
          "-…): a rank's files are missing");
    }
  }
  for (const DcpShardFile& file : files) {
    if (file.largest != files.front().largest) {
      throw ValueError(
          "The shard files of '" + directory.string() + "' disagree on the " +
          "number of model files: " + files.front().path.filename().string() +
          " and " + file.path.filename().string());
    }
  }
  return files;
}

// A shard file's header, and DCP_SHARDING_INFO from its metadata.
std::pair<ParsedHeader, nlohmann::json> read_shard_header(
    const DcpShardFile& input) {
  const File& file = input.file;
  const SafetensorsSource source{"file " + quoted(input.path), true};
  const std::uint64_t size = file.size();
  std::string prefix(
      static_cast<std::size_t>(std::min<std::uint64_t>(8, size)), '\0');
  file.pread_exact(prefix.data(), prefix.size(), 0);
  const std::uint64_t n = read_header_length(prefix, size, source);
  std::string header(static_cast<std::size_t>(n), '\0');
  file.pread_exact(header.data(), header.size(), 8);
  ParsedHeader parsed = parse_header(header, size, source);
  const auto* info_text = parsed.metadata.has_value() &&
                                  parsed.metadata->count(kShardingInfoKey) != 0
                              ? &parsed.metadata->at(kShardingInfoKey)
                              : nullptr;
  if (info_text == nullptr) {
    throw ValueError(
        quoted(input.path) + " has no " + kShardingInfoKey +
        " in its metadata: it was not written by DCP's "
        "HuggingFaceStorageWriter(save_distributed=True)");
  }
  nlohmann::json info;
  try {
    info = nlohmann::json::parse(*info_text);
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(
        quoted(input.path) + ": " + kShardingInfoKey + " is not JSON (" +
        e.what() + ")");
  }
  if (!info.is_object()) {
    throw ValueError(
        quoted(input.path) + ": " + kShardingInfoKey + " is not a JSON object");
  }
  return {std::move(parsed), std::move(info)};
}

// Full shapes from where the pieces end, and pieces that tile them.
void check_pieces(DcpTensor& t, const std::vector<DcpShardFile>& files) {
  t.full.assign(t.pieces.front().sizes.size(), 0);
  std::vector<TilePiece> tiles;
  std::vector<std::string> names;
  for (const DcpPiece& p : t.pieces) {
    for (std::size_t d = 0; d < t.full.size(); ++d) {
      std::int64_t end = 0;
      if (__builtin_add_overflow(p.offsets[d], p.sizes[d], &end)) {
        throw ValueError(
            quoted(files[p.file].path) + ": tensor '" + t.name +
            "' has saved_offsets " + shape_text(p.offsets) +
            " that put it past 2^63 elements");
      }
      t.full[d] = std::max(t.full[d], end);
    }
    tiles.push_back(
        {p.offsets, p.sizes, quoted(files[p.file].path.filename())});
    names.push_back(files[p.file].path.filename().string());
  }
  std::string holders = "in ";
  for (std::size_t n = 0; n < names.size(); ++n) {
    holders +=
        (n == 0 ? "" : (n + 1 == names.size() ? " and " : ", ")) + names[n];
  }
  check_tiling(t.name, t.full, tiles, holders, "the shard files hold it twice");
  if (safetensors_dtype_bits(t.dtype) % 8 != 0 && t.pieces.size() > 1) {
    throw ValueError(
        "Tensor '" + t.name + "' is " + safetensors_dtype_name(t.dtype) +
        ", whose elements are not whole bytes: its pieces cannot be placed "
        "byte-wise");
  }
}

} // namespace

bool is_dcp_shard_name(const std::string& filename) {
  return std::regex_match(filename, kShardName);
}

DcpLayout read_dcp_layout(const std::filesystem::path& directory) {
  std::error_code ec;
  if (!std::filesystem::is_directory(directory, ec)) {
    throw_os_error("Cannot read the DCP layout of", directory, ENOENT);
  }
  DcpLayout layout;
  layout.files = shard_files(directory);
  std::map<std::string, std::size_t> tensor_of;
  for (std::size_t f = 0; f < layout.files.size(); ++f) {
    DcpShardFile& input = layout.files[f];
    input.file = File::open_read(input.path);
    const auto [parsed, info] = read_shard_header(input);
    for (const SafetensorsTensorInfo& t : parsed.tensors) {
      const auto it = info.find(t.name);
      Shape offsets;
      try {
        if (it == info.end()) {
          throw std::out_of_range("missing");
        }
        offsets = it->at("saved_offsets").get<Shape>();
      } catch (const std::exception&) {
        throw ValueError(
            quoted(input.path) + ": tensor '" + t.name + "' has no " +
            "saved_offsets list in " + kShardingInfoKey);
      }
      if (offsets.size() != t.shape.size() ||
          std::any_of(offsets.begin(), offsets.end(), [](std::int64_t o) {
            return o < 0;
          })) {
        throw ValueError(
            quoted(input.path) + ": tensor '" + t.name + "' of shape " +
            shape_text(t.shape) + " has saved_offsets " + shape_text(offsets) +
            ", which do not give one offset ≥ 0 per dimension");
      }
      const auto [slot, inserted] =
          tensor_of.try_emplace(t.name, layout.tensors.size());
      if (inserted) {
        layout.tensors.push_back(DcpTensor{t.name, t.dtype, {}, {}});
      }
      DcpTensor& tensor = layout.tensors[slot->second];
      if (tensor.dtype != t.dtype) {
        throw ValueError(
            "Tensor '" + t.name + "' is " +
            safetensors_dtype_name(tensor.dtype) + " in " +
            layout.files[tensor.pieces.front().file].path.filename().string() +
            " but " + safetensors_dtype_name(t.dtype) + " in " +
            input.path.filename().string());
      }
      if (!tensor.pieces.empty() &&
          tensor.pieces.front().sizes.size() != t.shape.size()) {
        throw ValueError(
            "Tensor '" + t.name + "' has " +
            std::to_string(tensor.pieces.front().sizes.size()) +
            " dimensions in " +
            layout.files[tensor.pieces.front().file].path.filename().string() +
            " but " + std::to_string(t.shape.size()) + " in " +
            input.path.filename().string());
      }
      tensor.pieces.push_back(
          DcpPiece{f, t.shape, offsets, parsed.data_start + t.begin});
    }
  }
  for (DcpTensor& t : layout.tensors) {
    check_pieces(t, layout.files);
  }
  return layout;
}

} // namespace torchser::detail
