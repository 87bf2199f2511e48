#include <torchser/load.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include <torchser/constants.h>
#include <torchser/module.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "torchser/detail/directory_lock.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/load_safetensors.h"
#include "torchser/detail/python_format.h"

namespace torchser {
namespace {

bool has_suffix(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), std::string::npos, suffix) == 0;
}

// Python's PurePath(name).suffix.
std::string path_suffix(const std::string& path) {
  const std::string name = std::filesystem::path(path).filename().string();
  const std::size_t dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == name.size()) {
    return "";
  }
  return name.substr(dot);
}

std::string torch_size(c10::IntArrayRef sizes) {
  std::string out = "torch.Size([";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  return out + "])";
}

std::string quoted_list(const std::vector<std::string>& keys, const char* separator) {
  std::string out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out += (i == 0 ? "\"" : std::string(separator) + "\"") + keys[i] + "\"";
  }
  return out;
}

// M-T9: a safetensors file with metadata must say format "pt" or "mlx".
void check_format_metadata(const SafeOpen& file, const std::string& path) {
  const auto& metadata = file.metadata();
  if (!metadata.has_value()) {
    return;
  }
  const auto format = metadata->find("format");
  if (format == metadata->end() || (format->second != "pt" && format->second != "mlx")) {
    throw OSError("The safetensors archive passed at " + path +
                  " does not contain the valid metadata. Make sure you save your model with the "
                  "`save_torch_model` method.");
  }
}

// What a checkpoint holds for the module: shapes first (to validate), values
// later (to copy), plus the aliases its metadata records.
struct Source {
  std::filesystem::path path;
  bool safetensors;
};

// The tensors of a pickle shard, on CPU, on its mapped records (no copy).
// (safetensors shards are read through SafeOpen, header first.)
StateDict open_pickle(const std::filesystem::path& path, LoadBackend backend) {
  return extract_state_dict(torch_load(path, TorchLoadOptions().mmap(backend == LoadBackend::kMmap)));
}

// Copies values into the module's tensors after everything was checked.
class ModuleLoader {
 public:
  explicit ModuleLoader(torch::nn::Module& model) : model_(model), targets_(state_dict(model)) {}

  const StateDict& targets() const {
    return targets_;
  }
  std::string class_name() const {
    std::string name = model_.name();
    // LibTorch names modules after their Impl class: "torch::nn::LinearImpl".
    if (has_suffix(name, "Impl")) {
      name.resize(name.size() - 4);
    }
    const std::size_t colon = name.rfind("::");
    return colon == std::string::npos ? name : name.substr(colon + 2);
  }

  // PyTorch's message for size mismatches (collected, raised together).
  void check_shape(const std::string& key, c10::IntArrayRef from_checkpoint) {
    const at::Tensor* target = targets_.find(key);
    if (target != nullptr && target->sizes() != from_checkpoint) {
      errors_.push_back(
          "size mismatch for " + key + ": copying a param with shape " + torch_size(from_checkpoint) +
          " from checkpoint, the shape in current model is " + torch_size(target->sizes()) + ".");
    }
  }
  std::vector<std::string>& errors() {
    return errors_;
  }
  void raise_if_errors() const {
    if (!errors_.empty()) {
      std::string message = "Error(s) in loading state_dict for " + class_name() + ":";
      for (const std::string& e : errors_) {
        message += "\n\t" + e;
      }
      throw RuntimeError(message);
    }
  }

  void copy(const std::string& key, const at::Tensor& value) {
    at::Tensor* target = targets_.find(key);
    if (target == nullptr) {
      return;
    }
    at::NoGradGuard no_grad;
    target->copy_(value);
  }

 private:
  torch::nn::Module& model_;
  StateDict targets_;
  std::vector<std::string> errors_;
};

// Copies every tensor of a safetensors file into the module (and into the
// aliases re-tied to it), one at a time, dropping each tensor's mapped pages
// once copied: resident memory grows by about one tensor, not one file.
void copy_safetensors(const SafeOpen& file, ModuleLoader& loader, const std::map<std::string, std::string>& retied) {
  for (const auto& info : file.tensors()) {
    const at::Tensor value = file.get_tensor(info.name);
    loader.copy(info.name, value);
    for (const auto& [alias, kept] : retied) {
      if (kept == info.name) {
        loader.copy(alias, value);
      }
    }
    file.release_pages(info.name);
  }
}

