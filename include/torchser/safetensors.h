#pragma once

/// \file
/// The safetensors format: a validated, zero-copy reader and a writer whose
/// files are byte-identical to the official Rust writer's.
///
/// On-disk layout (github.com/huggingface/safetensors, README "Format"):
/// 1. 8 bytes: N, the header length, unsigned little-endian 64-bit;
///    N ≤ 100,000,000.
/// 2. N bytes: a UTF-8 JSON object. Key `__metadata__` (optional): a
///    string → string map. Every other key names a tensor:
///    `{"dtype": "F32", "shape": [2, 3], "data_offsets": [BEGIN, END]}`,
///    offsets relative to the start of the data buffer, END one past.
///    The writer pads the JSON with spaces to a multiple of 8.
/// 3. The data buffer: every tensor's bytes, row-major, little-endian. Sorted
///    by offsets, the tensors tile the buffer exactly: the first begins at 0,
///    each begins where the previous ends, END − BEGIN = numel × bits / 8,
///    and the file ends at 8 + N + the last END.
///
/// The writer orders tensors by dtype alignment, descending (the Rust enum
/// order reversed), then by name, byte-wise; it writes `__metadata__` first
/// with its keys sorted byte-wise (the official writer's order is random), as
/// compact JSON with serde_json's escaping; and it puts no padding between
/// tensors.
///
/// Example:
/// ```
/// torchser::save_file(state_dict, "model.safetensors", {{"format", "pt"}});
/// torchser::StateDict loaded = torchser::load_file("model.safetensors");
/// torchser::SafeOpen f("model.safetensors");
/// at::Tensor rows = f.get_slice("embed.weight")({torchser::SliceIndex(0,
/// 10)});
/// ```

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <torchser/errors.h>
#include <torchser/export.h>
#include <torchser/load_backend.h>
#include <torchser/ordered_map.h>
#include <torchser/state_dict.h>

namespace torchser {

/// The safetensors dtypes, in the official enum's order, which is increasing
/// alignment and the writer's sort key.
enum class SafetensorsDtype : std::uint8_t {
  kBOOL,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};

/// The dtype's code in headers: "BOOL", "F32", "F8_E4M3", ...
TORCHSER_API const char* safetensors_dtype_name(SafetensorsDtype dtype);
/// The dtype of a header code (case-sensitive), or nullopt.
TORCHSER_API std::optional<SafetensorsDtype> parse_safetensors_dtype(
    std::string_view code);
/// Bits per element: 4 (F4), 6 (F6_*), 8 … 64.
TORCHSER_API int safetensors_dtype_bits(SafetensorsDtype dtype);

/// The safetensors dtype of a torch dtype. Throws ValueError for dtypes the
/// format cannot express (complex128, quantized, bits types, ...).
TORCHSER_API SafetensorsDtype to_safetensors_dtype(at::ScalarType dtype);
/// The torch dtype of a safetensors dtype. Throws SafetensorError
/// (kUnsupportedDtype) when this LibTorch build has none: F6_* never do;
/// F8_E5M2/F8_E4M3 need LibTorch ≥ 2.1, the FNUZ variants ≥ 2.2, U16/U32/U64
/// ≥ 2.3, F8_E8M0 ≥ 2.7, F4 ≥ 2.8.
TORCHSER_API at::ScalarType to_torch_dtype(SafetensorsDtype dtype);

/// `__metadata__`: string → string, kept sorted (the writer's order).
using SafetensorsMetadata = std::map<std::string, std::string>;

/// One tensor as the header describes it.
struct TORCHSER_API SafetensorsTensorInfo {
  std::string name;       ///< the tensor's name
  SafetensorsDtype dtype; ///< its element type
  /// Logical shape (for F4, the packed torch shape halves the last dim).
  std::vector<std::int64_t> shape;
  /// [begin, end) relative to the start of the data buffer.
  ///@{
  std::uint64_t begin;
  std::uint64_t end;
  ///@}
};

// ---------------------------------------------------------------------------
// Writer

/// Receives the bytes of a file in order (a file, a socket, a zip entry...).
using ByteSink = std::function<void(const void* data, std::size_t size)>;

/// A state dict prepared for writing: validated, sorted and with its header
/// built, before a single data byte is touched. write() then streams the
/// file, bringing one tensor at a time to CPU (and making it contiguous when
/// asked), so peak memory stays one tensor above the model.
///
/// Rejected with ValueError: a tensor named `__metadata__`, undefined or
/// sparse tensors, non-contiguous tensors (unless force_contiguous), dtypes
/// the format cannot express, names or metadata that are not valid UTF-8.
/// A header over 100,000,000 bytes is a SafetensorError (kHeaderTooLarge).
/// Tensors that share memory are written once per name (deduplicating them is
/// save_torch_state_dict's job).
class TORCHSER_API SafetensorsWriter {
 public:
  /// Prepares `tensors` with `metadata` (the `__metadata__` map, none when
  /// nullopt); `force_contiguous` writes non-contiguous tensors as contiguous
  /// copies instead of rejecting them. `cast`, when set, writes
  /// floating-point tensors in that dtype, converting one tensor at a time
  /// while writing (integer and bool tensors keep theirs). `checksums`
  /// records each tensor's CRC-32C under kChecksumMetadataKey: the header
  /// then holds placeholders until write() has seen the bytes, and
  /// final_header() has the values (same size), for the caller to write over
  /// the first one.
  SafetensorsWriter(
      const StateDict& tensors,
      const std::optional<SafetensorsMetadata>& metadata = std::nullopt,
      bool force_contiguous = false,
      std::optional<c10::ScalarType> cast = std::nullopt,
      bool checksums = false);

