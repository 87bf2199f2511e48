// Resharding on load: each rank matches its pieces with the checkpoint's
// tensors (through the checkpoint layer: which files, which headers, where
// each tensor's bytes lie), the ranks check the whole together, and each
// reads the byte ranges of its own pieces with positional reads.

#include <torchser/distributed_load.h>

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <tuple>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>

#include <torchser/errors.h>
#include <torchser/hub_cache.h>
#include <torchser/key_mapping.h>
#include <torchser/module.h>
#include <torchser/safetensors.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/collectives.h"
#include "torchser/detail/dcp_layout.h"
#include "torchser/detail/direct_io.h"
#include "torchser/detail/file.h"
#include "torchser/detail/key_filter.h"
#include "torchser/detail/load_messages.h"
#include "torchser/detail/tensor_file.h"
#include "torchser/detail/tiling.h"

namespace torchser {
namespace {

using detail::Shape;

constexpr std::size_t kChunkBytes = std::size_t{16} << 20;

// The torch dtype of a stored tensor, named in errors: one this LibTorch
// lacks, or one whose elements are not whole bytes (F4, F6: a piece's runs
// cannot be placed byte-wise, and LibTorch packs F4 two to a byte).
at::ScalarType torch_dtype_of(
    SafetensorsDtype code, const std::string& name, const std::string& where) {
  if (safetensors_dtype_bits(code) % 8 != 0) {
    throw ValueError(
        "Tensor '" + name + "' of " + where + " is " +
        safetensors_dtype_name(code) +
        ", whose elements are not whole bytes: a distributed load cannot "
        "place its pieces (load it whole with load_torch_model)");
  }
  try {
    return to_torch_dtype(code);
  } catch (const SafetensorError& e) {
    throw ValueError(
        "Tensor '" + name + "' of " + where + " has dtype " +
        safetensors_dtype_name(code) +
        ", which this LibTorch build cannot hold (" + e.what() + ")");
  }
}

at::ScalarType dtype_of(
    const detail::TensorEntry& entry, const std::string& file) {
  if (const auto code = parse_safetensors_dtype(entry.dtype)) {
    return torch_dtype_of(*code, entry.name, file);
  }
  if (entry.dtype == c10::toString(at::kComplexDouble)) {
    return at::kComplexDouble;
  }
  throw ValueError(
      "Tensor '" + entry.name + "' of " + file + " has dtype " + entry.dtype +
      ", which this LibTorch build cannot hold");
}

// Whether `t` holds a file's bytes as they are (no conversion, no gaps).
bool takes_file_bytes(const at::Tensor& t, at::ScalarType dtype) {
  return t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous();
}

// Reads the byte runs of pieces of one file's row-major tensors.
class PieceReader {
 public:
  // `direct`: the runs that take the file's bytes go through the cold-cache
  // reader (LoadBackend::kDirect), all of a piece's runs in one pass.
  // `chunk`: the conversion buffer (kChunkBytes), shared by the readers of
  // one load and allocated on first use.
  PieceReader(
      std::filesystem::path path,
      bool direct,
      std::unique_ptr<std::uint8_t[]>* chunk)
      : path_(std::move(path)),
        file_(detail::File::open_read(path_)),
        chunk_(*chunk) {
    if (direct) {
      direct_ = std::make_unique<detail::DirectFile>(path_, path_.string());
    }
  }

