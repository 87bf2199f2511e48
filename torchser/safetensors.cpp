#include <torchser/safetensors.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>
#include <utility>

#include <sys/mman.h>
#include <unistd.h>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <torchser/constants.h>

#include "torchser/detail/checksum.h"
#include "torchser/detail/direct_io.h"
#include "torchser/detail/file.h"
#include "torchser/detail/safetensors_format.h"
#include "torchser/detail/torch_version.h"

static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
    "torchser writes and maps safetensors data as it lies in memory, which "
    "is only correct on little-endian hosts");

namespace torchser {
namespace {

using Kind = SafetensorError::Kind;

struct TorchDtypeRow {
  at::ScalarType torch;
  SafetensorsDtype code;
};

// torch ↔ safetensors, for the dtypes this LibTorch build has.
const std::vector<TorchDtypeRow>& torch_dtype_table() {
  static const std::vector<TorchDtypeRow> table = {
    {at::kBool, SafetensorsDtype::kBOOL},
    {at::kByte, SafetensorsDtype::kU8},
    {at::kChar, SafetensorsDtype::kI8},
    {at::kShort, SafetensorsDtype::kI16},
    {at::kInt, SafetensorsDtype::kI32},
    {at::kLong, SafetensorsDtype::kI64},
    {at::kHalf, SafetensorsDtype::kF16},
    {at::kBFloat16, SafetensorsDtype::kBF16},
    {at::kFloat, SafetensorsDtype::kF32},
    {at::kDouble, SafetensorsDtype::kF64},
    {at::kComplexFloat, SafetensorsDtype::kC64},
#if TORCHSER_TORCH_AT_LEAST(2, 1)
    {at::ScalarType::Float8_e5m2, SafetensorsDtype::kF8_E5M2},
    {at::ScalarType::Float8_e4m3fn, SafetensorsDtype::kF8_E4M3},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 2)
    {at::ScalarType::Float8_e5m2fnuz, SafetensorsDtype::kF8_E5M2FNUZ},
    {at::ScalarType::Float8_e4m3fnuz, SafetensorsDtype::kF8_E4M3FNUZ},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 3)
    {at::ScalarType::UInt16, SafetensorsDtype::kU16},
    {at::ScalarType::UInt32, SafetensorsDtype::kU32},
    {at::ScalarType::UInt64, SafetensorsDtype::kU64},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 7)
    {at::ScalarType::Float8_e8m0fnu, SafetensorsDtype::kF8_E8M0},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 8)
    {at::ScalarType::Float4_e2m1fn_x2, SafetensorsDtype::kF4},
#endif
  };
  return table;
}

// The LibTorch release that introduced each dtype's torch type.
const char* torch_version_needed(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF8_E5M2:
    case SafetensorsDtype::kF8_E4M3:
      return "2.1";
    case SafetensorsDtype::kF8_E5M2FNUZ:
    case SafetensorsDtype::kF8_E4M3FNUZ:
      return "2.2";
    case SafetensorsDtype::kU16:
    case SafetensorsDtype::kU32:
    case SafetensorsDtype::kU64:
      return "2.3";
    case SafetensorsDtype::kF8_E8M0:
      return "2.7";
    case SafetensorsDtype::kF4:
      return "2.8";
    default:
      return nullptr;
  }
}

bool is_f4(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::kF4;
}

std::string shape_string(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

} // namespace

SafetensorsDtype to_safetensors_dtype(at::ScalarType dtype) {
  for (const TorchDtypeRow& row : torch_dtype_table()) {
    if (row.torch == dtype) {
      return row.code;
    }
  }
  std::string supported;
  for (const TorchDtypeRow& row : torch_dtype_table()) {
    supported += supported.empty() ? "" : ", ";
    supported += c10::toString(row.torch);
  }
  throw ValueError(
      std::string("Unknown dtype ") + c10::toString(dtype) +
      ": safetensors has no code for it. Supported dtypes: " + supported + ".");
}

