// torch_load: the weights-only unpickler over a torch.save ZIP archive, and
// extract_state_dict.

#include <torchser/pickle.h>

#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <torchser/storage.h>

#include "torchser/detail/file.h"
#include "torchser/detail/torch_load_layout.h"
#include "torchser/detail/torch_storage_types.h"
#include "torchser/detail/torch_version.h"
#include "torchser/detail/zip.h"

namespace torchser {

// ---------------------------------------------------------------------------
// The pickle machine

namespace {

using detail::is_untyped_storage;
using detail::storage_type_name;
using detail::storage_types;
using detail::v3_dtype_name;
using detail::v3_dtypes;

const std::set<std::string>& allowed_globals() {
  static const std::set<std::string> globals = {
      "collections.OrderedDict",
      "torch._utils._rebuild_tensor_v2",
      "torch._utils._rebuild_tensor_v3",
      "torch.storage.UntypedStorage",
      "torch.UntypedStorage",
      "torch._utils._rebuild_parameter",
      "torch._utils._rebuild_parameter_with_state",
      "torch.device",
      "torch.Size",
  };
  return globals;
}

enum class Tag : std::uint8_t {
  kNone,
  kBool,
  kInt,
  kFloat,
  kStr,
  kBytes,
  kTensor,
  kList,
  kTuple,
  kDict,
  kGlobal,
  kStorage,
};

// A value on the machine's stack. Containers live in the machine's arena and
// are referred to by index, so aliasing (the memo) and even cycles in a
// hostile file are just references; the tree handed out is built at the end.
struct V {
  Tag tag = Tag::kNone;
  bool b = false;
  std::int64_t i = 0;
  double f = 0;
  std::string s;         // str, bytes, global name
  at::Tensor t;          // tensor, storage base
  std::uint32_t ref = 0; // container index
};

struct Container {
  Tag kind;
  bool ordered = false;
  std::vector<V> items;                 // list, tuple
  std::vector<std::pair<V, V>> entries; // dict
  std::unordered_map<std::string, std::size_t>
      str_keys; // dict: str key → entry
};

// Provides the base tensor of a storage record (1-D, `numel` elements).
using StorageProvider = std::function<at::Tensor(
    const std::string& key, at::ScalarType dtype, std::int64_t numel)>;

class Machine {
 public:
  Machine(
      const std::uint8_t* data,
      std::size_t size,
      std::string source,
      StorageProvider storages)
      : data_(data),
        size_(size),
        source_(std::move(source)),
        storages_(std::move(storages)) {}

