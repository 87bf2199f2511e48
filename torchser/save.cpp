#include <torchser/save.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

#include <torchser/errors.h>
#include <torchser/module.h>
#include <torchser/safetensors.h>
#include <torchser/storage.h>

#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/file.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/parallel.h"
#include "torchser/detail/pickle_writer.h"
#include "torchser/detail/python_format.h"
#include "torchser/detail/save_plan.h"
#include "torchser/detail/shared_tensors.h"

namespace torchser {
namespace {

// The state dict under the written names (the same tensors, no copy).
StateDict renamed(const StateDict& state_dict, const KeyMapping& mapping) {
  StateDict out;
  out.reserve(state_dict.size());
  for (const auto& [from, to] :
       map_keys(state_dict.keys(), mapping, "the state dict")) {
    out.insert(to, state_dict[from]);
  }
  return out;
}

// A storage's bytes once cast: what `model.to(dtype)` gives it.
std::uint64_t cast_storage_size(
    const at::Tensor& t, std::optional<c10::ScalarType> dtype) {
  const std::uint64_t size = get_torch_storage_size(t);
  if (!dtype.has_value() || !t.is_floating_point()) {
    return size;
  }
  return size / t.element_size() * c10::elementSize(*dtype);
}

// `tensors` with floating-point storages cast to `dtype`, each storage
// once, so that tensors viewing one storage still view one (ties stay tied
// in torch.save files).
StateDict cast_storages(const StateDict& tensors, c10::ScalarType dtype) {
  std::map<const void*, at::Tensor> cast_base; // by storage data
  StateDict out;
  out.reserve(tensors.size());
  for (const auto& item : tensors) {
    const at::Tensor& t = item.value();
    if (!t.is_floating_point() || t.scalar_type() == dtype) {
      out.insert(item.key(), t);
      continue;
    }
    const auto storage = t.storage();
    const auto whole = static_cast<std::int64_t>(storage.nbytes()) /
                       static_cast<std::int64_t>(t.element_size());
    auto it = cast_base.find(storage.data());
    if (it == cast_base.end() || it->second.numel() != whole ||
        it->second.scalar_type() != dtype) {
      at::Tensor base = at::empty({0}, t.options());
      base.set_(storage, 0, {whole}, {1});
      it = cast_base.insert_or_assign(storage.data(), base.to(dtype)).first;
    }
    out.insert(
        item.key(),
        it->second.as_strided(t.sizes(), t.strides(), t.storage_offset()));
  }
  return out;
}

} // namespace

bool recover_interrupted_save(const std::filesystem::path& directory) {
  // A save in progress holds the lock: its files are not leftovers, and it
  // will finish its own commit.
  const detail::DirectoryLock lock(
      directory, detail::DirectoryLock::Mode::kExclusive, /*wait=*/false);
  return lock.held() && detail::recover_locked(directory);
}

namespace detail {

SaveOptions without_key_mapping(const SaveOptions& options) {
  SaveOptions written = options;
  std::vector<std::string> discard;
  for (const std::string& name : options.shared_tensors_to_discard()) {
    if (auto mapped = map_key(name, options.key_mapping())) {
      discard.push_back(std::move(*mapped));
    }
  }
  written.key_mapping(KeyMapping()).shared_tensors_to_discard(discard);
  return written;
}

SavePlan plan_save(const StateDict& state_dict, const SaveOptions& options) {
  if (options.dtype().has_value() && !c10::isFloatingType(*options.dtype())) {
    throw ValueError(
        std::string("SaveOptions::dtype must be a floating-point dtype (it "
                    "casts floating-point tensors), not ") +
        c10::toString(*options.dtype()));
  }
  SavePlan plan;
  plan.safe = options.safe_serialization();
  plan.pattern_text = options.filename_pattern().value_or(
      plan.safe ? kSafetensorsWeightsFilePattern : kPytorchWeightsFilePattern);
  const FilenamePattern pattern(plan.pattern_text);
  for (const auto& item : options.metadata()) {
    // torchser's own record of the bytes is written fresh, or not at all.
    if (item.key() != kChecksumMetadataKey) {
      plan.metadata.insert(item.key(), item.value());
    }
  }
  if (const std::string* format = plan.metadata.find("format");
      format != nullptr && *format != "pt") {
    throw ValueError(
        "metadata['format'] is '" + *format +
        "', but files written by save_torch_state_dict must say 'pt' "
        "(load_state_dict_from_file would reject them).");
  }

  // Tied weights: keep one name per storage, record the others in metadata
  // (without touching the caller's dict or metadata). torch.save files keep
  // shared storage themselves.
  if (plan.safe) {
    plan.tied = drop_aliases(state_dict, options.shared_tensors_to_discard());
    for (const auto& [alias, kept] : plan.tied.aliases) {
      if (!plan.metadata.contains(alias)) {
        plan.metadata.insert(alias, kept);
      }
    }
  } else {
    plan.tied.kept = state_dict;
  }
  const StateDict& tensors = plan.tied.kept;
  const SplitOptions split_options =
      SplitOptions()
          .filename_pattern(plan.pattern_text)
          .max_shard_size(options.max_shard_size());
  plan.split =
      options.dtype().has_value()
          ? split_state_dict_into_shards_factory(
                tensors,
                [&](const at::Tensor& t) {
                  return cast_storage_size(t, options.dtype());
                },
                [](const at::Tensor& t) { return get_torch_storage_id(t); },
                split_options)
          : split_torch_state_dict_into_shards(tensors, split_options);
  plan.index_name = pattern.format("") + kIndexSuffix;
  return plan;
}

std::vector<std::string> SavePlan::files() const {
  std::vector<std::string> names;
  for (const auto& shard : split.filename_to_tensors) {
    names.push_back(shard.key());
  }
  if (split.is_sharded) {
    names.push_back(index_name);
  }
  return names;
}

StateDict SavePlan::shard_dict(std::size_t shard) const {
  const auto& names = split.filename_to_tensors.items()[shard].value();
  StateDict out;
  out.reserve(names.size());
  for (const std::string& name : names) {
    out.insert(name, tied.kept[name]);
  }
  return out;
}

SafetensorsMetadata SavePlan::file_metadata() const {
  SafetensorsMetadata out{{"format", "pt"}};
  if (!split.is_sharded) {
    for (const auto& item : metadata) {
      out[item.key()] = item.value();
    }
  }
  return out;
}

std::string SavePlan::index() const {
  return index_json(split, metadata);
}

} // namespace detail

void save_torch_state_dict(
    const StateDict& state_dict,
    const std::filesystem::path& save_directory,
    const SaveOptions& options) {
  if (!options.key_mapping().empty()) {
    save_torch_state_dict(
        renamed(state_dict, options.key_mapping()),
        save_directory,
        detail::without_key_mapping(options));
    return;
  }
  const detail::SavePlan plan = detail::plan_save(state_dict, options);
  const bool safe = plan.safe;
  const StateDictSplit& split = plan.split;
  const std::string& index_name = plan.index_name;
  std::error_code ec;
  if (!std::filesystem::is_directory(save_directory, ec)) {
    detail::throw_os_error("Cannot save into", save_directory, ENOENT);
  }

  // Takes the directory's lock and finishes any interrupted save first.
  detail::CheckpointCommit commit(
      save_directory,
      split.filename_to_tensors.size() + (split.is_sharded ? 1 : 0),
      options.durable());
  if (options.is_main_process()) {
    commit.remove(detail::stale_files(
        save_directory,
        detail::FilenamePattern(plan.pattern_text),
        plan.files()));
  }

  std::mutex progress_mutex;
  std::uint64_t bytes_done = 0;
  const auto report = [&](const std::string& file,
                          const std::string& tensor,
                          std::uint64_t bytes) {
    if (options.progress()) {
      const std::lock_guard<std::mutex> guard(progress_mutex);
      bytes_done += bytes;
      options.progress()(Progress{
          file,
          tensor,
          bytes_done,
          static_cast<std::uint64_t>(split.metadata.total_size)});
    }
  };

  // Shards are written by up to four threads at once: copying into the page
  // cache is CPU work, and a single writer leaves the other cores idle.
  const auto& shards = split.filename_to_tensors.items();
  const auto write_shard = [&](std::size_t i) {
    const auto& shard = shards[i];
    const StateDict shard_dict = plan.shard_dict(i);
    detail::AtomicFile file(commit.target(shard.key()));
    if (safe) {
      const SafetensorsWriter writer(
          shard_dict,
          plan.file_metadata(),
          options.force_contiguous(),
          options.dtype(),
          options.checksums());
      file.preallocate(writer.size());
      writer.write(
          [&](const void* data, std::size_t size) { file.write(data, size); },
          [&](std::size_t t) {
            const auto& info = writer.tensors()[t];
            report(shard.key(), info.name, info.end - info.begin);
          });
      if (options.checksums()) {
        const std::string header = writer.final_header();
        file.patch(header.data(), header.size(), 8);
      }
    } else {
      const std::string stem =
          std::filesystem::path(shard.key()).stem().string();
      detail::write_torch_save(
          options.dtype().has_value()
              ? cast_storages(shard_dict, *options.dtype())
              : shard_dict,
          file,
          stem.empty() ? "archive" : stem,
          [&](const std::vector<std::string>& names, std::uint64_t bytes) {
            for (std::size_t n = 0; n < names.size(); ++n) {
              report(shard.key(), names[n], n == 0 ? bytes : 0);
            }
          });
    }
    commit.stage(shard.key(), file.keep(options.durable()));
  };
  // A failure rethrows after every writer stopped; the commit's destructor
  // then removes what was staged.
  detail::parallel_for(shards.size(), 4, [&](std::size_t i) {
    try {
      write_shard(i);
    } catch (const FileNotFoundError&) {
      throw;
    } catch (const OSError& e) {
      // The file named may be in the staging directory: say which save.
      throw OSError(
          std::string(e.what()) + " (saving into '" + save_directory.string() +
          "')");
    }
  });
  if (split.is_sharded) {
    const std::string index = plan.index();
    detail::AtomicFile file(commit.target(index_name));
    file.write(index.data(), index.size());
    commit.stage(index_name, file.keep(options.durable()));
  }
  commit.commit();
}

void save_torch_model(
    const torch::nn::Module& model,
    const std::filesystem::path& save_directory,
    const SaveOptions& options) {
  save_torch_state_dict(state_dict(model), save_directory, options);
}

} // namespace torchser
