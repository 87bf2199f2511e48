#include <torchser/hub_cache.h>

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>
#include <vector>

#include <openssl/evp.h>

#include <torchser/errors.h>

#include "torchser/detail/hub_cache.h"

namespace torchser {
namespace {

namespace fs = std::filesystem;

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

// Python's os.path.expanduser: a leading "~" or "~user".
std::string expand_user(const std::string& path) {
  if (path.empty() || path[0] != '~') {
    return path;
  }
  const std::size_t slash = path.find('/');
  const std::string user =
      path.substr(1, slash == std::string::npos ? slash : slash - 1);
  std::string home;
  if (user.empty()) {
    home = env("HOME");
    if (home.empty()) {
      if (const passwd* pw = ::getpwuid(::getuid()); pw != nullptr) {
        home = pw->pw_dir;
      }
    }
  } else if (const passwd* pw = ::getpwnam(user.c_str()); pw != nullptr) {
    home = pw->pw_dir;
  } else {
    return path;
  }
  return home + (slash == std::string::npos ? "" : path.substr(slash));
}

// Python's os.path.expandvars: $NAME and ${NAME} when set, else unchanged.
std::string expand_vars(const std::string& path) {
  std::string out;
  for (std::size_t i = 0; i < path.size(); ++i) {
    if (path[i] != '$') {
      out += path[i];
      continue;
    }
    const bool braced = i + 1 < path.size() && path[i + 1] == '{';
    std::size_t begin = i + (braced ? 2 : 1);
    std::size_t end = begin;
    while (end < path.size() &&
           (std::isalnum(static_cast<unsigned char>(path[end])) != 0 ||
            path[end] == '_')) {
      ++end;
    }
    if (end == begin || (braced && (end >= path.size() || path[end] != '}'))) {
      out += path[i];
      continue;
    }
    const std::string name = path.substr(begin, end - begin);
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) {
      out += path.substr(i, end + (braced ? 1 : 0) - i);
    } else {
      out += value;
    }
    i = end + (braced ? 1 : 0) - 1;
  }
  return out;
}

std::string expanded(const std::string& path) {
  return expand_vars(expand_user(path));
}

// huggingface_hub's validate_repo_id: one or two parts of [\w.-], each
// starting and ending with a word character; no "--" or "..".
bool valid_repo_id(const std::string& repo_id) {
  if (repo_id.empty() || repo_id.size() > 96 ||
      repo_id.find("--") != std::string::npos ||
      repo_id.find("..") != std::string::npos) {
    return false;
  }
  const auto word = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
  };
  std::size_t parts = 0;
  std::size_t begin = 0;
  while (begin <= repo_id.size()) {
    std::size_t end = repo_id.find('/', begin);
    if (end == std::string::npos) {
      end = repo_id.size();
    }
    const std::string part = repo_id.substr(begin, end - begin);
    if (part.empty() || !word(part.front()) || !word(part.back()) ||
        !std::all_of(part.begin(), part.end(), [&](char c) {
          return word(c) || c == '-' || c == '.';
        })) {
      return false;
    }
    ++parts;
    begin = end + 1;
  }
  return parts <= 2;
}

// A name that stays one level inside its folder (refs content, revisions).
bool plain_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find('\0') == std::string::npos;
}

bool inside(const fs::path& child, const fs::path& parent) {
  const auto [p, c] =
      std::mismatch(parent.begin(), parent.end(), child.begin(), child.end());
  return p == parent.end();
}

// huggingface_hub's repo_folder_name: "models--org--name".
std::string folder_name(const std::string& repo_id) {
  std::string folder = "models--" + repo_id;
  for (std::size_t at = folder.find('/'); at != std::string::npos;
       at = folder.find('/', at)) {
    folder.replace(at, 1, "--");
  }
  return folder;
}

