#include <torchser/consolidate.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <memory>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include <torchser/errors.h>
#include <torchser/safetensors.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/file.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/python_format.h"
#include "torchser/detail/safetensors_format.h"
#include "torchser/detail/tiling.h"

namespace torchser {
namespace {

using detail::Shape;

// The names HuggingFaceStorageWriter gives the files (`_hf_utils.py`).
const std::regex kShardName(
    R"(shard-(\d{5,})-model-(\d{5,})-of-(\d{5,})\.safetensors)");
constexpr const char* kShardingInfoKey = "DCP_SHARDING_INFO";

std::string output_name(int index, int largest) {
  const auto five = [](int n) {
    std::string s = std::to_string(n);
    return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
  };
  return "model-" + five(index) + "-of-" + five(largest) + ".safetensors";
}

struct Piece {
  std::size_t file; // in the input list
  Shape sizes;
  Shape offsets;
  std::uint64_t begin; // first byte in its file
};

struct Tensor {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<Piece> pieces;
  Shape full;
  int output = 0; // 1-based output file
};

struct Input {
  std::filesystem::path path;
  int shard; // the writing rank + 1
  int model_index;
  int largest;
};

std::string quoted(const std::filesystem::path& p) {
  return "'" + p.string() + "'";
}

// Copies `size` bytes between files at the given offsets, in the kernel
// where it can (copy_file_range), else through `buffer`.
class RangeCopier {
 public:
  void copy(
      int from,
      const std::filesystem::path& from_path,
      std::uint64_t from_offset,
      int to,
      const std::filesystem::path& to_path,
      std::uint64_t to_offset,
      std::uint64_t size) {
    while (size > 0 && in_kernel_) {
      auto in = static_cast<loff_t>(from_offset);
      auto out = static_cast<loff_t>(to_offset);
      const ssize_t n = ::copy_file_range(
          from,
          &in,
          to,
          &out,
          static_cast<std::size_t>(std::min<std::uint64_t>(size, 1u << 30)),
          0);
      if (n > 0) {
        from_offset += static_cast<std::uint64_t>(n);
        to_offset += static_cast<std::uint64_t>(n);
        size -= static_cast<std::uint64_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n == 0) {
        break; // the source ends early: the copy below says where
      }
      if (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
          errno == EOPNOTSUPP || errno == EPERM || errno == EBADF) {
        in_kernel_ = false; // no in-kernel copy between these files
        break;
      }
      detail::throw_os_error("Cannot copy into", to_path, errno);
    }
    if (size == 0) {
      return;
    }
    if (!buffer_) {
      buffer_ = std::make_unique<std::uint8_t[]>(kChunk);
    }
    while (size > 0) {
      const std::size_t n =
          static_cast<std::size_t>(std::min<std::uint64_t>(size, kChunk));
      detail::pread_exact(from, from_path, buffer_.get(), n, from_offset);
      detail::pwrite_all(to, to_path, buffer_.get(), n, to_offset);
      from_offset += n;
      to_offset += n;
      size -= n;
    }
  }

