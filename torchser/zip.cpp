#include "torchser/detail/zip.h"

#include <isa-l/crc.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace torchser::detail {
namespace {

// Record signatures and fixed sizes (APPNOTE 4.3.7, 4.3.12, 4.3.14-16).
constexpr std::uint32_t kLocalHeaderSig = 0x04034b50;
constexpr std::uint32_t kCentralHeaderSig = 0x02014b50;
constexpr std::uint32_t kEndSig = 0x06054b50;
constexpr std::uint32_t kZip64EndSig = 0x06064b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint64_t kLocalHeaderSize = 30;
constexpr std::uint64_t kCentralHeaderSize = 46;
constexpr std::uint64_t kEndSize = 22;
constexpr std::uint64_t kZip64EndSize = 56;
constexpr std::uint64_t kZip64LocatorSize = 20;
constexpr std::uint16_t kZip64ExtraId = 0x0001;

[[noreturn]] void fail(const std::string& what) {
  throw ZipFormatError(what);
}

std::uint16_t u16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) |
         (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) |
         (static_cast<std::uint32_t>(p[3]) << 24);
}
std::uint64_t u64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(u32(p)) |
         (static_cast<std::uint64_t>(u32(p + 4)) << 32);
}

// Bounds-checked reads from a source.
class Reader {
 public:
  explicit Reader(const ZipSource& source) : source_(source) {}
  std::uint64_t size() const {
    return source_.size;
  }
  // The bytes [offset, offset + length), or a ZipFormatError naming `what`:
  // a pointer into the archive when it is in memory, else into `scratch`.
  const std::uint8_t* read(
      std::uint64_t offset,
      std::uint64_t length,
      const char* what,
      std::vector<std::uint8_t>& scratch) const {
    std::uint64_t end = 0;
    if (__builtin_add_overflow(offset, length, &end) || end > source_.size) {
      fail(
          std::string(what) + " at byte " + std::to_string(offset) +
          " runs past the end of the file (" + std::to_string(source_.size) +
          " bytes)");
    }
    if (source_.memory != nullptr) {
      return source_.memory + offset;
    }
    scratch.resize(static_cast<std::size_t>(length));
    if (length > 0) {
      source_.read(scratch.data(), scratch.size(), offset);
    }
    return scratch.data();
  }

 private:
  const ZipSource& source_;
};

// Offset of the end-of-central-directory record: at the very end when there
// is no comment, otherwise the last signature in the final 64 KiB + 22 bytes
// whose comment length reaches exactly the end (Python's _EndRecData).
std::int64_t find_end_record(const Reader& reader) {
  if (reader.size() < kEndSize) {
    return -1;
  }
  const std::uint64_t window =
      std::min<std::uint64_t>(reader.size(), kEndSize + 0xFFFF);
  const std::uint64_t base = reader.size() - window;
  std::vector<std::uint8_t> scratch;
  const std::uint8_t* tail =
      reader.read(base, window, "the end of the archive", scratch);
  for (std::uint64_t pos = window - kEndSize + 1; pos-- > 0;) {
    const std::uint8_t* p = tail + pos;
    if (u32(p) == kEndSig && pos + kEndSize + u16(p + 20) == window) {
      return static_cast<std::int64_t>(base + pos);
    }
  }
  return -1;
}

struct Zip64Fields {
  std::uint64_t* uncompressed;
  std::uint64_t* compressed;
  std::uint64_t* offset;
};

// Replaces the 0xFFFFFFFF placeholders with the ZIP64 extra's values, in the
// order the spec fixes (4.5.3): only those fields that overflowed are there.
void apply_zip64_extra(
    const std::uint8_t* extra,
    std::uint64_t length,
    std::uint32_t raw_usize,
    std::uint32_t raw_csize,
    std::uint32_t raw_offset,
    Zip64Fields out,
    const std::string& name) {
  std::uint64_t pos = 0;
  while (pos + 4 <= length) {
    const std::uint16_t id = u16(extra + pos);
    const std::uint16_t size = u16(extra + pos + 2);
    if (pos + 4 + size > length) {
      fail("the extra field of entry '" + name + "' is truncated");
    }
    if (id == kZip64ExtraId) {
      const std::uint8_t* p = extra + pos + 4;
      std::uint64_t left = size;
      const auto take = [&](std::uint64_t* field) {
        if (left < 8) {
          fail("the ZIP64 extra field of entry '" + name + "' is too short");
        }
        *field = u64(p);
        p += 8;
        left -= 8;
      };
      if (raw_usize == 0xFFFFFFFF) {
        take(out.uncompressed);
      }
      if (raw_csize == 0xFFFFFFFF) {
        take(out.compressed);
      }
      if (raw_offset == 0xFFFFFFFF && out.offset != nullptr) {
        take(out.offset);
      }
      return;
    }
    pos += 4 + static_cast<std::uint64_t>(size);
  }
}

} // namespace