  PickleValue run() {
    while (true) {
      if (pos_ >= size_) {
        fail("the pickle ends without a STOP opcode");
      }
      op_pos_ = pos_;
      op_ = data_[pos_++];
      if (op_ == '.') { // STOP
        if (stack_.size() != 1 || !marks_.empty()) {
          fail("the stack does not hold exactly one value at STOP");
        }
        if (pos_ != size_) {
          fail(
              "there are " + std::to_string(size_ - pos_) +
              " bytes after STOP");
        }
        std::set<std::uint32_t> open;
        std::size_t budget = std::max<std::size_t>(1 << 20, 8 * size_);
        return materialize(stack_.back(), open, budget);
      }
      step();
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    char op[8];
    std::snprintf(op, sizeof op, "0x%02x", op_);
    throw UnpicklingError(
        "Cannot load " + source_ + ": " + what + " (pickle opcode " + op +
        " at byte " + std::to_string(op_pos_) + " of data.pkl)");
  }

  const std::uint8_t* take(std::size_t n) {
    if (n > size_ - pos_) {
      fail("the pickle is truncated");
    }
    const std::uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  std::uint64_t le(std::size_t n) {
    const std::uint8_t* p = take(n);
    std::uint64_t v = 0;
    for (std::size_t k = n; k-- > 0;) {
      v = (v << 8) | p[k];
    }
    return v;
  }
  std::string text(std::size_t n) {
    const std::uint8_t* p = take(n);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  std::string line() {
    const auto* start = data_ + pos_;
    const void* nl = std::memchr(start, '\n', size_ - pos_);
    if (nl == nullptr) {
      fail("a GLOBAL name is not terminated by a newline");
    }
    const std::size_t n = static_cast<const std::uint8_t*>(nl) - start;
    std::string out(reinterpret_cast<const char*>(start), n);
    pos_ += n + 1;
    return out;
  }

  void push(V v) {
    if (stack_.size() >= kMaxStack) {
      fail("the stack grows past " + std::to_string(kMaxStack) + " values");
    }
    stack_.push_back(std::move(v));
  }
  V pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() == marks_.back())) {
      fail("stack underflow");
    }
    V v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  V& top() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() == marks_.back())) {
      fail("stack underflow");
    }
    return stack_.back();
  }
  // The values since the last MARK, which is removed.
  std::vector<V> pop_mark() {
    if (marks_.empty()) {
      fail("no MARK on the stack");
    }
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<V> out(
        std::make_move_iterator(
            stack_.begin() + static_cast<std::ptrdiff_t>(mark)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return out;
  }

  V container(Tag kind, std::vector<V> items = {}, bool ordered = false) {
    if (arena_.size() >= kMaxContainers) {
      fail("more than " + std::to_string(kMaxContainers) + " containers");
    }
    Container c;
    c.kind = kind;
    c.ordered = ordered;
    c.items = std::move(items);
    arena_.push_back(std::move(c));
    V v;
    v.tag = kind;
    v.ref = static_cast<std::uint32_t>(arena_.size() - 1);
    return v;
  }
  Container& as(const V& v, Tag kind, const char* what) {
    if (v.tag != kind) {
      fail(std::string("expected a ") + what);
    }
    return arena_[v.ref];
  }

  void set_item(Container& dict, V key, V value) {
    if (key.tag == Tag::kStr) {
      const auto [it, inserted] =
          dict.str_keys.emplace(key.s, dict.entries.size());
      if (!inserted) { // Python keeps the first position, updates the value
        dict.entries[it->second].second = std::move(value);
        return;
      }
    } else if (
        key.tag != Tag::kInt && key.tag != Tag::kBool &&
        key.tag != Tag::kNone && key.tag != Tag::kTuple &&
        key.tag != Tag::kFloat && key.tag != Tag::kBytes) {
      fail("a dict key is not hashable");
    }
    dict.entries.emplace_back(std::move(key), std::move(value));
  }

  V memo_get(std::uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) {
      fail("memo key " + std::to_string(index) + " was never stored");
    }
    return it->second;
  }
  void memo_put(std::uint64_t index) {
    if (memo_.size() >= kMaxMemo && memo_.count(index) == 0) {
      fail("the memo grows past " + std::to_string(kMaxMemo) + " entries");
    }
    memo_[index] = top();
  }

  V global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    V v;
    v.tag = Tag::kGlobal;
    v.s = full;
    if (module == "torch" && storage_types().count(name) != 0) {
      return v;
    }
    if (module == "torch") {
      for (const auto& row : v3_dtypes()) {
        if (name == row.name) {
          if (!row.type) {
            fail(
                "dtype torch." + name +
                " is not supported by this LibTorch build (" + TORCH_VERSION +
                "): it needs LibTorch >= " + row.since);
          }
          return v;
        }
      }
    }
    if (allowed_globals().count(full) == 0) {
      fail(
          "Unsupported global: GLOBAL " + full +
          " is not an allowed global (torchser loads weights only and never "
          "runs code from a checkpoint)");
    }
    return v;
  }

  std::vector<std::int64_t> int_tuple(const V& v, const char* what) {
    const Container& c = as(v, Tag::kTuple, what);
    std::vector<std::int64_t> out;
    for (const V& x : c.items) {
      if (x.tag != Tag::kInt || x.i < 0) {
        fail(
            std::string("a ") + what +
            " holds something other than a non-negative int");
      }
      out.push_back(x.i);
    }
    return out;
  }

