// A description of an array owned by the caller (torch tensor or numpy array): no libtorch here.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace gk {

enum class DType : int { float16 = 0, bfloat16 = 1, float32 = 2, float64 = 3, uint32 = 4, int64 = 5 };
enum class Device : int { cpu = 0, cuda = 1 };

const char* dtype_name(DType d);
int64_t dtype_size(DType d);

struct Array {
  uintptr_t data = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  DType dtype = DType::float32;
  Device device = Device::cpu;
  int device_index = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const {
    return reinterpret_cast<T*>(data);
  }
  void* raw() const { return reinterpret_cast<void*>(data); }
};

// Raised as ValueError / TypeError in Python, naming the argument.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Checks used by every family's bindings before a kernel runs: the kernels index contiguous memory
// and trust these.
void check_contiguous(const Array& a, const char* name);
void check_dtype(const Array& a, DType expected, const char* name);
void check_float(const Array& a, const char* name);
void check_numel(const Array& a, int64_t expected, const char* name);
void check_same(const Array& a, const Array& ref, const char* name, const char* ref_name);  // dtype, device

}  // namespace gk