at::ScalarType to_torch_dtype(SafetensorsDtype dtype) {
  for (const TorchDtypeRow& row : torch_dtype_table()) {
    if (row.code == dtype) {
      return row.torch;
    }
  }
  const char* needed = torch_version_needed(dtype);
  throw SafetensorError(
      Kind::kUnsupportedDtype,
      std::string("safetensors dtype ") + safetensors_dtype_name(dtype) +
          (needed != nullptr
               ? std::string(" is not supported by this LibTorch build (") +
                     TORCH_VERSION + "): it needs LibTorch >= " + needed + "."
               : std::string(" has no torch dtype.")));
}

// ---------------------------------------------------------------------------
// Writer

namespace {

// The dtype `t` is written in: `cast` for floating-point tensors.
c10::ScalarType written_dtype(
    const at::Tensor& t, std::optional<c10::ScalarType> cast) {
  return cast.has_value() && t.is_floating_point() ? *cast : t.scalar_type();
}

} // namespace

SafetensorsWriter::SafetensorsWriter(
    const StateDict& tensors,
    const std::optional<SafetensorsMetadata>& metadata,
    bool force_contiguous,
    std::optional<c10::ScalarType> cast,
    bool checksums)
    : force_contiguous_(force_contiguous),
      cast_(cast),
      metadata_(metadata),
      checksums_(checksums) {
  std::vector<std::pair<SafetensorsTensorInfo, at::Tensor>> prepared;
  prepared.reserve(tensors.size());
  for (const auto& item : tensors) {
    const std::string& name = item.key();
    const at::Tensor& t = item.value();
    if (!t.defined()) {
      throw ValueError(
          "Tensor '" + name + "' is undefined: there is nothing to save.");
    }
    if (t.layout() != at::kStrided) {
      std::ostringstream msg;
      msg << "You are trying to save a sparse tensors: `" << name
          << "` (layout " << t.layout()
          << ") which this library does not support. You can make it a dense "
             "tensor before saving with `.to_dense()` but be aware this might "
             "make a much larger file than needed.";
      throw ValueError(msg.str());
    }
    if (t.is_meta()) {
      throw ValueError(
          "Tensor '" + name +
          "' is on the meta device: it has a shape but no data to save.");
    }
    if (!force_contiguous && !t.is_contiguous()) {
      throw ValueError(
          "You are trying to save a non contiguous tensor: `" + name +
          "` which is not allowed. It either means you are trying to save "
          "tensors which are reference of each other in which case it's "
          "recommended to save only the full tensors, and reslice at load "
          "time, or simply call `.contiguous()` on your tensor to pack it "
          "before saving.");
    }
    const c10::ScalarType dtype = written_dtype(t, cast);
    SafetensorsDtype code{};
    try {
      code = to_safetensors_dtype(dtype);
    } catch (const ValueError& e) {
      throw ValueError("Tensor '" + name + "': " + e.what());
    }
    std::vector<std::int64_t> shape(t.sizes().begin(), t.sizes().end());
    if (is_f4(code)) {
      // torch packs two F4 values per element; the header has the logical
      // shape.
      if (shape.empty() ||
          __builtin_mul_overflow(shape.back(), 2, &shape.back())) {
        throw ValueError(
            "Tensor '" + name +
            "': an F4 tensor needs a last dimension that "
            "can be doubled to its logical size.");
      }
    }
    prepared.push_back(
        {SafetensorsTensorInfo{name, code, std::move(shape), 0, 0}, t});
  }
  std::stable_sort(
      prepared.begin(), prepared.end(), [](const auto& a, const auto& b) {
        return detail::writer_order_less(a.first, b.first);
      });
  std::uint64_t offset = 0;
  infos_.reserve(prepared.size());
  ordered_.reserve(prepared.size());
  for (auto& [info, tensor] : prepared) {
    const std::uint64_t nbytes = static_cast<std::uint64_t>(tensor.numel()) *
                                 c10::elementSize(written_dtype(tensor, cast));
    info.begin = offset;
    info.end = offset + nbytes;
    offset = info.end;
    infos_.push_back(std::move(info));
    ordered_.push_back(std::move(tensor));
  }
  data_size_ = offset;
  if (checksums_) {
    // Placeholders of the final width: the header's size is fixed now.
    crcs_.assign(infos_.size(), 0);
    if (!metadata_) {
      metadata_.emplace();
    }
    (*metadata_)[kChecksumMetadataKey] = checksum_text(crcs_);
  }
  header_ = detail::build_header(metadata_, infos_);
  if (header_.size() > detail::kMaxHeaderSize) {
    throw SafetensorError(
        Kind::kHeaderTooLarge,
        "Error while serializing: header too large (the header of " +
            std::to_string(infos_.size()) + " tensors takes " +
            std::to_string(header_.size()) + " bytes; readers accept at most " +
            std::to_string(detail::kMaxHeaderSize) +
            "; split the state dict into shards)");
  }
}

