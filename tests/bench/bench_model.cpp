// Saving and loading a ~1 GiB module as huggingface_hub checkpoints
// (save_torch_model in 200 MB shards, load_torch_model), against the limits
// and peers in one run: raw write() of the same bytes, memcpy into the
// module's parameters, torch::save / torch::load of the module, Python
// torch.save(state_dict) / torch.load + load_state_dict.
//
// Section "model" of torchser_bench (--mib, --repeats and --quick resize it).
// Default: 1024 MiB in 256 float32 parameters, 5 repeats, medians.

#include <malloc.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <ATen/ops/rand.h>
#include <torch/nn/module.h>
#include <torch/serialize.h>

#include <torchser/load.h>
#include <torchser/save.h>

#include "bench_utils.h"

using namespace torchser::bench;

namespace {

struct Big : torch::nn::Module {
  Big(std::int64_t count, std::int64_t elements) {
    for (std::int64_t i = 0; i < count; ++i) {
      register_parameter(
          "layer" + std::to_string(i) + "_weight", at::rand({elements}));
    }
  }
};

// Peak resident memory since the last reset, in bytes.
std::int64_t peak_rss() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      return std::atoll(line.c_str() + 6) * 1024;
    }
  }
  return 0;
}
void reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
}

} // namespace

int torchser::bench::bench_model(const Config& config) {
  const BenchArgs args = section_args(config, 1024, 256, 5);
  const std::filesystem::path dir = args.dir;
  const std::int64_t elements = args.elements_per_tensor();
  const double total =
      static_cast<double>(elements) * 4 * static_cast<double>(args.tensors);
  auto model = std::make_shared<Big>(args.tensors, elements);
  auto target = std::make_shared<Big>(
      args.tensors, elements); // loads go into existing parameters
  std::vector<at::Tensor> params = model->parameters();
  std::vector<at::Tensor> target_params = target->parameters();
  std::cout << "# module of " << args.tensors << " float32 parameters, "
            << total / (1 << 20) << " MiB, 200 MB shards, medians of "
            << args.repeats << " runs, files in " << dir << "\n\n";

  const auto ckpt = dir / "checkpoint";
  const auto raw = dir / "raw.bin";
  const auto pt = dir / "model.pt";
  const auto settle = [&] {
    std::filesystem::remove_all(ckpt);
    std::filesystem::remove(raw);
    std::filesystem::remove(pt);
    std::filesystem::create_directories(ckpt);
    ::sync();
  };
  const auto raw_write = [&] { write_raw(raw, params, /*durable=*/false); };
  const auto save = [&] {
    torchser::save_torch_model(
        *model,
        ckpt,
        torchser::SaveOptions().max_shard_size("200MB").durable(false));
  };
  const Paired save_pair = paired(args.repeats, raw_write, save, settle);
  const Paired torch_save_pair = paired(
      args.repeats,
      raw_write,
      [&] { torch::save(model, pt.string()); },
      settle);
  save();
  torch::save(model, pt.string());

  const auto memcpy_params = [&] {
    for (std::size_t i = 0; i < params.size(); ++i) {
      std::memcpy(
          target_params[i].data_ptr(),
          params[i].data_ptr(),
          params[i].nbytes());
    }
  };
  std::int64_t peak_growth = 0;
  const Paired load_pair = paired(args.repeats, memcpy_params, [&] {
    ::malloc_trim(0);
    reset_peak_rss();
    const auto before = peak_rss();
    torchser::load_torch_model(
        *target, ckpt, torchser::LoadOptions().strict(true));
    peak_growth = std::max(peak_growth, peak_rss() - before);
  });
  const Paired torch_load_pair = paired(
      args.repeats, memcpy_params, [&] { torch::load(target, pt.string()); });

  std::vector<Row> rows = {
      {"memcpy into the module's parameters", load_pair.baseline, total, "", 0},
      {"raw write() to page cache (new file)",
       save_pair.baseline,
       total,
       "",
       0},
      {"torchser save_torch_model, 200 MB shards (durable=false)",
       save_pair.subject,
       total,
       "of raw write()",
       save_pair.ratio},
      {"torch::save(module)",
       torch_save_pair.subject,
       total,
       "of raw write()",
       torch_save_pair.ratio},
      {"torchser load_torch_model (strict, sharded)",
       load_pair.subject,
       total,
       "of memcpy",
       load_pair.ratio},
      {"torch::load(module)",
       torch_load_pair.subject,
       total,
       "of memcpy",
       torch_load_pair.ratio},
  };

  // Python: torch.save(state_dict) timed in one process; torch.load +
  // load_state_dict in a fresh process each time.
  const auto py_file = dir / "python.bin";
  const std::string common =
      "import os,sys,time,torch\n"
      "m=torch.nn.Module()\n"
      "for i in range(" +
      std::to_string(args.tensors) +
      "): m.register_parameter(f'layer{i}_weight', "
      "torch.nn.Parameter(torch.rand(" +
      std::to_string(elements) +
      ")))\n"
      "p='" +
      py_file.string() + "'\n";
  const auto run_python = [](const std::string& script) {
    const auto numbers = python_numbers(script);
    return numbers.empty() ? -1.0 : numbers.front();
  };
  std::vector<double> py_saves;
  std::vector<double> py_loads;
  for (int r = 0; r < args.repeats; ++r) {
    py_saves.push_back(run_python(
        common +
        "os.path.exists(p) and os.remove(p); os.sync()\n"
        "t=time.perf_counter(); torch.save(m.state_dict(), p); "
        "print(time.perf_counter()-t)\n"));
    py_loads.push_back(run_python(
        common +
        "t=time.perf_counter(); m.load_state_dict(torch.load(p)); "
        "print(time.perf_counter()-t)\n"));
  }
  std::sort(py_saves.begin(), py_saves.end());
  std::sort(py_loads.begin(), py_loads.end());
  const double py_save = py_saves[py_saves.size() / 2];
  const double py_load = py_loads[py_loads.size() / 2];
  if (py_save > 0 && py_load > 0) {
    rows.push_back(
        {"Python torch.save(state_dict)",
         py_save,
         total,
         "of raw write()",
         save_pair.baseline / py_save});
    rows.push_back(
        {"Python torch.load + load_state_dict",
         py_load,
         total,
         "of memcpy",
         load_pair.baseline / py_load});
  }
  print(rows);
  std::cout << "\nsave_torch_model vs torch::save: "
            << torch_save_pair.subject / save_pair.subject << "x faster";
  if (py_save > 0) {
    std::cout << ", vs Python torch.save: " << py_save / save_pair.subject
              << "x faster";
  }
  std::cout << "\nload_torch_model vs torch::load: "
            << torch_load_pair.subject / load_pair.subject << "x faster";
  if (py_load > 0) {
    std::cout << ", vs Python torch.load + load_state_dict: "
              << py_load / load_pair.subject << "x faster";
  }
  std::cout << "\npeak resident memory growth during load_torch_model: "
            << peak_growth / (1 << 20) << " MiB (module " << total / (1 << 20)
            << " MiB, largest tensor " << elements * 4 / (1 << 20)
            << " MiB, shards 200 MB)\n";
  std::filesystem::remove_all(ckpt);
  std::filesystem::remove(raw);
  std::filesystem::remove(pt);
  std::filesystem::remove(py_file);
  return 0;
}
