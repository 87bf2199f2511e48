#pragma once

// Per-tensor CRC-32C checksums (SaveOptions::checksums): written in a
// safetensors file's metadata under kChecksumMetadataKey, checked by the
// loaders and `torchser verify`. CRC-32C rather than a cryptographic hash:
// it finds flipped bits at the speed of ISA-L's crc32 instruction kernel,
// and the Hub's blob digests already cover tampering.

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/export.h>

namespace torchser::detail {

class TensorFile;

/// The standard CRC-32C of `size` bytes, continuing `crc` (0 to start).
TORCHSER_API std::uint32_t crc32c(
    const void* data, std::size_t size, std::uint32_t crc = 0);

/// The CRC-32C of A followed by B from crc(A), crc(B) and B's size: what
/// ranks that each wrote part of a tensor's bytes combine.
TORCHSER_API std::uint32_t crc32c_combine(
    std::uint32_t first, std::uint32_t second, std::uint64_t second_size);

/// The same for ZIP's CRC-32 (detail::crc32): the records of a torch.save
/// archive that several ranks wrote.
TORCHSER_API std::uint32_t crc32_combine(
    std::uint32_t first, std::uint32_t second, std::uint64_t second_size);

/// CRC-32C of a tensor's bytes as a file stores them (contiguous, on CPU).
TORCHSER_API std::uint32_t crc32c_of(const at::Tensor& tensor);

/// The metadata value: {"name": "1a2b3c4d", …} in the order given.
TORCHSER_API std::string checksum_metadata(
    const std::vector<std::pair<std::string, std::uint32_t>>& checksums);

/// The checksums `file` records (empty when it records none). ValueError
/// naming the file and the tensor for a value that is not 8 hex digits, a
/// name the file does not hold, or text that is not a JSON object.
TORCHSER_API std::map<std::string, std::uint32_t> recorded_checksums(
    const TensorFile& file);

/// Checks the recorded checksum of each tensor of `file` in `names` (all
/// when empty), on up to four threads. OSError naming the file, the tensor
/// and both values at the first mismatch. `batches`: reads batches of up to
/// 256 MiB of stored bytes through TensorFile::prefetch (kDirect: many
/// reads in flight) and releases each once checked; false when the caller
/// has prefetched `names` itself and keeps them (nothing read twice).
TORCHSER_API void check_checksums(
    const TensorFile& file,
    const std::set<std::string>& names = {},
    bool batches = true);

} // namespace torchser::detail
