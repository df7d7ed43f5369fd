// libtorch calls attention-cuda needs and tch does not bind: libtorch's current CUDA stream,
// the SDPA backend switches, SDPA on Megatron's [s, b, h, d] layout in one call (cuDNN's kernel
// directly once libtorch has chosen it) and what its choice depends on, and the
// variable-length flash-attention forward and backward (packed THD sequences). Public ATen, c10
// and torch autograd APIs only (calls autograd does not record view their tensors through c10's
// TensorImpl, without the dispatcher; a recorded cuDNN call is one autograd function); no CUDA
// headers. Exceptions become errors.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/GradMode.h>
#include <c10/core/Stream.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <tuple>

namespace {
void set_err(char* err, int64_t errlen, const char* msg) {
  if (err && errlen > 0) {
    std::strncpy(err, msg, errlen - 1);
    err[errlen - 1] = 0;
  }
}

// A view of `t`'s memory with other sizes and strides, made without libtorch's dispatcher (a
// permute goes through it twice). The view has no autograd history: only where autograd records
// nothing (`untracked` calls, `CudnnSbhd`'s forward, its backward outside `create_graph`). It
// shares `t`'s version counter, so an in-place change through either shows on both.
at::Tensor raw_view(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()), t.key_set(),
                                                   t.dtype());
  impl->set_sizes_and_strides(sizes, strides, t.storage_offset());
  impl->set_version_counter(t.unsafeGetTensorImpl()->version_counter());
  return at::Tensor(std::move(impl));
}

// Whether autograd records nothing of a call on these tensors.
bool untracked(std::initializer_list<const at::Tensor*> ts) {
  if (!c10::GradMode::is_enabled()) return true;
  for (const at::Tensor* t : ts)
    if (t->requires_grad()) return false;
  return true;
}

// [s, b, h, d] viewed [b, h, s, d] (SDPA's layout), raw where `raw`.
at::Tensor bhsd(const at::Tensor& t, bool raw) {
  if (!raw || t.dim() != 4) return t.permute({1, 2, 0, 3});
  const int64_t sizes[4] = {t.size(1), t.size(2), t.size(0), t.size(3)};
  const int64_t strides[4] = {t.stride(1), t.stride(2), t.stride(0), t.stride(3)};
  return raw_view(t, sizes, strides);
}

// An output [b, h, s, d] back to [s, b, h, d]: a raw view where `raw`, else a permuted view.
at::Tensor sbhd(const at::Tensor& o, bool raw) {
  if (!raw || o.dim() != 4) return o.permute({2, 0, 1, 3});
  const int64_t sizes[4] = {o.size(2), o.size(0), o.size(1), o.size(3)};
  const int64_t strides[4] = {o.stride(2), o.stride(0), o.stride(1), o.stride(3)};
  return raw_view(o, sizes, strides);
}

// `o` [b, h, s, d] as [s, b, h * d]: a raw view where `raw` and `o` already lies in that order
// (cuDNN allocates its output in its query's layout), a contiguous copy where it does not.
at::Tensor sbhd_flat(const at::Tensor& o, bool raw) {
  if (raw && o.dim() == 4) {
    const int64_t b = o.size(0), h = o.size(1), s = o.size(2), d = o.size(3);
    const bool dense = (d <= 1 || o.stride(3) == 1) && (h <= 1 || o.stride(1) == d) &&
                       (b <= 1 || o.stride(0) == h * d) && (s <= 1 || o.stride(2) == b * h * d);
    if (dense) {
      const int64_t sizes[3] = {s, b, h * d};
      const int64_t strides[3] = {b * h * d, h * d, 1};
      return raw_view(o, sizes, strides);
    }
  }
  return o.permute({2, 0, 1, 3}).contiguous().view({o.size(2), o.size(0), -1});
}