  // `local`'s elements from `offsets` of a row-major tensor of shape `full`
  // and dtype `dtype` whose first element is at `base` in the file: each
  // run straight into the tensor when its bytes are the file's, else
  // through the chunk.
  std::uint64_t read(
      const at::Tensor& local,
      const Shape& full,
      const Shape& offsets,
      c10::ScalarType dtype,
      std::uint64_t base) {
    const std::size_t esize = c10::elementSize(dtype);
    std::uint64_t read = 0;
    std::vector<detail::DirectFile::Transfer> transfers;
    detail::for_each_block(
        local,
        full,
        offsets,
        [&](const at::Tensor& block, std::int64_t element, std::int64_t count) {
          const std::uint64_t at =
              base + static_cast<std::uint64_t>(element) * esize;
          read += static_cast<std::uint64_t>(count) * esize;
          if (takes_file_bytes(block, dtype)) {
            if (direct_) {
              transfers.push_back({at, block});
              return;
            }
            file_.pread_exact(
                block.data_ptr(), static_cast<std::size_t>(count) * esize, at);
            return;
          }
          detail::for_each_chunk(
              block,
              esize,
              kChunkBytes,
              [&](const at::Tensor& part, std::uint64_t offset) {
                if (!chunk_) {
                  chunk_ = std::make_unique<std::uint8_t[]>(kChunkBytes);
                }
                file_.pread_exact(
                    chunk_.get(),
                    static_cast<std::size_t>(part.numel()) * esize,
                    at + offset);
                part.copy_(at::from_blob(
                    chunk_.get(),
                    part.sizes(),
                    at::TensorOptions().dtype(dtype)));
              });
        });
    if (!transfers.empty()) {
      // Only touching runs share a read: a rank reads its share of the
      // checkpoint, not the other ranks' columns between its own.
      detail::DirectReadOptions direct;
      direct.merge_gap = 0;
      direct_->read_into(
          transfers, [](std::size_t) {}, direct);
    }
    return read;
  }