fs::path repo_folder(
    const std::string& repo_id, const std::optional<fs::path>& cache_dir) {
  const fs::path cache = cache_dir.value_or(hf_hub_cache());
  const std::string folder = folder_name(repo_id);
  const fs::path repo = cache / folder;
  std::error_code ec;
  if (!valid_repo_id(repo_id)) {
    throw ValueError(
        "Repo id must use alphanumeric chars, '-', '_' or '.' (one '/' at "
        "most, no '--' or '..'): '" +
        repo_id + "'.");
  }
  if (!fs::is_directory(repo, ec)) {
    throw LocalEntryNotFoundError(
        "Cannot find '" + repo_id +
        "': it is no local path, and the Hugging Face cache has no " + folder +
        " in " + cache.string() +
        " (torchser never downloads: fetch it first, e.g. `hf download " +
        repo_id + "`, or set HF_HUB_CACHE / HF_HOME).");
  }
  return repo;
}

std::string read_ref(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  std::string commit = text.str();
  while (!commit.empty() &&
         std::isspace(static_cast<unsigned char>(commit.back())) != 0) {
    commit.pop_back();
  }
  return commit;
}

// What the cache holds, for messages: "main -> 1a2b3c4, v1.0 -> …;
// snapshots: 1a2b3c4…".
std::string cached_revisions(const fs::path& repo) {
  std::string refs;
  std::error_code ec;
  std::vector<std::string> names;
  for (auto it = fs::recursive_directory_iterator(repo / "refs", ec);
       !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (it->is_regular_file(ec)) {
      names.push_back(fs::relative(it->path(), repo / "refs", ec).string());
    }
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    refs += (refs.empty() ? "" : ", ") + name + " -> " +
            read_ref(repo / "refs" / name).substr(0, 12);
  }
  std::vector<std::string> snapshots;
  for (auto it = fs::directory_iterator(repo / "snapshots", ec);
       !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    snapshots.push_back(it->path().filename().string());
  }
  std::sort(snapshots.begin(), snapshots.end());
  std::string snaps;
  for (const std::string& s : snapshots) {
    snaps += (snaps.empty() ? "" : ", ") + s;
  }
  return "refs: " + (refs.empty() ? std::string("none") : refs) +
         "; snapshots: " + (snaps.empty() ? std::string("none") : snaps);
}

// The commit `revision` names: a refs/ file's content, else the name itself
// (a commit hash, as huggingface_hub takes a snapshot folder's name).
std::string commit_of(
    const fs::path& repo,
    const std::string& repo_id,
    const std::string& revision) {
  if (!plain_name(revision) || revision.find("..") != std::string::npos ||
      revision.front() == '/') {
    throw ValueError("Invalid revision '" + revision + "' for " + repo_id);
  }
  std::error_code ec;
  const fs::path ref = repo / "refs" / revision;
  if (fs::is_regular_file(ref, ec)) {
    const std::string commit = read_ref(ref);
    if (!plain_name(commit) || commit.find('/') != std::string::npos) {
      throw OSError(
          "Cannot read revision '" + revision + "' of " + repo_id + ": " +
          ref.string() + " does not hold a commit hash");
    }
    return commit;
  }
  return revision;
}

void check_link(
    const fs::path& link, const fs::path& repo, const std::string& repo_id) {
  std::error_code ec;
  const fs::path target = fs::canonical(link, ec);
  if (ec) {
    throw OSError(
        "Cannot read " + link.string() +
        " in the Hugging Face cache: a "
        "symlink to a missing blob (" +
        fs::read_symlink(link, ec).string() + "); download " + repo_id +
        " again");
  }
  if (!inside(target, fs::canonical(repo, ec))) {
    throw OSError(
        "Refusing " + link.string() + ": a symlink in the cache of " + repo_id +
        " that leads outside its folder " + repo.string() + " (to " +
        target.string() + ")");
  }
}

