#include "torchser/detail/tiling.h"

#include <algorithm>

#include <torchser/errors.h>

namespace torchser::detail {

std::int64_t volume(const Shape& shape) {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) {
      throw ValueError(
          "A tensor of shape " + shape_text(shape) +
          " cannot exist: its element count is negative or past 2^63");
    }
  }
  return n;
}

ViewKey view_key(const at::Tensor& tensor) {
  return {
      tensor.storage().data_ptr().get(),
      tensor.storage_offset(),
      tensor.sizes().vec(),
      tensor.strides().vec(),
      tensor.scalar_type()};
}

void for_each_block(
    const at::Tensor& local,
    const Shape& full,
    const Shape& offsets,
    const std::function<void(
        const at::Tensor& block, std::int64_t element, std::int64_t count)>&
        run) {
  for_each_run(
      Shape(local.sizes().begin(), local.sizes().end()),
      full,
      offsets,
      [&](const Shape& leading, std::int64_t element, std::int64_t count) {
        at::Tensor block = local;
        for (const std::int64_t i : leading) {
          block = block.select(0, i);
        }
        run(block, element, count);
      });
}

void for_each_chunk(
    const at::Tensor& block,
    std::size_t element_size,
    std::uint64_t max_bytes,
    const std::function<void(const at::Tensor& part, std::uint64_t offset)>&
        part) {
  const std::uint64_t nbytes =
      static_cast<std::uint64_t>(block.numel()) * element_size;
  if (nbytes <= max_bytes || block.dim() == 0) {
    part(block, 0);
    return;
  }
  const std::int64_t rows = block.size(0);
  const std::uint64_t row_bytes = nbytes / static_cast<std::uint64_t>(rows);
  if (row_bytes > max_bytes) {
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::uint64_t base = static_cast<std::uint64_t>(r) * row_bytes;
      for_each_chunk(
          block.select(0, r),
          element_size,
          max_bytes,
          [&](const at::Tensor& p, std::uint64_t offset) {
            part(p, base + offset);
          });
    }
    return;
  }
  const auto per = static_cast<std::int64_t>(max_bytes / row_bytes);
  for (std::int64_t r = 0; r < rows; r += per) {
    part(
        block.narrow(0, r, std::min(per, rows - r)),
        static_cast<std::uint64_t>(r) * row_bytes);
  }
}

std::string shape_text(const Shape& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  }
  return out + "]";
}

std::optional<Block> intersection(const Block& a, const Block& b) {
  Block out{Shape(a.offsets.size()), Shape(a.offsets.size())};
  for (std::size_t d = 0; d < a.offsets.size(); ++d) {
    const std::int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    const std::int64_t hi =
        std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
    if (hi <= lo) {
      return std::nullopt;
    }
    out.offsets[d] = lo;
    out.sizes[d] = hi - lo;
  }
  return out;
}

void check_tiling(
    const std::string& name,
    const Shape& full,
    const std::vector<TilePiece>& pieces,
    const std::string& holders,
    const std::string& overlap_hint) {
  std::int64_t held = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const TilePiece& a = pieces[i];
    held += volume(a.sizes);
    for (std::size_t j = i + 1; j < pieces.size(); ++j) {
      const TilePiece& b = pieces[j];
      if (intersection({a.offsets, a.sizes}, {b.offsets, b.sizes})) {
        throw ValueError(
            "Tensor '" + name + "': the pieces of " + a.holder + " (offsets " +
            shape_text(a.offsets) + ", shape " + shape_text(a.sizes) +
            ") and " + b.holder + " (offsets " + shape_text(b.offsets) +
            ", shape " + shape_text(b.sizes) + ") overlap; " + overlap_hint);
      }
    }
  }
  const std::int64_t total = volume(full);
  if (held != total) {
    throw ValueError(
        "Tensor '" + name + "' of full shape " + shape_text(full) +
        ": its pieces " + holders + " hold " + std::to_string(held) +
        " of its " + std::to_string(total) + " elements, leaving " +
        std::to_string(total - held) + " held by no piece");
  }
}

void for_each_run(
    const Shape& sizes,
    const Shape& full,
    const Shape& offsets,
    const std::function<void(const Shape&, std::int64_t, std::int64_t)>& run) {
  if (volume(sizes) == 0) {
    return;
  }
  const auto dims = static_cast<std::int64_t>(full.size());
  if (dims == 0) {
    run({}, 0, 1);
    return;
  }
  // From dimension k on the piece is one run of the full tensor: the
  // dimensions after k are whole.
  std::int64_t k = dims - 1;
  while (k > 0 && sizes[k] == full[k]) {
    --k;
  }
  Shape stride(dims, 1);
  for (std::int64_t d = dims - 2; d >= 0; --d) {
    stride[d] = stride[d + 1] * full[d + 1];
  }
  const std::int64_t count = sizes[k] * stride[k];
  Shape leading(static_cast<std::size_t>(k), 0);
  while (true) {
    std::int64_t element = offsets[k] * stride[k];
    for (std::int64_t d = 0; d < k; ++d) {
      element += (offsets[d] + leading[d]) * stride[d];
    }
    run(leading, element, count);
    std::int64_t d = k - 1;
    while (d >= 0 && ++leading[d] == sizes[d]) {
      leading[d] = 0;
      --d;
    }
    if (d < 0) {
      return;
    }
  }
}

} // namespace torchser::detail
