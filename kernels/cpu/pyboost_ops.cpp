// PyNative twins of the AOT kernels, dispatched through MindSpore's pyboost runner (ops.CustomOpBuilder).
// Measured here: ~3 us of framework work per call, against ~90-100 us for the same kernel as ops.Custom(aot),
// which is all of a decode-sized rotary's cost and more than a decode-sized RMSNorm's. The kernels are the AOT library's own entry points (opened by
// path with set_library), called with the same argument arrays MindSpore's AOT convention builds, so there is one
// implementation and its checks. Only for eager calls: inside mindspore.jit the AOT ops stay in use.
#include <dlfcn.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "ms_extension/api.h"

namespace {

using AotEntry = int (*)(int, void**, int*, int64_t**, const char**, void*, void*);

void* g_library = nullptr;
std::unordered_map<std::string, AotEntry> g_entries;

AotEntry entry(const std::string& symbol) {
  auto found = g_entries.find(symbol);
  if (found != g_entries.end()) return found->second;
  if (g_library == nullptr) throw std::runtime_error("cogvlm2 pyboost ops: set_library() was not called");
  auto fn = reinterpret_cast<AotEntry>(dlsym(g_library, symbol.c_str()));
  if (fn == nullptr) throw std::runtime_error("cogvlm2 pyboost ops: no kernel " + symbol + " in the library");
  return g_entries[symbol] = fn;
}

const char* dtype_name(const ms::Tensor& t) {
  switch (t.data_type()) {
    case mindspore::kNumberTypeFloat32: return "float32";
    case mindspore::kNumberTypeInt32: return "int32";
    case mindspore::kNumberTypeBFloat16: return "bfloat16";
    case mindspore::kNumberTypeFloat16: return "float16";
    case mindspore::kNumberTypeInt8: return "int8";
    default: return "unsupported";
  }
}

// Runs an AOT kernel over the inputs, whose outputs follow them in the AOT argument list: either one allocated
// output tensor, or (in-place kernels) the [1] int32 ordering token, kept here.
class KernelRunner : public ms::pynative::PyboostRunner {
 public:
  KernelRunner(const std::string& symbol) : PyboostRunner(symbol), symbol_(symbol) {}

  void LaunchKernel() override {
    std::vector<ms::Tensor> args = inputs();
    for (const auto& out : outputs()) args.push_back(out);
    const int n = static_cast<int>(args.size());
    const bool token = outputs().empty();
    std::vector<void*> params(n + token);
    std::vector<int> ndims(n + token);
    std::vector<std::vector<int64_t>> shapes(n + token);
    std::vector<int64_t*> shape_ptrs(n + token);
    std::vector<const char*> dtypes(n + token);
    for (int i = 0; i < n; ++i) {
      if (!args[i].is_contiguous()) throw std::runtime_error(symbol_ + ": argument " + std::to_string(i) + " is strided");
      params[i] = args[i].GetDataPtr();
      shapes[i] = args[i].shape();
      dtypes[i] = dtype_name(args[i]);
    }
    int32_t done = 0;
    if (token) {
      params[n] = &done;
      shapes[n] = {1};
      dtypes[n] = "int32";
    }
    for (int i = 0; i < n + token; ++i) {
      ndims[i] = static_cast<int>(shapes[i].size());
      shape_ptrs[i] = shapes[i].data();
    }
    const int status = entry(symbol_)(n + token, params.data(), ndims.data(), shape_ptrs.data(), dtypes.data(),
                                      nullptr, nullptr);
    if (status != 0) throw std::runtime_error(symbol_ + " failed: its status is " + std::to_string(status));
  }

  static void RunInplace(const std::string& symbol, const std::vector<ms::Tensor>& tensors) {
    std::make_shared<KernelRunner>(symbol)->Run(tensors, {});
  }

  static ms::Tensor RunWithOutput(const std::string& symbol, const std::vector<ms::Tensor>& tensors,
                                  const std::vector<int64_t>& out_shape) {
    ms::Tensor out(mindspore::kNumberTypeFloat32, out_shape);
    std::make_shared<KernelRunner>(symbol)->Run(tensors, {out});
    return out;
  }

 private:
  std::string symbol_;
};

void set_library(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) throw std::runtime_error(std::string("cogvlm2 pyboost ops: ") + dlerror());
  g_library = handle;
  g_entries.clear();
}

py::object run_inplace(const std::string& symbol, const std::vector<ms::Tensor>& tensors) {
  return ms::pynative::PyboostRunner::Call<0>(KernelRunner::RunInplace, symbol, tensors);
}

py::object run(const std::string& symbol, const std::vector<ms::Tensor>& tensors, const std::vector<int64_t>& shape) {
  return ms::pynative::PyboostRunner::Call<1>(KernelRunner::RunWithOutput, symbol, tensors, shape);
}

}  // namespace

PYBIND11_MODULE(MS_EXTENSION_NAME, m) {
  m.def("set_library", &set_library, "Opens the AOT kernel library whose entry points run_inplace calls");
  m.def("run_inplace", &run_inplace, "Runs an in-place AOT kernel (e.g. RopeInplace) on the tensors, eagerly");
  m.def("run", &run, "Runs an AOT kernel on the tensors into a new float32 tensor of the given shape, eagerly");
}
