// Distributed saving: the ranks describe their pieces to each other, check
// them together, agree on the plan a single-process save of the assembled
// state dict would make (the same code makes it, over stand-in tensors of the
// full shapes), and write their own bytes at their final offsets. Rank 0
// creates the files, writes their headers and commits once every rank's
// bytes are durable.

#include <torchser/distributed.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include <torchser/errors.h>
#include <torchser/module.h>
#include <torchser/safetensors.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/checksum.h"
#include "torchser/detail/collectives.h"
#include "torchser/detail/file.h"
#include "torchser/detail/parallel.h"
#include "torchser/detail/pickle_writer.h"
#include "torchser/detail/python_format.h"
#include "torchser/detail/save_plan.h"
#include "torchser/detail/tiling.h"
#include "torchser/detail/zip.h"

namespace torchser {
namespace {

using detail::Shape;
using detail::shape_text;
using detail::volume;

std::string ranks_text(const std::vector<int>& ranks) {
  std::string out;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    out += (i == 0 ? "" : (i + 1 == ranks.size() ? " and " : ", ")) +
           std::to_string(ranks[i]);
  }
  return (ranks.size() == 1 ? "rank " : "ranks ") + out;
}

} // namespace

// ---------------------------------------------------------------------------
// Placements

Placement Placement::replicate() {
  return Placement();
}

Placement Placement::shard(
    std::int64_t dim, std::int64_t full_size, std::int64_t offset) {
  Placement p;
  p.kind_ = Kind::kShard;
  p.dim_ = dim;
  p.full_size_ = full_size;
  p.offset_ = offset;
  return p;
}

Placement Placement::block(Shape full_shape, Shape offsets) {
  Placement p;
  p.kind_ = Kind::kBlock;
  p.full_shape_ = std::move(full_shape);
  p.offsets_ = std::move(offsets);
  return p;
}

bool Placement::operator==(const Placement& other) const {
  return kind_ == other.kind_ && dim_ == other.dim_ &&
         full_size_ == other.full_size_ && offset_ == other.offset_ &&
         full_shape_ == other.full_shape_ && offsets_ == other.offsets_;
}

void Placement::locate(
    const at::Tensor& local,
    const std::string& name,
    Shape& full_shape,
    Shape& offsets) const {
  if (!local.defined()) {
    throw ValueError(
        "Tensor '" + name + "' is undefined: there is nothing to save.");
  }
  const Shape sizes(local.sizes().begin(), local.sizes().end());
  full_shape = sizes;
  offsets.assign(sizes.size(), 0);
  const auto fail = [&](const std::string& why) {
    throw ValueError(
        "Tensor '" + name + "': its local shape " + shape_text(sizes) +
        " does not fit its placement: " + why);
  };
  switch (kind_) {
    case Kind::kReplicate:
      return;
    case Kind::kShard: {
      const auto dims = static_cast<std::int64_t>(sizes.size());
      // Negative dims count from the end, as DTensor's Shard(-1).
      const std::int64_t dim = dim_ < 0 ? dim_ + dims : dim_;
      if (dim < 0 || dim >= dims) {
        fail(
            "shard(dim=" + std::to_string(dim_) + ") needs a dimension in [" +
            std::to_string(-dims) + ", " + std::to_string(dims) +
            ") of a tensor with " + std::to_string(dims) + " dimensions");
      }
      full_shape[dim] = full_size_;
      offsets[dim] = offset_;
      break;
    }
    case Kind::kBlock:
      if (full_shape_.size() != sizes.size() ||
          offsets_.size() != sizes.size()) {
        fail(
            "block(full_shape=" + shape_text(full_shape_) + ", offsets=" +
            shape_text(offsets_) + ") must give every one of its " +
            std::to_string(sizes.size()) + " dimensions");
      }
      full_shape = full_shape_;
      offsets = offsets_;
      break;
  }
  for (std::size_t d = 0; d < sizes.size(); ++d) {
    if (offsets[d] < 0 || full_shape[d] < 0 ||
        offsets[d] > full_shape[d] - sizes[d]) {
      fail(
          "in dimension " + std::to_string(d) + ", offset " +
          std::to_string(offsets[d]) + " plus size " +
          std::to_string(sizes[d]) + " leaves the full size " +
          std::to_string(full_shape[d]));
    }
  }
}

