#include "fuzz_targets.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>

#include "torchser/detail/index_json.h"
#include "torchser/detail/safetensors_format.h"
#include "torchser/detail/zip.h"

namespace torchser::fuzz {
namespace {

// Reads every byte of the tensor's storage (a sanitizer or a fault catches
// memory that is not there), and checks the invariant every reader must
// keep: the view stays inside its storage. Touching the storage rather than
// a contiguous copy keeps a hostile stride-0 view of 10^12 elements cheap.
void touch(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage()) {
    return;
  }
  const auto* bytes =
      static_cast<const volatile std::uint8_t*>(t.storage().data());
  const std::size_t nbytes = t.storage().nbytes();
  std::uint8_t sum = 0;
  for (std::size_t i = 0; i < nbytes; ++i) {
    sum = static_cast<std::uint8_t>(sum + bytes[i]);
  }
  (void)sum;
  if (t.numel() == 0) {
    return;
  }
  std::int64_t last = t.storage_offset();
  for (std::int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) {
      std::abort();
    }
    last += (t.size(d) - 1) * t.stride(d);
  }
  if (static_cast<std::uint64_t>(last + 1) * t.element_size() > nbytes) {
    std::fprintf(stderr, "view past the end of its storage\n");
    std::abort();
  }
}

void touch(const PickleValue& v, int depth = 0) {
  if (depth > 64) {
    return;
  }
  switch (v.kind()) {
    case PickleValue::Kind::kTensor:
      touch(v.to_tensor());
      break;
    case PickleValue::Kind::kList:
    case PickleValue::Kind::kTuple:
      for (const auto& item : v.items()) {
        touch(item, depth + 1);
      }
      break;
    case PickleValue::Kind::kDict:
      for (const auto& [key, value] : v.dict_items()) {
        touch(key, depth + 1);
        touch(value, depth + 1);
      }
      break;
    default:
      break;
  }
}

// The bytes as a file, for the readers that take a path: one file per
// process and extension, in /dev/shm when there is one.
class ScratchFile {
 public:
  explicit ScratchFile(const std::string& extension) {
    const std::filesystem::path dir =
        std::filesystem::is_directory("/dev/shm")
            ? "/dev/shm"
            : std::filesystem::temp_directory_path();
    path_ = dir / ("torchser-fuzz-" + std::to_string(::getpid()) + extension);
  }
  ~ScratchFile() {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
  }
  const std::filesystem::path& write(const void* data, std::size_t size) {
    const int fd =
        ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
      std::perror("fuzz scratch file");
      std::abort();
    }
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t n = ::write(fd, p, size);
      if (n <= 0) {
        std::perror("fuzz scratch file");
        std::abort();
      }
      p += n;
      size -= static_cast<std::size_t>(n);
    }
    ::close(fd);
    return path_;
  }

 private:
  std::filesystem::path path_;
};

// Runs `body`; torchser's typed errors are the expected answer to bad input.
template <typename F>
void expect_typed_errors(F&& body) {
  try {
    body();
  } catch (const torchser::Error&) {
  }
}

void read_safetensors(const SafeOpen& file) {
  for (const auto& name : file.keys()) {
    touch(file.get_tensor(name));
    const auto slice = file.get_slice(name);
    if (!slice.get_shape().empty() && slice.get_shape()[0] > 0) {
      touch(slice({SliceIndex(std::nullopt, 1)}));
      touch(slice({SliceIndex(-1)}));
    }
  }
}

} // namespace

void safetensors_header(const std::uint8_t* data, std::size_t size) {
  expect_typed_errors([&] {
    const std::string_view bytes(reinterpret_cast<const char*>(data), size);
    const detail::SafetensorsSource source{"fuzz input", false};
    const std::uint64_t n =
        detail::read_header_length(bytes.substr(0, 8), size, source);
    const auto header = detail::parse_header(bytes.substr(8, n), size, source);
    // Every tensor lies inside the data the file holds.
    for (const auto& t : header.tensors) {
      if (t.begin > t.end || header.data_start + t.end > size) {
        std::abort();
      }
    }
  });
}