 private:
  std::filesystem::path path_;
  detail::File file_;
  std::unique_ptr<detail::DirectFile> direct_;
  std::unique_ptr<std::uint8_t[]>& chunk_;
};

// Where bytes of a checkpoint tensor lie: a row-major piece of it in one
// file (the whole tensor, but in DCP's sharded layout).
struct Stored {
  std::size_t file = 0; // into Plan::paths
  Shape offsets;        // in the full tensor
  Shape sizes;
  // The piece's first byte in its file; none: a torch.save tensor that is
  // no contiguous view of its record (read through the mapping).
  std::optional<std::uint64_t> begin;
};

// One local tensor and where its values come from.
struct Target {
  std::string local_name;
  std::string checkpoint_name;
  Shape full;
  Shape offsets; // of the local piece in the full tensor
  at::ScalarType dtype = at::kFloat;
  std::uint64_t nbytes = 0; // of the checkpoint's whole tensor
  bool whole = false;       // the piece is the whole tensor, every byte placed
  std::vector<Stored> stored; // the stored pieces the local piece overlaps
};

// A tensor read once, by `reader`, and broadcast to the group.
struct FanOut {
  int reader = 0;
  std::uint64_t nbytes = 0;
};

// The bytes of a contiguous CPU tensor, as a byte tensor viewing them.
at::Tensor bytes_of(const at::Tensor& t) {
  return at::from_blob(
      t.data_ptr(),
      {static_cast<std::int64_t>(t.numel() * t.element_size())},
      at::TensorOptions().dtype(at::kByte));
}

std::string host_name() {
  char buffer[256] = {};
  return ::gethostname(buffer, sizeof(buffer) - 1) == 0 ? buffer : "?";
}

struct Plan {
  // By file: its tensor file (its header, a torch.save file's pickle; none
  // for DCP's shard files, whose headers the layout read) and its path.
  std::vector<std::unique_ptr<detail::TensorFile>> files;
  std::vector<std::filesystem::path> paths;
  std::vector<Target> targets;
  std::vector<std::string> missing;
  std::vector<std::string> mapped_names; // mapped, not ignored
  std::string where;                     // the checkpoint in messages
};

// The pieces of `layout`'s tensor that overlap the local piece at `offsets`
// of `sizes`, with their files numbered through `file_index`.
std::vector<Stored> overlapping(
    const detail::DcpTensor& tensor,
    const Shape& offsets,
    c10::IntArrayRef sizes,
    const std::function<std::size_t(std::size_t)>& file_index) {
  std::vector<Stored> out;
  for (const detail::DcpPiece& p : tensor.pieces) {
    if (detail::intersection({offsets, sizes.vec()}, {p.offsets, p.sizes})) {
      out.push_back(Stored{file_index(p.file), p.offsets, p.sizes, p.begin});
    }
  }
  return out;
}

Plan plan_load(
    const DistributedStateDict& state_dict,
    const std::filesystem::path& target,
    const LoadOptions& options,
    int rank) {
  if (options.map_location().has_value() || options.dtype().has_value()) {
    throw ValueError(
        "A distributed load copies into the local tensors, which decide "
        "device and dtype: LoadOptions::map_location and dtype are refused");
  }
  const detail::KeyFilter filter(options);
  detail::ResolveOptions resolve;
  resolve.filename_pattern = options.filename_pattern();
  resolve.allow_pickle = !options.safe();
  resolve.allow_dcp = true;
  const detail::Checkpoint checkpoint =
      detail::resolve_checkpoint(target, resolve);
  using Kind = detail::Checkpoint::Kind;
  Plan plan;
  plan.where = checkpoint.kind == Kind::kSharded
                   ? checkpoint.index_path.string()
               : checkpoint.kind == Kind::kDcpSharded
                   ? checkpoint.directory.string()
                   : checkpoint.files.front().string();

  // The checkpoint's names, the file holding each, and the alias records.
  std::vector<std::string> keys;
  std::map<std::string, std::string> file_of; // name → file, sharded only
  std::vector<std::pair<std::string, std::string>> aliases;
  std::unique_ptr<detail::TensorFile> single;
  std::optional<detail::DcpLayout> dcp;
  std::map<std::string, const detail::DcpTensor*> dcp_tensor;
  const detail::TensorFileOptions open{LoadBackend::kMmap, std::nullopt, {}};
  if (checkpoint.kind == Kind::kSharded) {
    keys.assign(checkpoint.index.keys.begin(), checkpoint.index.keys.end());
    for (const auto& [shard, names] : checkpoint.index.shards) {
      for (const std::string& name : names) {
        file_of[name] = shard;
      }
    }
    aliases = checkpoint.index.metadata;
  } else if (checkpoint.kind == Kind::kDcpSharded) {
    dcp = detail::read_dcp_layout(checkpoint.directory);
    for (const detail::DcpTensor& t : dcp->tensors) {
      keys.push_back(t.name);
      dcp_tensor.emplace(t.name, &t);
    }
  } else {
    single = detail::open_tensor_file(checkpoint.files.front(), open);
    single->check_format_metadata();
    for (const detail::TensorEntry& entry : single->entries()) {
      keys.push_back(entry.name);
    }
    aliases = single->metadata().value_or(
        std::vector<std::pair<std::string, std::string>>{});
  }
  std::vector<std::string> selected;
  for (const std::string& key : keys) {
    if (filter.selected(key)) {
      selected.push_back(key);
    }
  }
  std::map<std::string, std::string> source_of; // local → checkpoint name
  for (const auto& [checkpoint_name, local_name] :
       map_keys(selected, options.key_mapping(), plan.where)) {
    if (filter.ignored(local_name)) {
      continue;
    }
    plan.mapped_names.push_back(local_name);
    if (state_dict.contains(local_name)) {
      source_of.emplace(local_name, checkpoint_name);
    }
  }
  const std::set<std::string> selected_set(selected.begin(), selected.end());
  for (const auto& [alias, kept] : aliases) {
    if (selected_set.count(kept) == 0 || selected_set.count(alias) != 0) {
      continue;
    }
    const auto local_name = map_key(alias, options.key_mapping());
    if (local_name.has_value() && state_dict.contains(*local_name) &&
        source_of.count(*local_name) == 0) {
      source_of.emplace(*local_name, kept);
    }
  }

  // Each needed file opened once (its header; a torch.save file's pickle),
  // every piece checked against its tensor.
  std::map<std::string, std::size_t> opened;
  const auto file_index = [&](const std::string& file_name, bool parse) {
    auto at = opened.find(file_name);
    if (at == opened.end()) {
      at = opened.emplace(file_name, plan.files.size()).first;
      if (!parse) {
        plan.files.emplace_back();
      } else if (single) {
        plan.files.push_back(std::move(single));
      } else {
        plan.files.push_back(
            detail::open_tensor_file(checkpoint.directory / file_name, open));
        plan.files.back()->check_format_metadata();
      }
      plan.paths.push_back(checkpoint.directory / file_name);
    }
    return at->second;
  };
  const auto size_mismatch = [&](const std::string& name,
                                 const Shape& stored,
                                 const std::string& in,
                                 const Target& t,
                                 const Placement& placement) {
    return RuntimeError(
        "Error(s) in loading state_dict on rank " + std::to_string(rank) +
        ":\n\tsize mismatch for " + name + ": copying a param with shape " +
        detail::torch_size(stored) + " from checkpoint (" + in +
        "), the shape in current model is " + detail::torch_size(t.full) +
        (placement.is_replicate() ? std::string()
                                  : " (the full shape of its placement)") +
        ".");
  };
  for (const auto& item : state_dict) {
    const std::string& name = item.key();
    const auto source = source_of.find(name);
    if (source == source_of.end()) {
      if (!filter.ignored(name)) {
        plan.missing.push_back(name);
      }
      continue;
    }
    const at::Tensor& local = item.value().local;
    Target t;
    t.local_name = name;
    t.checkpoint_name = source->second;
    item.value().placement.locate(local, name, t.full, t.offsets);
    if (dcp) {
      const detail::DcpTensor& stored = *dcp_tensor.at(t.checkpoint_name);
      if (stored.full != t.full) {
        throw size_mismatch(
            name,
            stored.full,
            "the pieces of " + plan.where,
            t,
            item.value().placement);
      }
      t.dtype = torch_dtype_of(stored.dtype, t.checkpoint_name, plan.where);
      t.nbytes = static_cast<std::uint64_t>(detail::volume(stored.full)) *
                 c10::elementSize(t.dtype); // whole bytes: see torch_dtype_of
      t.stored =
          overlapping(stored, t.offsets, local.sizes(), [&](std::size_t f) {
            return file_index(dcp->files[f].path.filename().string(), false);
          });
    } else {
      const std::string file_name =
          checkpoint.kind == Kind::kSharded
              ? file_of.at(t.checkpoint_name)
              : checkpoint.files.front().filename().string();
      const std::size_t f = file_index(file_name, true);
      const detail::TensorFile& file = *plan.files[f];
      const detail::TensorEntry* entry = nullptr;
      for (const detail::TensorEntry& e : file.entries()) {
        if (e.name == t.checkpoint_name) {
          entry = &e;
          break;
        }
      }
      if (entry == nullptr) {
        throw ValueError(
            "Index " + plan.where + " places '" + t.checkpoint_name + "' in " +
            file_name + ", but " + file.display_name() + " does not hold it");
      }
      if (entry->shape != t.full) {
        throw size_mismatch(
            name, entry->shape, file.display_name(), t, item.value().placement);
      }
      t.dtype = dtype_of(*entry, file.display_name());
      t.nbytes = entry->nbytes;
      t.stored.push_back(Stored{
          f,
          Shape(t.full.size(), 0),
          t.full,
          file.file_offset(t.checkpoint_name)});
    }
    // (A piece of the full shape sits at offsets zero: locate() checked
    // that it fits.)
    t.whole =
        local.sizes() == c10::IntArrayRef(t.full) &&
        std::all_of(t.stored.begin(), t.stored.end(), [](const Stored& s) {
          return s.begin.has_value();
        });
    plan.targets.push_back(std::move(t));
  }
  std::sort(plan.missing.begin(), plan.missing.end());
  return plan;
}

} // namespace

DistributedLoadResult load_torch_state_dict(
    DistributedStateDict& state_dict,
    const std::filesystem::path& checkpoint,
    const ProcessGroup& group,
    const LoadOptions& options,
    const DistributedLoadOptions& distributed) {
  const int me = group.rank();
  DistributedLoadResult result;

  // 1. Each rank matches its tensors with the checkpoint's.
  Plan plan;
  std::optional<detail::DirectoryLock> lock;
  detail::run_step(group, "matching each rank's tensors", [&] {
    const std::filesystem::path path = resolve_hub_path(checkpoint);
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      throw ValueError("Checkpoint path " + path.string() + " does not exist");
    }
    if (std::filesystem::is_directory(path, ec)) {
      // Held until the last byte is read: a concurrent save's commit is
      // never seen halfway (see detail/checkpoint_dir.h).
      lock.emplace(detail::lock_for_reading(path));
    }
    plan = plan_load(state_dict, path, options, me);
  });