// alias → kept entries of a checkpoint's metadata that re-tie a module key
// the checkpoint lacks (SPEC deviation 13).
std::map<std::string, std::string> aliases_to_retie(
    const std::vector<std::pair<std::string, std::string>>& metadata,
    const std::set<std::string>& checkpoint_keys,
    const StateDict& targets) {
  std::map<std::string, std::string> out;
  for (const auto& [alias, kept] : metadata) {
    if (targets.contains(alias) && checkpoint_keys.count(alias) == 0 && checkpoint_keys.count(kept) != 0) {
      out.emplace(alias, kept);
    }
  }
  return out;
}

LoadResult key_differences(const StateDict& targets, const std::set<std::string>& loaded,
                           const std::map<std::string, std::string>& retied) {
  LoadResult result;
  for (const auto& item : targets) {
    if (loaded.count(item.key()) == 0 && retied.count(item.key()) == 0) {
      result.missing_keys.push_back(item.key());
    }
  }
  for (const std::string& key : loaded) {
    if (!targets.contains(key)) {
      result.unexpected_keys.push_back(key);
    }
  }
  std::sort(result.missing_keys.begin(), result.missing_keys.end());
  return result; // unexpected keys come sorted from the set
}

// Loads one file's tensors into the module: `shapes` and `metadata` come
// from the file's header (or mapped pickle), `copy_all` copies the values once
// everything was checked.
LoadResult load_one_file(
    ModuleLoader& loader,
    const std::map<std::string, std::vector<std::int64_t>>& shapes,
    const std::vector<std::pair<std::string, std::string>>& metadata,
    const LoadOptions& options,
    const std::function<void(const std::map<std::string, std::string>&)>& copy_all) {
  std::set<std::string> keys;
  for (const auto& [key, shape] : shapes) {
    keys.insert(key);
    loader.check_shape(key, shape);
  }
  auto retied = aliases_to_retie(metadata, keys, loader.targets());
  for (auto it = retied.begin(); it != retied.end();) {
    // An alias of a different shape (a slice) cannot be rebuilt from its name.
    it = loader.targets()[it->first].sizes() == c10::IntArrayRef(shapes.at(it->second)) ? std::next(it)
                                                                                         : retied.erase(it);
  }
  const LoadResult result = key_differences(loader.targets(), keys, retied);
  if (options.strict() && (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    // PyTorch's load_state_dict format.
    std::vector<std::string> messages;
    if (!result.missing_keys.empty()) {
      messages.push_back("Missing key(s) in state_dict: " + quoted_list(result.missing_keys, ", ") + ". ");
    }
    if (!result.unexpected_keys.empty()) {
      messages.push_back("Unexpected key(s) in state_dict: " + quoted_list(result.unexpected_keys, ", ") + ". ");
    }
    loader.errors().insert(loader.errors().begin(), messages.begin(), messages.end());
  }
  loader.raise_if_errors();
  copy_all(retied);
  return result;
}

LoadResult load_single_file(torch::nn::Module& model, const std::filesystem::path& path, const LoadOptions& options) {
  if (path.extension() == ".safetensors") {
    return detail::load_safetensors_into(model, SafeOpen(path, SafeOpenOptions().backend(options.backend())),
                                         path.string(), options);
  }
  const StateDict pickled =
      load_state_dict_from_file(path, LoadOptions(options).map_location(std::nullopt).mmap(options.backend() == LoadBackend::kMmap));
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& item : pickled) {
    shapes[item.key()] = item.value().sizes().vec();
  }
  ModuleLoader loader(model);
  return load_one_file(loader, shapes, {}, options, [&](const std::map<std::string, std::string>& retied) {
    for (const auto& item : pickled) {
      loader.copy(item.key(), item.value());
    }
    for (const auto& [alias, kept] : retied) {
      loader.copy(alias, pickled[kept]);
    }
  });
}

