#pragma once

// The few ZIP structures torchser needs (PKWARE APPNOTE.TXT 6.3), read and
// written directly: libzip 1.7 exposes no data offsets and cannot align
// entries, and both torch.save archives and DDUF need both.
//
// Reading works on a memory view of the whole archive (a mapping). Every
// offset and length read from it is checked against its size with overflow-
// safe arithmetic; a damaged archive is a ZipFormatError, never a read out of
// bounds. Never installed; exported for the tests and fuzzers.

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <torchser/export.h>

namespace torchser::detail {

/// A damaged or unsupported archive. Callers rethrow it as their public
/// error type (UnpicklingError, DDUFCorruptedFileError) with the file name.
class TORCHSER_API ZipFormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  ~ZipFormatError() override;
};

/// One entry, from the central directory, with its data offset taken from
/// its local header (4.3.7), as Python's zipfile and huggingface_hub do.
struct TORCHSER_API ZipEntry {
  std::string name;
  std::uint16_t flags = 0;
  std::uint16_t method = 0; ///< 0 = stored
  std::uint32_t crc32 = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t uncompressed_size = 0;
  std::uint64_t local_header_offset = 0; ///< absolute, in the file
  std::uint64_t data_offset = 0;         ///< absolute, in the file
  bool is_directory() const {
    return !name.empty() && name.back() == '/';
  }
};

/// Random access to an archive's bytes: `read(out, n, offset)` fills `out`
/// with n bytes at offset (the caller keeps offset + n ≤ size).
struct TORCHSER_API ZipSource {
  std::uint64_t size;
  std::function<void(void* out, std::size_t n, std::uint64_t offset)> read;
  /// The whole archive in memory, when it is: then nothing is copied.
  const std::uint8_t* memory = nullptr;
};

/// The central directory, in directory order. Bytes before the archive (a
/// self-extractor stub, junk) are allowed, as in Python's zipfile: offsets
/// are shifted by their length. Only the end records, the directory and the
/// local headers are read (with pread on a file, nothing is mapped).
TORCHSER_API std::vector<ZipEntry> read_zip_directory(const ZipSource& source);
/// The same over bytes in memory.
TORCHSER_API std::vector<ZipEntry> read_zip_directory(
    const std::uint8_t* data, std::uint64_t size);

/// The standard CRC-32 (ISO 3309, as ZIP and zlib use it), continued from
/// `crc` (0 to start).
TORCHSER_API std::uint32_t crc32(
    std::uint32_t crc, const void* data, std::size_t size);

/// Writes an archive of stored entries in one pass: local header, data, next
/// entry, ..., central directory. Each entry's data starts at a multiple of
/// `alignment` (padding in the local header's extra field, as torch.save and
/// DDUF readers expect), sizes go in the local header up front, and the CRC is
/// patched into it once the data is through, so no data descriptor is needed.
class TORCHSER_API ZipWriter {
 public:
  struct Output {
    /// Appends bytes at the current end.
    std::function<void(const void*, std::size_t)> write;
    /// Overwrites bytes already written at an absolute offset.
    std::function<void(const void*, std::size_t, std::uint64_t)> patch;
    /// Moves the end past bytes written by someone else (add_reserved only).
    std::function<void(std::uint64_t)> skip;
  };
  struct Options {
    std::uint64_t alignment = 64;
    /// Padding extra-field id: torch.save uses "FB" (0x4246).
    std::uint16_t padding_id = 0x4246;
    /// Python zipfile's layout with force_zip64=True, as huggingface_hub's
    /// DDUF export writes it: every local header carries size fields of
    /// 0xFFFFFFFF and a ZIP64 extra (entries may then be streamed without a
    /// known size: the sizes are patched in like the CRC); the UTF-8 flag
    /// only for non-ASCII names; version made by 0x032D; external
    /// attributes 0o600; central-directory ZIP64 extras and ZIP64 end
    /// records only past 2^31 − 1 (CPython's ZIP64_LIMIT).
    bool python_zip64_layout = false;
  };

  ZipWriter(Output output, Options options);

  /// Adds a stored entry of exactly `size` bytes that `produce` writes through
  /// the sink it is given. Throws ZipFormatError when it writes another count.
  void add(
      const std::string& name,
      std::uint64_t size,
      const std::function<
          void(const std::function<void(const void*, std::size_t)>&)>& produce);
  /// Adds a stored entry from memory.
  void add(const std::string& name, std::string_view content);
  /// Adds a stored entry of `size` bytes whose CRC-32 is `crc` and whose data
  /// someone else writes: the output skips it. Lays out archives whose data
  /// several processes write at their offsets (the headers are written again
  /// once the CRCs are known).
  void add_reserved(
      const std::string& name, std::uint64_t size, std::uint32_t crc);
  /// Adds a stored entry of a size not known in advance (python_zip64_layout
  /// only): `produce` writes any number of bytes.
  void add_streaming(
      const std::string& name,
      const std::function<
          void(const std::function<void(const void*, std::size_t)>&)>& produce);
  /// Writes the central directory and the end records.
  void finish();

  std::uint64_t offset() const noexcept {
    return offset_;
  }

 private:
  void emit(const void* data, std::size_t size);
  void add_entry(
      const std::string& name,
      std::optional<std::uint64_t> size,
      const std::function<
          void(const std::function<void(const void*, std::size_t)>&)>& produce,
      std::optional<std::uint32_t> reserved_crc = std::nullopt);
  Output output_;
  Options options_;
  std::uint64_t offset_ = 0;
  std::vector<ZipEntry> entries_;
  bool finished_ = false;
};

} // namespace torchser::detail