  V rebuild_tensor(const std::vector<V>& args) {
    if (args.size() < 4 || args[0].tag != Tag::kStorage ||
        args[1].tag != Tag::kInt) {
      fail("_rebuild_tensor_v2 expects (storage, offset, size, stride, ...)");
    }
    const at::Tensor& base = args[0].t;
    const std::int64_t offset = args[1].i;
    const auto sizes = int_tuple(args[2], "tensor size");
    const auto strides = int_tuple(args[3], "tensor stride");
    if (sizes.size() != strides.size() || offset < 0) {
      fail("a tensor's size and stride disagree, or its offset is negative");
    }
    // The view must lie inside its storage: torch would read out of bounds.
    bool empty = false;
    std::int64_t last = offset;
    for (std::size_t d = 0; d < sizes.size(); ++d) {
      empty = empty || sizes[d] == 0;
      std::int64_t span = 0;
      if (sizes[d] > 0 &&
          (__builtin_mul_overflow(sizes[d] - 1, strides[d], &span) ||
           __builtin_add_overflow(last, span, &last))) {
        fail("a tensor's size and stride overflow");
      }
    }
    if (!empty && last >= base.numel()) {
      fail(
          "a tensor view reaches element " + std::to_string(last) +
          " of a storage of " + std::to_string(base.numel()) + " elements");
    }
    V v;
    v.tag = Tag::kTensor;
    v.t = base.as_strided(sizes, strides, offset);
    return v;
  }

  V reduce(const V& callable, const V& args_value) {
    if (callable.tag != Tag::kGlobal) {
      fail("REDUCE on something that is not an allowed global");
    }
    const std::vector<V>& args =
        as(args_value, Tag::kTuple, "tuple of arguments").items;
    const std::string& name = callable.s;
    if (name == "collections.OrderedDict") {
      if (!args.empty()) {
        fail("OrderedDict(...) with arguments is not supported");
      }
      return container(Tag::kDict, {}, /*ordered=*/true);
    }
    if (name == "torch._utils._rebuild_tensor_v2") {
      return rebuild_tensor(args);
    }
    if (name == "torch._utils._rebuild_tensor_v3") {
      // (untyped storage, offset, size, stride, requires_grad, hooks, dtype[,
      // metadata]): the storage's bytes reinterpreted as dtype, then the view
      // as in v2.
      if (args.size() < 7 || args[0].tag != Tag::kStorage ||
          args[6].tag != Tag::kGlobal) {
        fail(
            "_rebuild_tensor_v3 expects (storage, offset, size, stride, "
            "requires_grad, hooks, dtype, ...)");
      }
      const at::ScalarType dtype = v3_dtype(args[6].s);
      std::vector<V> typed(args.begin(), args.begin() + 4);
      const at::Tensor& bytes = typed[0].t;
      if (bytes.scalar_type() != dtype) {
        if (bytes.scalar_type() != at::kByte) {
          fail("_rebuild_tensor_v3 over a typed storage of another dtype");
        }
        const auto item = static_cast<std::int64_t>(c10::elementSize(dtype));
        if (bytes.numel() % item != 0) {
          fail(
              "an untyped storage of " + std::to_string(bytes.numel()) +
              " bytes is not a whole number of " + args[6].s + " elements");
        }
        typed[0].t = bytes.view(dtype);
      }
      return rebuild_tensor(typed);
    }
    if (name == "torch._utils._rebuild_parameter" ||
        name == "torch._utils._rebuild_parameter_with_state") {
      if (args.size() < 2 || args[0].tag != Tag::kTensor ||
          args[1].tag != Tag::kBool) {
        fail("_rebuild_parameter expects (tensor, requires_grad, ...)");
      }
      return args[0];
    }
    if (name == "torch.device") {
      if (args.empty() || args[0].tag != Tag::kStr) {
        fail("torch.device expects a device string");
      }
      V v;
      v.tag = Tag::kStr;
      v.s = args[0].s;
      if (args.size() > 1 && args[1].tag == Tag::kInt) {
        v.s += ":" + std::to_string(args[1].i);
      }
      return v;
    }
    if (name == "torch.Size") {
      if (args.size() != 1 || args[0].tag != Tag::kTuple) {
        fail("torch.Size expects one tuple");
      }
      int_tuple(args[0], "torch.Size");
      return args[0];
    }
    fail("calling " + name + " is not supported");
  }

