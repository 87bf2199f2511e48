#include <torchser/load.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <torchser/constants.h>
#include <torchser/hub_cache.h>
#include <torchser/module.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/checksum.h"
#include "torchser/detail/key_filter.h"
#include "torchser/detail/load_file.h"
#include "torchser/detail/load_messages.h"
#include "torchser/detail/tensor_file.h"

namespace torchser {
namespace {

bool has_suffix(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() &&
         name.compare(name.size() - suffix.size(), std::string::npos, suffix) ==
             0;
}

using detail::quoted_list;
using detail::torch_size;

using detail::KeyFilter;

// The longest common prefix of `keys` that ends with a '.'.
std::string common_dotted_prefix(const std::vector<std::string>& keys) {
  if (keys.empty()) {
    return "";
  }
  std::string prefix = keys.front();
  for (const std::string& key : keys) {
    std::size_t n = 0;
    while (n < prefix.size() && n < key.size() && prefix[n] == key[n]) {
      ++n;
    }
    prefix.resize(n);
  }
  const std::size_t dot = prefix.rfind('.');
  return dot == std::string::npos ? "" : prefix.substr(0, dot + 1);
}

// A prefix change that turns unexpected names into missing ones ("module."
// → "", "" → "model.", "model." → "transformer."), said as the KeyMapping
// that does it; empty when none helps.
std::string prefix_hint(
    const std::vector<std::string>& unexpected,
    const std::vector<std::string>& missing) {
  if (unexpected.empty() || missing.empty()) {
    return "";
  }
  std::string from = common_dotted_prefix(unexpected);
  std::string to = common_dotted_prefix(missing);
  // "module.h.0." vs "h.0.": only the leading difference matters.
  while (!from.empty() && !to.empty()) {
    const std::size_t f = from.rfind('.', from.size() - 2);
    const std::size_t t = to.rfind('.', to.size() - 2);
    const std::string from_last =
        from.substr(f == std::string::npos ? 0 : f + 1);
    const std::string to_last = to.substr(t == std::string::npos ? 0 : t + 1);
    if (from_last != to_last) {
      break;
    }
    from.resize(from.size() - from_last.size());
    to.resize(to.size() - to_last.size());
  }
  if (from == to) {
    return "";
  }
  const std::set<std::string> wanted(missing.begin(), missing.end());
  std::size_t matched = 0;
  for (const std::string& key : unexpected) {
    matched += wanted.count(to + key.substr(from.size()));
  }
  if (matched == 0) {
    return "";
  }
  std::string mapping;
  if (!from.empty()) {
    mapping += ".strip_prefix(\"" + from + "\")";
  }
  if (!to.empty()) {
    mapping += ".add_prefix(\"" + to + "\")";
  }
  std::string said = from.empty() ? "the missing keys start with '" + to +
                                        "' and the checkpoint's do not"
                     : to.empty() ? "the unexpected keys start with '" + from +
                                        "' and the module's do not"
                                  : "the unexpected keys start with '" + from +
                                        "', the missing ones with '" + to + "'";
  return "Hint: " + said + "; LoadOptions().key_mapping(KeyMapping()" +
         mapping + ") matches " + std::to_string(matched) + " of the " +
         std::to_string(missing.size()) + " missing keys.";
}

// A tensor's shape and size before its data is read.
struct Shape {
  std::vector<std::int64_t> sizes;
  std::uint64_t nbytes = 0;
};

using Visitor = std::function<void(
    const std::string& file, const std::string& key, const at::Tensor& value)>;
// The module tensor a checkpoint key's values go to (undefined: none), so
// that a reader can put the bytes straight there.
using TargetOf = std::function<at::Tensor(const std::string& key)>;

// What a load reads: checkpoint tensors by name, in one or more files (or
// in memory). Headers come before values, so that nothing is copied unless
// everything fits.
class Source {
 public:
  virtual ~Source() = default;
  /// The checkpoint in messages: a file, an index, or "the state dict".
  virtual std::string where() const = 0;
  /// Whether strict errors take huggingface_hub's sharded format.
  virtual bool sharded() const {
    return false;
  }
  /// Every tensor name, before any header of a shard is read.
  virtual std::vector<std::string> keys() const = 0;
  /// alias → kept records of tied weights (the savers' metadata).
  virtual std::vector<std::pair<std::string, std::string>> metadata() const {
    return {};
  }
  /// The shapes of `wanted`, opening only what holds them.
  virtual std::map<std::string, Shape> shapes(
      const std::set<std::string>& wanted) = 0;
  /// The recorded CRC-32Cs of `wanted` (after shapes()), when asked for.
  virtual void check_checksums(const std::set<std::string>& /*wanted*/) {}
  /// Each of `wanted` once; mapped pages are dropped after `visit` returns.
  /// `value` may be the target itself, already filled (kDirect).
  virtual void for_each(
      const std::set<std::string>& wanted,
      const TargetOf& target_of,
      const Visitor& visit) = 0;
};

class MemorySource final : public Source {
 public:
  explicit MemorySource(const StateDict& state_dict)
      : state_dict_(state_dict) {}
  std::string where() const override {
    return "the state dict";
  }
  std::vector<std::string> keys() const override {
    return state_dict_.keys();
  }
  std::map<std::string, Shape> shapes(
      const std::set<std::string>& wanted) override {
    std::map<std::string, Shape> out;
    for (const std::string& key : wanted) {
      const at::Tensor& t = state_dict_[key];
      out[key] = Shape{t.sizes().vec(), static_cast<std::uint64_t>(t.nbytes())};
    }
    return out;
  }
  void for_each(
      const std::set<std::string>& wanted,
      const TargetOf& /*target_of*/,
      const Visitor& visit) override {
    for (const auto& item : state_dict_) {
      if (wanted.count(item.key()) != 0) {
        visit("", item.key(), item.value());
      }
    }
  }

