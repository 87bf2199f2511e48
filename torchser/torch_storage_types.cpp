#include "torchser/detail/torch_storage_types.h"

#include <torchser/errors.h>

#include "torchser/detail/torch_version.h"

namespace torchser::detail {

// The storage classes torch.save names, and their dtypes in this build.
const std::map<std::string, at::ScalarType>& storage_types() {
  static const std::map<std::string, at::ScalarType> types = {
    {"DoubleStorage", at::kDouble},
    {"FloatStorage", at::kFloat},
    {"HalfStorage", at::kHalf},
    {"BFloat16Storage", at::kBFloat16},
    {"LongStorage", at::kLong},
    {"IntStorage", at::kInt},
    {"ShortStorage", at::kShort},
    {"CharStorage", at::kChar},
    {"ByteStorage", at::kByte},
    {"BoolStorage", at::kBool},
    {"ComplexFloatStorage", at::kComplexFloat},
    {"ComplexDoubleStorage", at::kComplexDouble},
#if TORCHSER_TORCH_AT_LEAST(2, 1)
    {"Float8_e5m2Storage", at::ScalarType::Float8_e5m2},
    {"Float8_e4m3fnStorage", at::ScalarType::Float8_e4m3fn},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 2)
    {"Float8_e5m2fnuzStorage", at::ScalarType::Float8_e5m2fnuz},
    {"Float8_e4m3fnuzStorage", at::ScalarType::Float8_e4m3fnuz},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 3)
    {"UInt16Storage", at::ScalarType::UInt16},
    {"UInt32Storage", at::ScalarType::UInt32},
    {"UInt64Storage", at::ScalarType::UInt64},
#endif
  };
  return types;
}

const std::vector<NamedDtype>& v3_dtypes() {
  static const std::vector<NamedDtype> table = {
#if TORCHSER_TORCH_AT_LEAST(2, 1)
    {"float8_e5m2", "2.1", at::ScalarType::Float8_e5m2},
    {"float8_e4m3fn", "2.1", at::ScalarType::Float8_e4m3fn},
#else
    {"float8_e5m2", "2.1", std::nullopt},
    {"float8_e4m3fn", "2.1", std::nullopt},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 2)
    {"float8_e5m2fnuz", "2.2", at::ScalarType::Float8_e5m2fnuz},
    {"float8_e4m3fnuz", "2.2", at::ScalarType::Float8_e4m3fnuz},
#else
    {"float8_e5m2fnuz", "2.2", std::nullopt},
    {"float8_e4m3fnuz", "2.2", std::nullopt},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 3)
    {"uint16", "2.3", at::ScalarType::UInt16},
    {"uint32", "2.3", at::ScalarType::UInt32},
    {"uint64", "2.3", at::ScalarType::UInt64},
#else
    {"uint16", "2.3", std::nullopt},
    {"uint32", "2.3", std::nullopt},
    {"uint64", "2.3", std::nullopt},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 7)
    {"float8_e8m0fnu", "2.7", at::ScalarType::Float8_e8m0fnu},
#else
    {"float8_e8m0fnu", "2.7", std::nullopt},
#endif
#if TORCHSER_TORCH_AT_LEAST(2, 8)
    {"float4_e2m1fn_x2", "2.8", at::ScalarType::Float4_e2m1fn_x2},
#else
    {"float4_e2m1fn_x2", "2.8", std::nullopt},
#endif
  };
  return table;
}

// The name torch.save gives a v3 dtype, or nullptr for a typed-storage dtype.
const char* v3_dtype_name(at::ScalarType dtype) {
  for (const auto& row : v3_dtypes()) {
    if (row.type == dtype) {
      return row.name;
    }
  }
  return nullptr;
}

// The typed storage class torch.save names for `dtype` (v2 tensors).
std::string storage_type_name(at::ScalarType dtype) {
  for (const auto& [name, type] : storage_types()) {
    if (type == dtype) {
      return name;
    }
  }
  throw ValueError(
      std::string("torch.save has no storage type for dtype ") +
      c10::toString(dtype) + " in this build.");
}

bool is_untyped_storage(const std::string& global) {
  return global == "torch.storage.UntypedStorage" ||
         global == "torch.UntypedStorage";
}

} // namespace torchser::detail