void SafetensorsWriter::write(
    const ByteSink& sink,
    const std::function<void(std::size_t)>& written) const {
  std::uint8_t prefix[8];
  std::uint64_t n = header_.size();
  for (std::uint8_t& byte : prefix) {
    byte = static_cast<std::uint8_t>(n & 0xFF);
    n >>= 8;
  }
  sink(prefix, sizeof prefix);
  sink(header_.data(), header_.size());
  for (std::size_t i = 0; i < ordered_.size(); ++i) {
    const std::uint64_t nbytes = infos_[i].end - infos_[i].begin;
    if (nbytes == 0) {
      if (written) {
        written(i);
      }
      continue;
    }
    // One tensor at a time on the host, packed: peak memory stays one tensor.
    at::Tensor t = ordered_[i];
    if (!t.device().is_cpu()) {
      t = t.to(at::kCPU);
    }
    t = t.resolve_conj().resolve_neg();
    if (t.scalar_type() != written_dtype(t, cast_)) {
      t = t.to(written_dtype(t, cast_)); // contiguous, one tensor at a time
    }
    if (!t.is_contiguous()) {
      TORCH_INTERNAL_ASSERT(force_contiguous_);
      t = t.contiguous();
    }
    sink(t.data_ptr(), static_cast<std::size_t>(nbytes));
    if (checksums_) {
      crcs_[i] = detail::crc32c(t.data_ptr(), static_cast<std::size_t>(nbytes));
    }
    if (written) {
      written(i);
    }
  }
  written_ = true;
}

std::string SafetensorsWriter::checksum_text(
    const std::vector<std::uint32_t>& crcs) const {
  std::vector<std::pair<std::string, std::uint32_t>> checksums;
  checksums.reserve(infos_.size());
  for (std::size_t i = 0; i < infos_.size(); ++i) {
    checksums.emplace_back(infos_[i].name, crcs.empty() ? 0 : crcs[i]);
  }
  return detail::checksum_metadata(checksums);
}

std::string SafetensorsWriter::final_header() const {
  if (!checksums_) {
    return header_;
  }
  TORCH_INTERNAL_ASSERT(written_, "final_header() before write()");
  return final_header(crcs_);
}

std::string SafetensorsWriter::final_header(
    const std::vector<std::uint32_t>& checksums) const {
  TORCH_CHECK(
      checksums_ && checksums.size() == infos_.size(),
      "final_header(checksums): the writer records no checksums, or the "
      "count differs from its tensors'");
  SafetensorsMetadata metadata = *metadata_;
  metadata[kChecksumMetadataKey] = checksum_text(checksums);
  std::string header = detail::build_header(metadata, infos_);
  TORCH_INTERNAL_ASSERT(header.size() == header_.size());
  return header;
}

void save_file(
    const StateDict& tensors,
    const std::filesystem::path& path,
    const std::optional<SafetensorsMetadata>& metadata,
    const SaveFileOptions& options) {
  const SafetensorsWriter writer(
      tensors,
      metadata,
      options.force_contiguous(),
      std::nullopt,
      options.checksums());
  detail::AtomicFile file(path);
  file.preallocate(writer.size());
  writer.write(
      [&](const void* data, std::size_t size) { file.write(data, size); });
  if (options.checksums()) {
    const std::string header = writer.final_header();
    file.patch(header.data(), header.size(), 8);
  }
  file.commit(options.durable());
}