fs::path snapshot_folder(
    const fs::path& repo,
    const std::string& repo_id,
    const std::string& revision) {
  const std::string commit = commit_of(repo, repo_id, revision);
  const fs::path snapshot = repo / "snapshots" / commit;
  std::error_code ec;
  if (commit.find('/') != std::string::npos ||
      !fs::is_directory(snapshot, ec)) {
    throw LocalEntryNotFoundError(
        "Cannot find revision '" + revision + "' of " + repo_id +
        " in the Hugging Face cache " + repo.string() +
        (commit != revision ? " (refs/" + revision + " names " + commit +
                                  ", whose snapshot is missing)"
                            : "") +
        "; it holds " + cached_revisions(repo) + ".");
  }
  if (fs::is_symlink(snapshot, ec)) {
    check_link(snapshot, repo, repo_id);
  }
  return snapshot;
}

} // namespace

fs::path hf_hub_cache() {
  for (const char* name : {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}) {
    if (const std::string value = env(name); !value.empty()) {
      return expanded(value);
    }
  }
  std::string home = env("HF_HOME");
  if (home.empty()) {
    std::string xdg = env("XDG_CACHE_HOME");
    home = (xdg.empty() ? std::string("~/.cache") : xdg) + "/huggingface";
  }
  return fs::path(expanded(home)) / "hub";
}

std::optional<HubReference> parse_hub_reference(std::string_view text) {
  const std::string s(text);
  if (s.empty() || s[0] == '/' || s[0] == '.' || s[0] == '~' ||
      s.find('\\') != std::string::npos || s.find("//") != std::string::npos ||
      s.find('\0') != std::string::npos || s.back() == '/') {
    return std::nullopt;
  }
  HubReference ref;
  const std::size_t at = s.find('@');
  std::string rest;
  if (at != std::string::npos) {
    ref.repo_id = s.substr(0, at);
    const std::string tail = s.substr(at + 1);
    const std::size_t slash = tail.find('/');
    ref.revision = tail.substr(0, slash);
    rest = slash == std::string::npos ? "" : tail.substr(slash + 1);
    if (ref.revision.empty()) {
      return std::nullopt;
    }
  } else {
    const std::size_t first = s.find('/');
    const std::size_t second =
        first == std::string::npos ? first : s.find('/', first + 1);
    ref.repo_id = s.substr(0, second);
    rest = second == std::string::npos ? "" : s.substr(second + 1);
  }
  if (!valid_repo_id(ref.repo_id)) {
    return std::nullopt;
  }
  for (const auto& part : fs::path(rest)) {
    if (part == ".." || part == ".") {
      return std::nullopt;
    }
  }
  ref.filename = rest;
  return ref;
}

fs::path cached_snapshot(
    const std::string& repo_id,
    const std::string& revision,
    const std::optional<fs::path>& cache_dir) {
  const fs::path repo = repo_folder(repo_id, cache_dir);
  const fs::path snapshot = snapshot_folder(repo, repo_id, revision);
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(snapshot, ec);
       it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (ec) {
      break;
    }
    if (it->is_symlink(ec)) {
      check_link(it->path(), repo, repo_id);
    }
  }
  if (ec) {
    throw OSError("Cannot list " + snapshot.string() + ": " + ec.message());
  }
  return snapshot;
}

