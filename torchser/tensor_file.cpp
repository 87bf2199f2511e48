#include "torchser/detail/tensor_file.h"
#include "torchser/detail/checksum.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <unordered_map>

#include <torchser/errors.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/storage.h>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>

#include "torchser/detail/direct_io.h"
#include "torchser/detail/file.h"
#include "torchser/detail/safetensors_format.h"
#include "torchser/detail/torch_load_layout.h"
#include "torchser/detail/zip.h"

namespace torchser::detail {
namespace fs = std::filesystem;

const char* format_name(TensorFormat format) {
  return format == TensorFormat::kSafetensors ? "safetensors" : "pickle";
}

TensorFile::~TensorFile() = default;

void TensorFile::prefetch(const std::vector<std::string>& /*names*/) const {}

std::optional<TensorSpec> TensorFile::direct_spec(
    const std::string& /*name*/) const {
  return std::nullopt;
}

void TensorFile::check_format_metadata() const {
  if (format_ != TensorFormat::kSafetensors || !metadata_.has_value()) {
    return;
  }
  for (const auto& [key, value] : *metadata_) {
    if (key == "format") {
      if (value == "pt" || value == "mlx") {
        return;
      }
      break;
    }
  }
  throw OSError(
      "The safetensors archive passed at " + display_ +
      " does not contain the valid metadata. Make sure you save your model "
      "with the `save_torch_model` "
      "method.");
}

// The tensors whose bytes can go straight into their targets stream through
// kDirect's ring; the rest are get() as usual.
void TensorFile::read_into(
    const std::vector<std::string>& names,
    const std::vector<at::Tensor>& targets,
    const IntoVisitor& visit) const {
  const DirectFile* direct = direct_reader();
  std::vector<DirectFile::Transfer> transfers;
  std::vector<std::size_t> streamed; // into names, per transfer
  std::vector<std::size_t> rest;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const at::Tensor* target = i < targets.size() ? &targets[i] : nullptr;
    std::optional<TensorSpec> spec;
    if (direct != nullptr && target != nullptr && target->defined() &&
        target->is_contiguous() && (target->is_cpu() || target->is_cuda())) {
      spec = direct_spec(names[i]);
    }
    if (spec.has_value() && spec->dtype == target->scalar_type() &&
        target->sizes() == c10::IntArrayRef(spec->sizes)) {
      transfers.push_back({spec->offset, *target});
      streamed.push_back(i);
    } else {
      rest.push_back(i);
    }
  }
  if (!transfers.empty()) {
    direct->read_into(transfers, [&](std::size_t k) {
      visit(names[streamed[k]], targets[streamed[k]]);
    });
  }
  for (const std::size_t i : rest) {
    visit(names[i], get(names[i]));
    release(names[i]);
  }
}