ZipFormatError::~ZipFormatError() = default;

std::vector<ZipEntry> read_zip_directory(
    const std::uint8_t* data, std::uint64_t size) {
  return read_zip_directory(ZipSource{size, {}, data});
}

std::vector<ZipEntry> read_zip_directory(const ZipSource& source) {
  const Reader reader(source);
  const std::int64_t end_pos = find_end_record(reader);
  if (end_pos < 0) {
    fail("File is not a zip file (no end of central directory record)");
  }
  std::vector<std::uint8_t> end_buffer;
  const std::uint8_t* end = reader.read(
      static_cast<std::uint64_t>(end_pos),
      kEndSize,
      "the end record",
      end_buffer);
  if (u16(end + 4) != 0 || u16(end + 6) != 0) {
    fail("multi-disk archives are not supported");
  }
  std::uint64_t count = u16(end + 10);
  std::uint64_t cd_size = u32(end + 12);
  std::uint64_t cd_offset = u32(end + 16);
  // Where the directory really ends: before the ZIP64 records when present.
  std::uint64_t directory_end = static_cast<std::uint64_t>(end_pos);

  if (static_cast<std::uint64_t>(end_pos) >= kZip64LocatorSize) {
    std::vector<std::uint8_t> locator_buffer;
    const std::uint8_t* locator = reader.read(
        static_cast<std::uint64_t>(end_pos) - kZip64LocatorSize,
        kZip64LocatorSize,
        "the ZIP64 locator",
        locator_buffer);
    if (u32(locator) == kZip64LocatorSig) {
      if (static_cast<std::uint64_t>(end_pos) <
          kZip64LocatorSize + kZip64EndSize) {
        fail("the ZIP64 end record is missing");
      }
      const std::uint64_t record_pos = static_cast<std::uint64_t>(end_pos) -
                                       kZip64LocatorSize - kZip64EndSize;
      std::vector<std::uint8_t> record_buffer;
      const std::uint8_t* record = reader.read(
          record_pos, kZip64EndSize, "the ZIP64 end record", record_buffer);
      if (u32(record) != kZip64EndSig) {
        fail("the ZIP64 end record has a bad signature");
      }
      if (u32(record + 16) != 0 || u32(record + 20) != 0) {
        fail("multi-disk archives are not supported");
      }
      count = u64(record + 32);
      cd_size = u64(record + 40);
      cd_offset = u64(record + 48);
      directory_end = record_pos;
    }
  }
  // Bytes prepended to the archive shift every offset it records.
  std::uint64_t claimed_end = 0;
  if (__builtin_add_overflow(cd_offset, cd_size, &claimed_end) ||
      claimed_end > directory_end) {
    fail("the central directory offsets are inconsistent with the file size");
  }
  const std::uint64_t concat = directory_end - claimed_end;
  std::vector<std::uint8_t> directory;
  const std::uint8_t* cd = reader.read(
      cd_offset + concat, cd_size, "the central directory", directory);
  if (count > cd_size / kCentralHeaderSize) {
    fail(
        "the archive claims " + std::to_string(count) +
        " entries, more than its central directory of " +
        std::to_string(cd_size) + " bytes can hold");
  }

  std::vector<ZipEntry> entries;
  entries.reserve(static_cast<std::size_t>(count));
  std::vector<std::uint8_t> local_buffer;
  std::uint64_t pos = 0;
  for (std::uint64_t i = 0; i < count; ++i) {
    if (cd_size - pos < kCentralHeaderSize) {
      fail("central directory entry " + std::to_string(i) + " is truncated");
    }
    const std::uint8_t* h = cd + pos;
    if (u32(h) != kCentralHeaderSig) {
      fail(
          "central directory entry " + std::to_string(i) +
          " has a bad signature");
    }
    const std::uint64_t name_len = u16(h + 28);
    const std::uint64_t extra_len = u16(h + 30);
    const std::uint64_t comment_len = u16(h + 32);
    const std::uint64_t record =
        kCentralHeaderSize + name_len + extra_len + comment_len;
    if (cd_size - pos < record) {
      fail("central directory entry " + std::to_string(i) + " is truncated");
    }
    ZipEntry e;
    e.name.assign(
        reinterpret_cast<const char*>(h + kCentralHeaderSize), name_len);
    e.flags = u16(h + 8);
    e.method = u16(h + 10);
    e.crc32 = u32(h + 16);
    const std::uint32_t raw_csize = u32(h + 20);
    const std::uint32_t raw_usize = u32(h + 24);
    const std::uint32_t raw_offset = u32(h + 42);
    e.compressed_size = raw_csize;
    e.uncompressed_size = raw_usize;
    std::uint64_t local = raw_offset;
    apply_zip64_extra(
        h + kCentralHeaderSize + name_len,
        extra_len,
        raw_usize,
        raw_csize,
        raw_offset,
        {&e.uncompressed_size, &e.compressed_size, &local},
        e.name);
    if ((e.flags & 0x1) != 0) {
      fail("entry '" + e.name + "' is encrypted");
    }
    // A stored entry's bytes are its content: readers use either size, so
    // they must agree (found by fuzzing: a larger uncompressed size made
    // torch_load read past the end of the mapping).
    if (e.method == 0 && e.compressed_size != e.uncompressed_size) {
      fail(
          "entry '" + e.name + "' is stored, but its sizes disagree (" +
          std::to_string(e.compressed_size) + " bytes stored, " +
          std::to_string(e.uncompressed_size) + " bytes uncompressed)");
    }
    if (__builtin_add_overflow(local, concat, &e.local_header_offset)) {
      fail("entry '" + e.name + "' has an impossible offset");
    }
    const std::uint8_t* lh = reader.read(
        e.local_header_offset,
        kLocalHeaderSize,
        "the local header",
        local_buffer);
    if (u32(lh) != kLocalHeaderSig) {
      fail("the local header of entry '" + e.name + "' has a bad signature");
    }
    e.data_offset =
        e.local_header_offset + kLocalHeaderSize + u16(lh + 26) + u16(lh + 28);
    std::uint64_t data_end = 0;
    if (__builtin_add_overflow(e.data_offset, e.compressed_size, &data_end) ||
        data_end > reader.size()) {
      fail("the data of entry '" + e.name + "' runs past the end of the file");
    }
    entries.push_back(std::move(e));
    pos += record;
  }
  return entries;
}