 private:
  const StateDict& state_dict_;
};

void warn_note(const detail::TensorFile& file) {
  if (!file.note().empty()) {
    TORCH_WARN(file.note());
  }
}

Shape shape_of(const detail::TensorEntry& entry) {
  return Shape{entry.shape, entry.nbytes};
}

// Each wanted tensor of one file, in the reader's order (file order, or as
// kDirect's reads complete).
void visit_file(
    const detail::TensorFile& file,
    const std::set<std::string>& wanted,
    const std::string& name,
    const TargetOf& target_of,
    const Visitor& visit) {
  std::vector<std::string> names;
  std::vector<at::Tensor> targets;
  for (const detail::TensorEntry& entry : file.entries()) {
    if (wanted.count(entry.name) != 0) {
      names.push_back(entry.name);
      targets.push_back(target_of(entry.name));
    }
  }
  file.read_into(
      names, targets, [&](const std::string& key, const at::Tensor& value) {
        visit(name, key, value);
      });
}

class FileSource final : public Source {
 public:
  FileSource(const detail::TensorFile& file, bool verify_checksums)
      : file_(file), verify_checksums_(verify_checksums) {
    warn_note(file_);
    file_.check_format_metadata();
  }
  std::string where() const override {
    return file_.display_name();
  }
  std::vector<std::string> keys() const override {
    std::vector<std::string> out;
    out.reserve(file_.entries().size());
    for (const detail::TensorEntry& entry : file_.entries()) {
      out.push_back(entry.name);
    }
    return out;
  }
  std::vector<std::pair<std::string, std::string>> metadata() const override {
    return file_.metadata().value_or(
        std::vector<std::pair<std::string, std::string>>{});
  }
  std::map<std::string, Shape> shapes(
      const std::set<std::string>& wanted) override {
    std::map<std::string, Shape> out;
    for (const detail::TensorEntry& entry : file_.entries()) {
      if (wanted.count(entry.name) != 0) {
        out[entry.name] = shape_of(entry);
      }
    }
    return out;
  }
  void check_checksums(const std::set<std::string>& wanted) override {
    if (verify_checksums_ && !wanted.empty()) {
      detail::check_checksums(file_, wanted);
    }
  }
  void for_each(
      const std::set<std::string>& wanted,
      const TargetOf& target_of,
      const Visitor& visit) override {
    visit_file(
        file_,
        wanted,
        std::filesystem::path(file_.display_name()).filename(),
        target_of,
        visit);
  }

