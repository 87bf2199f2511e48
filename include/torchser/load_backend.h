#pragma once

/// \file
/// How a reader gets a file's bytes: mapped or read. The choice matters when
/// a file may change while it is being loaded.
///
/// A mapping is private (copy-on-write) but not a snapshot: a page not yet
/// read shows whatever the file holds when it is first touched, and a file
/// truncated under the mapping makes the lost pages fault (SIGBUS), which no
/// library can turn into an exception. A file *replaced* by renaming a new one
/// over it (how torchser saves, and how huggingface_hub's deletes-then-writes
/// leave it) is harmless: the mapping keeps the old inode alive. Tools that
/// rewrite a file in place (Python's `torch.save` and `safetensors.save_file`
/// open the path with "wb") are not: load files that such a tool may rewrite
/// during the load with kPread, which reads everything up front, so a
/// truncation is an OSError naming the file.

namespace torchser {

/// How tensor bytes come from the file.
enum class LoadBackend {
  /// Memory-map the file; CPU tensors are zero-copy views of the mapping
  /// (private, copy-on-write), which lives while any of them does. Nothing
  /// is read until touched. The file must not be truncated or rewritten in
  /// place while tensors are alive.
  kMmap,
  /// Read each tensor with pread() into its own allocation: for network
  /// filesystems and files that may change while they are loaded (a change
  /// during the read is an OSError, never a fault).
  kPread,
};

} // namespace torchser
