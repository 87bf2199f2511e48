// torch_save: state dicts in torch.save's ZIP format, readable by Python's
// torch.load (weights_only too).

#include <torchser/pickle.h>

#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/ops/empty.h>

#include "torchser/detail/file.h"
#include "torchser/detail/pickle_writer.h"
#include "torchser/detail/torch_storage_types.h"
#include "torchser/detail/zip.h"

namespace torchser {

// ---------------------------------------------------------------------------
// torch_save

namespace {

// A protocol-2 pickle, as Python's pickler writes it for the subset torchser
// saves.
class PickleWriter {
 public:
  void proto() {
    out_ += "\x80\x02";
  }
  void op(char code) {
    out_ += code;
  }
  void global(const std::string& module, const std::string& name) {
    out_ += 'c';
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
  }
  void string(const std::string& s) {
    out_ += 'X';
    put32(static_cast<std::uint32_t>(s.size()));
    out_ += s;
  }
  void integer(std::int64_t v) {
    if (v >= 0 && v < 256) {
      out_ += 'K';
      out_ += static_cast<char>(v);
    } else if (v >= 0 && v < 65536) {
      out_ += 'M';
      out_ += static_cast<char>(v & 0xFF);
      out_ += static_cast<char>(v >> 8);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      out_ += 'J';
      put32(static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
    } else { // LONG1, minimal two's complement, as Python's encode_long
      out_ += '\x8a';
      std::string bytes;
      auto u = static_cast<std::uint64_t>(v);
      for (int k = 0; k < 8; ++k) {
        bytes += static_cast<char>(u & 0xFF);
        u >>= 8;
      }
      while (bytes.size() > 1) {
        const auto last = static_cast<unsigned char>(bytes.back());
        const auto prev = static_cast<unsigned char>(bytes[bytes.size() - 2]);
        if ((last == 0x00 && !(prev & 0x80)) ||
            (last == 0xFF && (prev & 0x80))) {
          bytes.pop_back();
        } else {
          break;
        }
      }
      out_ += static_cast<char>(bytes.size());
      out_ += bytes;
    }
  }
  void int_tuple(c10::IntArrayRef values) {
    if (values.empty()) {
      out_ += ')';
      return;
    }
    if (values.size() > 3) {
      out_ += '(';
    }
    for (const std::int64_t v : values) {
      integer(v);
    }
    out_ += values.size() == 1   ? '\x85'
            : values.size() == 2 ? '\x86'
            : values.size() == 3 ? '\x87'
                                 : 't';
  }
  const std::string& bytes() const {
    return out_;
  }

 private:
  void put32(std::uint32_t v) {
    for (int k = 0; k < 4; ++k) {
      out_ += static_cast<char>((v >> (8 * k)) & 0xFF);
    }
  }
  std::string out_;
};

} // namespace

namespace detail {

std::uint64_t TorchSaveRecord::nbytes() const {
  return static_cast<std::uint64_t>(numel) * c10::elementSize(dtype);
}

TorchSaveArchive torch_save_archive(
    const StateDict& state_dict, const std::string& folder) {
  TorchSaveArchive archive;
  archive.folder = folder;
  std::vector<TorchSaveRecord>& records = archive.records;
  // One record per storage, in first-use order; tensors keep their views.
  // Keyed by the storage itself, as torch.save keys by storage._cdata: two
  // empty tensors have equal StorageIds (no data) but are separate storages.
  std::unordered_map<const c10::StorageImpl*, std::size_t> record_of;
  PickleWriter p;
  p.proto();
  p.op('}'); // EMPTY_DICT
  p.op('(');
  for (const auto& item : state_dict) {
    const at::Tensor& t = item.value();
    if (!t.defined() || t.layout() != at::kStrided || t.is_meta()) {
      throw ValueError(
          "Tensor '" + item.key() +
          "' cannot be saved: it is undefined, sparse or on the meta device.");
    }
    const auto nbytes = static_cast<std::int64_t>(t.storage().nbytes());
    const auto element = static_cast<std::int64_t>(t.element_size());
    auto [it, inserted] = record_of.try_emplace(
        t.storage().unsafeGetStorageImpl(), records.size());
    if (inserted) {
      if (nbytes % element != 0) {
        throw ValueError(
            "Tensor '" + item.key() +
            "': its storage is not a whole number of " +
            c10::toString(t.scalar_type()) + " elements.");
      }
      if (v3_dtype_name(t.scalar_type()) == nullptr) {
        storage_type_name(
            t.scalar_type()); // throws for dtypes torch.save cannot name
      }
      records.push_back({at::Tensor(), t.scalar_type(), nbytes / element, {}});
      records.back().storage =
          t; // any tensor on the storage; bytes are taken whole
    } else if (records[it->second].dtype != t.scalar_type()) {
      throw ValueError(
          "Cannot save tensor '" + item.key() +
          "': it views the same storage as another tensor with a different "
          "dtype (" +
          c10::toString(records[it->second].dtype) + " vs " +
          c10::toString(t.scalar_type()) +
          "), which torch.save's typed storages cannot express.");
    }
    records[it->second].names.push_back(item.key());
    const TorchSaveRecord& r = records[it->second];
    // As PyTorch 2.x writes them: dtypes with a typed storage class through
    // _rebuild_tensor_v2; the others (float8, uint16..64, float4) through
    // _rebuild_tensor_v3 over an untyped storage sized in bytes, with the
    // dtype named last.
    const char* v3_name = v3_dtype_name(r.dtype);
    p.string(item.key());
    p.global(
        "torch._utils",
        v3_name != nullptr ? "_rebuild_tensor_v3" : "_rebuild_tensor_v2");
    p.op('(');
    p.op('(');
    p.string("storage");
    if (v3_name != nullptr) {
      p.global("torch.storage", "UntypedStorage");
    } else {
      p.global("torch", storage_type_name(r.dtype));
    }
    p.string(std::to_string(it->second));
    p.string("cpu");
    p.integer(
        v3_name != nullptr
            ? r.numel * static_cast<std::int64_t>(c10::elementSize(r.dtype))
            : r.numel);
    p.op('t');
    p.op('Q'); // BINPERSID
    p.integer(t.storage_offset());
    p.int_tuple(t.sizes());
    p.int_tuple(t.strides());
    p.op('\x89'); // requires_grad = False
    p.global("collections", "OrderedDict");
    p.op(')');
    p.op('R');
    if (v3_name != nullptr) {
      p.global("torch", v3_name);
    }
    p.op('t');
    p.op('R');
  }
  p.op('u'); // SETITEMS
  p.op('.');

  archive.pickle = p.bytes();
  return archive;
}

namespace {

// The entries in torch.save's order; `record(zip, k, name)` adds the k-th
// storage's.
void add_entries(
    const TorchSaveArchive& archive,
    ZipWriter& zip,
    const std::function<void(std::size_t, const std::string&)>& record) {
  zip.add(archive.folder + "/data.pkl", archive.pickle);
  zip.add(archive.folder + "/byteorder", "little");
  for (std::size_t k = 0; k < archive.records.size(); ++k) {
    record(k, archive.folder + "/data/" + std::to_string(k));
  }
  zip.add(archive.folder + "/version", "3\n");
  zip.finish();
}

} // namespace

void write_torch_save(
    const StateDict& state_dict,
    AtomicFile& file,
    const std::string& folder,
    const RecordWritten& written) {
  const TorchSaveArchive archive = torch_save_archive(state_dict, folder);
  ZipWriter zip(
      {[&](const void* d, std::size_t n) { file.write(d, n); },
       [&](const void* d, std::size_t n, std::uint64_t offset) {
         file.patch(d, n, offset);
       },
       {}},
      ZipWriter::Options{});
  add_entries(archive, zip, [&](std::size_t k, const std::string& name) {
    const TorchSaveRecord& r = archive.records[k];
    const std::uint64_t nbytes = r.nbytes();
    zip.add(
        name,
        nbytes,
        [&](const std::function<void(const void*, std::size_t)>& sink) {
          if (nbytes == 0) {
            return;
          }
          // The whole storage, on CPU, one record at a time.
          const c10::Storage& storage = r.storage.storage();
          if (r.storage.device().is_cpu()) {
            sink(storage.data_ptr().get(), static_cast<std::size_t>(nbytes));
            return;
          }
          const at::Tensor whole = at::empty({0}, r.storage.options())
                                       .set_(storage, 0, {r.numel}, {1})
                                       .to(at::kCPU);
          sink(whole.data_ptr(), static_cast<std::size_t>(nbytes));
        });
    if (written) {
      written(r.names, nbytes);
    }
  });
}

TorchSaveLayout torch_save_layout(
    const TorchSaveArchive& archive, const std::vector<std::uint32_t>& crcs) {
  TorchSaveLayout layout;
  std::uint64_t end = 0;
  const auto append = [&](const void* d, std::size_t n) {
    if (layout.fixed.empty() ||
        layout.fixed.back().first + layout.fixed.back().second.size() != end) {
      layout.fixed.emplace_back(end, std::string());
    }
    layout.fixed.back().second.append(static_cast<const char*>(d), n);
    end += n;
  };
  const auto patch = [&](const void* d, std::size_t n, std::uint64_t at) {
    for (auto& [offset, bytes] : layout.fixed) {
      if (at >= offset && at + n <= offset + bytes.size()) {
        bytes.replace(at - offset, n, static_cast<const char*>(d), n);
        return;
      }
    }
    throw RuntimeError("torch.save layout: a patch outside the headers");
  };
  ZipWriter zip(
      {append, patch, [&](std::uint64_t n) { end += n; }},
      ZipWriter::Options{});
  add_entries(archive, zip, [&](std::size_t k, const std::string& name) {
    zip.add_reserved(name, archive.records[k].nbytes(), crcs.at(k));
    layout.data_offset.push_back(end - archive.records[k].nbytes());
  });
  layout.size = end;
  return layout;
}

} // namespace detail

void torch_save(
    const StateDict& state_dict,
    const std::filesystem::path& path,
    bool durable) {
  // torch.save names the archive folder after the file.
  const std::string stem = path.stem().string();
  detail::AtomicFile file(path);
  detail::write_torch_save(state_dict, file, stem.empty() ? "archive" : stem);
  file.commit(durable);
}

} // namespace torchser
