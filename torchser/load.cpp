#include <torchser/load.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <torchser/constants.h>
#include <torchser/module.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/load_file.h"
#include "torchser/detail/tensor_file.h"

namespace torchser {
namespace {

bool has_suffix(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() &&
         name.compare(name.size() - suffix.size(), std::string::npos, suffix) ==
             0;
}

std::string torch_size(c10::IntArrayRef sizes) {
  std::string out = "torch.Size([";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  return out + "])";
}

std::string quoted_list(
    const std::vector<std::string>& keys, const char* separator) {
  std::string out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out += (i == 0 ? "\"" : std::string(separator) + "\"") + keys[i] + "\"";
  }
  return out;
}

// Copies values into the module's tensors after everything was checked.
class ModuleLoader {
 public:
  explicit ModuleLoader(torch::nn::Module& model)
      : model_(model), targets_(state_dict(model)) {}

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
          "size mismatch for " + key + ": copying a param with shape " +
          torch_size(from_checkpoint) +
          " from checkpoint, the shape in current model is " +
          torch_size(target->sizes()) + ".");
    }
  }
  std::vector<std::string>& errors() {
    return errors_;
  }
  void raise_if_errors() const {
    if (!errors_.empty()) {
      std::string message =
          "Error(s) in loading state_dict for " + class_name() + ":";
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

// Copies every tensor of a file into the module (and into the aliases
// re-tied to it), one at a time, dropping each tensor's mapped pages once
// copied: resident memory grows by about one tensor, not one file.
void copy_file(
    const detail::TensorFile& file,
    ModuleLoader& loader,
    const std::map<std::string, std::string>& retied) {
  std::multimap<std::string, std::string> aliases_of;
  for (const auto& [alias, kept] : retied) {
    aliases_of.emplace(kept, alias);
  }
  for (const detail::TensorEntry& entry : file.entries()) {
    const at::Tensor value = file.get(entry.name);
    loader.copy(entry.name, value);
    const auto [first, last] = aliases_of.equal_range(entry.name);
    for (auto it = first; it != last; ++it) {
      loader.copy(it->second, value);
    }
    file.release(entry.name);
  }
}

// alias → kept entries of a checkpoint's metadata that re-tie a module key
// the checkpoint lacks (save_torch_state_dict records them; the reference never
// re-ties them on load, so its strict loads of tied checkpoints fail).
std::map<std::string, std::string> aliases_to_retie(
    const std::vector<std::pair<std::string, std::string>>& metadata,
    const std::set<std::string>& checkpoint_keys,
    const StateDict& targets) {
  std::map<std::string, std::string> out;
  for (const auto& [alias, kept] : metadata) {
    if (targets.contains(alias) && checkpoint_keys.count(alias) == 0 &&
        checkpoint_keys.count(kept) != 0) {
      out.emplace(alias, kept);
    }
  }
  return out;
}

LoadResult key_differences(
    const StateDict& targets,
    const std::set<std::string>& loaded,
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
    const std::function<void(const std::map<std::string, std::string>&)>&
        copy_all) {
  std::set<std::string> keys;
  for (const auto& [key, shape] : shapes) {
    keys.insert(key);
    loader.check_shape(key, shape);
  }
  auto retied = aliases_to_retie(metadata, keys, loader.targets());
  for (auto it = retied.begin(); it != retied.end();) {
    // An alias of a different shape (a slice) cannot be rebuilt from its name.
    it = loader.targets()[it->first].sizes() ==
                 c10::IntArrayRef(shapes.at(it->second))
             ? std::next(it)
             : retied.erase(it);
  }
  const LoadResult result = key_differences(loader.targets(), keys, retied);
  if (options.strict() &&
      (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    // PyTorch's load_state_dict format.
    std::vector<std::string> messages;
    if (!result.missing_keys.empty()) {
      messages.push_back(
          "Missing key(s) in state_dict: " +
          quoted_list(result.missing_keys, ", ") + ". ");
    }
    if (!result.unexpected_keys.empty()) {
      messages.push_back(
          "Unexpected key(s) in state_dict: " +
          quoted_list(result.unexpected_keys, ", ") + ". ");
    }
    loader.errors().insert(
        loader.errors().begin(), messages.begin(), messages.end());
  }
  loader.raise_if_errors();
  copy_all(retied);
  return result;
}

detail::TensorFileOptions file_options(const LoadOptions& options) {
  detail::TensorFileOptions out;
  out.backend = options.backend();
  return out;
}

void warn_note(const detail::TensorFile& file) {
  if (!file.note().empty()) {
    TORCH_WARN(file.note());
  }
}

// One file (or DDUF entry) into the module: its header's keys and shapes are
// checked first, then every tensor copied.
LoadResult load_file_into(
    torch::nn::Module& model,
    const detail::TensorFile& file,
    const LoadOptions& options) {
  warn_note(file);
  file.check_format_metadata();
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const detail::TensorEntry& entry : file.entries()) {
    shapes[entry.name] = entry.shape;
  }
  ModuleLoader loader(model);
  return load_one_file(
      loader,
      shapes,
      file.metadata().value_or(
          std::vector<std::pair<std::string, std::string>>{}),
      options,
      [&](const std::map<std::string, std::string>& retied) {
        copy_file(file, loader, retied);
      });
}

LoadResult load_sharded(
    torch::nn::Module& model,
    const detail::Checkpoint& checkpoint,
    const LoadOptions& options) {
  // Every shard name was checked before any file is opened.
  const detail::IndexFile& index = checkpoint.index;
  const auto& index_keys = index.keys;
  const auto& metadata = index.metadata;
  ModuleLoader loader(model);
  const auto retied = aliases_to_retie(metadata, index_keys, loader.targets());
  const LoadResult result =
      key_differences(loader.targets(), index_keys, retied);
  if (options.strict() &&
      (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    std::string message =
        "Error(s) in loading state_dict for " + loader.class_name();
    if (!result.missing_keys.empty()) {
      message +=
          "\nMissing key(s): " + quoted_list(result.missing_keys, ",") + ".";
    }
    if (!result.unexpected_keys.empty()) {
      message +=
          "\nUnexpected key(s): " + quoted_list(result.unexpected_keys, ",") +
          ".";
    }
    throw RuntimeError(message);
  }
  // Shapes first, from the headers (or the mapped pickles): nothing is copied
  // unless everything fits.
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const std::filesystem::path& path : checkpoint.files) {
    const auto file = detail::open_tensor_file(path, file_options(options));
    warn_note(*file);
    file->check_format_metadata();
    for (const detail::TensorEntry& entry : file->entries()) {
      shapes[entry.name] = entry.shape;
      loader.check_shape(entry.name, entry.shape);
    }
  }
  std::map<std::string, std::string> retie;
  for (const auto& [alias, kept] : retied) {
    const auto shape = shapes.find(kept);
    if (shape != shapes.end() &&
        loader.targets()[alias].sizes() == c10::IntArrayRef(shape->second)) {
      retie.emplace(alias, kept);
    }
  }
  loader.raise_if_errors();
  // Then one shard at a time.
  for (const std::filesystem::path& path : checkpoint.files) {
    copy_file(
        *detail::open_tensor_file(path, file_options(options)), loader, retie);
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

} // namespace

namespace detail {

LoadResult load_tensor_file_into(
    torch::nn::Module& model,
    const TensorFile& file,
    const LoadOptions& options) {
  return load_file_into(model, file, options);
}

} // namespace detail

StateDict load_state_dict_from_file(
    const std::filesystem::path& path, const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw FileNotFoundError(
        "No checkpoint file found at '" + path.string() +
        "'. Please verify the path is correct and the file has been properly "
        "downloaded.");
  }
  detail::TensorFileOptions open = file_options(options);
  open.device = options.map_location();
  const auto file = detail::open_tensor_file(path, open);
  warn_note(*file);
  file->check_format_metadata();
  return detail::read_all(*file);
}

LoadResult load_single_file(
    torch::nn::Module& model,
    const std::filesystem::path& path,
    const LoadOptions& options) {
  return load_file_into(
      model, *detail::open_tensor_file(path, file_options(options)), options);
}

LoadResult load_torch_model(
    torch::nn::Module& model,
    const std::filesystem::path& checkpoint_path,
    const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::exists(checkpoint_path, ec)) {
    throw ValueError(
        "Checkpoint path " + checkpoint_path.string() + " does not exist");
  }
  if (options.map_location().has_value()) {
    throw ValueError(
        "LoadOptions::map_location applies to load_state_dict_from_file; "
        "load_torch_model copies into "
        "the module's own tensors, wherever they are (move the module with "
        "->to(device) before or after "
        "loading).");
  }
  std::optional<detail::DirectoryLock> lock;
  const std::string given = checkpoint_path.filename().string();
  const bool index_given = given.size() > std::strlen(kIndexSuffix) &&
                           given.compare(
                               given.size() - std::strlen(kIndexSuffix),
                               std::string::npos,
                               kIndexSuffix) == 0;
  if (std::filesystem::is_directory(checkpoint_path, ec) || index_given) {
    // Held until the last tensor is copied: a concurrent save's commit is
    // never seen halfway (see detail/checkpoint_dir.h).
    const std::filesystem::path parent = checkpoint_path.parent_path();
    lock.emplace(detail::lock_for_reading(
        index_given ? (parent.empty() ? std::filesystem::path(".") : parent)
                    : checkpoint_path));
  }
  detail::ResolveOptions resolve;
  resolve.filename_pattern = options.filename_pattern();
  resolve.allow_pickle = !options.safe();
  const detail::Checkpoint checkpoint =
      detail::resolve_checkpoint(checkpoint_path, resolve);
  if (checkpoint.kind == detail::Checkpoint::Kind::kSharded) {
    return load_sharded(model, checkpoint, options);
  }
  return load_single_file(model, checkpoint.files.front(), options);
}

} // namespace torchser
