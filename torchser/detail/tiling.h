#pragma once

// Pieces of a row-major tensor: whether they tile it (no overlap, no hole),
// and the contiguous runs each piece occupies in it. The distributed save
// writes a rank's pieces by these runs; consolidation copies DCP's pieces by
// them; the distributed load reads by them. Never installed; exported only so
// that the tests can reach it.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/export.h>

namespace torchser::detail {

using Shape = std::vector<std::int64_t>;

struct TORCHSER_API TilePiece {
  Shape offsets;
  Shape sizes;
  /// Who holds it, for messages: "rank 1", "'shard-00001-….safetensors'".
  std::string holder;
};

/// Throws ValueError naming tensor `name`, the two pieces that overlap, or
/// the elements no piece holds. `holders` says where the pieces are ("on
/// ranks 0, 1 and 2"); `overlap_hint` what to do about an overlap.
TORCHSER_API void check_tiling(
    const std::string& name,
    const Shape& full,
    const std::vector<TilePiece>& pieces,
    const std::string& holders,
    const std::string& overlap_hint);

/// Calls `run(leading, element, count)` for each contiguous run of a piece
/// of `sizes` at `offsets` in a row-major tensor of shape `full`, in the
/// piece's own row-major order (run i holds the piece's elements
/// [i × count, (i + 1) × count)): `leading` indexes the piece's leading
/// dimensions, `element` is the run's first element in the full tensor.
/// Nothing for an empty piece; one run of one element for a scalar.
TORCHSER_API void for_each_run(
    const Shape& sizes,
    const Shape& full,
    const Shape& offsets,
    const std::function<void(
        const Shape& leading, std::int64_t element, std::int64_t count)>& run);

/// for_each_run() over a piece held as `local`: `block` is the part of
/// `local` one run covers (its leading indices selected), whose elements
/// are contiguous in the full tensor from `element` on.
TORCHSER_API void for_each_block(
    const at::Tensor& local,
    const Shape& full,
    const Shape& offsets,
    const std::function<void(
        const at::Tensor& block, std::int64_t element, std::int64_t count)>&
        run);

/// Splits `block` (elements of `element_size` bytes, contiguous in a file in
/// row-major order) into parts of at most `max_bytes` (whole rows, or a
/// row's own rows when one row is larger), with each part's byte offset
/// from the block's start: copies through a chunk of that size.
TORCHSER_API void for_each_chunk(
    const at::Tensor& block,
    std::size_t element_size,
    std::uint64_t max_bytes,
    const std::function<void(const at::Tensor& part, std::uint64_t offset)>&
        part);

/// What makes two local tensors of a distributed state dict one (tied): the
/// same view of one storage. Other views of one buffer (a flat parameter)
/// are separate tensors.
using ViewKey =
    std::tuple<const void*, std::int64_t, Shape, Shape, c10::ScalarType>;
TORCHSER_API ViewKey view_key(const at::Tensor& tensor);

/// A block of a row-major tensor: its offsets and sizes in every dimension.
struct TORCHSER_API Block {
  Shape offsets;
  Shape sizes;
};

/// The elements blocks `a` and `b` of one tensor share, as a block; nullopt
/// when they share none (a block with no elements shares none).
TORCHSER_API std::optional<Block> intersection(const Block& a, const Block& b);

/// Elements of `shape`; ValueError when negative or past 2^63 − 1.
TORCHSER_API std::int64_t volume(const Shape& shape);

/// "[1, 2, 3]".
TORCHSER_API std::string shape_text(const Shape& shape);

} // namespace torchser::detail