std::uint32_t crc32(std::uint32_t crc, const void* data, std::size_t size) {
  // ISA-L's gzip CRC is the ZIP CRC-32, continued the way zlib's crc32 is.
  return ::crc32_gzip_refl(crc, static_cast<const unsigned char*>(data), size);
}

ZipWriter::ZipWriter(Output output, Options options)
    : output_(std::move(output)), options_(options) {}

void ZipWriter::emit(const void* data, std::size_t size) {
  output_.write(data, size);
  offset_ += size;
}

namespace {

void put16(std::string& out, std::uint16_t v) {
  out += static_cast<char>(v & 0xFF);
  out += static_cast<char>(v >> 8);
}
void put32(std::string& out, std::uint32_t v) {
  put16(out, static_cast<std::uint16_t>(v & 0xFFFF));
  put16(out, static_cast<std::uint16_t>(v >> 16));
}
void put64(std::string& out, std::uint64_t v) {
  put32(out, static_cast<std::uint32_t>(v & 0xFFFFFFFF));
  put32(out, static_cast<std::uint32_t>(v >> 32));
}

constexpr std::uint32_t k32 = 0xFFFFFFFF;
// MS-DOS date 1980-01-01 00:00: deterministic, and what torch.save writes.
constexpr std::uint16_t kDosDate = (0 << 9) | (1 << 5) | 1;
constexpr std::uint16_t kDosTime = 0;
constexpr std::uint16_t kUtf8Flag = 0x0800;

} // namespace

