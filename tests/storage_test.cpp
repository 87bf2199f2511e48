// get_torch_storage_id / get_torch_storage_size on real LibTorch storages
// (huggingface_hub.md §1.7, S-05).

#include <torchser/storage.h>

#include <cstdint>
#include <unordered_set>
#include <vector>

#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/quantize_per_tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/version.h>

#include <torchser/errors.h>

#include "test_utils.h"

namespace torchser {
namespace {

TEST(StorageSizeTest, CountsTheWholeStorageInBytes) {
  // S-05: float64 [1..5] → 40, float16 [1..5] → 10.
  EXPECT_EQ(get_torch_storage_size(at::arange(1, 6, at::kDouble)), 40);
  EXPECT_EQ(get_torch_storage_size(at::arange(1, 6, at::kHalf)), 10);
}

TEST(StorageSizeTest, AViewReportsItsWholeStorage) {
  // arange(10.)[2:4] gives 40, not 8 (§1.7).
  const auto base = at::arange(10, at::kFloat);
  EXPECT_EQ(get_torch_storage_size(base.slice(0, 2, 4)), 40);
  EXPECT_EQ(get_torch_storage_size(base.view({2, 5}).t()), 40);
  EXPECT_EQ(get_torch_storage_size(base[3]), 40);
}

TEST(StorageSizeTest, ExpandedTensorReportsItsSmallStorage) {
  const auto one = at::zeros({1}, at::kFloat);
  EXPECT_EQ(get_torch_storage_size(one.expand({4})), 4);
}

TEST(StorageSizeTest, EmptyAndScalarTensors) {
  EXPECT_EQ(get_torch_storage_size(at::empty({0}, at::kFloat)), 0);
  EXPECT_EQ(get_torch_storage_size(at::empty({3, 0}, at::kDouble)), 0);
  EXPECT_EQ(get_torch_storage_size(at::scalar_tensor(1.5, at::kDouble)), 8);
  EXPECT_EQ(get_torch_storage_size(at::scalar_tensor(1, at::kShort)), 2);
}

TEST(StorageSizeTest, MetaTensorIsNumelTimesElementSize) {
  const auto meta = at::empty(
      {3, 4}, at::TensorOptions().device(at::kMeta).dtype(at::kFloat));
  EXPECT_EQ(get_torch_storage_size(meta), 48);
  const auto meta_half =
      at::empty({5}, at::TensorOptions().device(at::kMeta).dtype(at::kHalf));
  EXPECT_EQ(get_torch_storage_size(meta_half), 10);
}

std::vector<at::ScalarType> dtypes_of_this_build() {
  std::vector<at::ScalarType> dtypes = {
      at::kBool,
      at::kByte,
      at::kChar,
      at::kShort,
      at::kInt,
      at::kLong,
      at::kHalf,
      at::kBFloat16,
      at::kFloat,
      at::kDouble,
      at::kComplexHalf,
      at::kComplexFloat,
      at::kComplexDouble};
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  dtypes.push_back(at::kFloat8_e4m3fn);
  dtypes.push_back(at::kFloat8_e5m2);
#endif
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  dtypes.push_back(at::kUInt16);
  dtypes.push_back(at::kUInt32);
  dtypes.push_back(at::kUInt64);
#endif
  return dtypes;
}

TEST(StorageSizeTest, EveryDtypeOfTheBuild) {
  for (const auto dtype : dtypes_of_this_build()) {
    const auto t = at::empty({2, 3}, dtype);
    SCOPED_TRACE(c10::toString(dtype));
    EXPECT_EQ(
        get_torch_storage_size(t),
        6 * static_cast<std::int64_t>(t.element_size()));
    EXPECT_EQ(
        get_torch_storage_size(t.slice(1, 1)),
        6 * static_cast<std::int64_t>(t.element_size()));
    EXPECT_EQ(get_torch_storage_id(t), get_torch_storage_id(t[1]));
  }
}

TEST(StorageSizeTest, QuantizedTensorHasAStorage) {
  const auto q = at::quantize_per_tensor(at::ones({4}), 0.1, 0, at::kQInt8);
  EXPECT_EQ(get_torch_storage_size(q), 4);
  EXPECT_TRUE(get_torch_storage_id(q).has_value());
}

TEST(StorageIdTest, ViewsOfOneStorageShareTheId) {
  const auto base = at::arange(12, at::kFloat).view({3, 4});
  const auto id = get_torch_storage_id(base);
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(get_torch_storage_id(base.t()), id);
  EXPECT_EQ(get_torch_storage_id(base.slice(0, 1)), id);
  EXPECT_EQ(get_torch_storage_id(base[2]), id);
  EXPECT_EQ(get_torch_storage_id(base.view({12})), id);
  EXPECT_EQ(get_torch_storage_id(base.select(1, 3)), id);
  EXPECT_EQ(get_torch_storage_id(base.detach()), id);
  EXPECT_EQ(get_torch_storage_id(base.as_strided({2}, {5}, 1)), id);
  const auto one = at::zeros({1});
  EXPECT_EQ(get_torch_storage_id(one.expand({7})), get_torch_storage_id(one));
}

TEST(StorageIdTest, DistinctStoragesHaveDistinctIds) {
  const auto a = at::zeros({4});
  const auto b = at::zeros({4});
  EXPECT_NE(get_torch_storage_id(a), get_torch_storage_id(b));
  EXPECT_NE(get_torch_storage_id(a), get_torch_storage_id(a.clone()));
  EXPECT_NE(
      get_torch_storage_id(a.t()),
      get_torch_storage_id(a.t().contiguous().add(1)));
}

TEST(StorageIdTest, IdIsDeviceAddressAndStorageBytes) {
  const auto base = at::arange(10, at::kFloat);
  const auto id = get_torch_storage_id(base.slice(0, 3, 5));
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(id->device, c10::Device(c10::kCPU));
  EXPECT_EQ(id->data_ptr, reinterpret_cast<std::uintptr_t>(base.data_ptr()));
  EXPECT_EQ(id->nbytes, 40);
}

TEST(StorageIdTest, TensorsSetToTheSameStorageShareTheId) {
  const auto a = at::arange(6, at::kFloat);
  auto b = at::empty({0}, at::kFloat);
  b.set_(a.storage(), /*storage_offset=*/2, /*size=*/{2}, /*stride=*/{1});
  EXPECT_EQ(get_torch_storage_id(a), get_torch_storage_id(b));
}

TEST(StorageIdTest, ExternalMemoryIsIdentifiedByAddressAndSize) {
  // Two from_blob tensors over one buffer are one storage for Python too only
  // when they describe the same bytes: the size is part of the id.
  std::vector<float> buffer(8, 0.0F);
  const auto whole = at::from_blob(buffer.data(), {8}, at::kFloat);
  const auto whole_again = at::from_blob(buffer.data(), {2, 4}, at::kFloat);
  const auto half = at::from_blob(buffer.data(), {4}, at::kFloat);
  EXPECT_EQ(get_torch_storage_id(whole), get_torch_storage_id(whole_again));
  EXPECT_NE(get_torch_storage_id(whole), get_torch_storage_id(half));
}

TEST(StorageIdTest, EmptyTensorsShareTheNullStorageId) {
  // Every empty storage has data pointer 0, so (as in Python) all empty CPU
  // tensors share one id, (cpu, 0, 0).
  const auto a = at::empty({0}, at::kFloat);
  const auto b = at::zeros({2, 0}, at::kLong);
  const auto id = get_torch_storage_id(a);
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(id->data_ptr, 0U);
  EXPECT_EQ(id->nbytes, 0);
  EXPECT_EQ(get_torch_storage_id(b), id);
}

TEST(StorageIdTest, MetaTensorsHaveNoId) {
  const auto meta = at::empty({3}, at::TensorOptions().device(at::kMeta));
  EXPECT_FALSE(get_torch_storage_id(meta).has_value());
}

TEST(StorageIdTest, HashGroupsViewsTogether) {
  const auto a = at::zeros({4, 4});
  const auto b = at::zeros({4, 4});
  std::unordered_set<StorageId> ids = {
      *get_torch_storage_id(a),
      *get_torch_storage_id(a.t()),
      *get_torch_storage_id(a[1]),
      *get_torch_storage_id(b),
      *get_torch_storage_id(b.slice(1, 2))};
  EXPECT_EQ(ids.size(), 2U);
}

TEST(StorageIdTest, UndefinedTensorIsAValueError) {
  const at::Tensor undefined;
  EXPECT_THROW_MESSAGE(
      get_torch_storage_id(undefined),
      ValueError,
      "get_torch_storage_id: the tensor is undefined (a default-constructed "
      "at::Tensor has no storage).");
  EXPECT_THROW_CONTAINS(
      get_torch_storage_size(undefined),
      ValueError,
      "get_torch_storage_size: the tensor is undefined");
}

TEST(StorageIdTest, SparseTensorIsAValueError) {
  const auto indices = at::zeros({1, 1}, at::kLong);
  const auto values = at::ones({1});
  const auto sparse = at::_sparse_coo_tensor_unsafe(indices, values, {3});
  EXPECT_THROW_CONTAINS(
      get_torch_storage_id(sparse),
      ValueError,
      "with layout Sparse has no storage");
  EXPECT_THROW_CONTAINS(
      get_torch_storage_size(sparse), ValueError, "to_dense()");
}

} // namespace
} // namespace torchser
