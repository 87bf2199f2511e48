#include <torchser/consolidate.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <memory>

#include <torchser/errors.h>
#include <torchser/safetensors.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/dcp_layout.h"
#include "torchser/detail/file.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/python_format.h"
#include "torchser/detail/safetensors_format.h"
#include "torchser/detail/tiling.h"

namespace torchser {
namespace {

using detail::Shape;

std::string output_name(int index, int largest) {
  const auto five = [](int n) {
    std::string s = std::to_string(n);
    return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
  };
  return "model-" + five(index) + "-of-" + five(largest) + ".safetensors";
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
  // 1. The shard files, their pieces, and the full tensors they tile.
  const detail::DcpLayout layout = detail::read_dcp_layout(input_dir);
  const std::vector<detail::DcpShardFile>& inputs = layout.files;
  const std::vector<detail::DcpTensor>& tensors = layout.tensors;
  std::map<std::string, std::size_t> tensor_of;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    tensor_of.emplace(tensors[i].name, i);
  }

  // 2. The output file of each tensor: the mapping's, else the index in the
  // names of the files holding it (all the same).
  const int largest_in_names = inputs.front().largest;
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
    const detail::DcpTensor& t = tensors[i];
    int output = 0;
    for (const detail::DcpPiece& p : t.pieces) {
      const detail::DcpShardFile& input = inputs[p.file];
      int index = input.model_index;
      if (options.fqn_to_index_mapping().has_value()) {
        const auto& mapping = *options.fqn_to_index_mapping();
        const auto m = mapping.find(t.name);
        if (m == mapping.end()) {
          throw ValueError(
              "fqn_to_index_mapping has no output file for tensor '" + t.name +
              "'");
        }
        index = m->second;
      } else if (index < 1 || index > input.largest) {
        throw ValueError(
            "Tensor '" + t.name + "' belongs to model file " +
            std::to_string(index) + ", outside 1 … " +
            std::to_string(input.largest) + " (" +
            input.path.filename().string() + ")");
      }
      if (output != 0 && output != index) {
        throw ValueError(
            "Tensor '" + t.name + "' belongs to model file " +
            std::to_string(output) + " in one shard file and " +
            std::to_string(index) + " in " + input.path.filename().string());
      }
      output = index;
    }
    by_output[output].push_back(i);
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
  std::error_code ec;
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
      const detail::DcpTensor& t = tensors[tensor_of.at(info.name)];
      const std::uint64_t base = out.head.size() + info.begin;
      const auto bits =
          static_cast<std::uint64_t>(safetensors_dtype_bits(t.dtype));
      for (const detail::DcpPiece& p : t.pieces) {
        if (bits % 8 != 0) {
          // One whole sub-byte tensor.
          done += info.end - info.begin;
          copier.copy(
              inputs[p.file].file.fd(),
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
                  inputs[p.file].file.fd(),
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