void ZipWriter::add(
    const std::string& name,
    std::uint64_t size,
    const std::function<
        void(const std::function<void(const void*, std::size_t)>&)>& produce) {
  add_entry(name, size, produce);
}

void ZipWriter::add_streaming(
    const std::string& name,
    const std::function<
        void(const std::function<void(const void*, std::size_t)>&)>& produce) {
  if (!options_.python_zip64_layout) {
    fail(
        "ZipWriter::add_streaming needs the ZIP64 layout, whose sizes can be "
        "patched");
  }
  add_entry(name, std::nullopt, produce);
}

void ZipWriter::add_reserved(
    const std::string& name, std::uint64_t size, std::uint32_t crc) {
  if (!output_.skip) {
    fail("ZipWriter::add_reserved needs an output that can skip bytes");
  }
  add_entry(name, size, {}, crc);
}

void ZipWriter::add(const std::string& name, std::string_view content) {
  add_entry(
      name,
      content.size(),
      [&](const std::function<void(const void*, std::size_t)>& sink) {
        if (!content.empty()) {
          sink(content.data(), content.size());
        }
      });
}

namespace {

bool is_ascii(const std::string& text) {
  return std::all_of(text.begin(), text.end(), [](char c) {
    return static_cast<unsigned char>(c) < 0x80;
  });
}

} // namespace

void ZipWriter::add_entry(
    const std::string& name,
    std::optional<std::uint64_t> size,
    const std::function<
        void(const std::function<void(const void*, std::size_t)>&)>& produce,
    std::optional<std::uint32_t> reserved_crc) {
  if (finished_) {
    fail("ZipWriter::add after finish");
  }
  if (name.size() > 0xFFFF) {
    fail("entry name too long: " + name.substr(0, 64) + "...");
  }
  const bool python = options_.python_zip64_layout;
  const bool zip64 = python || (size.has_value() && *size >= k32);
  const std::uint16_t flags = (!python || !is_ascii(name)) ? kUtf8Flag : 0;
  std::string header;
  put32(header, kLocalHeaderSig);
  put16(header, zip64 ? 45 : 20); // version needed
  put16(header, flags);
  put16(header, 0); // stored
  put16(header, kDosTime);
  put16(header, kDosDate);
  const std::uint64_t crc_offset = offset_ + header.size();
  put32(header, reserved_crc.value_or(0)); // else patched below
  put32(header, zip64 ? k32 : static_cast<std::uint32_t>(*size));
  put32(header, zip64 ? k32 : static_cast<std::uint32_t>(*size));
  put16(header, static_cast<std::uint16_t>(name.size()));
  std::string extra;
  std::uint64_t sizes_offset = 0; // of the ZIP64 extra's two sizes
  if (zip64) {
    put16(extra, kZip64ExtraId);
    put16(extra, 16);
    sizes_offset = offset_ + kLocalHeaderSize + name.size() + extra.size();
    put64(extra, size.value_or(0)); // uncompressed
    put64(extra, size.value_or(0)); // compressed
  }
  // Pad the extra field so that the data starts on an alignment boundary.
  const std::uint64_t unpadded =
      offset_ + kLocalHeaderSize + name.size() + extra.size();
  if (options_.alignment > 1) {
    std::uint64_t pad = (options_.alignment - unpadded % options_.alignment) %
                        options_.alignment;
    if (pad > 0 && pad < 4) {
      pad +=
          options_.alignment; // room for the padding field's own 4-byte header
    }
    if (pad > 0) {
      put16(extra, options_.padding_id);
      put16(extra, static_cast<std::uint16_t>(pad - 4));
      extra.append(pad - 4, '\0');
    }
  }
  put16(header, static_cast<std::uint16_t>(extra.size()));
  header += name;
  header += extra;

  ZipEntry entry;
  entry.name = name;
  entry.flags = flags;
  entry.local_header_offset = offset_;
  emit(header.data(), header.size());
  entry.data_offset = offset_;

  std::uint32_t crc = 0;
  std::uint64_t written = 0;
  if (reserved_crc.has_value()) {
    crc = *reserved_crc;
    written = *size;
    output_.skip(written);
    offset_ += written;
  } else {
    produce([&](const void* data, std::size_t n) {
      if (size.has_value() && n > *size - written) {
        fail(
            "entry '" + name + "' produced more than its declared " +
            std::to_string(*size) + " bytes");
      }
      crc = crc32(crc, data, n);
      emit(data, n);
      written += n;
    });
  }
  if (size.has_value() && written != *size) {
    fail(
        "entry '" + name + "' produced " + std::to_string(written) +
        " bytes, not the declared " + std::to_string(*size));
  }
  if (!reserved_crc.has_value()) {
    std::string crc_bytes;
    put32(crc_bytes, crc);
    output_.patch(crc_bytes.data(), crc_bytes.size(), crc_offset);
  }
  if (!size.has_value()) {
    std::string sizes;
    put64(sizes, written);
    put64(sizes, written);
    output_.patch(sizes.data(), sizes.size(), sizes_offset);
  }
  entry.crc32 = crc;
  entry.compressed_size = entry.uncompressed_size = written;
  entries_.push_back(std::move(entry));
}