  // 2. The names every rank loads, for the checkpoint's names no rank holds.
  // With each rank's whole tensors and the bytes of its other pieces, for
  // the choice of who reads what once.
  nlohmann::json mine = {
      {"loaded", nlohmann::json::object()},
      {"local", nlohmann::json::array()},
      {"whole", nlohmann::json::array()},
      {"split_bytes", 0},
      {"host", host_name()}};
  std::uint64_t split_bytes = 0;
  for (const Target& t : plan.targets) {
    mine["loaded"][t.checkpoint_name] = t.nbytes;
    mine["local"].push_back(t.local_name);
    if (t.whole) {
      mine["whole"].push_back(t.checkpoint_name);
    } else {
      split_bytes += t.nbytes; // an upper bound of the piece: the balance
    }
  }
  mine["split_bytes"] = split_bytes;
  std::set<std::string> read_anywhere;           // checkpoint names
  std::set<std::string> loaded_anywhere;         // local names
  std::map<std::string, std::set<int>> whole_on; // checkpoint name → ranks
  std::map<std::string, std::uint64_t> nbytes_of;
  std::vector<std::uint64_t> rank_bytes;
  std::set<std::string> hosts;
  int from_rank = 0;
  for (const std::string& text : detail::all_gather_bytes(
           group, mine.dump(), "exchanging the names each rank loads")) {
    const nlohmann::json theirs = nlohmann::json::parse(text);
    for (const auto& name : theirs.at("whole")) {
      whole_on[name.get<std::string>()].insert(from_rank);
    }
    rank_bytes.push_back(theirs.at("split_bytes").get<std::uint64_t>());
    hosts.insert(theirs.at("host").get<std::string>());
    for (const auto& [name, nbytes] : theirs.at("loaded").items()) {
      nbytes_of[name] = nbytes.get<std::uint64_t>();
    }
    ++from_rank;
    for (const auto& [name, nbytes] : theirs.at("loaded").items()) {
      if (read_anywhere.insert(name).second) {
        result.total_bytes += nbytes.get<std::uint64_t>();
      }
    }
    for (const auto& name : theirs.at("local")) {
      loaded_anywhere.insert(name.get<std::string>());
    }
  }
  // Who reads each tensor several ranks need whole: the holder with the
  // fewest bytes so far, largest tensors first (as saves pick writers).
  std::map<std::string, FanOut> fan_out;
  if (distributed.read_once().value_or(hosts.size() > 1)) {
    std::vector<std::string> shared;
    for (const auto& [name, ranks] : whole_on) {
      if (ranks.size() > 1) {
        shared.push_back(name);
      }
    }
    std::stable_sort(
        shared.begin(), shared.end(), [&](const auto& a, const auto& b) {
          return nbytes_of.at(a) > nbytes_of.at(b);
        });
    for (const std::string& name : shared) {
      int best = *whole_on[name].begin();
      for (const int r : whole_on[name]) {
        if (rank_bytes[r] < rank_bytes[best]) {
          best = r;
        }
      }
      rank_bytes[best] += nbytes_of.at(name);
      fan_out[name] = FanOut{best, nbytes_of.at(name)};
    }
  }
  for (const std::string& name : plan.mapped_names) {
    if (loaded_anywhere.count(name) == 0) {
      result.unexpected_keys.push_back(name);
    }
  }
  std::sort(result.unexpected_keys.begin(), result.unexpected_keys.end());
  result.missing_keys = plan.missing;