  at::ScalarType v3_dtype(const std::string& global) {
    for (const auto& row : v3_dtypes()) {
      if (global == std::string("torch.") + row.name && row.type) {
        return *row.type;
      }
    }
    fail(global + " is not a dtype _rebuild_tensor_v3 takes");
  }

  V persistent_load(const V& pid) {
    const std::vector<V>& f = as(pid, Tag::kTuple, "persistent id tuple").items;
    if (f.size() != 5 || f[0].tag != Tag::kStr || f[0].s != "storage" ||
        f[1].tag != Tag::kGlobal || f[2].tag != Tag::kStr ||
        f[4].tag != Tag::kInt || f[4].i < 0) {
      fail("a persistent id is not ('storage', type, key, location, numel)");
    }
    at::ScalarType dtype = at::kByte; // an untyped storage: numel counts bytes
    if (!is_untyped_storage(f[1].s)) {
      const std::string type = f[1].s.substr(f[1].s.rfind('.') + 1);
      const auto typed = storage_types().find(type);
      if (f[1].s.rfind("torch.", 0) != 0 || typed == storage_types().end()) {
        fail("storage type " + f[1].s + " is not supported by this build");
      }
      dtype = typed->second;
    }
    const std::string& key = f[2].s;
    auto it = storage_cache_.find(key);
    if (it == storage_cache_.end()) {
      it = storage_cache_.emplace(key, storages_(key, dtype, f[4].i)).first;
    } else if (it->second.scalar_type() != dtype) {
      fail("storage '" + key + "' is used with two dtypes");
    }
    V v;
    v.tag = Tag::kStorage;
    v.t = it->second;
    return v;
  }