fs::path cached_file(
    const std::string& repo_id,
    const std::string& filename,
    const std::string& revision,
    const std::optional<fs::path>& cache_dir) {
  const fs::path name(filename);
  if (filename.empty() || name.is_absolute() ||
      std::any_of(name.begin(), name.end(), [](const fs::path& part) {
        return part == ".." || part == ".";
      })) {
    throw ValueError(
        "Invalid filename '" + filename + "' in " + repo_id +
        ": a path inside the repo, without '..'");
  }
  const fs::path repo = repo_folder(repo_id, cache_dir);
  const std::string commit = commit_of(repo, repo_id, revision);
  std::error_code ec;
  if (fs::is_regular_file(repo / ".no_exist" / commit / name, ec)) {
    throw LocalEntryNotFoundError(
        "Cannot find '" + filename + "' in " + repo_id + "@" + revision +
        ": the Hugging Face cache records that the repo does not have it (" +
        (repo / ".no_exist" / commit / name).string() + ").");
  }
  const fs::path snapshot = snapshot_folder(repo, repo_id, revision);
  const fs::path file = snapshot / name;
  if (!fs::exists(fs::symlink_status(file, ec))) {
    std::vector<std::string> names;
    for (auto it = fs::directory_iterator(snapshot, ec);
         !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      names.push_back(it->path().filename().string());
    }
    std::sort(names.begin(), names.end());
    std::string held;
    for (const std::string& name : names) {
      held += (held.empty() ? "" : ", ") + name;
    }
    throw LocalEntryNotFoundError(
        "Cannot find '" + filename + "' in the cached snapshot of " + repo_id +
        "@" + revision + " (" + snapshot.string() + "), which holds: " +
        (held.empty() ? std::string("nothing") : held) + ".");
  }
  // Each component may be a link (a folder of a pipeline, the file itself).
  fs::path walked = snapshot;
  for (const auto& part : name) {
    walked /= part;
    if (fs::is_symlink(walked, ec)) {
      check_link(walked, repo, repo_id);
    }
  }
  return file;
}

fs::path resolve_hub_path(const fs::path& path) {
  std::error_code ec;
  if (fs::exists(fs::symlink_status(path, ec))) {
    return path;
  }
  const std::optional<HubReference> ref = parse_hub_reference(path.string());
  if (!ref.has_value()) {
    return path;
  }
  if (path.string().find('@') == std::string::npos &&
      !fs::is_directory(hf_hub_cache() / folder_name(ref->repo_id), ec)) {
    // Without '@', a name ("gpt2", "runs/exp1") is a cached repo only when the
    // cache holds it; otherwise it is the missing local path it looks like,
    // and keeps that error.
    return path;
  }
  const fs::path snapshot = cached_snapshot(ref->repo_id, ref->revision);
  if (ref->filename.empty()) {
    return snapshot;
  }
  if (fs::is_directory(snapshot / ref->filename, ec)) {
    return snapshot / ref->filename;
  }
  return cached_file(ref->repo_id, ref->filename, ref->revision);
}

} // namespace torchser

namespace torchser::detail {
namespace {

namespace fs = std::filesystem;

bool hex_name(const std::string& name, std::size_t length) {
  return name.size() == length &&
         std::all_of(name.begin(), name.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// The digest of `file`'s content, as git's blob id when `git_blob`.
std::string digest_of(const fs::path& file, bool git_blob) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw OSError("Cannot read " + file.string());
  }
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr ||
      EVP_DigestInit_ex(ctx, git_blob ? EVP_sha1() : EVP_sha256(), nullptr) !=
          1) {
    EVP_MD_CTX_free(ctx);
    throw RuntimeError("OpenSSL could not start a digest");
  }
  if (git_blob) {
    std::error_code ec;
    const std::string head = "blob " + std::to_string(fs::file_size(file, ec)) +
                             std::string(1, '\0');
    EVP_DigestUpdate(ctx, head.data(), head.size());
  }
  std::vector<char> buffer(std::size_t{4} << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    EVP_DigestUpdate(ctx, buffer.data(), static_cast<std::size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(ctx, digest, &size);
  EVP_MD_CTX_free(ctx);
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) {
    out += digits[digest[i] >> 4];
    out += digits[digest[i] & 15];
  }
  return out;
}

} // namespace

fs::path snapshot_of(const fs::path& path) {
  const fs::path absolute = fs::absolute(path).lexically_normal();
  fs::path walked;
  std::vector<fs::path> parts(absolute.begin(), absolute.end());
  for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
    walked /= parts[i];
    const std::string repo = parts[i].string();
    if (i + 2 < parts.size() + 1 && parts[i + 1] == "snapshots" &&
        i + 2 < parts.size() &&
        (repo.rfind("models--", 0) == 0 || repo.rfind("datasets--", 0) == 0 ||
         repo.rfind("spaces--", 0) == 0)) {
      return walked / parts[i + 1] / parts[i + 2];
    }
  }
  return {};
}