namespace {

// One vocabulary for dtypes whatever the format: the safetensors codes
// ("F32"), or LibTorch's name for the few it lacks (complex128).
std::string dtype_code(at::ScalarType type) {
  try {
    return safetensors_dtype_name(to_safetensors_dtype(type));
  } catch (const std::exception&) {
    return c10::toString(type);
  }
}

bool holds_tensors(const PickleValue& v) {
  switch (v.kind()) {
    case PickleValue::Kind::kTensor:
      return true;
    case PickleValue::Kind::kList:
    case PickleValue::Kind::kTuple:
      return std::any_of(v.items().begin(), v.items().end(), holds_tensors);
    case PickleValue::Kind::kDict:
      return std::any_of(
          v.dict_items().begin(), v.dict_items().end(), [](const auto& item) {
            return holds_tensors(item.second);
          });
    default:
      return false;
  }
}

struct Selected {
  StateDict tensors;
  std::string selection;
  bool ambiguous = false;
};

// extract_state_dict's choice (or `key`), said: which key, what was ignored.
Selected select_state_dict(
    const PickleValue& checkpoint,
    const std::optional<std::string>& key,
    const std::string& display) {
  Selected out;
  const PickleValue* chosen = &checkpoint;
  std::string chosen_key;
  if (key.has_value()) {
    chosen = checkpoint.kind() == PickleValue::Kind::kDict
                 ? checkpoint.find(*key)
                 : nullptr;
    if (chosen == nullptr) {
      throw KeyError(
          "'" + display + "' has no key '" + *key + "' at its top level.");
    }
    chosen_key = *key;
    out.tensors = extract_state_dict(*chosen);
  } else {
    out.tensors = extract_state_dict(checkpoint);
    if (checkpoint.kind() == PickleValue::Kind::kDict &&
        !out.tensors.is_empty()) {
      // Which top-level value extract_state_dict took: the one holding the
      // first tensor it returned.
      const at::Tensor& first = out.tensors.begin()->value();
      for (const auto& [k, v] : checkpoint.dict_items()) {
        if (v.kind() == PickleValue::Kind::kTensor &&
            v.to_tensor().is_same(first)) {
          chosen_key.clear(); // the top level itself
          break;
        }
        if (v.kind() == PickleValue::Kind::kDict &&
            k.kind() == PickleValue::Kind::kString) {
          for (const auto& [name, t] : v.dict_items()) {
            if (t.kind() == PickleValue::Kind::kTensor &&
                t.to_tensor().is_same(first)) {
              chosen_key = k.to_string();
              break;
            }
          }
          if (!chosen_key.empty()) {
            break;
          }
        }
      }
    }
  }
  if (chosen_key.empty() || checkpoint.kind() != PickleValue::Kind::kDict) {
    return out;
  }
  std::string ignored;
  std::string with_tensors;
  for (const auto& [k, v] : checkpoint.dict_items()) {
    const std::string name = k.kind() == PickleValue::Kind::kString
                                 ? k.to_string()
                                 : "<" + k.type_name() + ">";
    if (name == chosen_key) {
      continue;
    }
    ignored += (ignored.empty() ? "" : ", ") + name;
    if (holds_tensors(v)) {
      with_tensors += (with_tensors.empty() ? "" : ", ") + name;
    }
  }
  out.selection = "state dict taken from key '" + chosen_key + "'" +
                  (ignored.empty() ? "" : "; ignored: " + ignored);
  out.ambiguous = !with_tensors.empty();
  if (out.ambiguous) {
    out.selection += " (" + with_tensors + " hold" +
                     (with_tensors.find(',') == std::string::npos ? "s" : "") +
                     " tensors too)";
  }
  return out;
}

class SafetensorsFile final : public TensorFile {
 public:
  SafetensorsFile(
      SafeOpen file, std::string display, std::string note, c10::Device device)
      : file_(std::move(file)), device_(device) {
    format_ = TensorFormat::kSafetensors;
    display_ = std::move(display);
    note_ = std::move(note);
    entries_.reserve(file_.tensors().size());
    for (const auto& info : file_.tensors()) {
      position_.emplace(info.name, position_.size());
      entries_.push_back(
          {info.name,
           safetensors_dtype_name(info.dtype),
           info.shape,
           info.end - info.begin,
           "",
           info.end - info.begin});
    }
    if (const auto& metadata = file_.metadata()) {
      metadata_.emplace(metadata->begin(), metadata->end());
    }
  }
  at::Tensor get(const std::string& name) const override {
    const auto it = prefetched_.find(name);
    return it != prefetched_.end() ? it->second : file_.get_tensor(name);
  }
  void prefetch(const std::vector<std::string>& names) const override {
    const DirectFile* reader = direct_reader();
    if (reader == nullptr) {
      return;
    }
    std::vector<std::string> read;
    std::vector<TensorSpec> specs;
    for (const std::string& name : names) {
      if (auto spec = direct_spec(name)) {
        read.push_back(name);
        specs.push_back(std::move(*spec));
      }
    }
    std::vector<at::Tensor> tensors = read_tensors(*reader, specs, device_);
    for (std::size_t i = 0; i < read.size(); ++i) {
      prefetched_[read[i]] = std::move(tensors[i]);
    }
  }
  // SafeOpen's own (kDirect): the file whose header it read.
  const DirectFile* direct_reader() const override {
    return SafeOpenAccess::direct(file_);
  }
  // Where the tensor's bytes lie, when LibTorch holds them as they are
  // (packed F4 and dtypes this build lacks go through get()).
  std::optional<TensorSpec> direct_spec(
      const std::string& name) const override {
    const auto position = position_.find(name);
    if (position == position_.end()) {
      throw KeyError("'" + display_ + "' holds no tensor '" + name + "'.");
    }
    const SafetensorsTensorInfo& info = file_.tensors()[position->second];
    if (info.dtype == SafetensorsDtype::kF4) {
      return std::nullopt; // packed in pairs: get() gives LibTorch's shape
    }
    try {
      return TensorSpec{
          file_.data_offset() + info.begin,
          info.shape,
          to_torch_dtype(info.dtype)};
    } catch (const SafetensorError&) {
      return std::nullopt;
    }
  }
  std::optional<std::uint64_t> file_offset(
      const std::string& name) const override {
    for (const auto& info : file_.tensors()) {
      if (info.name == name) {
        return file_.data_offset() + info.begin;
      }
    }
    throw KeyError("'" + display_ + "' holds no tensor '" + name + "'.");
  }
  void release(const std::string& name) const override {
    prefetched_.erase(name);
    file_.release_pages(name);
  }