std::string save(
    const StateDict& tensors,
    const std::optional<SafetensorsMetadata>& metadata,
    bool force_contiguous) {
  const SafetensorsWriter writer(tensors, metadata, force_contiguous);
  std::string bytes;
  bytes.reserve(static_cast<std::size_t>(writer.size()));
  writer.write([&](const void* data, std::size_t size) {
    bytes.append(static_cast<const char*>(data), size);
  });
  return bytes;
}

// ---------------------------------------------------------------------------
// Reader

namespace {

// Where a tensor's bytes are: a mapping, an open file, or a buffer.
struct ByteSource {
  std::shared_ptr<const detail::MappedFile> mapping; // kMmap
  const detail::File* file = nullptr;                // kPread
  const detail::DirectFile* direct = nullptr;        // kDirect (and `file`)
  const std::uint8_t* buffer = nullptr;              // load(bytes)

  // Copies `size` bytes at absolute `offset` into `out`.
  void copy(void* out, std::size_t size, std::uint64_t offset) const {
    if (size == 0) {
      return;
    }
    if (file != nullptr) {
      file->pread_exact(out, size, offset);
    } else {
      const std::uint8_t* base = mapping ? mapping->data() : buffer;
      std::memcpy(out, base + offset, size);
    }
  }
};

at::ScalarType torch_dtype_for(
    const SafetensorsTensorInfo& info,
    const detail::SafetensorsSource& source) {
  try {
    return to_torch_dtype(info.dtype);
  } catch (const SafetensorError& e) {
    throw SafetensorError(
        e.kind(),
        std::string(e.what()) + " (" + source.description + ": tensor `" +
            info.name + "`)");
  }
}

// The torch storage shape: F4 packs the last dimension in pairs.
std::vector<std::int64_t> torch_shape_for(
    const SafetensorsTensorInfo& info,
    const detail::SafetensorsSource& source) {
  std::vector<std::int64_t> shape = info.shape;
  if (is_f4(info.dtype)) {
    if (shape.empty() || shape.back() % 2 != 0) {
      throw SafetensorError(
          Kind::kUnsupportedDtype,
          "f4_x2 dtype requires the last dim be divisible by 2 in torch: got " +
              shape_string(shape) + " (" + source.description + ": tensor `" +
              info.name + "`)");
    }
    shape.back() /= 2;
  }
  return shape;
}

// Sends a host tensor to `device`; CUDA copies go through pinned memory so
// they are real DMA transfers and do not stall on pageable pages.
at::Tensor to_device(const at::Tensor& host, const c10::Device& device) {
  if (device.is_cpu()) {
    return host;
  }
  if (device.is_cuda()) {
    if (!at::hasCUDA()) {
      throw ValueError(
          "Device " + device.str() +
          " was requested, but this LibTorch build has no CUDA support.");
    }
    at::Tensor pinned =
        at::empty(host.sizes(), host.options().pinned_memory(true));
    pinned.copy_(host);
    return pinned.to(device, /*non_blocking=*/true);
  }
  return host.to(device);
}

// Builds the tensor for `info` from `bytes`, on `device`.
at::Tensor make_tensor(
    const SafetensorsTensorInfo& info,
    std::uint64_t data_start,
    const ByteSource& bytes,
    const c10::Device& device,
    const detail::SafetensorsSource& source) {
  const at::ScalarType dtype = torch_dtype_for(info, source);
  const std::vector<std::int64_t> shape = torch_shape_for(info, source);
  const auto options = at::TensorOptions().dtype(dtype);
  const std::uint64_t nbytes = info.end - info.begin;
  const std::uint64_t offset = data_start + info.begin;
  if (bytes.mapping && device.is_cpu() && nbytes > 0) {
    const std::uint8_t* data = bytes.mapping->data() + offset;
    const auto element_size =
        static_cast<std::uintptr_t>(c10::elementSize(dtype));
    // Zero-copy when the data is aligned for its dtype (always, in files
    // from the official writer); old writers left some tensors misaligned,
    // and those get their own aligned copy.
    if (reinterpret_cast<std::uintptr_t>(data) % element_size == 0) {
      return at::from_blob(
          const_cast<std::uint8_t*>(data),
          shape,
          [keep = bytes.mapping](void*) {},
          options);
    }
  }
  if (bytes.direct != nullptr && nbytes > 0 &&
      (device.is_cpu() || device.is_cuda())) {
    if (device.is_cuda() && !at::hasCUDA()) {
      throw ValueError(
          "Device " + device.str() +
          " was requested, but this LibTorch build has no CUDA support.");
    }
    return detail::read_tensors(
        *bytes.direct, {detail::TensorSpec{offset, shape, dtype}}, device)[0];
  }
  at::Tensor host = at::empty(shape, options);
  bytes.copy(host.data_ptr(), static_cast<std::size_t>(nbytes), offset);
  return to_device(host, device);
}

} // namespace

