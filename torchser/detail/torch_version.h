#pragma once

// Compile-time LibTorch version checks, for dtypes and APIs that newer
// LibTorch releases added. Never installed.

#include <torch/version.h>

/// True when the LibTorch being compiled against is at least major.minor.
#define TORCHSER_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||           \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))