 private:
  SafeOpen file_;
  c10::Device device_;
  std::unordered_map<std::string, std::size_t> position_;
  mutable std::unordered_map<std::string, at::Tensor> prefetched_;
};

class PickleFile final : public TensorFile {
 public:
  PickleFile(
      StateDict tensors,
      std::string display,
      std::string note,
      bool mapped,
      std::string selection,
      bool ambiguous,
      fs::path path,
      std::optional<std::string> key,
      const File* direct,
      c10::Device device)
      : tensors_(std::move(tensors)),
        mapped_(mapped),
        path_(std::move(path)),
        key_(std::move(key)),
        device_(device) {
    if (direct != nullptr) {
      // The entries are the layout's stand-ins, never handed out; the
      // records are read from the very file whose pickle was read (`direct`
      // is it, open), even if a save has renamed another over the path.
      layout_ = tensors_;
      reader_ = std::make_unique<DirectFile>(path_, display, direct->fd());
    }
    selection_ = std::move(selection);
    ambiguous_ = ambiguous;
    format_ = TensorFormat::kPickle;
    display_ = std::move(display);
    note_ = std::move(note);
    entries_.reserve(tensors_.size());
    for (const auto& item : tensors_) {
      const at::Tensor& t = item.value();
      const auto id = get_torch_storage_id(t);
      entries_.push_back(
          {item.key(),
           dtype_code(t.scalar_type()),
           t.sizes().vec(),
           static_cast<std::uint64_t>(t.nbytes()),
           id ? std::to_string(id->data_ptr) + ":" + std::to_string(id->nbytes)
              : "#" + item.key(),
           static_cast<std::uint64_t>(
               t.numel() == 0 ? 0 : t.storage().nbytes())});
    }
    for (const TensorEntry& entry : entries_) {
      last_user_[entry.storage] = entry.name;
      storage_of_[entry.name] = entry.storage;
    }
  }
  at::Tensor get(const std::string& name) const override {
    const at::Tensor* t = tensors_.find(name);
    if (t == nullptr) {
      throw KeyError("'" + display_ + "' holds no tensor '" + name + "'.");
    }
    if (!reader_) {
      return *t;
    }
    const auto it = prefetched_.find(name);
    return it != prefetched_.end() ? it->second : read_direct({name}).front();
  }
  void prefetch(const std::vector<std::string>& names) const override {
    if (!reader_) {
      return;
    }
    std::vector<at::Tensor> tensors = read_direct(names);
    for (std::size_t i = 0; i < names.size(); ++i) {
      prefetched_[names[i]] = std::move(tensors[i]);
    }
  }
  // Opened with the entries (kDirect), else none.
  const DirectFile* direct_reader() const override {
    return reader_.get();
  }
  std::optional<TensorSpec> direct_spec(
      const std::string& name) const override {
    const std::optional<std::uint64_t> offset = file_offset(name);
    if (!offset.has_value()) {
      return std::nullopt;
    }
    const at::Tensor& t = *layout().find(name);
    return TensorSpec{*offset, t.sizes().vec(), t.scalar_type()};
  }
  std::optional<std::uint64_t> file_offset(
      const std::string& name) const override {
    get_entry(name); // KeyError for an unknown name
    const at::Tensor* t = layout().find(name);
    if (t == nullptr || !t->is_contiguous()) {
      return std::nullopt;
    }
    if (t->numel() == 0) {
      return 0;
    }
    return static_cast<std::uint64_t>(
        reinterpret_cast<std::uintptr_t>(t->data_ptr()) - kLayoutBase);
  }
  void release(const std::string& name) const override {
    prefetched_.erase(name);
    // The record's pages of the private file mapping: dropped, they are
    // read from the file again if touched (as SafeOpen::release_pages).
    // Only after the last tensor on the storage: a record copied to the
    // heap (misaligned in the archive) would read back as zeros.
    const at::Tensor* t = tensors_.find(name);
    const auto last_user = last_user_.find(storage_of(name));
    if (!mapped_ || t == nullptr || t->numel() == 0 || !t->device().is_cpu() ||
        last_user == last_user_.end() || last_user->second != name) {
      return;
    }
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<std::uintptr_t>(t->storage().data());
    const std::uintptr_t first = (begin + page - 1) / page * page;
    const std::uintptr_t last = (begin + t->storage().nbytes()) / page * page;
    if (last > first) {
      ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
    }
  }