struct SafeOpen::State {
  std::filesystem::path path;
  SafeOpenOptions options;
  detail::SafetensorsSource source;
  detail::File file;
  detail::ParsedHeader header;
  ByteSource bytes;
  std::unique_ptr<detail::DirectFile> direct;
};

SafeOpen::SafeOpen(
    const std::filesystem::path& path, const SafeOpenOptions& options)
    : SafeOpen(path, 0, std::numeric_limits<std::uint64_t>::max(), options) {}

SafeOpen::SafeOpen(
    const std::filesystem::path& path,
    std::uint64_t offset,
    std::uint64_t length,
    const SafeOpenOptions& options)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.path = path;
  s.options = options;
  s.file = detail::File::open_read(path);
  const std::uint64_t file_size = s.file.size();
  const bool whole = length == std::numeric_limits<std::uint64_t>::max();
  if (whole) {
    length = file_size;
    s.source = {"file '" + path.string() + "'", true};
  } else {
    s.source = {
        "entry at bytes " + std::to_string(offset) + "+" +
            std::to_string(length) + " of file '" + path.string() + "'",
        true};
    if (offset > file_size || length > file_size - offset) {
      detail::throw_safetensor_error(
          Kind::kMetadataIncompleteBuffer,
          s.source,
          "incomplete metadata, file not fully covered",
          "the file has only " + std::to_string(file_size) + " bytes");
    }
  }
  const std::uint64_t size = length;
  if (options.backend() == LoadBackend::kMmap && size >= 8) {
    s.bytes.mapping = detail::MappedFile::map(s.file);
    const auto* base =
        reinterpret_cast<const char*>(s.bytes.mapping->data()) + offset;
    const std::uint64_t n =
        detail::read_header_length(std::string_view(base, 8), size, s.source);
    s.header = detail::parse_header(
        std::string_view(base + 8, static_cast<std::size_t>(n)),
        size,
        s.source);
    s.header.data_start += offset;
    return;
  }
  char prefix[8] = {};
  if (size >= 8) {
    s.file.pread_exact(prefix, 8, offset);
  }
  const std::uint64_t n = detail::read_header_length(
      std::string_view(prefix, size >= 8 ? 8 : 0), size, s.source);
  std::string header(static_cast<std::size_t>(n), '\0');
  s.file.pread_exact(header.data(), header.size(), offset + 8);
  s.header = detail::parse_header(header, size, s.source);
  s.header.data_start += offset;
  s.bytes.file = &s.file;
  if (options.backend() == LoadBackend::kDirect) {
    s.direct =
        std::make_unique<detail::DirectFile>(path, path.string(), s.file.fd());
    s.bytes.direct = s.direct.get();
  }
}

const detail::DirectFile* detail::SafeOpenAccess::direct(const SafeOpen& file) {
  return file.state_->direct.get();
}

SafeOpen::~SafeOpen() = default;
SafeOpen::SafeOpen(SafeOpen&&) noexcept = default;
SafeOpen& SafeOpen::operator=(SafeOpen&&) noexcept = default;

