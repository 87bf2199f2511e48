#pragma once

/// \file
/// Symbol visibility for the torchser shared library.
///
/// torchser is built with hidden visibility by default; every public function
/// and class carries TORCHSER_API so that exactly the documented surface is
/// exported (and exception type_info is shared with the caller, so that
/// `catch (const torchser::ValueError&)` works across the library boundary).
///
/// \def TORCHSER_API
/// Exports a declaration from the torchser shared library.

#include <torchser/version.h>

#if defined(_WIN32)
#if defined(torchser_EXPORTS)
#define TORCHSER_API __declspec(dllexport)
#else
#define TORCHSER_API __declspec(dllimport)
#endif
#else
#define TORCHSER_API __attribute__((visibility("default")))
#endif
