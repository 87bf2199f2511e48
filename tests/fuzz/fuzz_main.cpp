// One libFuzzer binary per target: TORCHSER_FUZZ_TARGET names the function
// of fuzz_targets.h this binary drives.

#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(
    const std::uint8_t* data, std::size_t size) {
  torchser::fuzz::TORCHSER_FUZZ_TARGET(data, size);
  return 0;
}