void ZipWriter::finish() {
  if (finished_) {
    return;
  }
  finished_ = true;
  const bool python = options_.python_zip64_layout;
  // CPython writes ZIP64 fields past ZIP64_LIMIT (2^31 - 1); torch.save past
  // what 32 bits hold.
  const std::uint64_t limit = python ? 0x7FFFFFFF : k32 - 1;
  const std::uint64_t cd_offset = offset_;
  for (const ZipEntry& e : entries_) {
    const bool big_size = e.uncompressed_size > limit;
    const bool big_offset = e.local_header_offset > limit;
    std::string h;
    put32(h, kCentralHeaderSig);
    put16(
        h,
        python ? 0x032D
               : ((big_size || big_offset) ? 45 : 20));     // version made by
    put16(h, (python || big_size || big_offset) ? 45 : 20); // version needed
    put16(h, e.flags);
    put16(h, 0);
    put16(h, kDosTime);
    put16(h, kDosDate);
    put32(h, e.crc32);
    std::string extra;
    if (big_size || big_offset) {
      put16(extra, kZip64ExtraId);
      put16(
          extra,
          static_cast<std::uint16_t>(
              (big_size ? 16 : 0) + (big_offset ? 8 : 0)));
      if (big_size) {
        put64(extra, e.uncompressed_size);
        put64(extra, e.compressed_size);
      }
      if (big_offset) {
        put64(extra, e.local_header_offset);
      }
    }
    put32(h, big_size ? k32 : static_cast<std::uint32_t>(e.compressed_size));
    put32(h, big_size ? k32 : static_cast<std::uint32_t>(e.uncompressed_size));
    put16(h, static_cast<std::uint16_t>(e.name.size()));
    put16(h, static_cast<std::uint16_t>(extra.size()));
    put16(h, 0);                       // comment
    put16(h, 0);                       // disk
    put16(h, 0);                       // internal attributes
    put32(h, python ? 0x01800000 : 0); // external attributes: 0o600 << 16
    put32(
        h,
        big_offset ? k32 : static_cast<std::uint32_t>(e.local_header_offset));
    h += e.name;
    h += extra;
    emit(h.data(), h.size());
  }
  const std::uint64_t cd_size = offset_ - cd_offset;
  const bool zip64_end =
      entries_.size() >= 0xFFFF || cd_offset > limit || cd_size > limit;
  std::string tail;
  if (zip64_end) {
    const std::uint64_t record_offset = offset_;
    put32(tail, kZip64EndSig);
    put64(tail, kZip64EndSize - 12);
    put16(tail, 45);
    put16(tail, 45);
    put32(tail, 0);
    put32(tail, 0);
    put64(tail, entries_.size());
    put64(tail, entries_.size());
    put64(tail, cd_size);
    put64(tail, cd_offset);
    put32(tail, kZip64LocatorSig);
    put32(tail, 0);
    put64(tail, record_offset);
    put32(tail, 1);
  }
  put32(tail, kEndSig);
  put16(tail, 0);
  put16(tail, 0);
  const auto count16 = static_cast<std::uint16_t>(
      std::min<std::size_t>(entries_.size(), 0xFFFF));
  put16(tail, count16);
  put16(tail, count16);
  put32(
      tail, static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_size, k32)));
  put32(
      tail,
      static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_offset, k32)));
  put16(tail, 0);
  emit(tail.data(), tail.size());
}

} // namespace torchser::detail