 private:
  const at::Tensor& get_entry(const std::string& name) const {
    const at::Tensor* t = tensors_.find(name);
    if (t == nullptr) {
      throw KeyError("'" + display_ + "' holds no tensor '" + name + "'.");
    }
    return *t;
  }
  const StateDict& layout() const {
    if (!layout_.has_value()) {
      // The same pickle again, over stand-in storages that say where each
      // record lies (nothing else is read), and the same dict chosen.
      layout_ =
          select_state_dict(torch_load_layout(path_), key_, display_).tensors;
    }
    return *layout_;
  }
  // `names` read with kDirect: one read per storage record, so that tensors
  // sharing a storage in the file share one here too.
  std::vector<at::Tensor> read_direct(
      const std::vector<std::string>& names) const {
    std::map<std::pair<std::uint64_t, at::ScalarType>, std::size_t> record_of;
    std::vector<TensorSpec> specs;
    std::vector<std::size_t> which(names.size(), SIZE_MAX);
    for (std::size_t i = 0; i < names.size(); ++i) {
      get_entry(names[i]);
      const at::Tensor& t = *layout().find(names[i]);
      const std::size_t element = t.element_size();
      const std::uint64_t nbytes = t.storage().nbytes();
      if (t.numel() == 0 || nbytes == 0) {
        continue;
      }
      const std::uint64_t start =
          reinterpret_cast<std::uintptr_t>(t.data_ptr()) - kLayoutBase -
          static_cast<std::uint64_t>(t.storage_offset()) * element;
      const auto key = std::make_pair(start, t.scalar_type());
      const auto [it, fresh] = record_of.emplace(key, specs.size());
      if (fresh) {
        specs.push_back(TensorSpec{
            start,
            {static_cast<std::int64_t>(nbytes / element)},
            t.scalar_type()});
      }
      which[i] = it->second;
    }
    const std::vector<at::Tensor> bases =
        read_tensors(*reader_, specs, device_);
    std::vector<at::Tensor> out;
    out.reserve(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      const at::Tensor& t = *layout().find(names[i]);
      out.push_back(
          which[i] == SIZE_MAX
              ? at::empty(t.sizes(), t.options().device(device_))
              : bases[which[i]].as_strided(
                    t.sizes(), t.strides(), t.storage_offset()));
    }
    return out;
  }
  std::string storage_of(const std::string& name) const {
    const auto it = storage_of_.find(name);
    return it == storage_of_.end() ? "" : it->second;
  }

  StateDict tensors_;
  bool mapped_;
  fs::path path_;
  std::optional<std::string> key_;
  mutable std::optional<StateDict> layout_;
  std::unordered_map<std::string, std::string>
      last_user_; // storage → its last tensor
  std::unordered_map<std::string, std::string> storage_of_; // tensor → storage
  c10::Device device_;
  std::unique_ptr<DirectFile> reader_; // kDirect only
  mutable std::unordered_map<std::string, at::Tensor> prefetched_;
};

} // namespace

TensorFormat sniff_format(const fs::path& path, std::string* note) {
  const bool says_safetensors = path.extension() == ".safetensors";
  unsigned char head[9] = {};
  std::uint64_t size = 0;
  {
    const File file = File::open_read(path);
    size = file.size();
    if (size >= sizeof head) {
      file.pread_exact(head, sizeof head, 0);
    }
  }
  if (size == 0) {
    throw OSError(
        "'" + path.string() +
        "' is empty (0 bytes): not a safetensors or torch.save file.");
  }
  std::optional<TensorFormat> content;
  if (size >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0) {
    content = TensorFormat::kPickle;
  } else if (size >= 9 && head[8] == '{') {
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) {
      header = (header << 8) | head[i];
    }
    if (header >= 2 && header <= size - 8) {
      content = TensorFormat::kSafetensors;
    }
  }
  const TensorFormat by_name =
      says_safetensors ? TensorFormat::kSafetensors : TensorFormat::kPickle;
  if (!content.has_value()) {
    return by_name; // the format's own reader says what is wrong with it
  }
  if (*content != by_name && note != nullptr) {
    *note = "'" + path.string() + "' is a " +
            (*content == TensorFormat::kPickle
                 ? std::string("torch.save ZIP archive")
                 : std::string("safetensors file")) +
            " despite its name; reading it as one";
  }
  return *content;
}