  /// Total file size in bytes.
  std::uint64_t size() const noexcept {
    return 8 + header_.size() + data_size_;
  }
  /// The padded JSON header (N = header().size()).
  const std::string& header() const noexcept {
    return header_;
  }
  /// The tensors in file order.
  const std::vector<SafetensorsTensorInfo>& tensors() const noexcept {
    return infos_;
  }
  /// Streams the whole file into `sink`; `written(i)`, when given, after the
  /// data of tensors()[i] went through it (progress, releasing source pages).
  void write(
      const ByteSink& sink,
      const std::function<void(std::size_t)>& written = {}) const;
  /// After write(): the header with the checksums of the bytes written (the
  /// header itself without checksums). A writer is used by one thread.
  std::string final_header() const;
  /// The header with `checksums` (one per tensors() entry, in that order),
  /// for bytes that were written elsewhere (a distributed save's ranks);
  /// the same size as header(). Needs `checksums` at construction.
  std::string final_header(const std::vector<std::uint32_t>& checksums) const;

 private:
  std::string checksum_text(const std::vector<std::uint32_t>& crcs) const;
  std::vector<at::Tensor> ordered_;
  std::vector<SafetensorsTensorInfo> infos_;
  std::string header_;
  std::uint64_t data_size_ = 0;
  bool force_contiguous_;
  std::optional<c10::ScalarType> cast_;
  std::optional<SafetensorsMetadata> metadata_;
  bool checksums_ = false;
  mutable std::vector<std::uint32_t> crcs_;
  mutable bool written_ = false;
};

/// Options of save_file().
struct TORCHSER_API SaveFileOptions {
  /// Make non-contiguous tensors contiguous (one at a time) instead of
  /// rejecting them. Default: false, as safetensors' save_file.
  TORCH_ARG(bool, force_contiguous) = false;
  /// fsync the file before the rename and the directory after it, so that
  /// the new file survives a power loss. Default: true.
  TORCH_ARG(bool, durable) = true;
  /// Record each tensor's CRC-32C in the metadata (see SaveOptions).
  TORCH_ARG(bool, checksums) = false;
};

/// `safetensors.torch.save_file`: writes `tensors` to `path` under a
/// temporary name in the same directory, then renames it into place, so the
/// old file stays intact until the new one is complete (and tensors that
/// memory-map the old file keep their data).
TORCHSER_API void save_file(
    const StateDict& tensors,
    const std::filesystem::path& path,
    const std::optional<SafetensorsMetadata>& metadata = std::nullopt,
    const SaveFileOptions& options = {});

/// `safetensors.torch.save`: the file's bytes in memory.
TORCHSER_API std::string save(
    const StateDict& tensors,
    const std::optional<SafetensorsMetadata>& metadata = std::nullopt,
    bool force_contiguous = false);

// ---------------------------------------------------------------------------
// Reader

/// Options of SafeOpen and load_file().
struct TORCHSER_API SafeOpenOptions {
  /// Where tensors go. CUDA goes through pinned host memory when the build
  /// has CUDA.
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
  /// How the bytes are read: a copy-on-write mapping (tensors are views of
  /// it), pread into new tensors (for files that may change while open), or
  /// kDirect's O_DIRECT reads into new tensors (cold files; on CUDA through
  /// pinned buffers). See load_backend.h.
  TORCH_ARG(LoadBackend, backend) = LoadBackend::kMmap;
};

/// One index of SafeSlice: a position (negative counts from the end) or a
/// half-open range [start, stop) with Python's slice clamping; an absent
/// bound is the dimension's start or end.
struct TORCHSER_API SliceIndex {
  /// The whole dimension (Python's `:`).
  SliceIndex() = default;
  /// One position: the dimension is removed (Python's `x[i]`).
  SliceIndex(std::int64_t index) // NOLINT(google-explicit-constructor)
      : select(index) {}
  /// A range (Python's `x[start:stop]`).
  SliceIndex(
      std::optional<std::int64_t> start, std::optional<std::int64_t> stop)
      : start(start), stop(stop) {}