  void step() {
    switch (op_) {
      case 0x80: { // PROTO
        const auto version = le(1);
        if (version < 2 || version > 5) {
          fail(
              "pickle protocol " + std::to_string(version) +
              " is not supported");
        }
        return;
      }
      case 0x95: // FRAME (protocol 4): a length hint only
        le(8);
        return;
      case '(':
        marks_.push_back(stack_.size());
        return;
      case '0': // POP
        pop();
        return;
      case '1': // POP_MARK
        pop_mark();
        return;
      case '2': // DUP
        push(top());
        return;
      case 'N': // NONE
        push(V{});
        return;
      case 0x88:   // NEWTRUE
      case 0x89: { // NEWFALSE
        V v;
        v.tag = Tag::kBool;
        v.b = op_ == 0x88;
        push(std::move(v));
        return;
      }
      case 'J':   // BININT (signed 32-bit)
      case 'K':   // BININT1
      case 'M': { // BININT2
        V v;
        v.tag = Tag::kInt;
        v.i = op_ == 'J' ? static_cast<std::int32_t>(le(4))
                         : static_cast<std::int64_t>(le(op_ == 'K' ? 1 : 2));
        push(std::move(v));
        return;
      }
      case 0x8a:   // LONG1
      case 0x8b: { // LONG4
        const std::uint64_t n = le(op_ == 0x8a ? 1 : 4);
        if (n > 8) {
          fail(
              "an integer of " + std::to_string(n) +
              " bytes does not fit in 64 bits");
        }
        const std::uint8_t* p = take(static_cast<std::size_t>(n));
        std::uint64_t u = 0;
        for (std::size_t k = n; k-- > 0;) {
          u = (u << 8) | p[k];
        }
        if (n > 0 && n < 8 &&
            (p[n - 1] & 0x80)) { // sign-extend two's complement
          u |= ~std::uint64_t{0} << (8 * n);
        }
        V v;
        v.tag = Tag::kInt;
        v.i = static_cast<std::int64_t>(u);
        push(std::move(v));
        return;
      }
      case 'G': { // BINFLOAT (big-endian double)
        const std::uint8_t* p = take(8);
        std::uint64_t u = 0;
        for (int k = 0; k < 8; ++k) {
          u = (u << 8) | p[k];
        }
        V v;
        v.tag = Tag::kFloat;
        std::memcpy(&v.f, &u, 8);
        push(std::move(v));
        return;
      }
      case 'X':    // BINUNICODE
      case 0x8c:   // SHORT_BINUNICODE
      case 0x8d:   // BINUNICODE8
      case 'T':    // BINSTRING
      case 'U':    // SHORT_BINSTRING
      case 'B':    // BINBYTES
      case 'C':    // SHORT_BINBYTES
      case 0x8e: { // BINBYTES8
        const bool is_short = op_ == 0x8c || op_ == 'U' || op_ == 'C';
        const bool is_long = op_ == 0x8d || op_ == 0x8e;
        const std::uint64_t n = le(is_short ? 1 : is_long ? 8 : 4);
        if (n > size_ - pos_) {
          fail(
              "a string of " + std::to_string(n) +
              " bytes runs past the end of the pickle");
        }
        V v;
        v.tag =
            (op_ == 'B' || op_ == 'C' || op_ == 0x8e) ? Tag::kBytes : Tag::kStr;
        v.s = text(static_cast<std::size_t>(n));
        push(std::move(v));
        return;
      }
      case ']': // EMPTY_LIST
        push(container(Tag::kList));
        return;
      case ')': // EMPTY_TUPLE
        push(container(Tag::kTuple));
        return;
      case '}': // EMPTY_DICT
        push(container(Tag::kDict));
        return;
      case 'l': // LIST
        push(container(Tag::kList, pop_mark()));
        return;
      case 't': // TUPLE
        push(container(Tag::kTuple, pop_mark()));
        return;
      case 0x85:   // TUPLE1
      case 0x86:   // TUPLE2
      case 0x87: { // TUPLE3
        std::vector<V> items(static_cast<std::size_t>(op_ - 0x84));
        for (std::size_t k = items.size(); k-- > 0;) {
          items[k] = pop();
        }
        push(container(Tag::kTuple, std::move(items)));
        return;
      }
      case 'd': { // DICT
        std::vector<V> kv = pop_mark();
        if (kv.size() % 2 != 0) {
          fail("DICT with an odd number of items");
        }
        V d = container(Tag::kDict);
        for (std::size_t k = 0; k < kv.size(); k += 2) {
          set_item(arena_[d.ref], std::move(kv[k]), std::move(kv[k + 1]));
        }
        push(std::move(d));
        return;
      }
      case 'a': { // APPEND
        V item = pop();
        as(top(), Tag::kList, "list").items.push_back(std::move(item));
        return;
      }
      case 'e': { // APPENDS
        std::vector<V> items = pop_mark();
        Container& list = as(top(), Tag::kList, "list");
        for (V& item : items) {
          list.items.push_back(std::move(item));
        }
        return;
      }
      case 's': { // SETITEM
        V value = pop();
        V key = pop();
        set_item(
            as(top(), Tag::kDict, "dict"), std::move(key), std::move(value));
        return;
      }
      case 'u': { // SETITEMS
        std::vector<V> kv = pop_mark();
        if (kv.size() % 2 != 0) {
          fail("SETITEMS with an odd number of items");
        }
        Container& dict = as(top(), Tag::kDict, "dict");
        for (std::size_t k = 0; k < kv.size(); k += 2) {
          set_item(dict, std::move(kv[k]), std::move(kv[k + 1]));
        }
        return;
      }
      case 'c': { // GLOBAL
        const std::string module = line();
        const std::string name = line();
        push(global(module, name));
        return;
      }
      case 0x93: { // STACK_GLOBAL
        V name = pop();
        V module = pop();
        if (name.tag != Tag::kStr || module.tag != Tag::kStr) {
          fail("STACK_GLOBAL needs two strings");
        }
        push(global(module.s, name.s));
        return;
      }
      case 'R': { // REDUCE
        V args = pop();
        V callable = pop();
        push(reduce(callable, args));
        return;
      }
      case 'b': { // BUILD: only the `_metadata` attribute torch puts on state
                  // dicts
        V state = pop();
        const V& object = top();
        if (object.tag != Tag::kDict ||
            (state.tag != Tag::kDict && state.tag != Tag::kNone)) {
          fail("BUILD is only supported to set attributes of a dict");
        }
        return;
      }
      case 'Q': { // BINPERSID
        V pid = pop();
        push(persistent_load(pid));
        return;
      }
      case 'q': // BINPUT
        memo_put(le(1));
        return;
      case 'r': // LONG_BINPUT
        memo_put(le(4));
        return;
      case 0x94: // MEMOIZE
        memo_put(memo_.size());
        return;
      case 'h': // BINGET
        push(memo_get(le(1)));
        return;
      case 'j': // LONG_BINGET
        push(memo_get(le(4)));
        return;
      default:
        fail("unsupported opcode");
    }
  }