std::unique_ptr<TensorFile> open_tensor_file(
    const fs::path& path, const TensorFileOptions& options) {
  std::string note;
  const TensorFormat format = sniff_format(path, &note);
  if (format == TensorFormat::kSafetensors) {
    c10::Device device = options.device.value_or(c10::Device(c10::kCPU));
    if (device.is_meta()) {
      device = c10::Device(c10::kCPU); // the reference falls back to CPU too
    }
    return std::make_unique<SafetensorsFile>(
        SafeOpen(
            path, SafeOpenOptions().device(device).backend(options.backend)),
        path.string(),
        std::move(note),
        device);
  }
  if (options.device.has_value() && options.device->is_cuda() &&
      !at::hasCUDA()) {
    throw ValueError(
        "Device " + options.device->str() + " was requested for '" +
        path.string() + "', but this LibTorch build has no CUDA support.");
  }
  // kDirect takes its entries from the pickle replayed over stand-in
  // storages (nothing is mapped, no record is read: a file cut short is an
  // OSError, never a fault) and reads the records it is asked for itself.
  const bool direct = options.backend == LoadBackend::kDirect;
  const File opened = direct ? File::open_read(path) : File();
  Selected selected = select_state_dict(
      direct ? torch_load_layout(path, &opened)
             : torch_load(
                   path,
                   TorchLoadOptions()
                       .mmap(options.backend == LoadBackend::kMmap)
                       .map_location(options.device)),
      options.key,
      path.string());
  c10::Device device = options.device.value_or(c10::Device(c10::kCPU));
  return std::make_unique<PickleFile>(
      std::move(selected.tensors),
      path.string(),
      std::move(note),
      options.backend == LoadBackend::kMmap && !options.device.has_value(),
      std::move(selected.selection),
      selected.ambiguous,
      path,
      options.key,
      direct ? &opened : nullptr,
      device.is_meta() ? c10::Device(c10::kCPU) : device);
}

std::unique_ptr<TensorFile> open_tensor_file(
    const fs::path& path,
    std::uint64_t offset,
    std::uint64_t length,
    const std::string& display,
    const TensorFileOptions& options) {
  const c10::Device device = options.device.value_or(c10::Device(c10::kCPU));
  return std::make_unique<SafetensorsFile>(
      SafeOpen(
          path,
          offset,
          length,
          SafeOpenOptions()
              .device(device.is_meta() ? c10::Device(c10::kCPU) : device)
              .backend(options.backend)),
      display,
      "",
      device.is_meta() ? c10::Device(c10::kCPU) : device);
}

namespace {

void verify_zip_crcs(const fs::path& path) {
  const auto mapped = MappedFile::map(File::open_read(path));
  std::vector<ZipEntry> entries;
  try {
    entries = read_zip_directory(mapped->data(), mapped->size());
  } catch (const ZipFormatError& e) {
    throw UnpicklingError("Cannot read '" + path.string() + "': " + e.what());
  }
  for (const ZipEntry& entry : entries) {
    if (entry.method != 0 || entry.is_directory()) {
      continue; // compressed records are refused by torch_load itself
    }
    if (entry.data_offset + entry.compressed_size > mapped->size()) {
      throw UnpicklingError(
          "Record '" + entry.name + "' of '" + path.string() +
          "' runs past the file.");
    }
    const std::uint32_t crc = crc32(
        0,
        mapped->data() + entry.data_offset,
        static_cast<std::size_t>(entry.compressed_size));
    if (crc != entry.crc32) {
      char buffer[64];
      std::snprintf(
          buffer,
          sizeof buffer,
          "CRC-32 %08x, the ZIP directory says %08x",
          crc,
          entry.crc32);
      throw UnpicklingError(
          "Record '" + entry.name + "' of '" + path.string() +
          "' is corrupt: " + buffer + ".");
    }
  }
}

} // namespace

std::unique_ptr<TensorFile> verify_tensor_file(const fs::path& path) {
  if (sniff_format(path) == TensorFormat::kPickle) {
    verify_zip_crcs(path);
  }
  auto file = open_tensor_file(
      path);              // the header, or the pickle: every rule of the format
  check_checksums(*file); // the CRC-32Cs SaveOptions::checksums records
  return file;
}

StateDict read_all(const TensorFile& file) {
  StateDict out;
  out.reserve(file.entries().size());
  for (const TensorEntry& entry : file.entries()) {
    out.insert(entry.name, file.get(entry.name));
  }
  return out;
}

} // namespace torchser::detail