// cuDNN's attention on [s, b, h, d] tensors as one autograd node: the forward and backward view
// their tensors in SDPA's layout without the dispatcher (`raw_view`), where the same call made
// of permutes and views records five more nodes, each with its own host work in the backward.
// The backward is the one libtorch's derivative of `_scaled_dot_product_cudnn_attention` runs,
// with the forward's log-sum-exp and random state.
struct CudnnSbhd : public torch::autograd::Function<CudnnSbhd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double dropout, bool causal, double scale) {
    auto r = at::_scaled_dot_product_cudnn_attention(bhsd(q, true), bhsd(k, true), bhsd(v, true), std::nullopt,
                                                     true, dropout, causal, false, scale);
    const at::Tensor& o = std::get<0>(r);
    ctx->save_for_backward({q, k, v, o, std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<6>(r),
                            std::get<7>(r)});
    ctx->saved_data["max_q"] = std::get<4>(r).expect_int();
    ctx->saved_data["max_k"] = std::get<5>(r).expect_int();
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return sbhd_flat(o, true);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &o = saved[3];
    // Under `create_graph` autograd records this backward: dispatched views then, so that a
    // second backward reaches libtorch's own refusal (cuDNN's backward has no derivative), as
    // it does without this function.
    const bool raw = !c10::GradMode::is_enabled();
    // The gradient in the output's layout ([s, b, h * d] dense, as `sbhd_flat` made it).
    const at::Tensor g = grads[0].contiguous().view({o.size(2), o.size(0), o.size(1), o.size(3)});
    auto r = at::_scaled_dot_product_cudnn_attention_backward(
        bhsd(g, raw), bhsd(q, raw), bhsd(k, raw), bhsd(v, raw), o, saved[4], saved[7], saved[8], at::Tensor(),
        saved[5], saved[6], ctx->saved_data["max_q"].toInt(), ctx->saved_data["max_k"].toInt(),
        ctx->saved_data["dropout"].toDouble(), ctx->saved_data["causal"].toBool(),
        ctx->saved_data["scale"].toDouble());
    return {sbhd(std::get<0>(r), raw), sbhd(std::get<1>(r), raw), sbhd(std::get<2>(r), raw), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {

// cudaStream_t libtorch uses on `device` right now (nullptr: the legacy default stream).
void* attn_cuda_current_stream(int64_t device, char* err, int64_t errlen) {
  try {
    auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Stream s = impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    return s.native_handle();
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return reinterpret_cast<void*>(-1);
  }
}

// Which SDPA backends libtorch may pick (process-wide switches).
void attn_sdp_set(int flash, int mem_efficient, int math, int cudnn) {
  auto& c = at::globalContext();
  c.setSDPUseFlash(flash != 0);
  c.setSDPUseMemEfficient(mem_efficient != 0);
  c.setSDPUseMath(math != 0);
  c.setSDPUseCuDNN(cudnn != 0);
}

void attn_sdp_get(int* flash, int* mem_efficient, int* math, int* cudnn) {
  auto& c = at::globalContext();
  *flash = c.userEnabledFlashSDP();
  *mem_efficient = c.userEnabledMemEfficientSDP();
  *math = c.userEnabledMathSDP();
  *cudnn = c.userEnabledCuDNNSDP();
}

// Variable-length flash attention forward: q [total_q, hq, d], k/v [total_k, hkv, d],
// cu_q/cu_k int32 [n+1]. Returns out, logsumexp, rng_state, unused (4 new tensors).
int attn_flash_varlen_fwd(at::Tensor* q, at::Tensor* k, at::Tensor* v, at::Tensor* cu_q, at::Tensor* cu_k,
                          int64_t max_q, int64_t max_k, double dropout, int causal, double scale,
                          at::Tensor** outs, char* err, int64_t errlen) {
  try {
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_q, *cu_k, max_q, max_k, dropout, causal != 0, false,
                                          scale, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    outs[0] = new at::Tensor(std::get<0>(r));
    outs[1] = new at::Tensor(std::get<1>(r));
    outs[2] = new at::Tensor(std::get<2>(r));
    outs[3] = new at::Tensor(std::get<3>(r));
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// Its backward: grads of q, k, v (3 new tensors).
int attn_flash_varlen_bwd(at::Tensor* grad_out, at::Tensor* q, at::Tensor* k, at::Tensor* v, at::Tensor* out,
                          at::Tensor* lse, at::Tensor* cu_q, at::Tensor* cu_k, int64_t max_q, int64_t max_k,
                          double dropout, int causal, at::Tensor* rng_state, at::Tensor* unused, double scale,
                          at::Tensor** grads, char* err, int64_t errlen) {
  try {
    auto r = at::_flash_attention_backward(*grad_out, *q, *k, *v, *out, *lse, *cu_q, *cu_k, max_q, max_k, dropout,
                                           causal != 0, *rng_state, *unused, scale, std::nullopt, std::nullopt);
    grads[0] = new at::Tensor(std::get<0>(r));
    grads[1] = new at::Tensor(std::get<1>(r));
    grads[2] = new at::Tensor(std::get<2>(r));
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// Forward of `sdpa-cuda` without a mask: q [sq, b, hq, d], k/v [sk, b, hkv, d] -> out
// [sq, b, hq * d] (1 new tensor). backend 3 (cuDNN) calls at::_scaled_dot_product_cudnn_attention
// with the arguments at::scaled_dot_product_attention passes it once it has chosen cuDNN; any
// other code calls at::scaled_dot_product_attention.
int attn_sdpa_sbhd(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int64_t backend, double dropout,
                   int causal, double scale, int gqa, at::Tensor** out, char* err, int64_t errlen) {
  try {
    const bool raw = untracked({q, k, v});
    if (backend == 3 && !raw) {
      *out = new at::Tensor(CudnnSbhd::apply(*q, *k, *v, dropout, causal != 0, scale));
      return 0;
    }
    const auto qp = bhsd(*q, raw), kp = bhsd(*k, raw), vp = bhsd(*v, raw);
    at::Tensor o;
    if (backend == 3) {
      o = std::get<0>(at::_scaled_dot_product_cudnn_attention(qp, kp, vp, std::nullopt, !raw, dropout, causal != 0,
                                                              false, scale));
    } else {
      o = at::scaled_dot_product_attention(qp, kp, vp, std::nullopt, dropout, causal != 0, scale, gqa != 0);
    }
    *out = new at::Tensor(sbhd_flat(o, raw));
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// cuDNN's attention with its log-sum-exp, no mask or causal (top-left, square in our use):
// q [sq, b, hq, d], k/v [sk, b, hkv, d] -> out [sq, b, hq, d] (a view of cuDNN's result, in the
// layout it chose) and lse [b, hq, sq] fp32, natural log (2 new tensors).
int attn_cudnn_lse_sbhd(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int causal, double scale,
                        at::Tensor** outs, char* err, int64_t errlen) {
  try {
    const bool raw = untracked({q, k, v});
    const auto qp = bhsd(*q, raw), kp = bhsd(*k, raw), vp = bhsd(*v, raw);
    auto r = at::_scaled_dot_product_cudnn_attention(qp, kp, vp, std::nullopt, true, 0.0, causal != 0, false, scale);
    auto o = sbhd(std::get<0>(r), raw);
    auto lse = std::get<1>(r).reshape({qp.size(0), qp.size(1), qp.size(2)});
    outs[0] = new at::Tensor(std::move(o));
    outs[1] = new at::Tensor(std::move(lse));
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

// What libtorch's SDPA backend choice depends on in q, k and v, in one call: for each tensor
// 14 values (dimensions, the first 4 sizes and strides (-1 past the last), dtype, device type,
// device index, data pointer modulo 16, requires_grad), then grad mode and the
// deterministic-algorithms flag: 44 values (SDPA_SIGNATURE in src/shim.rs), written only where
// `cap` holds them all. 0: written; 1: a tensor has no data pointer or sizes to read
// (undefined, sparse, nested, ...); 2: `cap` is too small (nothing written).
int attn_sdpa_signature(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int64_t* sig,
                        int64_t cap) {
  constexpr int64_t per_tensor = 14, values = 3 * per_tensor + 2;
  if (cap < values) return 2;
  try {
    int64_t* o = sig;
    for (const at::Tensor* t : {q, k, v}) {
      if (!t->defined() || !t->has_storage() || t->is_nested()) return 1;
      const int64_t dim = t->dim();
      *o++ = dim;
      for (int64_t i = 0; i < 4; ++i) *o++ = i < dim ? t->size(i) : -1;
      for (int64_t i = 0; i < 4; ++i) *o++ = i < dim ? t->stride(i) : -1;
      *o++ = static_cast<int64_t>(t->scalar_type());
      *o++ = static_cast<int64_t>(t->device().type());
      *o++ = t->device().index();
      *o++ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16);
      *o++ = t->requires_grad() ? 1 : 0;
    }
    *o++ = c10::GradMode::is_enabled() ? 1 : 0;
    *o++ = at::globalContext().deterministicAlgorithms() ? 1 : 0;
    return o - sig == values ? 0 : 1;
  } catch (const std::exception&) {
    return 1;
  }
}

}  // extern "C"