  PickleValue materialize(
      const V& v, std::set<std::uint32_t>& open, std::size_t& budget) {
    if (budget-- == 0) {
      fail(
          "the structure expands past its size limit (shared references nested "
          "too deep)");
    }
    switch (v.tag) {
      case Tag::kNone:
        return PickleValue();
      case Tag::kBool:
        return PickleValue::from_bool(v.b);
      case Tag::kInt:
        return PickleValue::from_int(v.i);
      case Tag::kFloat:
        return PickleValue::from_float(v.f);
      case Tag::kStr:
        return PickleValue::from_string(v.s);
      case Tag::kBytes:
        return PickleValue::from_bytes(v.s);
      case Tag::kTensor:
        return PickleValue::from_tensor(v.t);
      case Tag::kList:
      case Tag::kTuple:
      case Tag::kDict: {
        if (!open.insert(v.ref).second) {
          fail("the structure contains a cycle");
        }
        if (open.size() > kMaxDepth) {
          fail(
              "the structure nests deeper than " + std::to_string(kMaxDepth) +
              " levels");
        }
        const Container& c = arena_[v.ref];
        PickleValue out;
        if (v.tag == Tag::kDict) {
          PickleValue::DictItems items;
          items.reserve(c.entries.size());
          for (const auto& [key, value] : c.entries) {
            items.emplace_back(
                materialize(key, open, budget),
                materialize(value, open, budget));
          }
          out = PickleValue::dict(std::move(items), c.ordered);
        } else {
          PickleValue::Items items;
          items.reserve(c.items.size());
          for (const V& item : c.items) {
            items.push_back(materialize(item, open, budget));
          }
          out = v.tag == Tag::kList ? PickleValue::list(std::move(items))
                                    : PickleValue::tuple(std::move(items));
        }
        open.erase(v.ref);
        return out;
      }
      case Tag::kGlobal:
      case Tag::kStorage:
        fail("a bare global or storage is not a value torchser returns");
    }
    fail("unknown value");
  }

  static constexpr std::size_t kMaxStack = 1 << 24;
  static constexpr std::size_t kMaxMemo = 1 << 24;
  static constexpr std::size_t kMaxContainers = 1 << 24;
  static constexpr std::size_t kMaxDepth = 1000;

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::size_t op_pos_ = 0;
  std::uint8_t op_ = 0;
  std::string source_;
  StorageProvider storages_;
  std::vector<V> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, V> memo_;
  std::vector<Container> arena_;
  std::map<std::string, at::Tensor> storage_cache_;
};

bool is_tensor_dict(const PickleValue& v) {
  if (v.kind() != PickleValue::Kind::kDict || v.dict_items().empty()) {
    return false;
  }
  for (const auto& [key, value] : v.dict_items()) {
    if (key.kind() != PickleValue::Kind::kString ||
        value.kind() != PickleValue::Kind::kTensor) {
      return false;
    }
  }
  return true;
}

} // namespace

// ---------------------------------------------------------------------------
// torch_load

namespace {

PickleValue load_archive(
    const std::filesystem::path& path,
    const TorchLoadOptions& options,
    bool layout_only,
    const detail::File* opened = nullptr);

} // namespace

