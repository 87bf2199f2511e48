// PickleValue: the Python values a torch.save pickle holds.

#include <torchser/pickle.h>

#include <string>
#include <utility>

namespace torchser {

// ---------------------------------------------------------------------------
// PickleValue

PickleValue PickleValue::from_bool(bool value) {
  PickleValue v;
  v.kind_ = Kind::kBool;
  v.bool_ = value;
  return v;
}
PickleValue PickleValue::from_int(std::int64_t value) {
  PickleValue v;
  v.kind_ = Kind::kInt;
  v.int_ = value;
  return v;
}
PickleValue PickleValue::from_float(double value) {
  PickleValue v;
  v.kind_ = Kind::kFloat;
  v.float_ = value;
  return v;
}
PickleValue PickleValue::from_string(std::string value) {
  PickleValue v;
  v.kind_ = Kind::kString;
  v.string_ = std::move(value);
  return v;
}
PickleValue PickleValue::from_bytes(std::string value) {
  PickleValue v;
  v.kind_ = Kind::kBytes;
  v.string_ = std::move(value);
  return v;
}
PickleValue PickleValue::from_tensor(at::Tensor value) {
  PickleValue v;
  v.kind_ = Kind::kTensor;
  v.tensor_ = std::move(value);
  return v;
}
PickleValue PickleValue::list(Items items) {
  PickleValue v;
  v.kind_ = Kind::kList;
  v.items_ = std::make_shared<const Items>(std::move(items));
  return v;
}
PickleValue PickleValue::tuple(Items items) {
  PickleValue v = list(std::move(items));
  v.kind_ = Kind::kTuple;
  return v;
}
PickleValue PickleValue::dict(DictItems items, bool ordered) {
  PickleValue v;
  v.kind_ = Kind::kDict;
  v.ordered_ = ordered;
  v.dict_ = std::make_shared<const DictItems>(std::move(items));
  return v;
}

std::string PickleValue::type_name() const {
  switch (kind_) {
    case Kind::kNone:
      return "NoneType";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTensor:
      return "torch.Tensor";
    case Kind::kList:
      return "list";
    case Kind::kTuple:
      return "tuple";
    case Kind::kDict:
      return ordered_ ? "collections.OrderedDict" : "dict";
  }
  return "?";
}

namespace {
[[noreturn]] void wrong_kind(const PickleValue& v, const char* wanted) {
  throw ValueError(
      std::string("Expected a ") + wanted + ", got a " + v.type_name() + ".");
}
} // namespace

bool PickleValue::to_bool() const {
  if (kind_ != Kind::kBool) {
    wrong_kind(*this, "bool");
  }
  return bool_;
}
std::int64_t PickleValue::to_int() const {
  if (kind_ != Kind::kInt) {
    wrong_kind(*this, "int");
  }
  return int_;
}
double PickleValue::to_float() const {
  if (kind_ != Kind::kFloat) {
    wrong_kind(*this, "float");
  }
  return float_;
}
const std::string& PickleValue::to_string() const {
  if (kind_ != Kind::kString && kind_ != Kind::kBytes) {
    wrong_kind(*this, "str");
  }
  return string_;
}
const at::Tensor& PickleValue::to_tensor() const {
  if (kind_ != Kind::kTensor) {
    wrong_kind(*this, "tensor");
  }
  return tensor_;
}
const PickleValue::Items& PickleValue::items() const {
  if (kind_ != Kind::kList && kind_ != Kind::kTuple) {
    wrong_kind(*this, "list or tuple");
  }
  return *items_;
}
const PickleValue::DictItems& PickleValue::dict_items() const {
  if (kind_ != Kind::kDict) {
    wrong_kind(*this, "dict");
  }
  return *dict_;
}
const PickleValue* PickleValue::find(const std::string& key) const {
  for (const auto& [k, v] : dict_items()) {
    if (k.kind() == Kind::kString && k.to_string() == key) {
      return &v;
    }
  }
  return nullptr;
}

} // namespace torchser
