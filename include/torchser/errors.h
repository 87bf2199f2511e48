#pragma once

/// \file
/// The exceptions torchser throws.
///
/// The names mirror the Python exception classes that huggingface_hub raises
/// (`ValueError`, `OSError`, `huggingface_hub.errors.DDUFError`, ...), so that
/// code ported from Python catches the same thing. Everything derives from
/// `torchser::Error`, which derives from `std::runtime_error`; messages keep
/// the reference's text byte for byte where it has one, and name the file,
/// entry or key where it does not. Errors raised by LibTorch itself
/// (`c10::Error`) are never caught and rewrapped.

#include <stdexcept>
#include <string>

#include <torchser/export.h>

namespace torchser {

/// Root of every exception torchser throws itself.
class TORCHSER_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  // Out-of-line destructors anchor each vtable and type_info in the library.
  ~Error() override;
};

/// Python `ValueError`: an argument or a file's content has the wrong value.
class TORCHSER_API ValueError : public Error {
 public:
  using Error::Error;
  ~ValueError() override;
};

/// Python `KeyError`: a lookup in a fixed table failed (for example a dtype
/// that the format has no name for).
class TORCHSER_API KeyError : public Error {
 public:
  using Error::Error;
  ~KeyError() override;
};

/// Python `RuntimeError`: an operation cannot be carried out as asked
/// (for example strict loading with missing keys).
class TORCHSER_API RuntimeError : public Error {
 public:
  using Error::Error;
  ~RuntimeError() override;
};

/// Python `OSError`: a file could not be read or written, or is not what
/// its name says.
class TORCHSER_API OSError : public Error {
 public:
  using Error::Error;
  ~OSError() override;
};

/// Python `torch.distributed.DistError` (a RuntimeError, as in Python): a
/// distributed operation failed as a whole. The message names the step and,
/// where one rank's failure caused it, that rank and its reason; every rank
/// of the group throws it.
class TORCHSER_API DistError : public RuntimeError {
 public:
  using RuntimeError::RuntimeError;
  ~DistError() override;
};

/// Python `torch.distributed.DistBackendError`: a collective failed or timed
/// out (a rank died, hung past the group's timeout, or left the group).
class TORCHSER_API DistBackendError : public DistError {
 public:
  using DistError::DistError;
  ~DistBackendError() override;
};

/// Python `FileNotFoundError` (a subclass of `OSError`, as in Python).
class TORCHSER_API FileNotFoundError : public OSError {
 public:
  using OSError::OSError;
  ~FileNotFoundError() override;
};

/// `huggingface_hub.errors.LocalEntryNotFoundError`: a repo, revision or file
/// is not in the local Hugging Face cache (torchser never downloads). A
/// FileNotFoundError, as in Python.
class TORCHSER_API LocalEntryNotFoundError : public FileNotFoundError {
 public:
  using FileNotFoundError::FileNotFoundError;
  ~LocalEntryNotFoundError() override;
};

/// `safetensors_rust.SafetensorError`: a safetensors file or buffer breaks a
/// rule of the format. kind() says which rule (the official reader's error
/// variants, plus torchser's own UnsupportedDtype); the message starts with
/// the official text and then names the file and the offending detail.
class TORCHSER_API SafetensorError : public Error {
 public:
  /// The format rule that was broken (the official reader's error variants).
  enum class Kind {
    kHeaderTooSmall,      ///< fewer than 8 bytes
    kHeaderTooLarge,      ///< header length over 100,000,000 bytes
    kInvalidHeaderLength, ///< header length points past the end of the file
    kInvalidHeader,       ///< header is not valid UTF-8
    kInvalidHeaderDeserialization, ///< header is not the expected JSON
    kTensorNotFound,               ///< no tensor of that name
    kTensorInvalidInfo,            ///< byte size disagrees with shape and dtype
    kInvalidOffset,                ///< gap, overlap, or end before begin
    kMetadataIncompleteBuffer,     ///< trailing or missing bytes
    kValidationOverflow,           ///< shape × element size overflows 64 bits
    kMisalignedSlice,  ///< sub-byte tensor that does not end on a byte
    kInvalidSlice,     ///< get_slice() index out of range or too many indices
    kUnsupportedDtype, ///< a valid dtype this LibTorch build cannot hold
  };
  /// An error of `kind` with the full `message`.
  SafetensorError(Kind kind, const std::string& message)
      : Error(message), kind_(kind) {}
  ~SafetensorError() override;
  /// Which rule was broken.
  Kind kind() const noexcept {
    return kind_;
  }

 private:
  Kind kind_;
};

/// Python `pickle.UnpicklingError`: a PyTorch checkpoint (`torch.save` file)
/// is damaged, hostile, or uses something torchser will not execute (a global
/// outside the allowlist, the legacy pre-1.6 format).
class TORCHSER_API UnpicklingError : public Error {
 public:
  using Error::Error;
  ~UnpicklingError() override;
};

/// `huggingface_hub.errors.DDUFError`: base of the DDUF errors.
class TORCHSER_API DDUFError : public Error {
 public:
  using Error::Error;
  ~DDUFError() override;
};

/// `huggingface_hub.errors.DDUFCorruptedFileError`: the archive is damaged or
/// breaks a DDUF rule.
class TORCHSER_API DDUFCorruptedFileError : public DDUFError {
 public:
  using DDUFError::DDUFError;
  ~DDUFCorruptedFileError() override;
};

/// `huggingface_hub.errors.DDUFExportError`: an export could not be completed.
class TORCHSER_API DDUFExportError : public DDUFError {
 public:
  using DDUFError::DDUFError;
  ~DDUFExportError() override;
};

/// `huggingface_hub.errors.DDUFInvalidEntryNameError`: an entry name breaks
/// the DDUF naming rules.
class TORCHSER_API DDUFInvalidEntryNameError : public DDUFExportError {
 public:
  using DDUFExportError::DDUFExportError;
  ~DDUFInvalidEntryNameError() override;
};

} // namespace torchser
