#pragma once

// One reader face over the files a checkpoint is made of: safetensors files,
// torch.save ZIP archives (`.bin`) and safetensors entries of DDUF archives.
// The loaders, `torchser inspect`, `verify` and `convert` read through it,
// and open_tensor_file() is the one place where the format is chosen: by
// content, since extensions lie (a `.bin` that is safetensors, a
// `.safetensors` that torch.save wrote), with a note that says so.
// Never installed; exported only so that the tests can reach it.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>

#include <torchser/export.h>
#include <torchser/load_backend.h>
#include <torchser/state_dict.h>

namespace torchser::detail {

class DirectFile;
struct TensorSpec;

enum class TensorFormat { kSafetensors, kPickle };

/// "safetensors" or "pickle".
TORCHSER_API const char* format_name(TensorFormat format);

/// A tensor as its file describes it, before any data is read.
struct TORCHSER_API TensorEntry {
  std::string name;
  /// The file's name for the dtype: "F32" (safetensors) or "Float" (pickle).
  std::string dtype;
  std::vector<std::int64_t> shape;
  /// The bytes of the tensor's elements.
  std::uint64_t nbytes = 0;
  /// The stored bytes this tensor views and an identity shared by the
  /// tensors viewing the same storage (pickle); for safetensors every tensor
  /// is its own storage (`storage` empty, `storage_bytes` == nbytes).
  std::string storage;
  std::uint64_t storage_bytes = 0;
};

struct TORCHSER_API TensorFileOptions {
  LoadBackend backend = LoadBackend::kMmap;
  /// Where tensors go (unset: CPU).
  std::optional<c10::Device> device;
  /// torch.save files holding several dicts (`{"generator": …,
  /// "discriminator": …}`): the key whose dict of tensors to take, instead
  /// of extract_state_dict's choice.
  std::optional<std::string> key;
};

class TORCHSER_API TensorFile {
 public:
  virtual ~TensorFile();
  TensorFormat format() const {
    return format_;
  }
  /// What the file is called in messages ("dir/model.safetensors",
  /// "pipe.dduf:unet/model.safetensors").
  const std::string& display_name() const {
    return display_;
  }
  /// Set when the content contradicts the extension (what was read instead).
  const std::string& note() const {
    return note_;
  }
  /// torch.save files whose tensors sit inside a larger object: which dict
  /// was taken and what was left out ("state dict taken from key 'model';
  /// ignored: optimizer, epoch"); empty otherwise.
  const std::string& selection() const {
    return selection_;
  }
  /// Whether what was left out holds tensors too (a GAN's two models, a
  /// tensor beside the dict): then taking one dict silently loses data.
  bool ambiguous() const {
    return ambiguous_;
  }
  /// Tensors in file order.
  const std::vector<TensorEntry>& entries() const {
    return entries_;
  }
  /// safetensors `__metadata__` (nullopt when there is none; torch.save
  /// files never have one).
  const std::optional<std::vector<std::pair<std::string, std::string>>>&
  metadata() const {
    return metadata_;
  }
  /// The tensor `name` (KeyError naming the file when absent).
  virtual at::Tensor get(const std::string& name) const = 0;
  /// Where `name`'s elements start in the file when they lie there
  /// contiguously in row-major order (every safetensors tensor; a torch.save
  /// tensor that is a contiguous view of its record), for readers that
  /// fetch byte ranges themselves; nullopt otherwise. KeyError naming the
  /// file when absent.
  virtual std::optional<std::uint64_t> file_offset(
      const std::string& name) const = 0;
  /// Drops this process's mapped pages of `name` once copied, so that a
  /// loop over a file keeps resident memory near one tensor; a hint.
  virtual void release(const std::string& name) const = 0;
  /// Reads `names` now, with many reads in flight, for the get() calls that
  /// follow (kDirect); a no-op for the backends whose get() reads on
  /// demand. release() drops what was read.
  virtual void prefetch(const std::vector<std::string>& names) const;
  /// Called with each tensor's values: `value` is the target itself when
  /// the bytes were read into it, else the file's tensor (to be copied).
  using IntoVisitor =
      std::function<void(const std::string& name, const at::Tensor& value)>;
  /// Each of `names`, in an order of the reader's choosing: kDirect reads
  /// the file's bytes straight into `targets[i]` (defined, contiguous, of
  /// the file's dtype and shape, on CPU or CUDA) through its staging ring;
  /// every other tensor is get() and then released after `visit` returns.
  void read_into(
      const std::vector<std::string>& names,
      const std::vector<at::Tensor>& targets,
      const IntoVisitor& visit) const;
  /// The reference's check before loading a safetensors file: metadata, when
  /// there is any, says format "pt" or "mlx"; OSError naming the file
  /// otherwise.
  void check_format_metadata() const;

 protected:
  /// kDirect's reader of this file (nullptr for the other backends).
  virtual const DirectFile* direct_reader() const {
    return nullptr;
  }
  /// Where `name`'s row-major bytes lie, for direct_reader() (nullopt: not
  /// as LibTorch holds them, or not contiguous in the file).
  virtual std::optional<TensorSpec> direct_spec(const std::string& name) const;

  TensorFormat format_ = TensorFormat::kSafetensors;
  std::string display_;
  std::string note_;
  std::string selection_;
  bool ambiguous_ = false;
  std::vector<TensorEntry> entries_;
  std::optional<std::vector<std::pair<std::string, std::string>>> metadata_;
};

/// The format of the file at `path` by its first bytes (a ZIP local header
/// is torch.save; an 8-byte length and '{' is safetensors), by extension
/// when the content says neither. `note` receives what contradicts the
/// extension.
TORCHSER_API TensorFormat
sniff_format(const std::filesystem::path& path, std::string* note = nullptr);

/// Opens and validates a tensor file (the header for safetensors; the pickle
/// and the ZIP directory for torch.save, tensors on mapped records).
TORCHSER_API std::unique_ptr<TensorFile> open_tensor_file(
    const std::filesystem::path& path, const TensorFileOptions& options = {});

/// A safetensors file stored at bytes [offset, offset + length) of `path`
/// (a DDUF archive's entry), called `display` in messages.
TORCHSER_API std::unique_ptr<TensorFile> open_tensor_file(
    const std::filesystem::path& path,
    std::uint64_t offset,
    std::uint64_t length,
    const std::string& display,
    const TensorFileOptions& options = {});

/// open_tensor_file() plus what loaders take on trust: for torch.save
/// files, every record's CRC-32 against the ZIP directory (the loaders map
/// records without reading them, so a flipped byte would load silently);
/// for safetensors files, the per-tensor CRC-32Cs they record, if any.
/// Costs one read of the file (ISA-L's CRC-32 runs far above the disk).
TORCHSER_API std::unique_ptr<TensorFile> verify_tensor_file(
    const std::filesystem::path& path);

/// Every tensor of `file`, in file order.
TORCHSER_API StateDict read_all(const TensorFile& file);

} // namespace torchser::detail
