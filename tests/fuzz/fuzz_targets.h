#pragma once

// The fuzz targets: one function per reader that takes arbitrary bytes. Each
// feeds the bytes to a torchser reader and touches whatever comes back;
// torchser's typed errors (torchser::Error) are the expected outcome for bad
// input and are swallowed. Anything else escaping (another exception type),
// a sanitizer report or a crash is a bug.
//
// They are built twice: into libFuzzer binaries (tests/fuzz/CMakeLists.txt,
// clang only), and into the test suite, which replays every saved crash
// input (tests/fuzz/regressions/<target>/) and the seed corpora under the
// normal and the sanitizer builds.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torchser::fuzz {

using Target = void (*)(const std::uint8_t* data, std::size_t size);

/// The safetensors header parser and validator on its own (rules 1–10).
void safetensors_header(const std::uint8_t* data, std::size_t size);
/// The whole safetensors reader: from a buffer (`load`), and from a file with
/// both backends (mmap and pread), every tensor and a slice of each.
void safetensors_file(const std::uint8_t* data, std::size_t size);
/// The index JSON reader with its shard-name checks.
void index_json(const std::uint8_t* data, std::size_t size);
/// The DDUF reader (central directory, local headers, structure rules), then
/// every entry read as text and as a mapping, safetensors entries opened.
void dduf(const std::uint8_t* data, std::size_t size);
/// torch_load on a whole file (the ZIP container, the record table and the
/// pickle), mapped and copied, and extract_state_dict on the result.
void torch_load_file(const std::uint8_t* data, std::size_t size);
/// The pickle machine alone: the bytes are data.pkl inside a valid archive
/// with a few records, so that mutations reach the VM instead of the ZIP
/// checks.
void pickle_vm(const std::uint8_t* data, std::size_t size);

struct NamedTarget {
  const char* name;
  Target run;
};
/// Every target, by the name its corpus and regression folders carry.
const std::vector<NamedTarget>& all_targets();

} // namespace torchser::fuzz