 private:
  const detail::TensorFile& file_;
  bool verify_checksums_;
};

// The shards an index names; a shard is opened only when it holds a wanted
// tensor, and then once for the headers and the values.
class ShardedSource final : public Source {
 public:
  ShardedSource(
      const detail::Checkpoint& checkpoint,
      const detail::TensorFileOptions& open,
      bool verify_checksums)
      : checkpoint_(checkpoint),
        open_(open),
        verify_checksums_(verify_checksums) {}
  std::string where() const override {
    return checkpoint_.index_path.string();
  }
  bool sharded() const override {
    return true;
  }
  std::vector<std::string> keys() const override {
    return {checkpoint_.index.keys.begin(), checkpoint_.index.keys.end()};
  }
  std::vector<std::pair<std::string, std::string>> metadata() const override {
    return checkpoint_.index.metadata;
  }
  std::map<std::string, Shape> shapes(
      const std::set<std::string>& wanted) override {
    std::map<std::string, Shape> out;
    for (const auto& [shard, names] : checkpoint_.index.shards) {
      std::vector<std::string> here;
      for (const std::string& name : names) {
        if (wanted.count(name) != 0) {
          here.push_back(name);
        }
      }
      if (here.empty()) {
        continue;
      }
      auto file =
          detail::open_tensor_file(checkpoint_.directory / shard, open_);
      warn_note(*file);
      file->check_format_metadata();
      std::map<std::string, const detail::TensorEntry*> entries;
      for (const detail::TensorEntry& entry : file->entries()) {
        entries.emplace(entry.name, &entry);
      }
      for (const std::string& name : here) {
        const auto entry = entries.find(name);
        if (entry == entries.end()) {
          // Loading on would leave the tensor silently unloaded.
          throw ValueError(
              "Index " + checkpoint_.index_path.string() + " places '" + name +
              "' in " + shard + ", but " + file->display_name() +
              " does not hold it");
        }
        out[name] = shape_of(*entry->second);
      }
      opened_.emplace_back(
          shard, std::set<std::string>(here.begin(), here.end()));
      files_.push_back(std::move(file));
    }
    return out;
  }
  void check_checksums(const std::set<std::string>& wanted) override {
    for (std::size_t i = 0; verify_checksums_ && i < files_.size(); ++i) {
      const std::set<std::string> here = wanted_in(i, wanted);
      if (!here.empty()) {
        detail::check_checksums(*files_[i], here);
      }
    }
  }
  void for_each(
      const std::set<std::string>& wanted,
      const TargetOf& target_of,
      const Visitor& visit) override {
    for (std::size_t i = 0; i < files_.size(); ++i) {
      visit_file(
          *files_[i], wanted_in(i, wanted), opened_[i].first, target_of, visit);
      files_[i].reset(); // unmapped as soon as its values are in
    }
  }

