#include "torchser/detail/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <torchser/errors.h>

namespace torchser::detail {
namespace {

constexpr std::size_t kWriteBufferSize = std::size_t{1} << 20;
// Linux caps one read()/write() at 0x7ffff000 bytes; ask for less.
constexpr std::size_t kMaxIo = std::size_t{1} << 30;

} // namespace

void throw_os_error(
    const std::string& what, const std::filesystem::path& path, int error) {
  const std::string message =
      what + " '" + path.string() + "': " + std::strerror(error);
  if (error == ENOENT) {
    throw FileNotFoundError(message);
  }
  throw OSError(message);
}

File File::open_write(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    throw_os_error("Cannot open", path, errno);
  }
  return File(fd, path);
}

File File::open_read(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw_os_error("Cannot open", path, errno);
  }
  File file(fd, path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw_os_error("Cannot stat", path, errno);
  }
  if (S_ISDIR(st.st_mode)) {
    throw_os_error("Cannot read", path, EISDIR);
  }
  return file;
}

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

std::uint64_t File::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    throw_os_error("Cannot stat", path_, errno);
  }
  return static_cast<std::uint64_t>(st.st_size);
}

void pread_exact(
    int fd,
    const std::filesystem::path& path,
    void* data,
    std::size_t size,
    std::uint64_t offset) {
  auto* out = static_cast<std::uint8_t*>(data);
  std::size_t done = 0;
  while (done < size) {
    const std::size_t chunk = std::min(size - done, kMaxIo);
    const ssize_t got =
        ::pread(fd, out + done, chunk, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw_os_error("Cannot read", path, errno);
    }
    if (got == 0) {
      throw OSError(
          "Cannot read '" + path.string() + "': the file ends at byte " +
          std::to_string(offset + done) + ", but " + std::to_string(size) +
          " bytes were expected from byte " + std::to_string(offset) +
          " (was it truncated while being read?)");
    }
    done += static_cast<std::size_t>(got);
  }
}

void pwrite_all(
    int fd,
    const std::filesystem::path& path,
    const void* data,
    std::uint64_t size,
    std::uint64_t offset) {
  const auto* in = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const auto chunk =
        static_cast<std::size_t>(std::min<std::uint64_t>(size, kMaxIo));
    const ssize_t put = ::pwrite(fd, in, chunk, static_cast<off_t>(offset));
    if (put < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw_os_error(
          "Cannot write " + std::to_string(chunk) + " bytes at offset " +
              std::to_string(offset) + " of",
          path,
          errno);
    }
    in += put;
    offset += static_cast<std::uint64_t>(put);
    size -= static_cast<std::uint64_t>(put);
  }
}

void File::pread_exact(
    void* data, std::size_t size, std::uint64_t offset) const {
  detail::pread_exact(fd_, path_, data, size, offset);
}

void File::write_all(const void* data, std::size_t size) const {
  const auto* in = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t put = ::write(fd_, in, std::min(size, kMaxIo));
    if (put < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw_os_error("Cannot write", path_, errno);
    }
    in += put;
    size -= static_cast<std::size_t>(put);
  }
}

std::shared_ptr<const MappedFile> MappedFile::map(const File& file) {
  const std::uint64_t size = file.size();
  if (size == 0) {
    return std::shared_ptr<const MappedFile>(
        new MappedFile(nullptr, 0, file.path()));
  }
  if (size > static_cast<std::uint64_t>(SIZE_MAX)) {
    throw OSError("Cannot map '" + file.path().string() + "': file too large");
  }
  // Private and writable, as torch's UntypedStorage.from_file(shared=False):
  // tensors over the mapping are ordinary writable tensors whose writes
  // copy the touched pages and never reach the file.
  void* data = ::mmap(
      nullptr,
      static_cast<std::size_t>(size),
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE,
      file.fd(),
      0);
  if (data == MAP_FAILED) {
    throw_os_error("Cannot map", file.path(), errno);
  }
  return std::shared_ptr<const MappedFile>(
      new MappedFile(static_cast<std::uint8_t*>(data), size, file.path()));
}

void MappedFile::advise_range(
    std::uint64_t offset, std::uint64_t size, int advice) const noexcept {
  if (data_ != nullptr && offset <= size_ && size <= size_ - offset) {
    ::madvise(data_ + offset, static_cast<std::size_t>(size), advice);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) {
    ::munmap(data_, static_cast<std::size_t>(size_));
  }
}

AtomicFile::AtomicFile(std::filesystem::path target)
    : target_(std::move(target)), buffer_(new std::uint8_t[kWriteBufferSize]) {
  // mkstemp's name: "<target>.torchser-tmp.XXXXXX" in the target's directory,
  // so the final rename never crosses a filesystem.
  std::string pattern = target_.string() + kTemporaryInfix + "XXXXXX";
  const int fd = ::mkostemp(pattern.data(), O_CLOEXEC);
  if (fd < 0) {
    throw_os_error("Cannot create a temporary file for", target_, errno);
  }
  file_ = File(fd, pattern);
  // mkstemp creates 0600; a checkpoint should get the usual 0666 & ~umask.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd, 0666 & ~mask);
}

AtomicFile::~AtomicFile() {
  if (!committed_ && file_.fd() >= 0) {
    ::unlink(file_.path().c_str());
  }
}

void AtomicFile::preallocate(std::uint64_t size) {
  if (size == 0) {
    return;
  }
  // The Linux call, not posix_fallocate: glibc emulates the latter by
  // writing zeros where the filesystem lacks support, doubling the I/O.
  if (::fallocate(file_.fd(), 0, 0, static_cast<off_t>(size)) != 0) {
    const int error = errno;
    if (error == EOPNOTSUPP || error == ENOSYS || error == EINVAL) {
      return;
    }
    throw_os_error(
        "Cannot reserve " + std::to_string(size) + " bytes for",
        target_,
        error);
  }
}

void AtomicFile::flush_buffer() {
  if (buffered_ > 0) {
    file_.write_all(buffer_.get(), buffered_);
    buffered_ = 0;
  }
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (buffered_ + size <= kWriteBufferSize) {
    std::memcpy(buffer_.get() + buffered_, data, size);
    buffered_ += size;
    return;
  }
  flush_buffer();
  if (size >= kWriteBufferSize) {
    file_.write_all(data, size);
    return;
  }
  std::memcpy(buffer_.get(), data, size);
  buffered_ = size;
}

void AtomicFile::patch(
    const void* data, std::size_t size, std::uint64_t offset) {
  flush_buffer();
  pwrite_all(file_.fd(), file_.path(), data, size, offset);
}

void AtomicFile::commit(bool durable) {
  flush_buffer();
  if (durable && ::fsync(file_.fd()) != 0) {
    throw_os_error("Cannot fsync", file_.path(), errno);
  }
  if (::rename(file_.path().c_str(), target_.c_str()) != 0) {
    throw_os_error(
        "Cannot rename '" + file_.path().string() + "' to", target_, errno);
  }
  committed_ = true;
  if (durable) {
    fsync_directory(target_.parent_path());
  }
}

std::filesystem::path AtomicFile::keep(bool durable) {
  flush_buffer();
  if (durable && ::fsync(file_.fd()) != 0) {
    throw_os_error("Cannot fsync", file_.path(), errno);
  }
  committed_ = true;
  return file_.path();
}

void fsync_directory(const std::filesystem::path& directory) {
  const std::filesystem::path dir = directory.empty() ? "." : directory;
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    throw_os_error("Cannot open directory", dir, errno);
  }
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) {
    throw_os_error("Cannot fsync directory", dir, error);
  }
}

} // namespace torchser::detail
