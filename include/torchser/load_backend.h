#pragma once

/// \file
/// How a reader gets a file's bytes: mapped, read, or read around the page
/// cache. Two things decide: whether the file's pages are already in memory
/// (warm) or must come from the disk (cold), and whether the file may change
/// while it is being loaded.
///
/// **Warm files: kMmap (the default).** When the page cache holds the file
/// (it was just written, downloaded or loaded), a mapping gives tensors that
/// *are* those pages: nothing is copied, and a whole checkpoint is "loaded"
/// in about a millisecond; copies into a module run at memory speed. Every
/// other backend copies.
///
/// **Cold files: kDirect.** When the pages are not cached (a first load
/// after a boot, a checkpoint larger than free memory, a fresh node), a
/// mapping reads the file through page faults and readahead windows of a
/// few hundred KiB, one at a time, and a buffered read() copies every byte
/// once more out of the page cache. kDirect is the reader the fast loaders
/// use: large aligned reads (4 MiB) with several in flight (8), through
/// io_uring (Debian's liburing, where the kernel allows it) or else a pool
/// of threads blocking in pread(), with O_DIRECT, so that the device writes
/// straight into the tensors' memory: new tensors are allocated so that the
/// file's blocks land in them in place (no copy at all), and existing ones
/// (a module's, CUDA tensors) receive the bytes from a ring of staging
/// buffers (pinned for CUDA, with asynchronous host-to-device copies) while
/// the next reads are in flight. Nothing it reads enters the page cache:
/// the choice for checkpoints larger than free memory or nodes serving
/// other work, and the fast path where buffered reads are CPU-bound below
/// the device (NVMe). On this project's virtio VM it reads new tensors 2x
/// faster than kMmap touching every page, but fresh memory (zeroed by the
/// kernel) and a buffered readahead that keeps up make it 0.6-0.8x of
/// `fio` there, and kMmap into a module as fast (the README's figures). It
/// is slower than kMmap on a warm file (O_DIRECT skips the cached pages and
/// reads the disk again).
/// Where the filesystem refuses O_DIRECT (tmpfs on older kernels, some
/// FUSE filesystems), the same reads go through the page cache.
/// $TORCHSER_IO_ENGINE=threads (or io_uring) overrides the engine.
///
/// **Files that may change: kPread or kDirect.** A mapping is private
/// (copy-on-write) but not a snapshot: a page not yet read shows whatever
/// the file holds when it is first touched, and a file truncated under the
/// mapping makes the lost pages fault (SIGBUS), which no library can turn
/// into an exception. A file *replaced* by renaming a new one over it (how
/// torchser saves, and how huggingface_hub's deletes-then-writes leave it)
/// is harmless: the mapping keeps the old inode alive. Tools that rewrite a
/// file in place (Python's `torch.save` and `safetensors.save_file` open the
/// path with "wb") are not: load files that such a tool may rewrite during
/// the load with kPread or kDirect, which read everything up front, so a
/// truncation is an OSError naming the file.

namespace torchser {

/// How tensor bytes come from the file.
enum class LoadBackend {
  /// Memory-map the file; CPU tensors are zero-copy views of the mapping
  /// (private, copy-on-write), which lives while any of them does. Nothing
  /// is read until touched. The file must not be truncated or rewritten in
  /// place while tensors are alive. The fastest on warm files.
  kMmap,
  /// Read each tensor with pread() into its own allocation: for network
  /// filesystems and files that may change while they are loaded (a change
  /// during the read is an OSError, never a fault).
  kPread,
  /// The cold-cache reader: large O_DIRECT reads, several in flight
  /// (io_uring or a thread pool), straight into new tensors' memory or
  /// through a staging ring into existing and CUDA tensors. The fastest on
  /// files the page cache does not hold; a change during the read is an
  /// OSError, as with kPread.
  kDirect,
};

} // namespace torchser