LoadResult load_sharded(torch::nn::Module& model, const std::filesystem::path& directory,
                        const std::string& pattern_text, const LoadOptions& options) {
  const detail::FilenamePattern pattern(pattern_text);
  const std::filesystem::path index_path = directory / (pattern.format("") + kIndexSuffix);
  // Every shard name is checked before any file is opened.
  const std::string expected_extension = path_suffix(pattern.format(""));
  const detail::IndexFile index = detail::read_index(index_path, expected_extension);
  const auto& shards = index.shards;
  const auto& index_keys = index.keys;
  const auto& metadata = index.metadata;
  ModuleLoader loader(model);
  const auto retied = aliases_to_retie(metadata, index_keys, loader.targets());
  const LoadResult result = key_differences(loader.targets(), index_keys, retied);
  if (options.strict() && (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    std::string message = "Error(s) in loading state_dict for " + loader.class_name();
    if (!result.missing_keys.empty()) {
      message += "\nMissing key(s): " + quoted_list(result.missing_keys, ",") + ".";
    }
    if (!result.unexpected_keys.empty()) {
      message += "\nUnexpected key(s): " + quoted_list(result.unexpected_keys, ",") + ".";
    }
    throw RuntimeError(message);
  }
  const bool safetensors = expected_extension == ".safetensors" || has_suffix(pattern_text, ".safetensors");
  std::vector<Source> sources;
  for (const auto& [shard, keys] : shards) {
    const bool is_safetensors = has_suffix(shard, ".safetensors") || (safetensors && expected_extension.empty());
    sources.push_back({directory / shard, is_safetensors});
  }
  // Shapes first, from the headers (or the mapped pickles): nothing is copied
  // unless everything fits.
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const Source& source : sources) {
    if (source.safetensors) {
      const SafeOpen file(source.path, SafeOpenOptions().backend(options.backend()));
      for (const auto& info : file.tensors()) {
        shapes[info.name] = info.shape;
        loader.check_shape(info.name, info.shape);
      }
    } else {
      for (const auto& item : open_pickle(source.path, options.backend())) {
        shapes[item.key()] = item.value().sizes().vec();
        loader.check_shape(item.key(), item.value().sizes());
      }
    }
  }
  std::map<std::string, std::string> retie;
  for (const auto& [alias, kept] : retied) {
    const auto shape = shapes.find(kept);
    if (shape != shapes.end() && loader.targets()[alias].sizes() == c10::IntArrayRef(shape->second)) {
      retie.emplace(alias, kept);
    }
  }
  loader.raise_if_errors();
  // Then one shard at a time.
  for (const Source& source : sources) {
    if (source.safetensors) {
      copy_safetensors(SafeOpen(source.path, SafeOpenOptions().backend(options.backend())), loader, retie);
      continue;
    }
    const StateDict shard = open_pickle(source.path, options.backend());
    for (const auto& item : shard) {
      loader.copy(item.key(), item.value());
    }
    for (const auto& [alias, kept] : retie) {
      if (const at::Tensor* value = shard.find(kept)) {
        loader.copy(alias, *value);
      }
    }
  }
  LoadResult out = result;
  for (const auto& [alias, kept] : retied) {
    if (retie.count(alias) == 0) {
      out.missing_keys.push_back(alias);
    }
  }
  std::sort(out.missing_keys.begin(), out.missing_keys.end());
  return out;
}

// The one regular file among `directory/*<extension>`, nullopt when there
// is none; M-T4 when there are several.
std::optional<std::filesystem::path> single_file(const std::filesystem::path& directory, const std::string& extension,
                                                 const std::filesystem::path& shown) {
  std::vector<std::filesystem::path> found;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    if (entry.path().extension() == extension) {
      found.push_back(entry.path());
    }
  }
  if (found.size() > 1) {
    throw ValueError("Directory '" + shown.string() +
                     "' does not contain a valid checkpoint. Expected either a sharded checkpoint with an index file, "
                     "or a single model file.");
  }
  if (found.empty()) {
    return std::nullopt;
  }
  return found.front();
}

} // namespace