void safetensors_file(const std::uint8_t* data, std::size_t size) {
  static ScratchFile scratch(".safetensors");
  expect_typed_errors([&] {
    for (const auto& item :
         load(std::string_view(reinterpret_cast<const char*>(data), size))) {
      touch(item.value());
    }
  });
  const auto& path = scratch.write(data, size);
  for (const auto backend : {LoadBackend::kMmap, LoadBackend::kPread}) {
    expect_typed_errors([&] {
      read_safetensors(SafeOpen(path, SafeOpenOptions().backend(backend)));
    });
  }
}

void index_json(const std::uint8_t* data, std::size_t size) {
  expect_typed_errors([&] {
    const auto index = detail::parse_index(
        std::string_view(reinterpret_cast<const char*>(data), size),
        "fuzz.index.json",
        ".safetensors");
    for (const auto& [shard, keys] : index.shards) {
      // What the reader accepted stays inside the checkpoint directory.
      if (detail::escapes_directory(shard) ||
          shard.find('\0') != std::string::npos || keys.empty()) {
        std::abort();
      }
    }
  });
}

void dduf(const std::uint8_t* data, std::size_t size) {
  static ScratchFile scratch(".dduf");
  const auto& path = scratch.write(data, size);
  expect_typed_errors([&] {
    for (const auto& item : read_dduf_file(path)) {
      const DDUFEntry& entry = item.value();
      if (entry.offset + entry.length > size) {
        std::abort(); // an entry past the end of the archive was accepted
      }
      expect_typed_errors([&] { (void)entry.read_text(); });
      const MappedBytes bytes = entry.as_mmap();
      std::uint8_t sum = 0;
      for (std::size_t i = 0; i < bytes.size(); ++i) {
        sum = static_cast<std::uint8_t>(sum + bytes.data()[i]);
      }
      (void)sum;
      const std::string& name = entry.filename;
      if (name.size() > 12 &&
          name.compare(name.size() - 12, 12, ".safetensors") == 0) {
        expect_typed_errors([&] {
          read_safetensors(SafeOpen(path, entry.offset, entry.length));
        });
      }
    }
  });
}

void torch_load_file(const std::uint8_t* data, std::size_t size) {
  static ScratchFile scratch(".bin");
  const auto& path = scratch.write(data, size);
  for (const bool mmap : {true, false}) {
    expect_typed_errors([&] {
      const PickleValue value = torch_load(path, TorchLoadOptions().mmap(mmap));
      touch(value);
      expect_typed_errors([&] { (void)extract_state_dict(value); });
    });
  }
}

void pickle_vm(const std::uint8_t* data, std::size_t size) {
  static ScratchFile scratch(".bin");
  std::string archive;
  detail::ZipWriter zip(
      {[&](const void* p, std::size_t n) {
         archive.append(static_cast<const char*>(p), n);
       },
       [&](const void* p, std::size_t n, std::uint64_t at) {
         archive.replace(at, n, static_cast<const char*>(p), n);
       },
       {}},
      {});
  zip.add(
      "archive/data.pkl",
      std::string_view(reinterpret_cast<const char*>(data), size));
  zip.add("archive/byteorder", "little");
  zip.add("archive/data/0", std::string(64, '\x11'));
  zip.add("archive/data/1", std::string(16, '\x22'));
  zip.add("archive/version", "3\n");
  zip.finish();
  const auto& path = scratch.write(archive.data(), archive.size());
  expect_typed_errors([&] {
    const PickleValue value = torch_load(path, TorchLoadOptions().mmap(false));
    touch(value);
  });
}

const std::vector<NamedTarget>& all_targets() {
  static const std::vector<NamedTarget> targets = {
      {"safetensors_header", safetensors_header},
      {"safetensors_file", safetensors_file},
      {"index_json", index_json},
      {"dduf", dduf},
      {"torch_load_file", torch_load_file},
      {"pickle_vm", pickle_vm},
  };
  return targets;
}

} // namespace torchser::fuzz