PickleValue torch_load(
    const std::filesystem::path& path, const TorchLoadOptions& options) {
  return load_archive(path, options, false);
}

namespace detail {

PickleValue torch_load_layout(
    const std::filesystem::path& path, const File* opened) {
  return load_archive(path, TorchLoadOptions().mmap(false), true, opened);
}

} // namespace detail

namespace {

PickleValue load_archive(
    const std::filesystem::path& path,
    const TorchLoadOptions& options,
    bool layout_only,
    const detail::File* opened) {
  const std::string source = "'" + path.string() + "'";
  const detail::File owned =
      opened != nullptr ? detail::File() : detail::File::open_read(path);
  const detail::File& file = opened != nullptr ? *opened : owned;
  // mmap: tensors are views of a mapping of the file. Otherwise nothing is
  // mapped: every byte is read with pread, so a file truncated or rewritten
  // while it is read gives an OSError naming it, never a SIGBUS.
  const std::shared_ptr<const detail::MappedFile> mapping =
      options.mmap() ? detail::MappedFile::map(file) : nullptr;
  const std::uint64_t size = options.mmap() ? mapping->size() : file.size();
  const auto read_bytes = [&](std::uint64_t offset, std::uint64_t n) {
    std::string out(static_cast<std::size_t>(n), '\0');
    if (mapping) {
      std::memcpy(out.data(), mapping->data() + offset, out.size());
    } else {
      file.pread_exact(out.data(), out.size(), offset);
    }
    return out;
  };

  std::vector<detail::ZipEntry> entries;
  try {
    // The directory and local headers through pread: touching them in the
    // mapping would make the kernel map 64 KiB of page cache around each.
    entries = detail::read_zip_directory(detail::ZipSource{
        size,
        [&](void* out, std::size_t n, std::uint64_t offset) {
          file.pread_exact(out, n, offset);
        },
        nullptr});
  } catch (const detail::ZipFormatError& e) {
    // Pre-1.6 torch.save files are a bare pickle stream (magic number first).
    const std::string magic = size >= 2 ? read_bytes(0, 2) : std::string();
    if (magic.size() == 2 && static_cast<std::uint8_t>(magic[0]) == 0x80 &&
        static_cast<std::uint8_t>(magic[1]) <= 5) {
      throw UnpicklingError(
          "Cannot load " + source +
          ": it is a legacy (pre-1.6, non-zip) torch.save file, which torchser "
          "does not read. Load it with "
          "Python torch and save it again with a recent torch (or as "
          "safetensors).");
    }
    throw UnpicklingError(
        "Cannot load " + source + ": not a torch.save zip archive (" +
        e.what() + ")");
  }
  // The records sit under one folder, named after the file by torch.save.
  const detail::ZipEntry* pickle = nullptr;
  for (const auto& e : entries) {
    const auto slash = e.name.find('/');
    if (slash != std::string::npos &&
        e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      pickle = &e;
      break;
    }
  }
  if (pickle == nullptr) {
    throw UnpicklingError(
        "Cannot load " + source +
        ": the archive has no <archive>/data.pkl record");
  }
  const std::string prefix =
      pickle->name.substr(0, pickle->name.size() - std::strlen("data.pkl"));
  std::unordered_map<std::string, const detail::ZipEntry*> by_name;
  for (const auto& e : entries) {
    if (e.method != 0) {
      throw UnpicklingError(
          "Cannot load " + source + ": record '" + e.name +
          "' is compressed; torch.save stores records");
    }
    by_name[e.name] = &e;
  }
  const auto byteorder = by_name.find(prefix + "byteorder");
  if (byteorder != by_name.end()) {
    const auto* e = byteorder->second;
    const std::string order = read_bytes(
        e->data_offset, std::min<std::uint64_t>(e->uncompressed_size, 64));
    if (order != "little") {
      throw UnpicklingError(
          "Cannot load " + source +
          ": big-endian checkpoints are not supported (byteorder '" + order +
          "')");
    }
  }

  const bool copy = !options.mmap();
  StorageProvider storages = [&](const std::string& key,
                                 at::ScalarType dtype,
                                 std::int64_t numel) -> at::Tensor {
    const auto it = by_name.find(prefix + "data/" + key);
    if (it == by_name.end()) {
      throw UnpicklingError(
          "Cannot load " + source + ": storage record '" + prefix + "data/" +
          key + "' is missing");
    }
    const detail::ZipEntry& e = *it->second;
    const auto element = static_cast<std::uint64_t>(c10::elementSize(dtype));
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(
            static_cast<std::uint64_t>(numel), element, &nbytes) ||
        nbytes > e.uncompressed_size) {
      throw UnpicklingError(
          "Cannot load " + source + ": storage '" + key + "' claims " +
          std::to_string(numel) + " elements of " + c10::toString(dtype) +
          " but its record has " + std::to_string(e.uncompressed_size) +
          " bytes");
    }
    const auto options_dtype = at::TensorOptions().dtype(dtype);
    at::Tensor base;
    if (layout_only) {
      // A stand-in whose address says where the record's data starts.
      return at::from_blob(
          reinterpret_cast<void*>(detail::kLayoutBase + e.data_offset),
          {numel},
          [](void*) {},
          options_dtype);
    }
    if (nbytes == 0) {
      base = at::empty({numel}, options_dtype);
    } else if (
        !copy &&
        reinterpret_cast<std::uintptr_t>(mapping->data() + e.data_offset) %
                element ==
            0) {
      base = at::from_blob(
          const_cast<std::uint8_t*>(mapping->data() + e.data_offset),
          {numel},
          [keep = mapping](void*) {},
          options_dtype);
    } else if (mapping) {
      base = at::empty({numel}, options_dtype);
      std::memcpy(base.data_ptr(), mapping->data() + e.data_offset, nbytes);
    } else {
      base = at::empty({numel}, options_dtype);
      file.pread_exact(base.data_ptr(), nbytes, e.data_offset);
    }
    if (options.map_location().has_value() &&
        !options.map_location()->is_cpu()) {
      base = base.to(*options.map_location());
    }
    return base;
  };
  std::string pickle_bytes;
  const std::uint8_t* pickle_data = nullptr;
  if (mapping) {
    pickle_data = mapping->data() + pickle->data_offset;
  } else {
    pickle_bytes = read_bytes(pickle->data_offset, pickle->uncompressed_size);
    pickle_data = reinterpret_cast<const std::uint8_t*>(pickle_bytes.data());
  }
  Machine machine(
      pickle_data,
      static_cast<std::size_t>(pickle->uncompressed_size),
      source,
      std::move(storages));
  try {
    return machine.run();
  } catch (const c10::Error& e) {
    // Whatever LibTorch refuses that the checks above let through is still a
    // bad file, reported as one.
    throw UnpicklingError(
        "Cannot load " + source + ": " + e.what_without_backtrace());
  }
}

} // namespace

StateDict extract_state_dict(const PickleValue& checkpoint) {
  const PickleValue* found = is_tensor_dict(checkpoint) ? &checkpoint : nullptr;
  if (found == nullptr && checkpoint.kind() == PickleValue::Kind::kDict) {
    for (const char* key :
         {"state_dict", "model_state_dict", "model", "module"}) {
      const PickleValue* v = checkpoint.find(key);
      if (v != nullptr && is_tensor_dict(*v)) {
        found = v;
        break;
      }
    }
    for (const auto& item : checkpoint.dict_items()) {
      if (found == nullptr && is_tensor_dict(item.second)) {
        found = &item.second;
      }
    }
  }
  if (found == nullptr) {
    throw ValueError(
        "No state dict (a dict of name → tensor) in the checkpoint: it is a " +
        checkpoint.type_name() +
        (checkpoint.kind() == PickleValue::Kind::kDict
             ? " whose values are not tensors"
             : "") +
        ".");
  }
  StateDict out;
  out.reserve(found->dict_items().size());
  for (const auto& [key, value] : found->dict_items()) {
    out.insert(key.to_string(), value.to_tensor());
  }
  return out;
}

} // namespace torchser