std::vector<std::string> SafeOpen::keys() const {
  std::vector<std::string> names = offset_keys();
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::string> SafeOpen::offset_keys() const {
  std::vector<std::string> names;
  names.reserve(state_->header.tensors.size());
  for (const SafetensorsTensorInfo& t : state_->header.tensors) {
    names.push_back(t.name);
  }
  return names;
}

const std::optional<SafetensorsMetadata>& SafeOpen::metadata() const noexcept {
  return state_->header.metadata;
}

const std::vector<SafetensorsTensorInfo>& SafeOpen::tensors() const noexcept {
  return state_->header.tensors;
}

const std::filesystem::path& SafeOpen::path() const noexcept {
  return state_->path;
}

std::uint64_t SafeOpen::data_offset() const noexcept {
  return state_->header.data_start;
}

bool SafeOpen::contains(std::string_view name) const {
  return state_->header.index.contains(name);
}

std::size_t SafeOpen::position_of(std::string_view name) const {
  const std::size_t* position = state_->header.index.find(name);
  if (position == nullptr) {
    throw SafetensorError(
        Kind::kTensorNotFound,
        "File does not contain tensor " + std::string(name) + " (" +
            state_->source.description + ")");
  }
  return *position;
}

at::Tensor SafeOpen::get_tensor(std::string_view name) const {
  const State& s = *state_;
  return make_tensor(
      s.header.tensors[position_of(name)],
      s.header.data_start,
      s.bytes,
      s.options.device(),
      s.source);
}

void SafeOpen::release_pages(std::string_view name) const {
  const State& s = *state_;
  if (!s.bytes.mapping) {
    return;
  }
  const SafetensorsTensorInfo& info = s.header.tensors[position_of(name)];
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t begin =
      (s.header.data_start + info.begin + page - 1) / page * page;
  const std::uint64_t end = (s.header.data_start + info.end) / page * page;
  if (end > begin) {
    s.bytes.mapping->advise_range(begin, end - begin, MADV_DONTNEED);
  }
}

SafeSlice SafeOpen::get_slice(std::string_view name) const {
  return SafeSlice(this, position_of(name));
}

const std::vector<std::int64_t>& SafeSlice::get_shape() const noexcept {
  return file_->state_->header.tensors[position_].shape;
}

std::string SafeSlice::get_dtype() const {
  return safetensors_dtype_name(file_->state_->header.tensors[position_].dtype);
}

at::Tensor SafeSlice::operator()(const std::vector<SliceIndex>& indices) const {
  const SafeOpen::State& s = *file_->state_;
  const SafetensorsTensorInfo& info = s.header.tensors[position_];
  const std::vector<std::int64_t>& shape = info.shape;
  const auto fail = [&](const std::string& what) {
    throw SafetensorError(
        Kind::kInvalidSlice,
        what + " (" + s.source.description + ": tensor `" + info.name +
            "` of shape " + shape_string(shape) + ")");
  };
  if (indices.size() > shape.size()) {
    fail("more slicing indexes than dimensions in tensor");
  }
  // Resolve every index to [lo, hi) on its dimension, Python-style.
  std::vector<std::int64_t> lo(shape.size(), 0);
  std::vector<std::int64_t> hi(shape);
  std::vector<bool> selected(shape.size(), false);
  for (std::size_t d = 0; d < indices.size(); ++d) {
    const SliceIndex& index = indices[d];
    const std::int64_t size = shape[d];
    if (index.select.has_value()) {
      const std::int64_t i =
          *index.select < 0 ? *index.select + size : *index.select;
      if (i < 0 || i >= size) {
        fail(
            "index " + std::to_string(*index.select) +
            " out of bounds for tensor dimension #" + std::to_string(d) +
            " of size " + std::to_string(size));
      }
      lo[d] = i;
      hi[d] = i + 1;
      selected[d] = true;
      continue;
    }
    const auto clamp = [&](std::optional<std::int64_t> bound,
                           std::int64_t fallback) {
      if (!bound.has_value()) {
        return fallback;
      }
      const std::int64_t b = *bound < 0 ? *bound + size : *bound;
      return std::clamp<std::int64_t>(b, 0, size);
    };
    lo[d] = clamp(index.start, 0);
    hi[d] = std::max(lo[d], clamp(index.stop, size));
  }

  const bool zero_copy = s.bytes.mapping && s.options.device().is_cpu();
  if (indices.empty() || zero_copy || is_f4(info.dtype)) {
    // A view of the whole tensor (zero-copy on a mapping), then narrowed.
    at::Tensor t = file_->get_tensor(info.name);
    for (std::int64_t d = static_cast<std::int64_t>(indices.size()) - 1; d >= 0;
         --d) {
      const auto dim = static_cast<std::size_t>(d);
      t = selected[dim] ? t.select(d, lo[dim])
                        : t.narrow(d, lo[dim], hi[dim] - lo[dim]);
    }
    return t;
  }

  // Read only the selected bytes: runs along the last indexed dimension,
  // for every combination of the indices before it.
  const at::ScalarType dtype = torch_dtype_for(info, s.source);
  const std::int64_t element_size =
      static_cast<std::int64_t>(c10::elementSize(dtype));
  std::vector<std::int64_t> out_shape;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    out_shape.push_back(hi[d] - lo[d]);
  }
  at::Tensor out = at::empty(out_shape, at::TensorOptions().dtype(dtype));
  std::vector<std::int64_t> stride(shape.size(), 1); // in elements
  for (std::size_t d = shape.size(); d-- > 1;) {
    stride[d - 1] = stride[d] * shape[d];
  }
  if (out.numel() > 0) {
    const std::size_t k = indices.size(); // ≥ 1 here
    const std::int64_t run =
        (hi[k - 1] - lo[k - 1]) * stride[k - 1] * element_size;
    std::vector<std::int64_t> at_index(
        lo.begin(), lo.begin() + static_cast<std::ptrdiff_t>(k));
    auto* dst = static_cast<std::uint8_t*>(out.data_ptr());
    const std::uint64_t base = s.header.data_start + info.begin;
    while (true) {
      std::int64_t element = 0;
      for (std::size_t d = 0; d < k; ++d) {
        element += at_index[d] * stride[d];
      }
      s.bytes.copy(
          dst,
          static_cast<std::size_t>(run),
          base + static_cast<std::uint64_t>(element * element_size));
      dst += run;
      // Odometer over the dimensions before the last indexed one.
      bool done = true;
      for (std::size_t d = k - 1; d-- > 0;) {
        if (++at_index[d] < hi[d]) {
          done = false;
          break;
        }
        at_index[d] = lo[d];
      }
      if (done) {
        break;
      }
    }
  }
  for (std::int64_t d = static_cast<std::int64_t>(shape.size()) - 1; d >= 0;
       --d) {
    if (selected[static_cast<std::size_t>(d)]) {
      out = out.squeeze(d);
    }
  }
  return to_device(out, s.options.device());
}

StateDict load_file(
    const std::filesystem::path& path, const SafeOpenOptions& options) {
  const SafeOpen file(path, options);
  StateDict out;
  out.reserve(file.tensors().size());
  for (const SafetensorsTensorInfo& info : file.tensors()) {
    out.insert(info.name, file.get_tensor(info.name));
  }
  return out;
}

StateDict load(std::string_view bytes, const c10::Device& device) {
  const detail::SafetensorsSource source{"in-memory buffer", false};
  const std::uint64_t n = detail::read_header_length(
      bytes.substr(0, std::min<std::size_t>(bytes.size(), 8)),
      bytes.size(),
      source);
  const detail::ParsedHeader header = detail::parse_header(
      bytes.substr(8, static_cast<std::size_t>(n)), bytes.size(), source);
  ByteSource from;
  from.buffer = reinterpret_cast<const std::uint8_t*>(bytes.data());
  StateDict out;
  out.reserve(header.tensors.size());
  for (const SafetensorsTensorInfo& info : header.tensors) {
    out.insert(
        info.name, make_tensor(info, header.data_start, from, device, source));
  }
  return out;
}

} // namespace torchser
