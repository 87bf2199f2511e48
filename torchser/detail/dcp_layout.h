#pragma once

// PyTorch DCP's sharded Hugging Face layout, as a checkpoint: what
// `HuggingFaceStorageWriter(save_distributed=True)` leaves in a folder.
// Every writing rank R writes `shard-RRRRR-model-KKKKK-of-NNNNN.safetensors`
// files holding its pieces; `__metadata__["DCP_SHARDING_INFO"]` records, per
// tensor, the piece's `saved_offsets` in the full tensor. There is no index
// and no world size: the full shape of a tensor is where its pieces end.
//
// Read here once, for the two jobs that take this layout: consolidation
// (consolidate.cpp) copies the pieces into full tensors; the distributed
// load (distributed_load.cpp) reads the parts of the pieces each rank's own
// pieces overlap. Never installed; exported only so that the tests can
// reach it.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <torchser/export.h>
#include <torchser/safetensors.h>

#include "torchser/detail/file.h"
#include "torchser/detail/tiling.h"

namespace torchser::detail {

/// Whether `filename` is a DCP shard file's name.
TORCHSER_API bool is_dcp_shard_name(const std::string& filename);

struct TORCHSER_API DcpShardFile {
  std::filesystem::path path;
  int shard = 0; ///< the writing rank + 1
  int model_index = 0;
  int largest = 0; ///< NNNNN, the number of model files
  File file;       ///< open for reading: the file whose header was parsed
};

/// One rank's piece of a tensor, in one shard file: a row-major tensor of
/// `sizes` whose first byte is at `begin` in the file.
struct TORCHSER_API DcpPiece {
  std::size_t file = 0; ///< into DcpLayout::files
  Shape sizes;
  Shape offsets; ///< in the full tensor
  std::uint64_t begin = 0;
};

struct TORCHSER_API DcpTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  Shape full;
  std::vector<DcpPiece> pieces; ///< in the order of the files
};

struct TORCHSER_API DcpLayout {
  std::vector<DcpShardFile> files; ///< sorted by name
  std::vector<DcpTensor> tensors;  ///< in the order first met
};

/// Reads the headers of every shard file of `directory` and checks the
/// layout: every writing rank's files present (shard numbers 1 … R), one
/// number of model files in every name, DCP_SHARDING_INFO with one offset
/// ≥ 0 per dimension for every tensor, one dtype and rank per tensor, and
/// pieces that tile each full tensor (no overlap, no hole). Sub-byte dtypes
/// only as a single piece. Throws ValueError naming the file and tensor, the
/// format's SafetensorError for a damaged file, OSError.
TORCHSER_API DcpLayout read_dcp_layout(const std::filesystem::path& directory);

} // namespace torchser::detail
