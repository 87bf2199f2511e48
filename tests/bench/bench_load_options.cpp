// Loads as users have them, each paired with a plain load_torch_model of the
// same checkpoint in one run: a key-mapped load (a DataParallel "module."
// checkpoint), a partial load (half the layers by prefix), a dtype-cast load
// (load_state_dict_from_file in bf16), a checksummed checkpoint (CRC-32C
// checked before copying), and an in-memory load_state_dict. Then CRC-32C
// throughput on one core against memcpy.
//
// Section "load" of torchser_bench. Default: 512 MiB in 128 float32
// parameters, 5 repeats, medians of per-round ratios.

#include <cstring>
#include <filesystem>

#include <ATen/ops/rand.h>
#include <torch/nn/module.h>

#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/save.h>

#include "bench_utils.h"
#include "torchser/detail/checksum.h"

using namespace torchser::bench;

namespace {

struct Layers : torch::nn::Module {
  Layers(std::int64_t count, std::int64_t elements) {
    for (std::int64_t i = 0; i < count; ++i) {
      register_parameter(
          "layer" + std::to_string(i) + "_weight", at::rand({elements}));
    }
  }
};

} // namespace

int torchser::bench::bench_load_options(const Config& config) {
  const BenchArgs args = section_args(config, 512, 128, 5);
  const std::filesystem::path dir = args.dir;
  const std::int64_t elements = args.elements_per_tensor();
  const double total =
      static_cast<double>(elements) * 4 * static_cast<double>(args.tensors);
  Layers model(args.tensors, elements);
  Layers target(args.tensors, elements);
  std::cout << "# module of " << args.tensors << " float32 parameters, "
            << total / (1 << 20) << " MiB, 200 MB shards, warm page cache, "
            << "medians of " << args.repeats << " paired runs\n\n";
  const auto plain = dir / "plain";
  const auto prefixed = dir / "prefixed";
  const auto summed = dir / "summed";
  for (const auto& d : {plain, prefixed, summed}) {
    std::filesystem::remove_all(d);
    std::filesystem::create_directories(d);
  }
  const auto shards = torchser::SaveOptions().max_shard_size("200MB");
  torchser::save_torch_model(model, plain, shards);
  torchser::save_torch_model(
      model,
      prefixed,
      torchser::SaveOptions(shards).key_mapping(
          torchser::KeyMapping().add_prefix("module.")));
  torchser::save_torch_model(
      model, summed, torchser::SaveOptions(shards).checksums(true));

  const auto load_plain = [&] {
    torchser::load_torch_model(
        target, plain, torchser::LoadOptions().strict(true));
  };
  const Paired mapped = paired(args.repeats, load_plain, [&] {
    torchser::load_torch_model(
        target,
        prefixed,
        torchser::LoadOptions().strict(true).key_mapping(
            torchser::KeyMapping().strip_prefix("module.")));
  });
  std::vector<std::string> half;
  for (std::int64_t i = 0; i < args.tensors; i += 2) {
    half.push_back("layer" + std::to_string(i) + "_");
  }
  const Paired partial = paired(args.repeats, load_plain, [&] {
    torchser::load_torch_model(
        target, plain, torchser::LoadOptions().prefixes(half));
  });
  const Paired checked = paired(args.repeats, load_plain, [&] {
    torchser::load_torch_model(
        target, summed, torchser::LoadOptions().strict(true));
  });
  const torchser::StateDict in_memory = torchser::state_dict(model);
  const Paired memory = paired(args.repeats, load_plain, [&] {
    torchser::load_state_dict(
        target, in_memory, torchser::LoadOptions().strict(true));
  });
  // load_state_dict_from_file of one shard: mapped views vs a bf16 cast.
  const auto shard = plain / "model-00001-of-00003.safetensors";
  const bool one_file = !std::filesystem::exists(shard);
  const auto file = one_file ? plain / "model.safetensors" : shard;
  const double file_bytes =
      static_cast<double>(std::filesystem::file_size(file));
  const Paired cast = paired(
      args.repeats,
      [&] {
        const auto sd = torchser::load_state_dict_from_file(
            file, torchser::LoadOptions().mmap(false));
      },
      [&] {
        const auto sd = torchser::load_state_dict_from_file(
            file, torchser::LoadOptions().dtype(at::kBFloat16));
      });

  // CRC-32C on one core against memcpy of the same bytes.
  std::vector<at::Tensor> params = model.parameters();
  std::vector<at::Tensor> target_params = target.parameters();
  volatile std::uint32_t sink = 0; // keeps the CRC loop
  const Paired crc = paired(
      args.repeats,
      [&] {
        for (std::size_t i = 0; i < params.size(); ++i) {
          std::memcpy(
              target_params[i].data_ptr(),
              params[i].data_ptr(),
              params[i].nbytes());
        }
      },
      [&] {
        for (const at::Tensor& p : params) {
          sink = sink ^ torchser::detail::crc32c(p.data_ptr(), p.nbytes());
        }
      });

  print({
      {"plain load_torch_model (strict, sharded)",
       mapped.baseline,
       total,
       "",
       0},
      {"key-mapped: strip_prefix(\"module.\")",
       mapped.subject,
       total,
       "of plain",
       mapped.ratio},
      {"partial: every other layer by prefix",
       partial.subject,
       total / 2,
       "of plain",
       partial.ratio},
      {"checksummed checkpoint (CRC-32C checked first)",
       checked.subject,
       total,
       "of plain",
       checked.ratio},
      {"load_state_dict from an in-memory state dict",
       memory.subject,
       total,
       "of plain",
       memory.ratio},
      {"load_state_dict_from_file, pread copies (one file)",
       cast.baseline,
       file_bytes,
       "",
       0},
      {"load_state_dict_from_file, dtype bf16 (one file)",
       cast.subject,
       file_bytes,
       "of pread copies",
       cast.ratio},
      {"memcpy into the module's parameters", crc.baseline, total, "", 0},
      {"CRC-32C, one core (ISA-L crc32_iscsi)",
       crc.subject,
       total,
       "of memcpy",
       crc.ratio},
  });
  std::cout << "\nchecksum overhead on a warm load: "
            << (1.0 / checked.ratio - 1.0) * 100 << "% (0% when off: files "
            << "without checksums are not read twice); key mapping "
            << (1.0 / mapped.ratio - 1.0) * 100 << "%\n";
  for (const auto& d : {plain, prefixed, summed}) {
    std::filesystem::remove_all(d);
  }
  return 0;
}