  detail::run_step(group, "checking the keys", [&] {
    if (!options.strict() ||
        (result.missing_keys.empty() && result.unexpected_keys.empty())) {
      return;
    }
    std::string message = "Error(s) in loading state_dict on rank " +
                          std::to_string(me) + " from " + plan.where + ":";
    if (!result.missing_keys.empty()) {
      message += "\n\tMissing key(s) in state_dict: " +
                 detail::quoted_list(result.missing_keys, ", ") + ".";
    }
    if (!result.unexpected_keys.empty()) {
      message += "\n\tUnexpected key(s) in state_dict (held by no rank): " +
                 detail::quoted_list(result.unexpected_keys, ", ") + ".";
    }
    throw RuntimeError(message);
  });

  // 3. Each rank reads its pieces, file by file (and what it reads for the
  // group).
  std::map<std::string, at::Tensor> sources; // read for the group
  const bool direct = options.backend() == LoadBackend::kDirect;
  detail::run_step(group, "reading the tensors", [&] {
    const c10::AutoGradMode no_grad(false);
    std::uint64_t planned = 0;
    for (const Target& t : plan.targets) {
      planned +=
          static_cast<std::uint64_t>(state_dict[t.local_name].local.numel()) *
          c10::elementSize(t.dtype);
    }
    // File by file (by each target's first), each file open from its first
    // target to its last.
    std::vector<std::size_t> order(plan.targets.size());
    for (std::size_t i = 0; i < order.size(); ++i) {
      order[i] = i;
    }
    const auto first_file = [&](std::size_t i) {
      const auto& stored = plan.targets[i].stored;
      return stored.empty() ? std::size_t{0} : stored.front().file;
    };
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) {
      return first_file(a) < first_file(b);
    });
    std::vector<std::size_t> last_use(plan.paths.size(), 0);
    for (std::size_t k = 0; k < order.size(); ++k) {
      for (const Stored& s : plan.targets[order[k]].stored) {
        last_use[s.file] = k;
      }
    }
    // Open readers, by file: a piece split across every writer's file of
    // DCP's layout would otherwise hold them all open at once.
    constexpr std::size_t kMaxOpenReaders = 16;
    std::map<std::size_t, PieceReader> readers;
    std::unique_ptr<std::uint8_t[]> chunk; // shared by the readers
    // Fills `dest` (target t's piece at `offsets`, or the whole tensor)
    // from the stored pieces it overlaps: the overlap's runs in each.
    const auto read =
        [&](const Target& t, const at::Tensor& dest, const Shape& offsets) {
          std::uint64_t bytes = 0;
          for (const Stored& s : t.stored) {
            const auto shared = detail::intersection(
                {offsets, dest.sizes().vec()}, {s.offsets, s.sizes});
            if (!shared) {
              continue;
            }
            at::Tensor part = dest;
            Shape within(s.offsets.size());
            for (std::size_t d = 0; d < s.offsets.size(); ++d) {
              part = part.narrow(
                  static_cast<std::int64_t>(d),
                  shared->offsets[d] - offsets[d],
                  shared->sizes[d]);
              within[d] = shared->offsets[d] - s.offsets[d];
            }
            if (s.begin.has_value()) {
              auto reader = readers.find(s.file);
              if (reader == readers.end()) {
                if (readers.size() >= kMaxOpenReaders) {
                  readers.erase(readers.begin()); // opened again if needed
                }
                reader = readers
                             .emplace(
                                 std::piecewise_construct,
                                 std::forward_as_tuple(s.file),
                                 std::forward_as_tuple(
                                     plan.paths[s.file], direct, &chunk))
                             .first;
              }
              bytes +=
                  reader->second.read(part, s.sizes, within, t.dtype, *s.begin);
              continue;
            }
            // A torch.save tensor that is no contiguous view of its record:
            // its piece, through the mapping.
            at::Tensor whole = plan.files[s.file]->get(t.checkpoint_name);
            for (std::size_t d = 0; d < within.size(); ++d) {
              whole = whole.narrow(
                  static_cast<std::int64_t>(d), within[d], part.size(d));
            }
            part.copy_(whole);
            bytes += static_cast<std::uint64_t>(part.numel()) *
                     c10::elementSize(t.dtype);
          }
          return bytes;
        };
    std::set<detail::ViewKey> done; // tied locals are read once
    for (std::size_t k = 0; k < order.size(); ++k) {
      const Target& t = plan.targets[order[k]];
      at::Tensor& local = state_dict[t.local_name].local;
      result.loaded_keys.push_back(t.local_name);
      // A piece of a tensor others need whole is this rank's own to read.
      const auto fanned =
          t.whole ? fan_out.find(t.checkpoint_name) : fan_out.end();
      if (fanned != fan_out.end()) {
        if (fanned->second.reader == me &&
            sources.count(t.checkpoint_name) == 0) {
          // Read for the group: into the local tensor when it holds the
          // file's bytes as they are, else into a copy that is broadcast.
          at::Tensor source =
              takes_file_bytes(local, t.dtype)
                  ? local
                  : at::empty(t.full, at::TensorOptions().dtype(t.dtype));
          result.bytes_read += read(t, source, Shape(t.full.size(), 0));
          if (!source.is_same(local)) {
            local.copy_(source);
          }
          sources.emplace(t.checkpoint_name, source);
          done.insert(detail::view_key(local));
        }
        // (Else received, or already read for the group.)
      } else if (
          local.numel() == 0 || done.insert(detail::view_key(local)).second) {
        // (Ties as the distributed save finds them: read once.)
        result.bytes_read += read(t, local, t.offsets);
        if (options.progress()) {
          options.progress()(Progress{
              t.stored.empty()
                  ? std::string()
                  : plan.paths[t.stored.front().file].filename().string(),
              t.local_name,
              result.bytes_read,
              planned});
        }
      }
      for (const Stored& s : t.stored) {
        if (last_use[s.file] == k) {
          readers.erase(s.file);
          plan.files[s.file].reset();
        }
      }
    }
  });
  // 4. The tensors read once, broadcast chunk by chunk, straight into the
  // holders' local tensors where they take the file's bytes.
  if (!fan_out.empty()) {
    detail::run_step(group, "sharing the tensors read once", [&] {
      const c10::AutoGradMode no_grad(false);
      at::Tensor chunk; // for ranks that do not hold a tensor
      for (const auto& [name, fan] : fan_out) {
        std::vector<const Target*> mine_of;
        for (const Target& t : plan.targets) {
          if (t.whole && t.checkpoint_name == name) {
            mine_of.push_back(&t);
          }
        }
        at::Tensor staged; // a holder's copy in the file's dtype and layout
        at::Tensor bytes;
        if (fan.reader == me) {
          bytes = bytes_of(sources.at(name));
        } else if (!mine_of.empty()) {
          const Target& t = *mine_of.front();
          at::Tensor& local = state_dict[t.local_name].local;
          staged = takes_file_bytes(local, t.dtype)
                       ? local
                       : at::empty(t.full, at::TensorOptions().dtype(t.dtype));
          bytes = bytes_of(staged);
        }
        for (std::uint64_t at = 0; at < fan.nbytes; at += kChunkBytes) {
          const auto n = static_cast<std::int64_t>(
              std::min<std::uint64_t>(kChunkBytes, fan.nbytes - at));
          at::Tensor view;
          if (bytes.defined()) {
            view = bytes.narrow(0, static_cast<std::int64_t>(at), n);
          } else {
            if (!chunk.defined()) {
              chunk = at::empty(
                  {static_cast<std::int64_t>(kChunkBytes)},
                  at::TensorOptions().dtype(at::kByte));
            }
            view = chunk.narrow(0, 0, n);
          }
          detail::broadcast_tensor(
              group, view, fan.reader, "broadcasting '" + name + "'");
        }
        if (mine_of.empty()) {
          continue;
        }
        const at::Tensor& first = state_dict[mine_of.front()->local_name].local;
        if (fan.reader != me) {
          result.bytes_received += fan.nbytes;
          if (!staged.is_same(first)) {
            state_dict[mine_of.front()->local_name].local.copy_(staged);
          }
        }
        // Other names of this rank with the same source (an alias record
        // and its kept tensor held apart).
        for (std::size_t k = 1; k < mine_of.size(); ++k) {
          at::Tensor& other = state_dict[mine_of[k]->local_name].local;
          if (!other.is_same(first)) {
            other.copy_(first);
          }
        }
      }
    });
  }
  std::sort(result.loaded_keys.begin(), result.loaded_keys.end());
  return result;
}

DistributedLoadResult load_torch_model(
    torch::nn::Module& model,
    const OrderedMap<Placement>& placements,
    const std::filesystem::path& checkpoint,
    const ProcessGroup& group,
    const LoadOptions& options,
    const DistributedLoadOptions& distributed) {
  DistributedStateDict local = distribute(state_dict(model), placements);
  return load_torch_state_dict(local, checkpoint, group, options, distributed);
}

} // namespace torchser
