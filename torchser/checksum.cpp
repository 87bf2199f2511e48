#include "torchser/detail/checksum.h"

#include <isa-l/crc.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <exception>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <torchser/constants.h>
#include <torchser/errors.h>

#include "torchser/detail/parallel.h"
#include "torchser/detail/tensor_file.h"

namespace torchser::detail {
namespace {

std::string hex8(std::uint32_t crc) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", crc);
  return text;
}

} // namespace

std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc) {
  // ISA-L's crc32_iscsi keeps the register un-inverted and takes an int.
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t state = ~crc;
  while (size > 0) {
    const std::size_t n = std::min<std::size_t>(size, std::size_t{1} << 30);
    state =
        crc32_iscsi(const_cast<unsigned char*>(p), static_cast<int>(n), state);
    p += n;
    size -= n;
  }
  return ~state;
}

namespace {

// The polynomials, bit-reflected, as the registers hold them: CRC-32C's and
// ZIP's CRC-32 (ISO 3309).
constexpr std::uint32_t kCastagnoli = 0x82F63B78u;
constexpr std::uint32_t kIso3309 = 0xEDB88320u;

// a × b modulo `poly`, in the reflected representation (x^0 is the top bit).
std::uint32_t multiply_mod(
    std::uint32_t a, std::uint32_t b, std::uint32_t poly) {
  std::uint32_t product = 0;
  for (std::uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if ((a & bit) != 0) {
      product ^= b;
    }
    b = (b & 1) != 0 ? (b >> 1) ^ poly : b >> 1;
  }
  return product;
}

// x^(8 × bytes) modulo `poly`, by squaring.
std::uint32_t shift_of(std::uint64_t bytes, std::uint32_t poly) {
  std::uint32_t result = 1u << 31; // x^0
  std::uint32_t power = 1u << 23;  // x^8: one byte
  while (bytes != 0) {
    if ((bytes & 1) != 0) {
      result = multiply_mod(power, result, poly);
    }
    power = multiply_mod(power, power, poly);
    bytes >>= 1;
  }
  return result;
}

} // namespace

std::uint32_t crc32c_combine(
    std::uint32_t first, std::uint32_t second, std::uint64_t second_size) {
  // CRC is linear: the first part's register, moved past the second part's
  // bytes, plus the second part's CRC (the pre- and post-inversions of the
  // standard CRC cancel).
  return multiply_mod(shift_of(second_size, kCastagnoli), first, kCastagnoli) ^
         second;
}

std::uint32_t crc32_combine(
    std::uint32_t first, std::uint32_t second, std::uint64_t second_size) {
  return multiply_mod(shift_of(second_size, kIso3309), first, kIso3309) ^
         second;
}

std::uint32_t crc32c_of(const at::Tensor& tensor) {
  at::Tensor t = tensor;
  if (!t.device().is_cpu()) {
    t = t.to(at::kCPU);
  }
  t = t.contiguous();
  return t.numel() == 0
             ? 0
             : crc32c(t.data_ptr(), static_cast<std::size_t>(t.nbytes()));
}

std::string checksum_metadata(
    const std::vector<std::pair<std::string, std::uint32_t>>& checksums) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [name, crc] : checksums) {
    out[name] = hex8(crc);
  }
  return out.dump();
}

std::map<std::string, std::uint32_t> recorded_checksums(
    const TensorFile& file) {
  std::map<std::string, std::uint32_t> out;
  if (!file.metadata().has_value()) {
    return out;
  }
  const std::string* text = nullptr;
  for (const auto& [key, value] : *file.metadata()) {
    if (key == kChecksumMetadataKey) {
      text = &value;
    }
  }
  if (text == nullptr) {
    return out;
  }
  const std::string where =
      file.display_name() + "'s metadata '" + kChecksumMetadataKey + "'";
  nlohmann::json parsed;
  try {
    parsed = nlohmann::json::parse(*text);
  } catch (const nlohmann::json::exception&) {
    throw ValueError(where + " is not a JSON object of tensor checksums");
  }
  if (!parsed.is_object()) {
    throw ValueError(where + " is not a JSON object of tensor checksums");
  }
  std::set<std::string> names;
  for (const TensorEntry& entry : file.entries()) {
    names.insert(entry.name);
  }
  for (const auto& [name, value] : parsed.items()) {
    const bool hex =
        value.is_string() && value.get<std::string>().size() == 8 &&
        value.get<std::string>().find_first_not_of("0123456789abcdef") ==
            std::string::npos;
    if (!hex) {
      throw ValueError(
          where + ": the checksum of tensor '" + name + "' is " + value.dump() +
          ", not 8 lowercase hex digits");
    }
    if (names.count(name) == 0) {
      throw ValueError(
          where + " has a checksum for tensor '" + name +
          "', which the file does not hold");
    }
    out[name] = static_cast<std::uint32_t>(
        std::stoul(value.get<std::string>(), nullptr, 16));
  }
  return out;
}

void check_checksums(
    const TensorFile& file, const std::set<std::string>& names, bool batches) {
  const std::map<std::string, std::uint32_t> recorded =
      recorded_checksums(file);
  struct Work {
    std::string name;
    std::uint32_t expected;
    std::uint64_t nbytes;
    const std::string* storage; // empty: its own bytes
    std::uint64_t storage_bytes;
  };
  std::vector<Work> work;
  for (const TensorEntry& entry : file.entries()) {
    const auto it = recorded.find(entry.name);
    if (it != recorded.end() &&
        (names.empty() || names.count(entry.name) != 0)) {
      work.push_back(
          {entry.name,
           it->second,
           entry.nbytes,
           &entry.storage,
           entry.storage_bytes});
    }
  }
  // In batches of up to 256 MiB of what is read: a tensor's own bytes, or
  // once per batch the whole storage record its views share (a .bin).
  constexpr std::uint64_t kBatchBytes = std::uint64_t{256} << 20;
  for (std::size_t first = 0; first < work.size();) {
    std::size_t last = first;
    std::uint64_t bytes = 0;
    std::set<std::string> storages;
    std::vector<std::string> batch;
    while (last < work.size()) {
      const Work& w = work[last];
      const std::uint64_t cost = w.storage->empty() ? w.nbytes
                                 : storages.count(*w.storage) != 0
                                     ? 0
                                     : w.storage_bytes;
      if (batches && last > first && bytes + cost > kBatchBytes) {
        break;
      }
      if (!w.storage->empty()) {
        storages.insert(*w.storage);
      }
      bytes += cost;
      batch.push_back(w.name);
      ++last;
    }
    if (batches) {
      file.prefetch(batch);
    }
    std::exception_ptr failure;
    try {
      parallel_for(last - first, 4, [&](std::size_t i) {
        const Work& w = work[first + i];
        const std::uint32_t actual = crc32c_of(file.get(w.name));
        if (actual != w.expected) {
          throw OSError(
              "Checksum mismatch in " + file.display_name() + ": tensor '" +
              w.name + "' has CRC-32C " + hex8(actual) + ", the file records " +
              hex8(w.expected) + " (its bytes changed since it was saved)");
        }
      });
    } catch (...) {
      failure = std::current_exception();
    }
    for (std::size_t i = first; batches && i < last; ++i) {
      file.release(work[i].name);
    }
    if (failure) {
      std::rethrow_exception(failure);
    }
    first = last;
  }
}

} // namespace torchser::detail