 private:
  // The names of `wanted` that opened shard `i` holds.
  std::set<std::string> wanted_in(
      std::size_t i, const std::set<std::string>& wanted) const {
    std::set<std::string> here;
    for (const std::string& name : opened_[i].second) {
      if (wanted.count(name) != 0) {
        here.insert(name);
      }
    }
    return here;
  }
  const detail::Checkpoint& checkpoint_;
  detail::TensorFileOptions open_;
  bool verify_checksums_;
  std::vector<std::pair<std::string, std::set<std::string>>> opened_;
  std::vector<std::unique_ptr<detail::TensorFile>> files_;
};

std::string class_name(const torch::nn::Module& model) {
  std::string name = model.name();
  // LibTorch names modules after their Impl class: "torch::nn::LinearImpl".
  if (has_suffix(name, "Impl")) {
    name.resize(name.size() - 4);
  }
  const std::size_t colon = name.rfind("::");
  return colon == std::string::npos ? name : name.substr(colon + 2);
}

// huggingface_hub's strict error for an index.
std::string sharded_strict_error(
    const std::string& module_class, const LoadResult& keys) {
  std::string message = "Error(s) in loading state_dict for " + module_class;
  if (!keys.missing_keys.empty()) {
    message += "\nMissing key(s): " + quoted_list(keys.missing_keys, ",") + ".";
  }
  if (!keys.unexpected_keys.empty()) {
    message +=
        "\nUnexpected key(s): " + quoted_list(keys.unexpected_keys, ",") + ".";
  }
  return message;
}

// PyTorch's load_state_dict lines for one file or a state dict (raised with
// the size mismatches).
std::vector<std::string> strict_errors(const LoadResult& keys) {
  std::vector<std::string> out;
  if (!keys.missing_keys.empty()) {
    out.push_back(
        "Missing key(s) in state_dict: " +
        quoted_list(keys.missing_keys, ", ") + ". ");
  }
  if (!keys.unexpected_keys.empty()) {
    out.push_back(
        "Unexpected key(s) in state_dict: " +
        quoted_list(keys.unexpected_keys, ", ") + ". ");
  }
  return out;
}

// The one loading procedure, for every source: select, map, check keys,
// check shapes, then copy.
LoadResult load_into(
    torch::nn::Module& model, Source& source, const LoadOptions& options) {
  const StateDict targets = state_dict(model);
  const KeyFilter filter(options);
  std::vector<std::string> selected;
  for (std::string& key : source.keys()) {
    if (filter.selected(key)) {
      selected.push_back(std::move(key));
    }
  }
  const auto mapped = map_keys(selected, options.key_mapping(), source.where());

  LoadResult result;
  std::map<std::string, std::string> module_of; // checkpoint → module name
  std::set<std::string> loaded;
  for (const auto& [checkpoint_key, module_key] : mapped) {
    if (filter.ignored(module_key)) {
      continue;
    }
    if (targets.contains(module_key)) {
      module_of.emplace(checkpoint_key, module_key);
      loaded.insert(module_key);
    } else {
      result.unexpected_keys.push_back(module_key);
    }
  }
  // alias → kept records re-tie a module key the checkpoint lacks (the
  // reference never re-ties them, so its strict loads of tied checkpoints
  // fail).
  std::map<std::string, std::string> retied; // module alias → checkpoint kept
  for (const auto& [alias, kept] : source.metadata()) {
    if (module_of.count(kept) == 0 || !filter.selected(alias)) {
      continue;
    }
    const std::optional<std::string> name =
        map_key(alias, options.key_mapping());
    if (name.has_value() && targets.contains(*name) &&
        loaded.count(*name) == 0 && !filter.ignored(*name)) {
      retied.emplace(*name, kept);
    }
  }
  for (const auto& item : targets) {
    if (loaded.count(item.key()) == 0 && retied.count(item.key()) == 0 &&
        !filter.ignored(item.key())) {
      result.missing_keys.push_back(item.key());
    }
  }
  std::sort(result.unexpected_keys.begin(), result.unexpected_keys.end());
  std::sort(result.missing_keys.begin(), result.missing_keys.end());
  std::string hint = prefix_hint(result.unexpected_keys, result.missing_keys);
  if (!hint.empty() && !options.key_mapping().empty()) {
    hint +=
        " (The names compared are those after your key_mapping: add the "
        "prefix step to it.)";
  }
  const std::string module_class = class_name(model);
  std::vector<std::string> errors;
  if (options.strict() &&
      (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    if (source.sharded()) {
      // Before any shard is opened.
      throw RuntimeError(
          sharded_strict_error(module_class, result) +
          (hint.empty() ? "" : "\n" + hint));
    }
    errors = strict_errors(result);
  }
  const bool keys_failed = !errors.empty();

  // Shapes, from the headers (or the mapped pickles): nothing is copied
  // unless everything fits.
  std::set<std::string> wanted;
  for (const auto& item : module_of) {
    wanted.insert(item.first);
  }
  const std::map<std::string, Shape> shapes = source.shapes(wanted);
  const auto check_shape = [&](const std::string& module_key,
                               const Shape& shape) {
    const at::Tensor& target = targets[module_key];
    if (target.sizes() == c10::IntArrayRef(shape.sizes)) {
      return true;
    }
    errors.push_back(
        "size mismatch for " + module_key + ": copying a param with shape " +
        torch_size(shape.sizes) +
        " from checkpoint, the shape in current model is " +
        torch_size(target.sizes()) + ".");
    return false;
  };
  std::uint64_t bytes_total = 0;
  for (const auto& [checkpoint_key, module_key] : module_of) {
    const Shape& shape = shapes.at(checkpoint_key);
    check_shape(module_key, shape);
    bytes_total += shape.nbytes;
  }
  std::multimap<std::string, std::string> aliases_of; // checkpoint kept → alias
  for (const auto& [alias, kept] : retied) {
    // An alias of another shape (a slice) cannot be rebuilt from its name.
    if (targets[alias].sizes() == c10::IntArrayRef(shapes.at(kept).sizes)) {
      aliases_of.emplace(kept, alias);
      loaded.insert(alias);
    } else if (options.strict()) {
      check_shape(alias, shapes.at(kept));
    } else {
      result.missing_keys.push_back(alias);
    }
  }
  std::sort(result.missing_keys.begin(), result.missing_keys.end());
  if (!errors.empty()) {
    std::string message =
        "Error(s) in loading state_dict for " + module_class + ":";
    for (const std::string& e : errors) {
      message += "\n\t" + e;
    }
    if (keys_failed && !hint.empty()) {
      message += "\n\t" + hint;
    }
    throw RuntimeError(message);
  }
  // The bytes last: a file whose keys or shapes are wrong says so first.
  source.check_checksums(wanted);

  // Then the values, file by file.
  at::NoGradGuard no_grad;
  std::uint64_t bytes_done = 0;
  const auto copy = [&](const std::string& module_key,
                        const at::Tensor& value) {
    at::Tensor target = targets[module_key];
    if (target.scalar_type() != value.scalar_type()) {
      result.dtype_changes.push_back(
          DtypeChange{module_key, value.scalar_type(), target.scalar_type()});
    }
    if (!target.is_same(value)) {
      target.copy_(value);
    } else {
      // Filled in place by the reader: an in-place change, as copy_ is.
      target.unsafeGetTensorImpl()->bump_version();
    }
  };
  source.for_each(
      wanted,
      [&](const std::string& key) { return targets[module_of.at(key)]; },
      [&](const std::string& file,
          const std::string& key,
          const at::Tensor& value) {
        copy(module_of.at(key), value);
        const auto [first, last] = aliases_of.equal_range(key);
        for (auto it = first; it != last; ++it) {
          copy(it->second, value);
        }
        bytes_done += shapes.at(key).nbytes;
        if (options.progress()) {
          options.progress()(Progress{file, key, bytes_done, bytes_total});
        }
      });

  result.loaded_keys.assign(loaded.begin(), loaded.end());
  for (const auto& [checkpoint_key, module_key] : module_of) {
    if (checkpoint_key != module_key) {
      result.renamed_keys.emplace_back(checkpoint_key, module_key);
    }
  }
  std::sort(
      result.dtype_changes.begin(),
      result.dtype_changes.end(),
      [](const DtypeChange& a, const DtypeChange& b) { return a.key < b.key; });
  if (loaded.empty() && !targets.is_empty()) {
    std::string warning =
        selected.empty()
            ? "Nothing was loaded: no tensor of " + source.where() +
                  (options.prefixes().empty()
                       ? " (it holds none)"
                       : " starts with the given prefixes")
            : "Nothing was loaded: none of the " +
                  std::to_string(selected.size()) + " tensors of " +
                  source.where() + " matched a key of " + module_class + " (" +
                  std::to_string(targets.size()) + " keys)";
    warning += hint.empty() ? "." : ". " + hint;
    TORCH_WARN(warning);
    result.warnings.push_back(std::move(warning));
  }
  return result;
}

detail::TensorFileOptions file_options(const LoadOptions& options) {
  detail::TensorFileOptions out;
  out.backend = options.backend();
  return out;
}

// What loading into a module refuses: it copies into the module's tensors,
// which decide device and dtype.
void check_module_options(const LoadOptions& options) {
  if (options.map_location().has_value()) {
    throw ValueError(
        "LoadOptions::map_location applies to load_state_dict_from_file; "
        "load_torch_model copies into "
        "the module's own tensors, wherever they are (move the module with "
        "->to(device) before or after "
        "loading).");
  }
  if (options.dtype().has_value()) {
    throw ValueError(
        "LoadOptions::dtype applies to load_state_dict_from_file; loading "
        "into a module converts to the module's own dtypes (cast the module "
        "with ->to(dtype); LoadResult::dtype_changes lists the conversions).");
  }
}

} // namespace

namespace detail {

LoadResult load_tensor_file_into(
    torch::nn::Module& model,
    const TensorFile& file,
    const LoadOptions& options) {
  check_module_options(options);
  FileSource source(file, options.verify_checksums());
  return load_into(model, source, options);
}

} // namespace detail

LoadResult load_state_dict(
    torch::nn::Module& model,
    const StateDict& state_dict,
    const LoadOptions& options) {
  check_module_options(options);
  MemorySource source(state_dict);
  return load_into(model, source, options);
}

StateDict load_state_dict_from_file(
    const std::filesystem::path& path_or_repo, const LoadOptions& options) {
  const std::filesystem::path path = resolve_hub_path(path_or_repo);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw FileNotFoundError(
        "No checkpoint file found at '" + path.string() +
        "'. Please verify the path is correct and the file has been properly "
        "downloaded.");
  }
  if (options.dtype().has_value() && !c10::isFloatingType(*options.dtype())) {
    throw ValueError(
        std::string("LoadOptions::dtype must be a floating-point dtype (it "
                    "casts floating-point tensors), not ") +
        c10::toString(*options.dtype()));
  }
  detail::TensorFileOptions open = file_options(options);
  open.device = options.map_location();
  const auto file = detail::open_tensor_file(path, open);
  warn_note(*file);
  file->check_format_metadata();
  const KeyFilter filter(options);
  std::vector<std::string> selected;
  std::map<std::string, std::uint64_t> nbytes;
  std::uint64_t bytes_total = 0;
  for (const detail::TensorEntry& entry : file->entries()) {
    if (filter.selected(entry.name)) {
      selected.push_back(entry.name);
      nbytes[entry.name] = entry.nbytes;
    }
  }
  auto mapped = map_keys(selected, options.key_mapping(), file->display_name());
  mapped.erase(
      std::remove_if(
          mapped.begin(),
          mapped.end(),
          [&](const auto& item) { return filter.ignored(item.second); }),
      mapped.end());
  std::set<std::string> read;
  for (const auto& item : mapped) {
    bytes_total += nbytes[item.first];
    read.insert(item.first);
  }
  // kDirect reads them all now, many reads in flight; the others on get().
  file->prefetch(std::vector<std::string>(read.begin(), read.end()));
  if (options.verify_checksums() && !read.empty()) {
    // On what was just read (kept: it is what this returns).
    detail::check_checksums(*file, read, false);
  }
  const std::string name = path.filename().string();
  StateDict out;
  out.reserve(mapped.size());
  std::uint64_t bytes_done = 0;
  for (const auto& [key, module_key] : mapped) {
    at::Tensor value = file->get(key);
    if (options.dtype().has_value() && value.is_floating_point() &&
        value.scalar_type() != *options.dtype()) {
      // The mapped view is read once, into the cast tensor.
      value = value.to(*options.dtype());
      file->release(key);
    }
    out.insert(module_key, std::move(value));
    bytes_done += nbytes[key];
    if (options.progress()) {
      options.progress()(Progress{name, key, bytes_done, bytes_total});
    }
  }
  return out;
}

LoadResult load_torch_model(
    torch::nn::Module& model,
    const std::filesystem::path& path_or_repo,
    const LoadOptions& options) {
  const std::filesystem::path checkpoint_path = resolve_hub_path(path_or_repo);
  std::error_code ec;
  if (!std::filesystem::exists(checkpoint_path, ec)) {
    const auto repo = parse_hub_reference(checkpoint_path.string());
    throw ValueError(
        "Checkpoint path " + checkpoint_path.string() + " does not exist" +
        (repo.has_value()
             ? " (nor does the Hugging Face cache " + hf_hub_cache().string() +
                   " hold a repo '" + repo->repo_id + "')"
             : std::string()));
  }
  check_module_options(options);
  std::optional<detail::DirectoryLock> lock;
  const std::string given = checkpoint_path.filename().string();
  const bool index_given = given.size() > std::strlen(kIndexSuffix) &&
                           has_suffix(given, kIndexSuffix);
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
    ShardedSource source(
        checkpoint, file_options(options), options.verify_checksums());
    return load_into(model, source, options);
  }
  const auto file =
      detail::open_tensor_file(checkpoint.files.front(), file_options(options));
  FileSource source(*file, options.verify_checksums());
  return load_into(model, source, options);
}

} // namespace torchser
