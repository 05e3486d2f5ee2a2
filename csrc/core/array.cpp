#include "core/array.h"

namespace gk {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
    case DType::uint32:
      return "uint32";
    case DType::int64:
      return "int64";
  }
  return "unknown";
}

int64_t dtype_size(DType d) {
  switch (d) {
    case DType::float16:
    case DType::bfloat16:
      return 2;
    case DType::float32:
    case DType::uint32:
      return 4;
    case DType::float64:
    case DType::int64:
      return 8;
  }
  return 0;
}

bool Array::is_contiguous() const {
  if (numel() == 0) return true;  // no memory is touched, whatever the strides say
  int64_t expected = 1;
  for (int64_t d = ndim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

void check_contiguous(const Array& a, const char* name) {
  if (a.shape.size() != a.strides.size()) throw ValueError(std::string(name) + ": shape and strides differ in length");
  for (int64_t s : a.shape)
    if (s < 0) throw ValueError(std::string(name) + ": negative size");
  if (!a.is_contiguous()) throw ValueError(std::string(name) + " must be contiguous");
  if (a.data == 0 && a.numel() > 0) throw ValueError(std::string(name) + " has a null data pointer");
}

void check_dtype(const Array& a, DType expected, const char* name) {
  if (a.dtype != expected)
    throw TypeError(std::string(name) + " must be " + dtype_name(expected) + ", got " + dtype_name(a.dtype));
}

void check_float(const Array& a, const char* name) {
  if (a.dtype == DType::uint32 || a.dtype == DType::int64)
    throw TypeError(std::string(name) + " must be a floating-point array, got " + dtype_name(a.dtype));
}

void check_numel(const Array& a, int64_t expected, const char* name) {
  if (a.numel() != expected)
    throw ValueError(std::string(name) + " has " + std::to_string(a.numel()) + " elements, expected " +
                     std::to_string(expected));
}

void check_same(const Array& a, const Array& ref, const char* name, const char* ref_name) {
  if (a.dtype != ref.dtype)
    throw TypeError(std::string(name) + " is " + dtype_name(a.dtype) + " but " + ref_name + " is " +
                    dtype_name(ref.dtype));
  if (a.device != ref.device || a.device_index != ref.device_index)
    throw ValueError(std::string(name) + " and " + ref_name + " are on different devices");
}

}  // namespace gk
