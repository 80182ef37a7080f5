// PyNative twins of the in-place AOT kernels, dispatched through MindSpore's pyboost runner (ops.CustomOpBuilder).
// Measured here: ~3 us of framework work per call, against ~90-100 us for the same kernel as ops.Custom(aot),
// which is all of a decode-sized rotary's cost. The kernels are the AOT library's own entry points (opened by
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
    default: return "unsupported";
  }
}

// Runs an in-place AOT kernel over the inputs; its one output is the [1] int32 ordering token, kept here.
class InplaceRunner : public ms::pynative::PyboostRunner {
 public:
  InplaceRunner(const std::string& symbol) : PyboostRunner(symbol), symbol_(symbol) {}

  void LaunchKernel() override {
    const auto& in = inputs();
    const int n = static_cast<int>(in.size());
    std::vector<void*> params(n + 1);
    std::vector<int> ndims(n + 1);
    std::vector<std::vector<int64_t>> shapes(n + 1);
    std::vector<int64_t*> shape_ptrs(n + 1);
    std::vector<const char*> dtypes(n + 1);
    for (int i = 0; i < n; ++i) {
      if (!in[i].is_contiguous()) throw std::runtime_error(symbol_ + ": input " + std::to_string(i) + " is strided");
      params[i] = in[i].GetDataPtr();
      shapes[i] = in[i].shape();
      dtypes[i] = dtype_name(in[i]);
    }
    int32_t token = 0;
    params[n] = &token;
    shapes[n] = {1};
    dtypes[n] = "int32";
    for (int i = 0; i <= n; ++i) {
      ndims[i] = static_cast<int>(shapes[i].size());
      shape_ptrs[i] = shapes[i].data();
    }
    const int status = entry(symbol_)(n + 1, params.data(), ndims.data(), shape_ptrs.data(), dtypes.data(),
                                      nullptr, nullptr);
    if (status != 0) throw std::runtime_error(symbol_ + " failed with status " + std::to_string(status));
  }

  static void Eval(const std::string& symbol, const std::vector<ms::Tensor>& tensors) {
    auto runner = std::make_shared<InplaceRunner>(symbol);
    runner->Run(tensors, {});
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
  return ms::pynative::PyboostRunner::Call<0>(InplaceRunner::Eval, symbol, tensors);
}

}  // namespace

PYBIND11_MODULE(MS_EXTENSION_NAME, m) {
  m.def("set_library", &set_library, "Opens the AOT kernel library whose entry points run_inplace calls");
  m.def("run_inplace", &run_inplace, "Runs an in-place AOT kernel (e.g. RopeInplace) on the tensors, eagerly");
}
