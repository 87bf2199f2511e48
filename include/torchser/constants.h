#pragma once

/// \file
/// Names and limits shared with huggingface_hub (`huggingface_hub.constants`
/// and `huggingface_hub.serialization._base`).

#include <cstdint>

namespace torchser {

/// `SAFETENSORS_WEIGHTS_FILE_PATTERN`: default pattern of safetensors files.
inline constexpr const char* kSafetensorsWeightsFilePattern =
    "model{suffix}.safetensors";
/// `PYTORCH_WEIGHTS_FILE_PATTERN`: default pattern of pickle (`.bin`) files.
inline constexpr const char* kPytorchWeightsFilePattern =
    "pytorch_model{suffix}.bin";
/// `SAFETENSORS_SINGLE_FILE`.
inline constexpr const char* kSafetensorsSingleFile = "model.safetensors";
/// `SAFETENSORS_INDEX_FILE`.
inline constexpr const char* kSafetensorsIndexFile =
    "model.safetensors.index.json";
/// `PYTORCH_WEIGHTS_NAME`.
inline constexpr const char* kPytorchWeightsName = "pytorch_model.bin";
/// Appended to a pattern formatted with an empty suffix to name the index.
inline constexpr const char* kIndexSuffix = ".index.json";
/// The safetensors `__metadata__` key of SaveOptions::checksums: a JSON
/// object of tensor name → CRC-32C (Castagnoli) of its bytes, 8 lowercase
/// hex digits. Other readers ignore it.
inline constexpr const char* kChecksumMetadataKey = "torchser.crc32c";
/// `MAX_SHARD_SIZE = "5GB"`, in bytes (sizes are decimal, as in Python).
inline constexpr std::int64_t kMaxShardSize = 5'000'000'000;

} // namespace torchser