std::vector<BlobCheck> check_cached_blobs(const fs::path& snapshot) {
  std::vector<BlobCheck> out;
  std::error_code ec;
  std::vector<fs::path> links;
  if (fs::is_symlink(snapshot, ec) && !fs::is_directory(snapshot, ec)) {
    links.push_back(snapshot); // one file
  }
  for (auto it = fs::recursive_directory_iterator(snapshot, ec);
       !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (it->is_symlink(ec)) {
      links.push_back(it->path());
    }
  }
  std::sort(links.begin(), links.end());
  for (const fs::path& link : links) {
    const fs::path target = fs::read_symlink(link, ec);
    const std::string blob = target.filename().string();
    if (ec || target.parent_path().filename() != "blobs" ||
        !fs::is_regular_file(link, ec)) {
      continue;
    }
    const bool lfs = hex_name(blob, 64);
    if (!lfs && !hex_name(blob, 40)) {
      continue;
    }
    out.push_back(BlobCheck{
        link, blob, lfs ? "sha256" : "git-sha1", digest_of(link, !lfs)});
  }
  return out;
}

fs::path local_dir_of(const fs::path& path) {
  std::error_code ec;
  for (fs::path dir = fs::absolute(path, ec).lexically_normal(); !dir.empty();
       dir = dir.parent_path()) {
    if (fs::is_directory(dir / ".cache" / "huggingface" / "download", ec)) {
      return dir;
    }
    if (dir == dir.parent_path()) {
      break;
    }
  }
  return {};
}

std::vector<BlobCheck> check_local_dir_downloads(
    const fs::path& local_dir,
    const fs::path& path,
    std::vector<std::string>* outdated) {
  std::vector<BlobCheck> out;
  const fs::path records = local_dir / ".cache" / "huggingface" / "download";
  fs::path scope = fs::absolute(path).lexically_normal();
  if (scope.filename().empty()) {
    scope = scope.parent_path(); // "dl/" names the folder dl
  }
  std::error_code ec;
  std::vector<fs::path> metadata;
  for (auto it = fs::recursive_directory_iterator(records, ec);
       !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (it->path().extension() == ".metadata" && it->is_regular_file(ec)) {
      metadata.push_back(it->path());
    }
  }
  std::sort(metadata.begin(), metadata.end());
  for (const fs::path& record : metadata) {
    fs::path relative = fs::relative(record, records, ec);
    relative.replace_extension(); // "model.safetensors.metadata" → its file
    const fs::path file = fs::absolute(local_dir / relative).lexically_normal();
    if (!inside(file, scope) || !fs::is_regular_file(file, ec)) {
      continue;
    }
    std::ifstream in(record);
    std::string commit;
    std::string etag;
    std::string timestamp;
    std::getline(in, commit);
    std::getline(in, etag);
    std::getline(in, timestamp);
    const bool lfs = hex_name(etag, 64);
    if (!lfs && !hex_name(etag, 40)) {
      continue;
    }
    // huggingface_hub trusts a record only while the file is not newer.
    double recorded = 0;
    try {
      recorded = std::stod(timestamp);
    } catch (const std::exception&) {
      continue;
    }
    struct stat st {};
    if (::stat(file.c_str(), &st) != 0) {
      continue;
    }
    const double mtime = static_cast<double>(st.st_mtim.tv_sec) +
                         static_cast<double>(st.st_mtim.tv_nsec) / 1e9;
    if (mtime - 1 > recorded) {
      if (outdated != nullptr) {
        outdated->push_back(relative.string());
      }
      continue;
    }
    out.push_back(BlobCheck{
        file, etag, lfs ? "sha256" : "git-sha1", digest_of(file, !lfs)});
  }
  return out;
}

} // namespace torchser::detail
