// The part of libtorch's C++ API that tch does not bind and attention-core needs: custom
// autograd functions whose forward and backward are Rust callbacks, gradient accumulation into
// a parameter's .grad, generator states, and device memory statistics. Only public ATen/torch
// APIs are used. Every entry point catches C++ exceptions and reports them as an error string.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fills `outputs[0..n_out)` with new at::Tensor* (nullptr = no tensor); returns 0, or non-zero
// with a message in `err`.
using Callback = int (*)(void* state, at::Tensor** inputs, int64_t n_in, at::Tensor** outputs,
                         int64_t n_out, char* err, int64_t errlen);
using Drop = void (*)(void* state);

void set_err(char* err, int64_t errlen, const char* msg) {
  if (err && errlen > 0) {
    std::strncpy(err, msg, errlen - 1);
    err[errlen - 1] = 0;
  }
}

// Owns the Rust state; destroyed with the autograd graph node that saved it.
struct State : torch::CustomClassHolder {
  void* state;
  Callback forward;
  Callback backward;
  Drop drop;
  int64_t n_in;
  int64_t n_out;
  State(void* s, Callback f, Callback b, Drop d, int64_t ni, int64_t no)
      : state(s), forward(f), backward(b), drop(d), n_in(ni), n_out(no) {}
  ~State() override {
    if (drop) drop(state);
  }
};

variable_list call(Callback cb, void* state, const variable_list& in, int64_t n_out) {
  std::vector<at::Tensor*> ins;
  ins.reserve(in.size());
  for (const auto& t : in) ins.push_back(new at::Tensor(t));  // the callback adopts these
  std::vector<at::Tensor*> outs(n_out, nullptr);
  char err[2048] = {0};
  int rc = cb(state, ins.data(), static_cast<int64_t>(ins.size()), outs.data(), n_out, err, sizeof(err));
  variable_list result;
  result.reserve(n_out);
  for (auto* t : outs) {
    result.push_back(t ? *t : at::Tensor());
    delete t;
  }
  if (rc != 0) throw std::runtime_error(err);
  return result;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  // `inputs` must be a TensorList: autograd registers the tensors of TensorList arguments as
  // differentiable inputs (a std::vector argument would count as a plain value).
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, c10::intrusive_ptr<State> st) {
    variable_list out = call(st->forward, st->state, inputs.vec(), st->n_out);
    for (const auto& t : out) {
      if (!t.defined()) throw std::runtime_error("a custom function's forward returned no tensor");
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto st = c10::static_intrusive_pointer_cast<State>(ctx->saved_data["state"].toCapsule());
    variable_list grads = call(st->backward, st->state, grad_outputs, st->n_in);
    grads.emplace_back();  // no gradient for the State argument
    return grads;
  }
};

}  // namespace

extern "C" {

int attn_custom_apply(at::Tensor** inputs, int64_t n_in, int64_t n_out, void* state, Callback fwd,
                      Callback bwd, Drop drop, at::Tensor** outputs, char* err, int64_t errlen) {
  // From here on the State owns `state`: it is dropped with the graph, or right away on error.
  c10::intrusive_ptr<State> st;
  try {
    st = c10::make_intrusive<State>(state, fwd, bwd, drop, n_in, n_out);
  } catch (const std::exception& e) {
    drop(state);
    set_err(err, errlen, e.what());
    return 1;
  }
  try {
    variable_list ins;
    ins.reserve(n_in);
    for (int64_t i = 0; i < n_in; ++i) ins.push_back(*inputs[i]);
    variable_list outs = RustFunction::apply(at::TensorList(ins), std::move(st));
    for (int64_t i = 0; i < n_out; ++i) outputs[i] = new at::Tensor(outs[i]);
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// Whether autograd records operations on this thread (torch.is_grad_enabled()).
int attn_is_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// param.grad += grad (param.grad = grad.clone() when it has none).
int attn_accumulate_grad(at::Tensor* param, at::Tensor* grad, char* err, int64_t errlen) {
  try {
    at::NoGradGuard no_grad;
    auto& g = param->mutable_grad();
    if (g.defined()) {
      g.add_(*grad);
    } else {
      g = grad->detach().clone();
    }
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// The default generator's state of a device (CPU: device_type 0; CUDA: 1, index).
at::Tensor* attn_rng_get_state(int device_type, int64_t index, char* err, int64_t errlen) {
  try {
    c10::Device d = device_type == 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return new at::Tensor(gen.get_state());
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return nullptr;
  }
}

int attn_rng_set_state(int device_type, int64_t index, at::Tensor* state, char* err, int64_t errlen) {
  try {
    c10::Device d = device_type == 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// Current and peak allocated bytes of the accelerator's caching allocator; reset_peak first
// resets the peak. Returns non-zero when no accelerator is available.
int attn_device_memory(int64_t index, int reset_peak, int64_t* current, int64_t* peak, char* err, int64_t errlen) {
  try {
    auto idx = static_cast<c10::DeviceIndex>(index);
    if (reset_peak) at::accelerator::resetPeakStats(idx);
    auto stats = at::accelerator::getDeviceStats(idx);
    const auto& a = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *current = a.current;
    *peak = a.peak;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

}  // extern "C"
