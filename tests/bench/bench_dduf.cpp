// DDUF: read_dduf_file on a 1,000-entry archive against huggingface_hub's
// (run by /usr/bin/python3 when importable), and exporting 1 GiB of
// entries against a plain copy of the same bytes, in one run.
//
// Section "dduf" of torchser_bench (--mib, --repeats and --quick resize it).
// Default: 1024 MiB in 8 safetensors entries, 5 repeats, medians.

#include <unistd.h>

#include <filesystem>

#include <ATen/ops/rand.h>

#include <torchser/dduf.h>

#include "bench_utils.h"

using namespace torchser::bench;

int torchser::bench::bench_dduf(const Config& config) {
  const BenchArgs args = section_args(config, 1024, 8, 5);
  const std::filesystem::path dir = args.dir;

  // --- read_dduf_file on 1,000 entries
  // ----------------------------------------
  const auto small = dir / "entries.dduf";
  std::vector<torchser::DDUFExportEntry> many = {
      torchser::DDUFExportEntry::from_bytes(
          "model_index.json", R"({"folder": 1})"),
      torchser::DDUFExportEntry::from_bytes("folder/config.json", "{}")};
  for (int i = 0; i < 999; ++i) {
    many.push_back(torchser::DDUFExportEntry::from_bytes(
        "file" + std::to_string(i) + ".txt", "x"));
  }
  torchser::export_entries_as_dduf(small, many);
  std::vector<double> reads;
  for (int r = 0; r < 20 * args.repeats; ++r) {
    const auto start = Clock::now();
    const auto entries = torchser::read_dduf_file(small);
    reads.push_back(seconds_since(start));
    if (entries.size() != many.size()) {
      return 1;
    }
  }
  std::sort(reads.begin(), reads.end());
  const double t_read = reads[reads.size() / 2];
  const auto python = python_numbers(
      "import sys,time,statistics\n"
      "try:\n from huggingface_hub.serialization._dduf import read_dduf_file\n"
      "except Exception:\n print(-1); sys.exit(0)\n"
      "ts=[]\n"
      "for _ in range(" +
      std::to_string(20 * args.repeats) +
      "):\n"
      " t=time.perf_counter(); read_dduf_file('" +
      small.string() +
      "'); ts.append(time.perf_counter()-t)\n"
      "print(statistics.median(ts))\n");
  const double t_python = python.empty() ? -1 : python.front();

  // --- exporting 1 GiB
  // ----------------------------------------------------------
  const std::int64_t elements = args.elements_per_tensor();
  std::vector<torchser::DDUFExportEntry> big = {
      torchser::DDUFExportEntry::from_bytes(
          "model_index.json", R"({"unet": 1})"),
      torchser::DDUFExportEntry::from_bytes("unet/config.json", "{}")};
  std::vector<at::Tensor> tensors;
  for (std::int64_t i = 0; i < args.tensors; ++i) {
    torchser::StateDict sd;
    tensors.push_back(at::rand({elements}));
    sd.insert("w", tensors.back());
    big.push_back(torchser::DDUFExportEntry::from_state_dict(
        "unet/part" + std::to_string(i) + ".safetensors", sd));
  }
  const double total =
      static_cast<double>(elements) * 4 * static_cast<double>(args.tensors);
  const auto archive = dir / "big.dduf";
  const auto copy = dir / "copy.bin";
  const auto settle = [&] {
    std::filesystem::remove(archive);
    std::filesystem::remove(copy);
    ::sync();
  };
  // The plain copy: the same tensor bytes written to one new file.
  const Paired export_pair =
      paired( // export_entries_as_dduf commits durably: so does the copy
          args.repeats,
          [&] { write_raw(copy, tensors, /*durable=*/true); },
          [&] { torchser::export_entries_as_dduf(archive, big); },
          settle);
  settle();

  std::vector<Row> rows = {
      {"read_dduf_file, 1,001 entries (torchser)", t_read, 0, "", 0},
      {"plain write() + fsync of the same bytes",
       export_pair.baseline,
       total,
       "",
       0},
      {"export_entries_as_dduf, " + std::to_string(args.tensors) +
           " safetensors entries",
       export_pair.subject,
       total,
       "of the plain copy",
       export_pair.ratio},
  };
  if (t_python > 0) {
    rows.insert(
        rows.begin() + 1,
        {"read_dduf_file (huggingface_hub, Python)", t_python, 0, "", 0});
  }
  print(rows);
  if (t_python > 0) {
    std::cout << "\nread_dduf_file: " << t_python / t_read
              << "x faster than huggingface_hub's\n";
  }
  std::filesystem::remove(small);
  return 0;
}