 private:
  static constexpr std::size_t kChunk = std::size_t{16} << 20;
  bool in_kernel_ = true;
  std::unique_ptr<std::uint8_t[]> buffer_;
};

} // namespace

ConsolidateResult consolidate_safetensors_files(
    const std::filesystem::path& input_dir,
    const std::filesystem::path& output_dir,
    const ConsolidateOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_directory(input_dir, ec)) {
    detail::throw_os_error("Cannot consolidate", input_dir, ENOENT);
  }
  // 1. The shard files and what each says.
  std::vector<Input> inputs;
  for (const auto& entry : std::filesystem::directory_iterator(input_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, m, kShardName)) {
      const auto number = [&](int group) {
        const std::string text = m[group].str();
        if (text.size() > 9) {
          throw ValueError(
              "'" + name + "': the number " + text + " is too large");
        }
        return std::stoi(text);
      };
      inputs.push_back({entry.path(), number(1), number(2), number(3)});
    }
  }
  std::sort(inputs.begin(), inputs.end(), [](const Input& a, const Input& b) {
    return a.path < b.path;
  });
  if (inputs.empty()) {
    throw ValueError(
        "'" + input_dir.string() +
        "' holds no shard files of PyTorch DCP's sharded layout "
        "(shard-NNNNN-model-NNNNN-of-NNNNN.safetensors, as "
        "HuggingFaceStorageWriter(save_distributed=True) writes them)");
  }
  // Every writing rank's files are here: the shard numbers run 1 … R. (A
  // missing last rank whose pieces all sit at the ends of their tensors
  // cannot be told from a smaller tensor; DCP records no world size here.)
  {
    std::set<int> shards;
    for (const Input& input : inputs) {
      shards.insert(input.shard);
    }
    for (int expect = 1; expect <= *shards.rbegin(); ++expect) {
      if (shards.count(expect) == 0) {
        throw ValueError(
            "'" + input_dir.string() + "' has shard files of ranks up to " +
            std::to_string(*shards.rbegin()) + " but none of shard " +
            std::to_string(expect) + " (shard-" + std::to_string(expect) +
            "-…): a rank's files are missing");
      }
    }
  }
  const int largest_in_names = inputs.front().largest;
  std::vector<Tensor> tensors;
  std::map<std::string, std::size_t> tensor_of;
  std::vector<detail::File> files;
  for (std::size_t f = 0; f < inputs.size(); ++f) {
    const Input& input = inputs[f];
    if (input.largest != largest_in_names) {
      throw ValueError(
          "The shard files of '" + input_dir.string() + "' disagree on the " +
          "number of model files: " + inputs.front().path.filename().string() +
          " and " + input.path.filename().string());
    }
    files.push_back(detail::File::open_read(input.path));
    const detail::File& file = files.back();
    const detail::SafetensorsSource source{"file " + quoted(input.path), true};
    const std::uint64_t size = file.size();
    std::string prefix(
        static_cast<std::size_t>(std::min<std::uint64_t>(8, size)), '\0');
    file.pread_exact(prefix.data(), prefix.size(), 0);
    const std::uint64_t n = detail::read_header_length(prefix, size, source);
    std::string header(static_cast<std::size_t>(n), '\0');
    file.pread_exact(header.data(), header.size(), 8);
    const detail::ParsedHeader parsed =
        detail::parse_header(header, size, source);
    const auto* info_text =
        parsed.metadata.has_value() &&
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
          quoted(input.path) + ": " + kShardingInfoKey +
          " is not a JSON object");
    }
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
            detail::shape_text(t.shape) + " has saved_offsets " +
            detail::shape_text(offsets) +
            ", which do not give one offset ≥ 0 per dimension");
      }
      const auto [slot, inserted] =
          tensor_of.try_emplace(t.name, tensors.size());
      if (inserted) {
        tensors.push_back(Tensor{t.name, t.dtype, {}, {}, 0});
      }
      Tensor& tensor = tensors[slot->second];
      if (tensor.dtype != t.dtype) {
        throw ValueError(
            "Tensor '" + t.name + "' is " +
            safetensors_dtype_name(tensor.dtype) + " in " +
            inputs[tensor.pieces.front().file].path.filename().string() +
            " but " + safetensors_dtype_name(t.dtype) + " in " +
            input.path.filename().string());
      }
      if (!tensor.pieces.empty() &&
          tensor.pieces.front().sizes.size() != t.shape.size()) {
        throw ValueError(
            "Tensor '" + t.name + "' has " +
            std::to_string(tensor.pieces.front().sizes.size()) +
            " dimensions in " +
            inputs[tensor.pieces.front().file].path.filename().string() +
            " but " + std::to_string(t.shape.size()) + " in " +
            input.path.filename().string());
      }
      int output = input.model_index;
      if (options.fqn_to_index_mapping().has_value()) {
        const auto& mapping = *options.fqn_to_index_mapping();
        const auto m = mapping.find(t.name);
        if (m == mapping.end()) {
          throw ValueError(
              "fqn_to_index_mapping has no output file for tensor '" + t.name +
              "'");
        }
        output = m->second;
      }
      if (output < 1 || output > (options.fqn_to_index_mapping().has_value()
                                      ? std::numeric_limits<int>::max()
                                      : input.largest)) {
        throw ValueError(
            "Tensor '" + t.name + "' belongs to model file " +
            std::to_string(output) + ", outside 1 … " +
            std::to_string(input.largest) + " (" +
            input.path.filename().string() + ")");
      }
      if (tensor.output != 0 && tensor.output != output) {
        throw ValueError(
            "Tensor '" + t.name + "' belongs to model file " +
            std::to_string(tensor.output) + " in one shard file and " +
            std::to_string(output) + " in " + input.path.filename().string());
      }
      tensor.output = output;
      tensor.pieces.push_back(
          Piece{f, t.shape, offsets, parsed.data_start + t.begin});
    }
  }

  // 2. Full shapes, and pieces that tile them.
  int largest = largest_in_names;
  if (options.fqn_to_index_mapping().has_value()) {
    largest = 0;
    for (const auto& [name, index] : *options.fqn_to_index_mapping()) {
      if (index < 1) {
        throw ValueError(
            "fqn_to_index_mapping gives tensor '" + name + "' the index " +
            std::to_string(index) + "; indices start at 1");
      }
      largest = std::max(largest, index);
    }
  }
  std::map<int, std::vector<std::size_t>> by_output;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    Tensor& t = tensors[i];
    t.full.assign(t.pieces.front().sizes.size(), 0);
    std::vector<detail::TilePiece> tiles;
    std::vector<std::string> names;
    for (const Piece& p : t.pieces) {
      for (std::size_t d = 0; d < t.full.size(); ++d) {
        std::int64_t end = 0;
        if (__builtin_add_overflow(p.offsets[d], p.sizes[d], &end)) {
          throw ValueError(
              quoted(inputs[p.file].path) + ": tensor '" + t.name +
              "' has saved_offsets " + detail::shape_text(p.offsets) +
              " that put it past 2^63 elements");
        }
        t.full[d] = std::max(t.full[d], end);
      }
      tiles.push_back(
          {p.offsets, p.sizes, quoted(inputs[p.file].path.filename())});
      names.push_back(inputs[p.file].path.filename().string());
    }
    std::string holders = "in ";
    for (std::size_t n = 0; n < names.size(); ++n) {
      holders +=
          (n == 0 ? "" : (n + 1 == names.size() ? " and " : ", ")) + names[n];
    }
    detail::check_tiling(
        t.name, t.full, tiles, holders, "the shard files hold it twice");
    const int bits = safetensors_dtype_bits(t.dtype);
    if (bits % 8 != 0 && t.pieces.size() > 1) {
      throw ValueError(
          "Tensor '" + t.name + "' is " + safetensors_dtype_name(t.dtype) +
          ", whose elements are not whole bytes: its pieces cannot be placed "
          "byte-wise");
    }
    by_output[t.output].push_back(i);
  }

  // 3. The output files' headers (the official writer's order and layout).
  struct Output {
    std::string name;
    std::string head;
    std::uint64_t size;
    std::vector<SafetensorsTensorInfo> infos; // file order
  };
  std::vector<Output> outputs;
  StateDictSplit split;
  for (auto& [index, members] : by_output) {
    Output out;
    out.name = output_name(index, largest);
    for (const std::size_t i : members) {
      out.infos.push_back(
          {tensors[i].name, tensors[i].dtype, tensors[i].full, 0, 0});
    }
    std::stable_sort(
        out.infos.begin(), out.infos.end(), detail::writer_order_less);
    std::uint64_t offset = 0;
    std::vector<std::string> names;
    for (SafetensorsTensorInfo& info : out.infos) {
      const auto bits =
          static_cast<std::uint64_t>(safetensors_dtype_bits(info.dtype));
      info.begin = offset;
      info.end =
          offset +
          (static_cast<std::uint64_t>(detail::volume(info.shape)) * bits + 7) /
              8;
      offset = info.end;
      names.push_back(info.name);
      split.tensor_to_filename.insert(info.name, out.name);
    }
    const std::string header =
        detail::build_header(SafetensorsMetadata{{"format", "pt"}}, out.infos);
    std::string length(8, '\0');
    for (int b = 0; b < 8; ++b) {
      length[b] = static_cast<char>((header.size() >> (8 * b)) & 0xff);
    }
    out.head = length + header;
    out.size = out.head.size() + offset;
    split.metadata.total_size += static_cast<std::int64_t>(offset);
    split.filename_to_tensors.insert(out.name, names);
    outputs.push_back(std::move(out));
  }
  split.is_sharded = true;

  // 4. Write them, copying each piece's runs to their places, and commit.
  std::filesystem::create_directories(output_dir, ec);
  ConsolidateResult result;
  for (const Output& out : outputs) {
    result.files.push_back(out.name);
  }
  result.files.push_back(kSafetensorsIndexFile);
  result.tensors = tensors.size();
  result.total_bytes = static_cast<std::uint64_t>(split.metadata.total_size);
  result.input_files = inputs.size();

  detail::CheckpointCommit commit(
      output_dir, result.files.size(), options.durable());
  commit.remove(detail::stale_files(
      output_dir,
      detail::FilenamePattern(kSafetensorsWeightsFilePattern),
      result.files));
  RangeCopier copier;
  std::uint64_t done = 0;
  for (const Output& out : outputs) {
    detail::AtomicFile file(commit.target(out.name));
    file.preallocate(out.size);
    file.write(out.head.data(), out.head.size());
    const std::filesystem::path temporary = file.keep(false);
    commit.stage(out.name, temporary);
    const detail::File written = detail::File::open_write(temporary);
    const int fd = written.fd();
    for (const SafetensorsTensorInfo& info : out.infos) {
      const Tensor& t = tensors[tensor_of.at(info.name)];
      const std::uint64_t base = out.head.size() + info.begin;
      const auto bits =
          static_cast<std::uint64_t>(safetensors_dtype_bits(t.dtype));
      for (const Piece& p : t.pieces) {
        if (bits % 8 != 0) {
          // One whole sub-byte tensor.
          done += info.end - info.begin;
          copier.copy(
              files[p.file].fd(),
              inputs[p.file].path,
              p.begin,
              fd,
              temporary,
              base,
              info.end - info.begin);
          continue;
        }
        const std::uint64_t esize = bits / 8;
        std::uint64_t source = p.begin;
        detail::for_each_run(
            p.sizes,
            t.full,
            p.offsets,
            [&](const Shape&, std::int64_t element, std::int64_t count) {
              const std::uint64_t bytes =
                  static_cast<std::uint64_t>(count) * esize;
              copier.copy(
                  files[p.file].fd(),
                  inputs[p.file].path,
                  source,
                  fd,
                  temporary,
                  base + static_cast<std::uint64_t>(element) * esize,
                  bytes);
              source += bytes;
            });
        done += static_cast<std::uint64_t>(detail::volume(p.sizes)) * esize;
        if (options.progress()) {
          options.progress()(
              Progress{out.name, t.name, done, result.total_bytes});
        }
      }
    }
    if (options.durable() && ::fdatasync(fd) != 0) {
      detail::throw_os_error("Cannot flush", temporary, errno);
    }
  }
  const std::string index = detail::index_json(split, Metadata());
  detail::AtomicFile file(commit.target(kSafetensorsIndexFile));
  file.write(index.data(), index.size());
  commit.stage(kSafetensorsIndexFile, file.keep(options.durable()));
  commit.commit();
  return result;
}

} // namespace torchser