  std::optional<std::int64_t> select; ///< one position, or none for a range
  std::optional<std::int64_t> start;  ///< the range's start (none: 0)
  std::optional<std::int64_t>
      stop; ///< the range's end (none: the dimension's size)
};

class SafeOpen;

/// `safe_open(...).get_slice(name)`: a tensor's shape and dtype without its
/// data, and sub-tensors read by ranges on the leading dimensions.
class TORCHSER_API SafeSlice {
 public:
  /// The tensor's shape.
  const std::vector<std::int64_t>& get_shape() const noexcept;
  /// The header code, e.g. "F32".
  std::string get_dtype() const;
  /// The sub-tensor for `indices` (at most one per dimension, leading
  /// dimensions first). With the mmap backend on CPU it is a view of the
  /// mapping; otherwise only the selected bytes are read.
  at::Tensor operator()(const std::vector<SliceIndex>& indices) const;

 private:
  friend class SafeOpen;
  SafeSlice(const SafeOpen* file, std::size_t position)
      : file_(file), position_(position) {}
  const SafeOpen* file_;
  std::size_t position_;
};

namespace detail {
struct SafeOpenAccess;
} // namespace detail

/// `safetensors.safe_open`: a validated, lazily read safetensors file. The
/// header is parsed and every rule of the format checked on construction;
/// tensors are created on request.
///
/// Throws FileNotFoundError / OSError for I/O problems and SafetensorError
/// for files that break the format (the message names the file and the rule).
class TORCHSER_API SafeOpen {
 public:
  /// Opens and validates the file at `path`.
  explicit SafeOpen(
      const std::filesystem::path& path, const SafeOpenOptions& options = {});
  /// A safetensors file stored at bytes [offset, offset + length) of a
  /// larger file (a DDUF archive entry). Rules and messages as for a file.
  SafeOpen(
      const std::filesystem::path& path,
      std::uint64_t offset,
      std::uint64_t length,
      const SafeOpenOptions& options = {});
  /// Closes the file; tensors created from the mapping keep it alive.
  ~SafeOpen();
  /// Movable, not copyable.
  ///@{
  SafeOpen(SafeOpen&&) noexcept;
  SafeOpen& operator=(SafeOpen&&) noexcept;
  ///@}

  /// Tensor names, sorted.
  std::vector<std::string> keys() const;
  /// Tensor names in data order.
  std::vector<std::string> offset_keys() const;
  /// `__metadata__`: nullopt when the header has none (or `null`), an empty
  /// map for `{}`.
  const std::optional<SafetensorsMetadata>& metadata() const noexcept;
  /// Header entries in data order.
  const std::vector<SafetensorsTensorInfo>& tensors() const noexcept;
  /// Whether the file has a tensor `name`.
  bool contains(std::string_view name) const;
  /// The tensor `name`. Throws SafetensorError (kTensorNotFound) for an
  /// unknown name, (kUnsupportedDtype) for a dtype this build lacks.
  at::Tensor get_tensor(std::string_view name) const;
  /// A lazily read view of tensor `name`.
  SafeSlice get_slice(std::string_view name) const;
  /// The file's path.
  const std::filesystem::path& path() const noexcept;
  /// Where the data section starts in the file (after the 8-byte length and
  /// the header; in an archive, after the entry's offset too): tensor `t`'s
  /// bytes are at data_offset() + t.begin.
  std::uint64_t data_offset() const noexcept;

  /// With the mmap backend: drops this process's mapped pages of tensor
  /// `name` (they stay in the page cache), so that a loader copying tensor
  /// after tensor keeps its resident memory near one tensor. Tensors created
  /// on those pages read the file's bytes again on next access; unsaved
  /// in-place changes to them are lost. A no-op with the pread backend.
  void release_pages(std::string_view name) const;

 private:
  friend class SafeSlice;
  friend struct detail::SafeOpenAccess;
  struct State;
  std::size_t position_of(std::string_view name) const;
  std::unique_ptr<State> state_;
};

/// `safetensors.torch.load_file`: every tensor of `path`, in data order.
TORCHSER_API StateDict load_file(
    const std::filesystem::path& path, const SafeOpenOptions& options = {});

/// `safetensors.torch.load`: every tensor of a safetensors buffer, copied
/// out of it, in data order. Errors are SafetensorErrors as for files.
TORCHSER_API StateDict load(
    std::string_view bytes, const c10::Device& device = c10::Device(c10::kCPU));

} // namespace torchser