namespace detail {

LoadResult load_safetensors_into(
    torch::nn::Module& model,
    const SafeOpen& file,
    const std::string& display_path,
    const LoadOptions& options) {
  check_format_metadata(file, display_path);
  std::vector<std::pair<std::string, std::string>> metadata;
  if (const auto& header = file.metadata()) {
    metadata.assign(header->begin(), header->end());
  }
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& info : file.tensors()) {
    shapes[info.name] = info.shape;
  }
  ModuleLoader loader(model);
  return load_one_file(loader, shapes, metadata, options, [&](const std::map<std::string, std::string>& retied) {
    copy_safetensors(file, loader, retied);
  });
}

} // namespace detail

StateDict load_state_dict_from_file(const std::filesystem::path& path, const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw FileNotFoundError("No checkpoint file found at '" + path.string() +
                            "'. Please verify the path is correct and the file has been properly downloaded.");
  }
  c10::Device device = options.map_location().value_or(c10::Device(c10::kCPU));
  if (path.extension() == ".safetensors") {
    if (device.is_meta()) {
      device = c10::Device(c10::kCPU); // the reference falls back to CPU too
    }
    const SafeOpen file(path, SafeOpenOptions().device(device).backend(options.backend()));
    check_format_metadata(file, path.string());
    StateDict out;
    for (const auto& info : file.tensors()) {
      out.insert(info.name, file.get_tensor(info.name));
    }
    return out;
  }
  return extract_state_dict(
      torch_load(path, TorchLoadOptions().mmap(options.mmap()).map_location(options.map_location())));
}

LoadResult load_torch_model(
    torch::nn::Module& model,
    const std::filesystem::path& checkpoint_path,
    const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::exists(checkpoint_path, ec)) {
    throw ValueError("Checkpoint path " + checkpoint_path.string() + " does not exist");
  }
  if (!std::filesystem::is_directory(checkpoint_path, ec)) {
    return load_single_file(model, checkpoint_path, options);
  }
  // Held until the last tensor is copied: a concurrent save's commit is
  // never seen halfway (see detail/directory_lock.h).
  const detail::DirectoryLock lock = detail::lock_for_reading(checkpoint_path);
  std::vector<std::string> patterns;
  if (options.filename_pattern().has_value()) {
    patterns.push_back(*options.filename_pattern());
  } else {
    patterns.push_back(kSafetensorsWeightsFilePattern);
    if (!options.safe()) {
      patterns.push_back(kPytorchWeightsFilePattern);
    }
  }
  for (const std::string& pattern : patterns) {
    const auto index = checkpoint_path / (detail::FilenamePattern(pattern).format("") + kIndexSuffix);
    if (std::filesystem::is_regular_file(index, ec)) {
      return load_sharded(model, checkpoint_path, pattern, options);
    }
  }
  std::vector<std::string> extensions = {".safetensors"};
  if (!options.safe()) {
    extensions.push_back(".bin");
  }
  for (const std::string& extension : extensions) {
    if (const auto file = single_file(checkpoint_path, extension, checkpoint_path)) {
      return load_single_file(model, *file, options);
    }
  }
  // The reference's message, and where it would mislead (a pickle checkpoint
  // under the default safe(true)), the way out.
  std::string hint;
  if (options.safe() && !options.filename_pattern().has_value()) {
    const auto pickle_index =
        checkpoint_path / (detail::FilenamePattern(kPytorchWeightsFilePattern).format("") + kIndexSuffix);
    if (std::filesystem::is_regular_file(pickle_index, ec)) {
      hint = " It holds a pickle checkpoint (" + pickle_index.filename().string() +
             "): pass LoadOptions().safe(false) to load it (torchser's pickle reader never runs code from a file).";
    } else if (single_file(checkpoint_path, ".bin", checkpoint_path)) {
      hint = " It holds a pickle .bin file: pass LoadOptions().safe(false) to load it (torchser's pickle reader "
             "never runs code from a file).";
    }
  }
  throw ValueError("Directory '" + checkpoint_path.string() +
                   "' does not contain a valid checkpoint. Expected either a sharded checkpoint with an index file, "
                   "or a single model file." + hint);
}

} // namespace torchser
