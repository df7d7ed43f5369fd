// libtorch calls attention-cuda needs and tch does not bind: libtorch's current CUDA stream,
// the SDPA backend switches, and the variable-length flash-attention forward and backward
// (packed THD sequences). Public ATen APIs only; no CUDA headers. Exceptions become errors.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <exception>
#include <tuple>

namespace {
void set_err(char* err, int64_t errlen, const char* msg) {
  if (err && errlen > 0) {
    std::strncpy(err, msg, errlen - 1);
    err[errlen - 1] = 0;
  }
}
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

}  // extern "C"