DistributedStateDict distribute(
    const StateDict& local, const OrderedMap<Placement>& placements) {
  for (const auto& item : placements) {
    if (!local.contains(item.key())) {
      throw ValueError(
          "distribute: a placement is given for '" + item.key() +
          "', which is not in the local state dict");
    }
  }
  // A tied name without a placement of its own takes its tie's (a module's
  // lm_head.weight that is its embed.weight).
  std::map<
      std::tuple<const void*, std::int64_t, std::vector<std::int64_t>>,
      Placement>
      placed;
  const auto view_of = [](const at::Tensor& t) {
    return std::make_tuple(
        t.defined() && t.has_storage() ? t.storage().data_ptr().get() : nullptr,
        t.defined() ? t.storage_offset() : 0,
        t.defined() ? t.sizes().vec() : std::vector<std::int64_t>{});
  };
  for (const auto& item : local) {
    const Placement* placement = placements.find(item.key());
    if (placement != nullptr && std::get<0>(view_of(item.value())) != nullptr) {
      placed.try_emplace(view_of(item.value()), *placement);
    }
  }
  DistributedStateDict out;
  out.reserve(local.size());
  for (const auto& item : local) {
    const Placement* placement = placements.find(item.key());
    if (placement == nullptr) {
      const auto it = placed.find(view_of(item.value()));
      if (it != placed.end() && std::get<0>(it->first) != nullptr) {
        placement = &it->second;
      }
    }
    out.insert(
        item.key(),
        DistributedTensor{
            item.value(),
            placement != nullptr ? *placement : Placement::replicate()});
  }
  return out;
}

std::pair<std::int64_t, std::int64_t> chunk_range(
    std::int64_t full_size, int rank, int world_size) {
  if (world_size <= 0 || rank < 0 || rank >= world_size || full_size < 0) {
    throw ValueError(
        "chunk_range: rank " + std::to_string(rank) + " of " +
        std::to_string(world_size) + " for size " + std::to_string(full_size) +
        " is not a valid split");
  }
  const std::int64_t per =
      full_size / world_size + (full_size % world_size != 0 ? 1 : 0);
  const std::int64_t begin = std::min(full_size, per * rank);
  const std::int64_t end = std::min(full_size, begin + per);
  return {begin, end - begin};
}

namespace {

// ---------------------------------------------------------------------------
// What each rank tells the others

struct Piece {
  std::string name;
  c10::ScalarType dtype = c10::ScalarType::Float;
  Shape full;
  Shape offsets;
  Shape sizes;
  bool replicated = true;
  /// The first name of its tie group on this rank (itself when untied).
  std::string tie;
};

struct RankView {
  std::string host;
  std::vector<Piece> pieces;
};

nlohmann::json to_json(const RankView& view) {
  nlohmann::json pieces = nlohmann::json::array();
  for (const Piece& p : view.pieces) {
    pieces.push_back(
        {{"n", p.name},
         {"d", static_cast<int>(p.dtype)},
         {"f", p.full},
         {"o", p.offsets},
         {"s", p.sizes},
         {"r", p.replicated},
         {"t", p.tie}});
  }
  return {{"host", view.host}, {"pieces", pieces}};
}

RankView from_json(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  RankView view;
  view.host = j.at("host").get<std::string>();
  for (const auto& p : j.at("pieces")) {
    view.pieces.push_back(Piece{
        p.at("n").get<std::string>(),
        static_cast<c10::ScalarType>(p.at("d").get<int>()),
        p.at("f").get<Shape>(),
        p.at("o").get<Shape>(),
        p.at("s").get<Shape>(),
        p.at("r").get<bool>(),
        p.at("t").get<std::string>()});
  }
  return view;
}

std::string host_name() {
  char buffer[256] = {};
  if (::gethostname(buffer, sizeof(buffer) - 1) != 0) {
    return "?";
  }
  return buffer;
}

// This rank's description, checked on its own: placements that fit, dtypes
// the format has, ties that are whole tensors with one placement.
RankView describe(const DistributedStateDict& local) {
  RankView view;
  view.host = host_name();
  // A view of a storage → the first name holding it.
  std::map<detail::ViewKey, std::string> tie_of;
  for (const auto& item : local) {
    const std::string& name = item.key();
    const DistributedTensor& dt = item.value();
    Piece piece;
    piece.name = name;
    dt.placement.locate(dt.local, name, piece.full, piece.offsets);
    const at::Tensor& t = dt.local;
    if (t.layout() != at::kStrided || t.is_meta()) {
      throw ValueError(
          "Tensor '" + name +
          "' is not a dense tensor with data (sparse or meta tensors cannot "
          "be saved).");
    }
    try {
      to_safetensors_dtype(t.scalar_type());
    } catch (const ValueError& e) {
      throw ValueError("Tensor '" + name + "': " + e.what());
    }
    piece.dtype = t.scalar_type();
    piece.sizes.assign(t.sizes().begin(), t.sizes().end());
    piece.replicated = dt.placement.is_replicate();
    // The full tensor's size must be expressible (volume checks overflow).
    detail::volume(piece.full);
    piece.tie = name;
    if (t.numel() > 0 && t.storage().nbytes() > 0) {
      const auto [it, first] = tie_of.try_emplace(detail::view_key(t), name);
      if (!first) {
        const DistributedTensor& other = local[it->second];
        if (!(other.placement == dt.placement)) {
          throw ValueError(
              "Tensors '" + it->second + "' and '" + name +
              "' are the same tensor (tied) but have different placements");
        }
        piece.tie = it->second;
      }
    }
    view.pieces.push_back(std::move(piece));
  }
  return view;
}

// ---------------------------------------------------------------------------
// The full state dict, as every rank sees it after the exchange

struct Holder {
  int rank;
  Shape offsets;
  Shape sizes;
};

struct Group { // one storage of the full state dict: a tensor and its ties
  std::vector<std::string> names; // in the full state dict's order
  c10::ScalarType dtype;
  Shape full;
  bool replicated;
  std::vector<Holder> holders; // one per rank that holds it
  int writer = -1;             // replicated: the rank that writes it
};

struct FullStateDict {
  std::vector<std::string> order;
  std::map<std::string, std::size_t> group_of;
  std::vector<Group> groups;
};

// Each rank's names in its own order, merged: names a rank has that no
// earlier rank had go just before the next name it shares with them, or at
// the end (so the stages of a pipeline follow each other).
std::vector<std::string> merged_order(const std::vector<RankView>& views) {
  std::list<std::string> order;
  std::unordered_map<std::string, std::list<std::string>::iterator> at;
  for (const RankView& view : views) {
    std::vector<std::string> pending;
    for (const Piece& p : view.pieces) {
      const auto it = at.find(p.name);
      if (it == at.end()) {
        pending.push_back(p.name);
        continue;
      }
      for (const std::string& name : pending) {
        at[name] = order.insert(it->second, name);
      }
      pending.clear();
    }
    for (const std::string& name : pending) {
      at[name] = order.insert(order.end(), name);
    }
  }
  return {order.begin(), order.end()};
}

FullStateDict assemble(const std::vector<RankView>& views) {
  FullStateDict full;
  full.order = merged_order(views);
  if (full.order.empty()) {
    throw ValueError(
        "The distributed state dict is empty on every rank: there is nothing "
        "to save.");
  }
  // Union of the ties every rank declares.
  std::map<std::string, std::string> parent;
  for (const std::string& n : full.order) {
    parent[n] = n;
  }
  const std::function<std::string(const std::string&)> root =
      [&](const std::string& n) {
        return parent[n] == n ? n : parent[n] = root(parent[n]);
      };
  for (const RankView& view : views) {
    for (const Piece& p : view.pieces) {
      const std::string a = root(p.name);
      const std::string b = root(p.tie);
      if (a != b) {
        parent[std::max(a, b)] = std::min(a, b);
      }
    }
  }
  std::map<std::string, std::size_t> group_of_root;
  for (const std::string& n : full.order) {
    const auto [it, inserted] =
        group_of_root.try_emplace(root(n), full.groups.size());
    if (inserted) {
      full.groups.emplace_back();
    }
    full.groups[it->second].names.push_back(n);
    full.group_of[n] = it->second;
  }

  // Every name: one dtype, one full shape, one kind of placement; ties that
  // every rank holding two of the names declares.
  std::map<std::string, std::vector<std::pair<int, const Piece*>>> by_name;
  for (std::size_t r = 0; r < views.size(); ++r) {
    for (const Piece& p : views[r].pieces) {
      by_name[p.name].emplace_back(static_cast<int>(r), &p);
    }
  }
  for (Group& group : full.groups) {
    const Piece* first = nullptr;
    int first_rank = -1;
    std::map<int, const Piece*> on_rank;
    for (const std::string& name : group.names) {
      for (const auto& held : by_name[name]) {
        // (Named copies: C++17 lambdas cannot capture structured bindings.)
        const int rank = held.first;
        const Piece* const piece = held.second;
        if (first == nullptr) {
          first = piece;
          first_rank = rank;
        }
        const auto disagree = [&](const std::string& what,
                                  const std::string& a,
                                  const std::string& b) {
          throw ValueError(
              "Tensor '" + name + "'" +
              (name == first->name ? "" : " (tied to '" + first->name + "')") +
              " has " + what + " " + a + " on rank " +
              std::to_string(first_rank) + " but " + b + " on rank " +
              std::to_string(rank) +
              ": every rank must describe the same "
              "full tensor");
        };
        if (piece->dtype != first->dtype) {
          disagree(
              "dtype",
              c10::toString(first->dtype),
              c10::toString(piece->dtype));
        }
        if (piece->full != first->full) {
          disagree(
              "full shape", shape_text(first->full), shape_text(piece->full));
        }
        if (piece->replicated != first->replicated) {
          disagree(
              "placement",
              first->replicated ? "replicate" : "a shard",
              piece->replicated ? "replicate" : "a shard");
        }
        const auto [it, inserted] = on_rank.try_emplace(rank, piece);
        if (!inserted && it->second->tie != piece->tie) {
          throw ValueError(
              "Tensors '" + it->second->name + "' and '" + name +
              "' are tied on some rank but not on rank " +
              std::to_string(rank) +
              ": every rank holding both must tie them (or none)");
        }
      }
    }
    group.dtype = first->dtype;
    group.full = first->full;
    group.replicated = first->replicated;
    for (const auto& [rank, piece] : on_rank) {
      group.holders.push_back(Holder{rank, piece->offsets, piece->sizes});
    }
  }

  // Shards: no two overlap, and together they cover the tensor.
  for (const Group& group : full.groups) {
    if (group.replicated) {
      continue;
    }
    std::vector<detail::TilePiece> pieces;
    std::vector<int> ranks;
    for (const Holder& h : group.holders) {
      pieces.push_back({h.offsets, h.sizes, "rank " + std::to_string(h.rank)});
      ranks.push_back(h.rank);
    }
    detail::check_tiling(
        group.names.front(),
        group.full,
        pieces,
        "on " + ranks_text(ranks),
        "each element must be held by one rank (replicate tensors that "
        "several ranks hold whole)");
  }

  // Each replicated tensor is written by the holder with the fewest bytes so
  // far, largest tensors first.
  std::vector<std::uint64_t> bytes(views.size(), 0);
  std::vector<std::size_t> replicated;
  for (std::size_t g = 0; g < full.groups.size(); ++g) {
    const Group& group = full.groups[g];
    if (group.replicated) {
      replicated.push_back(g);
      continue;
    }
    for (const Holder& h : group.holders) {
      bytes[h.rank] += static_cast<std::uint64_t>(volume(h.sizes)) *
                       c10::elementSize(group.dtype);
    }
  }
  const auto nbytes = [&](std::size_t g) {
    return static_cast<std::uint64_t>(volume(full.groups[g].full)) *
           c10::elementSize(full.groups[g].dtype);
  };
  std::stable_sort(
      replicated.begin(), replicated.end(), [&](std::size_t a, std::size_t b) {
        return nbytes(a) > nbytes(b);
      });
  for (const std::size_t g : replicated) {
    Group& group = full.groups[g];
    int best = group.holders.front().rank;
    for (const Holder& h : group.holders) {
      if (bytes[h.rank] < bytes[best]) {
        best = h.rank;
      }
    }
    group.writer = best;
    bytes[best] += nbytes(g);
  }
  return full;
}

// Stand-ins for the assembled tensors: the full shapes and dtypes, one per
// storage (ties share one), at addresses that are never read, so that the
// single-process planner and header builder see what a real assembled state
// dict would show them. With `cast`, floating-point tensors have that dtype,
// as SaveOptions::dtype gives torch.save's records.
StateDict stand_ins(
    const FullStateDict& full,
    std::optional<c10::ScalarType> cast = std::nullopt) {
  std::vector<at::Tensor> per_group;
  std::uintptr_t address = std::uintptr_t{1} << 40;
  for (const Group& group : full.groups) {
    const c10::ScalarType dtype =
        cast.has_value() && c10::isFloatingType(group.dtype) ? *cast
                                                             : group.dtype;
    const std::uint64_t size = static_cast<std::uint64_t>(volume(group.full)) *
                               c10::elementSize(dtype);
    per_group.push_back(at::from_blob(
        reinterpret_cast<void*>(address),
        group.full,
        [](void*) {},
        at::TensorOptions().dtype(dtype)));
    address += (size + 4095) / 4096 * 4096 + 4096;
  }
  StateDict out;
  out.reserve(full.order.size());
  for (const std::string& name : full.order) {
    out.insert(name, per_group[full.group_of.at(name)]);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Writing one rank's bytes

constexpr std::size_t kChunkBytes = std::size_t{16} << 20;

// Runs at least this long are contiguous enough for the disk to start on as
// soon as they are written. Shorter ones (column pieces) interleave with
// other ranks' runs: written back early, they would go out as small
// fragments, so they wait for the flush after every rank's writes, when
// their pages are contiguous.
constexpr std::uint64_t kLongRun = std::uint64_t{1} << 20;

// One run of bytes a rank wrote, with its CRC when the files need one (the
// CRC-32C of SaveOptions::checksums, ZIP's CRC-32 of torch.save records):
// rank 0 folds them, in file order, into each tensor's or record's.
struct WrittenRun {
  std::uint32_t file;
  std::uint32_t crc;
  std::uint64_t offset;
  std::uint64_t size;
};

// A CRC continued over more bytes: detail::crc32c's or detail::crc32's.
using CrcFunction = std::uint32_t (*)(std::uint32_t, const void*, std::size_t);
std::uint32_t continue_crc32c(std::uint32_t crc, const void* d, std::size_t n) {
  return detail::crc32c(d, n, crc);
}
std::uint32_t continue_crc32(std::uint32_t crc, const void* d, std::size_t n) {
  return detail::crc32(crc, d, n);
}

class PieceWriter {
 public:
  // `runs`, when given, receives every run written with its CRC by `crc`.
  PieceWriter(
      int fd,
      std::filesystem::path path,
      std::uint32_t file,
      std::vector<WrittenRun>* runs,
      CrcFunction crc)
      : fd_(fd), path_(std::move(path)), file_(file), runs_(runs), crc_(crc) {}

  // `local`'s elements, placed at `offsets` of a row-major tensor of shape
  // `full` whose first byte is at `base` in the file, in `dtype`.
  // With `start_writeback`, the disk starts on the piece's bytes when its
  // runs are long (see the caller).
  std::uint64_t write(
      const at::Tensor& local,
      const Shape& full,
      const Shape& offsets,
      c10::ScalarType dtype,
      std::uint64_t base,
      bool start_writeback) {
    const std::size_t esize = c10::elementSize(dtype);
    std::uint64_t written = 0;
    std::uint64_t shortest = UINT64_MAX;
    std::uint64_t span_begin = UINT64_MAX;
    std::uint64_t span_end = 0;
    detail::for_each_block(
        local,
        full,
        offsets,
        [&](const at::Tensor& run, std::int64_t element, std::int64_t count) {
          const std::uint64_t at =
              base + static_cast<std::uint64_t>(element) * esize;
          std::uint32_t crc = 0;
          block(run, at, esize, dtype, runs_ != nullptr ? &crc : nullptr);
          const std::uint64_t bytes = static_cast<std::uint64_t>(count) * esize;
          if (runs_ != nullptr) {
            runs_->push_back(WrittenRun{file_, crc, at, bytes});
          }
          written += bytes;
          shortest = std::min(shortest, bytes);
          span_begin = std::min(span_begin, at);
          span_end = std::max(span_end, at + bytes);
        });
    if (start_writeback && written > 0 && shortest >= kLongRun) {
      // Only a hint, which does not wait: the flush makes the bytes durable.
      (void)::sync_file_range(
          fd_,
          static_cast<off_t>(span_begin),
          static_cast<off_t>(span_end - span_begin),
          SYNC_FILE_RANGE_WRITE);
    }
    return written;
  }

 private:
  // A block the file holds contiguously: written straight from the tensor
  // when its bytes are already what the file holds, else through the chunk.
  // `crc`, when given, continues over the bytes in file order.
  void block(
      const at::Tensor& src,
      std::uint64_t offset,
      std::size_t esize,
      c10::ScalarType dtype,
      std::uint32_t* crc) {
    if (src.is_cpu() && src.scalar_type() == dtype && src.is_contiguous()) {
      pwrite_all(
          src.data_ptr(),
          static_cast<std::uint64_t>(src.numel()) * esize,
          offset,
          crc);
      return;
    }
    detail::for_each_chunk(
        src, esize, kChunkBytes, [&](const at::Tensor& part, std::uint64_t at) {
          if (!chunk_) {
            chunk_ = std::make_unique<std::uint8_t[]>(kChunkBytes);
          }
          at::from_blob(
              chunk_.get(), part.sizes(), at::TensorOptions().dtype(dtype))
              .copy_(part);
          pwrite_all(
              chunk_.get(),
              static_cast<std::uint64_t>(part.numel()) * esize,
              offset + at,
              crc);
        });
  }

  void pwrite_all(
      const void* data,
      std::uint64_t size,
      std::uint64_t offset,
      std::uint32_t* crc) {
    if (crc != nullptr) {
      *crc = crc_(*crc, data, static_cast<std::size_t>(size));
    }
    detail::pwrite_all(fd_, path_, data, size, offset);
  }

  int fd_;
  std::filesystem::path path_;
  std::uint32_t file_;
  std::vector<WrittenRun>* runs_;
  CrcFunction crc_;
  std::unique_ptr<std::uint8_t[]> chunk_;
};

// One file of the checkpoint as every rank knows it.
struct PlannedFile {
  std::string name;
  // The bytes rank 0 writes, (offset, bytes), with placeholder CRCs: a
  // safetensors file's length and header, a torch.save archive's headers,
  // pickle and central directory. The first run starts the file.
  std::vector<std::pair<std::uint64_t, std::string>> fixed;
  std::uint64_t size = 0;
  std::map<std::string, std::uint64_t> begin; // tensor → first byte in file
  // What each CRC covers, in file order: (tensor or record, first, end).
  std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>> checked;
  // What makes the final bytes once the CRCs are known: one of the two.
  std::unique_ptr<SafetensorsWriter> writer;
  std::optional<detail::TorchSaveArchive> archive;

  const std::string& head() const {
    return fixed.front().second;
  }
  // The runs of `fixed` again, with the CRCs in place.
  std::vector<std::pair<std::uint64_t, std::string>> final_bytes(
      const std::vector<std::uint32_t>& crcs) const {
    if (writer) {
      return {{8, writer->final_header(crcs)}};
    }
    return detail::torch_save_layout(*archive, crcs).fixed;
  }
};

std::string encode_length(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  }
  return out;
}

// The folder a save's files are named from: the checkpoint directory's
// parent (the staging directory of a swap sits there), canonical.
std::filesystem::path directory_base(const std::filesystem::path& directory) {
  return std::filesystem::weakly_canonical(directory).parent_path();
}

// Opens a file rank 0 created and checks it is that file (the ranks share a
// filesystem), by its header.
detail::File open_shared(
    const std::filesystem::path& path,
    const PlannedFile& file,
    const ProcessGroup& group,
    const std::string& host,
    const std::string& host0) {
  std::optional<detail::File> opened;
  std::string why;
  try {
    opened = detail::File::open_write(path);
    std::string seen(file.head().size(), '\0');
    const ssize_t n = ::pread(opened->fd(), seen.data(), seen.size(), 0);
    seen.resize(n < 0 ? 0 : static_cast<std::size_t>(n));
    if (seen != file.head()) {
      why = "see rank 0's header in '" + path.string() + "'";
    }
  } catch (const OSError& e) {
    why = "open '" + path.string() + "' (" + e.what() + ")";
  }
  if (!why.empty()) {
    throw OSError(
        "rank " + std::to_string(group.rank()) + " (host " + host +
        ") cannot " + why + ", which rank 0 (host " + host0 + ") created" +
        ". A distributed save writes every file from every rank, so the "
        "directory must be on a filesystem all ranks share (NFS, Lustre, a "
        "local disk for ranks of one host); ranks without one are not "
        "supported.");
  }
  return std::move(*opened);
}

// Each tensor's or record's CRC from the runs the ranks wrote, folded in
// file order, written over the placeholders.
void write_crcs(
    const std::vector<PlannedFile>& files,
    std::vector<WrittenRun> runs,
    const std::vector<std::string>& temporaries,
    bool durable) {
  std::sort(
      runs.begin(), runs.end(), [](const WrittenRun& a, const WrittenRun& b) {
        return std::tie(a.file, a.offset) < std::tie(b.file, b.offset);
      });
  std::size_t next = 0;
  for (std::uint32_t f = 0; f < files.size(); ++f) {
    const PlannedFile& file = files[f];
    const auto combine =
        file.writer ? detail::crc32c_combine : detail::crc32_combine;
    std::vector<std::uint32_t> crcs;
    for (const auto& [name, begin, end] : file.checked) {
      std::uint32_t crc = 0;
      std::uint64_t at = begin;
      while (next < runs.size() && runs[next].file == f &&
             runs[next].offset < end) {
        const WrittenRun& run = runs[next++];
        if (run.offset != at) {
          throw RuntimeError(
              "distributed save: the ranks' writes of '" + name + "' in " +
              file.name + " leave bytes " + std::to_string(at) + "…" +
              std::to_string(run.offset) + " unaccounted for");
        }
        crc = combine(crc, run.crc, run.size);
        at += run.size;
      }
      if (at != end) {
        throw RuntimeError(
            "distributed save: the ranks' writes of '" + name + "' in " +
            file.name + " end at byte " + std::to_string(at) + ", not " +
            std::to_string(end));
      }
      crcs.push_back(crc);
    }
    const std::filesystem::path path = temporaries[f];
    const detail::File out = detail::File::open_write(path);
    for (const auto& [offset, bytes] : file.final_bytes(crcs)) {
      detail::pwrite_all(out.fd(), path, bytes.data(), bytes.size(), offset);
    }
    if (durable && ::fdatasync(out.fd()) != 0) {
      detail::throw_os_error("Cannot flush", path, errno);
    }
  }
}

} // namespace

DistributedSaveResult save_torch_state_dict(
    const DistributedStateDict& state_dict,
    const std::filesystem::path& save_directory,
    const ProcessGroup& group,
    const SaveOptions& options) {
  const int me = group.rank();

  // 1. Each rank checks its own part, under the written names.
  DistributedStateDict local;
  SaveOptions written = options;
  RankView mine;
  detail::run_step(group, "checking each rank's state dict", [&] {
    if (!options.key_mapping().empty()) {
      std::vector<std::string> names;
      for (const auto& item : state_dict) {
        names.push_back(item.key());
      }
      for (const auto& [from, to] :
           map_keys(names, options.key_mapping(), "the state dict")) {
        local.insert(to, state_dict[from]);
      }
      written = detail::without_key_mapping(options);
    } else {
      local = state_dict;
    }
    mine = describe(local);
    std::error_code ec;
    if (!std::filesystem::is_directory(save_directory, ec)) {
      detail::throw_os_error("Cannot save into", save_directory, ENOENT);
    }
  });

  // 2. Everyone learns everyone's part, and checks the whole the same way.
  const std::vector<std::string> texts = detail::all_gather_bytes(
      group, to_json(mine).dump(), "exchanging the tensors' placements");
  std::vector<RankView> views;
  for (const std::string& text : texts) {
    views.push_back(from_json(text));
  }
  const FullStateDict full = assemble(views);

  // The plan, made by every rank alike: options that fail on one rank, or
  // that differ between ranks, fail every rank here, before any file.
  detail::SavePlan plan;
  std::vector<PlannedFile> files;
  std::string plan_digest;
  detail::run_step(group, "planning the files", [&] {
    plan = detail::plan_save(stand_ins(full), written);
    const auto& shards = plan.split.filename_to_tensors.items();
    // torch.save records hold the cast bytes; safetensors headers are
    // built by the writer from the dtype.
    const StateDict records = plan.safe || !written.dtype().has_value()
                                  ? StateDict()
                                  : stand_ins(full, written.dtype());
    for (std::size_t i = 0; i < shards.size(); ++i) {
      PlannedFile file;
      file.name = shards[i].key();
      if (plan.safe) {
        file.writer = std::make_unique<SafetensorsWriter>(
            plan.shard_dict(i),
            plan.file_metadata(),
            true,
            written.dtype(),
            written.checksums());
        const SafetensorsWriter& writer = *file.writer;
        const std::string head =
            encode_length(writer.header().size()) + writer.header();
        file.fixed.emplace_back(0, head);
        file.size = writer.size();
        for (const SafetensorsTensorInfo& info : writer.tensors()) {
          file.begin[info.name] = head.size() + info.begin;
          file.checked.emplace_back(
              info.name, head.size() + info.begin, head.size() + info.end);
        }
      } else {
        StateDict shard = plan.shard_dict(i);
        if (!records.is_empty()) {
          for (auto& item : shard) {
            item.value() = records[item.key()];
          }
        }
        const std::string stem = std::filesystem::path(file.name).stem();
        file.archive =
            detail::torch_save_archive(shard, stem.empty() ? "archive" : stem);
        const detail::TorchSaveLayout layout = detail::torch_save_layout(
            *file.archive,
            std::vector<std::uint32_t>(file.archive->records.size(), 0));
        file.fixed = layout.fixed;
        file.size = layout.size;
        for (std::size_t k = 0; k < file.archive->records.size(); ++k) {
          const detail::TorchSaveRecord& record = file.archive->records[k];
          const std::uint64_t begin = layout.data_offset[k];
          for (const std::string& name : record.names) {
            file.begin[name] = begin;
          }
          file.checked.emplace_back(
              "record " + std::to_string(k) + " ('" + record.names.front() +
                  "')",
              begin,
              begin + record.nbytes());
        }
      }
      plan_digest += file.name + '\n';
      for (const auto& [offset, bytes] : file.fixed) {
        plan_digest += std::to_string(offset) + ':' + bytes + '\n';
      }
      files.push_back(std::move(file));
    }
    plan_digest += plan.split.is_sharded ? plan.index() : std::string();
    plan_digest += written.durable() ? "durable" : "volatile";
  });
  {
    const std::vector<std::string> digests = detail::all_gather_bytes(
        group,
        std::to_string(std::hash<std::string>{}(plan_digest)),
        "comparing the ranks' plans");
    for (std::size_t r = 1; r < digests.size(); ++r) {
      if (digests[r] != digests[0]) {
        throw ValueError(
            "Rank " + std::to_string(r) +
            "'s SaveOptions give other files than rank 0's (max_shard_size, "
            "filename_pattern, metadata, shared_tensors_to_discard, dtype, "
            "checksums and durable must be the same on every rank)");
      }
    }
  }
  DistributedSaveResult result;
  result.files = plan.files();
  result.total_bytes =
      static_cast<std::uint64_t>(plan.split.metadata.total_size);

  // 3. Rank 0 takes the directory, creates the files with their headers.
  std::optional<detail::CheckpointCommit> commit;
  std::string paths_text;
  detail::run_step(group, "creating the checkpoint's files", [&] {
    if (me != 0) {
      return;
    }
    commit.emplace(save_directory, result.files.size(), written.durable());
    commit->remove(detail::stale_files(
        save_directory,
        detail::FilenamePattern(plan.pattern_text),
        result.files));
    nlohmann::json paths = nlohmann::json::array();
    for (const PlannedFile& file : files) {
      detail::AtomicFile out(commit->target(file.name));
      out.preallocate(file.size);
      for (const auto& [offset, bytes] : file.fixed) {
        out.patch(bytes.data(), bytes.size(), offset);
      }
      const std::filesystem::path temporary = out.keep(written.durable());
      commit->stage(file.name, temporary);
      // Said relative to the directory's parent, which every rank names its
      // own way (another mount point, another working directory).
      paths.push_back(std::filesystem::weakly_canonical(temporary)
                          .lexically_relative(directory_base(save_directory))
                          .string());
    }
    paths_text = paths.dump();
  });
  std::vector<std::string> temporaries;
  for (const std::string& relative :
       nlohmann::json::parse(
           detail::broadcast_bytes(
               group, paths_text, 0, "sharing the files' paths"))
           .get<std::vector<std::string>>()) {
    temporaries.push_back((directory_base(save_directory) / relative).string());
  }

  // 4. Every rank writes its bytes at their offsets, and makes them durable.
  std::vector<WrittenRun> my_runs;
  std::vector<std::optional<detail::File>> opened(files.size());
  std::vector<std::vector<std::size_t>> work(files.size()); // file → groups
  detail::run_step(group, "writing the tensors", [&] {
    std::map<std::string, std::size_t> file_of_name;
    for (std::size_t f = 0; f < files.size(); ++f) {
      for (const auto& [name, begin] : files[f].begin) {
        file_of_name[name] = f;
      }
    }
    for (std::size_t g = 0; g < full.groups.size(); ++g) {
      const Group& grp = full.groups[g];
      const bool mine_to_write =
          grp.replicated ? grp.writer == me
                         : std::any_of(
                               grp.holders.begin(),
                               grp.holders.end(),
                               [&](const Holder& h) { return h.rank == me; });
      if (!mine_to_write) {
        continue;
      }
      for (const std::string& name : grp.names) {
        if (const auto it = file_of_name.find(name); it != file_of_name.end()) {
          work[it->second].push_back(g);
          break;
        }
      }
    }
    const auto written_dtype = [&](const Group& grp) {
      return written.dtype().has_value() && c10::isFloatingType(grp.dtype)
                 ? *written.dtype()
                 : grp.dtype;
    };
    const auto my_holder = [&](const Group& grp) -> const Holder& {
      return *std::find_if(
          grp.holders.begin(), grp.holders.end(), [&](const Holder& h) {
            return h.rank == me;
          });
    };
    std::uint64_t planned = 0;
    for (const std::vector<std::size_t>& groups : work) {
      for (const std::size_t g : groups) {
        const Group& grp = full.groups[g];
        planned += static_cast<std::uint64_t>(volume(my_holder(grp).sizes)) *
                   c10::elementSize(written_dtype(grp));
      }
    }
    std::uint64_t done = 0;
    std::mutex mutex; // for my_runs, result, done and progress calls
    // Each rank starts at its own file and wraps around, so that ranks of
    // one host write different files at a time (one file's writers share
    // its inode lock), on up to four threads.
    const auto count = static_cast<std::uint32_t>(files.size());
    const auto first = static_cast<std::uint32_t>(
        static_cast<std::uint64_t>(me) * count /
        static_cast<std::uint64_t>(group.size()));
    detail::parallel_for(count, 4, [&](std::size_t k) {
      const auto f = static_cast<std::uint32_t>((first + k) % count);
      const std::filesystem::path path = temporaries.at(f);
      opened[f] = open_shared(path, files[f], group, mine.host, views[0].host);
      // torch.save records always carry a CRC; safetensors tensors when the
      // save records checksums.
      std::vector<WrittenRun> runs;
      PieceWriter writer(
          opened[f]->fd(),
          path,
          f,
          (plan.safe && !written.checksums()) ? nullptr : &runs,
          plan.safe ? continue_crc32c : continue_crc32);
      for (const std::size_t g : work[f]) {
        const Group& grp = full.groups[g];
        std::string kept;
        for (const std::string& name : grp.names) {
          if (files[f].begin.count(name) != 0) {
            kept = name;
            break;
          }
        }
        // This rank's tensor for the group, under whichever name it holds.
        const DistributedTensor* held = nullptr;
        for (const std::string& name : grp.names) {
          if ((held = local.find(name)) != nullptr) {
            break;
          }
        }
        const std::uint64_t bytes = writer.write(
            held->local,
            grp.full,
            my_holder(grp).offsets,
            written_dtype(grp),
            files[f].begin.at(kept),
            written.durable());
        const std::lock_guard<std::mutex> guard(mutex);
        result.bytes_written += bytes;
        done += bytes;
        if (written.progress()) {
          written.progress()(Progress{files[f].name, kept, done, planned});
        }
      }
      const std::lock_guard<std::mutex> guard(mutex);
      my_runs.insert(my_runs.end(), runs.begin(), runs.end());
    });
  });

  // Every rank flushes the files it wrote once all have written: the pages
  // of interleaved pieces are then contiguous, and each flush mostly waits
  // for writeback already under way. (Each rank flushes its own writes,
  // which on a network filesystem only its host holds.)
  detail::run_step(group, "flushing the tensors", [&] {
    if (!written.durable()) {
      return;
    }
    detail::parallel_for(opened.size(), 4, [&](std::size_t f) {
      if (!work[f].empty() && ::fdatasync(opened[f]->fd()) != 0) {
        detail::throw_os_error("Cannot flush", opened[f]->path(), errno);
      }
    });
  });

  // Every rank's runs and their CRCs, for rank 0 to fold.
  const bool crcs = !plan.safe || written.checksums();
  std::vector<WrittenRun> all_runs;
  if (crcs) {
    const std::string mine_runs(
        reinterpret_cast<const char*>(my_runs.data()),
        my_runs.size() * sizeof(WrittenRun));
    for (const std::string& bytes : detail::gather_bytes(
             group, mine_runs, 0, "gathering the tensors' checksums")) {
      const std::size_t n = bytes.size() / sizeof(WrittenRun);
      const std::size_t at = all_runs.size();
      all_runs.resize(at + n);
      std::memcpy(all_runs.data() + at, bytes.data(), n * sizeof(WrittenRun));
    }
  }

  // 5. Rank 0 writes the index and commits; the agreement after it tells
  // every rank the checkpoint is in place.
  detail::run_step(group, "committing the checkpoint", [&] {
    if (me != 0) {
      return;
    }
    if (crcs) {
      write_crcs(files, all_runs, temporaries, written.durable());
    }
    if (plan.split.is_sharded) {
      const std::string index = plan.index();
      detail::AtomicFile out(commit->target(plan.index_name));
      out.write(index.data(), index.size());
      commit->stage(plan.index_name, out.keep(written.durable()));
    }
    commit->commit();
  });
  return result;
}

DistributedSaveResult save_torch_model(
    const torch::nn::Module& model,
    const OrderedMap<Placement>& placements,
    const std::filesystem::path& save_directory,
    const ProcessGroup& group,
    const SaveOptions& options) {
  return save_torch_state_dict(
      distribute(state_dict(model), placements),
      save_directory,
      group,
      options);
}

} // namespace torchser
