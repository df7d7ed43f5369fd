// Probe: every cuDNN execution plan for the prefill forward of `attn bench`'s shapes, each timed
// against SDPA default on [b, s, h, d] memory and cuDNN through libtorch on Megatron's [s, b, h, d]
// memory (what sdpa-cuda calls). Plans come from cudnn-frontend's graph API with the build
// policy ALL; plan 0 is the heuristics' first choice (the one libtorch builds).
//
// Built on the CPU machine against the project's PyTorch wheel, with the headers of the
// nvidia-cudnn-frontend (1.32.0) and nvidia-cuda-cccl (13.x) wheels unpacked to $CFE and
// $CCCL (SP: the venv's site-packages, T=$SP/torch):
//   g++ -std=c++17 -O2 cudnn-plans-probe.cpp -o cudnn-plans-probe -I$T/include
//     -I$T/include/torch/csrc/api/include -I$SP/nvidia/cu13/include -I$CCCL/nvidia/cu13/include
//     -I$SP/nvidia/cudnn/include -I$CFE/include -L$T/lib -Wl,--no-as-needed -ltorch -ltorch_cuda
//     -ltorch_cpu -lc10 -lc10_cuda -L$SP/nvidia/cudnn/lib -l:libcudnn.so.9
//     -L$SP/nvidia/cu13/lib -l:libcudart.so.13 -l:libnvrtc.so.13
// and run on the GPU machine with its torch/lib, nvidia/cudnn/lib and nvidia/cu13/lib on
// LD_LIBRARY_PATH. Output: 2026-11-27-cudnn-plans-probe.txt.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cudnn_frontend.h>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

namespace fe = cudnn_frontend;

static double time_ms(const std::function<void()>& f, int iters) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaEventRecord(a, stream);
  for (int i = 0; i < iters; i++) f();
  cudaEventRecord(b, stream);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

int main(int argc, char** argv) {
  int heur = argc > 1 ? atoi(argv[1]) : 0;  // 0: A, 1: A+B+FALLBACK
  cudnnHandle_t handle;
  cudnnCreate(&handle);
  cudnnSetStream(handle, c10::cuda::getCurrentCUDAStream());
  auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  int64_t shapes[6][2] = {{512, 32}, {1024, 16}, {2048, 8}, {4096, 4}, {8192, 2}, {16384, 1}};
  for (int64_t hd : {128, 64}) {
    int64_t h = 2048 / hd;
    for (bool causal : {false, true}) {
      for (auto& sb : shapes) {
        int64_t s = sb[0], b = sb[1];
        double flops = 4.0 * b * h * s * s * hd * (causal ? 0.5 : 1.0);
        auto q0 = at::randn({b, s, h, hd}, opt).transpose(1, 2);
        auto k0 = at::randn({b, s, h, hd}, opt).transpose(1, 2);
        auto v0 = at::randn({b, s, h, hd}, opt).transpose(1, 2);
        auto q = at::randn({s, b, h, hd}, opt).permute({1, 2, 0, 3});
        auto k = at::randn({s, b, h, hd}, opt).permute({1, 2, 0, 3});
        auto v = at::randn({s, b, h, hd}, opt).permute({1, 2, 0, 3});
        auto o = at::empty({s, b, h, hd}, opt).permute({1, 2, 0, 3});
        std::vector<int64_t> dim = {b, h, s, hd}, stride = {h * hd, hd, b * h * hd, 1};
        auto g = std::make_shared<fe::graph::Graph>();
        g->set_io_data_type(fe::DataType_t::BFLOAT16)
            .set_intermediate_data_type(fe::DataType_t::FLOAT)
            .set_compute_data_type(fe::DataType_t::FLOAT);
        auto mk = [&](const char* n, int64_t uid) {
          return g->tensor(fe::graph::Tensor_attributes().set_name(n).set_uid(uid).set_dim(dim).set_stride(stride));
        };
        auto Q = mk("Q", 1), K = mk("K", 2), V = mk("V", 3);
        auto attrs = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(false).set_attn_scale(
            1.0f / std::sqrt((float)hd));
        if (causal) attrs.set_causal_mask(true);
        auto [O, Stats] = g->sdpa(Q, K, V, attrs);
        O->set_output(true).set_uid(4).set_dim(dim).set_stride(stride);
        std::vector<fe::HeurMode_t> modes = {fe::HeurMode_t::A};
        if (heur) modes = {fe::HeurMode_t::A, fe::HeurMode_t::B, fe::HeurMode_t::FALLBACK};
        auto st = g->validate();
        if (st.is_good()) st = g->build_operation_graph(handle);
        if (st.is_good()) st = g->create_execution_plans(modes);
        if (st.is_good()) st = g->check_support(handle);
        if (st.is_good()) st = g->build_plans(handle, fe::BuildPlanPolicy_t::ALL);
        if (st.is_bad()) {
          printf("hd%ld %s s%ld b%ld: frontend error %s\n", hd, causal ? "causal" : "full", s, b,
                 st.get_message().c_str());
          continue;
        }
        int64_t n = g->get_execution_plan_count();
        std::vector<at::Tensor> ws(n);
        for (int64_t i = 0; i < n; i++) {
          int64_t w = 0;
          g->get_workspace_size_plan_at_index(i, w);
          ws[i] = at::empty({std::max<int64_t>(w, 1)}, opt.dtype(at::kByte));
        }
        std::unordered_map<int64_t, void*> pack = {
            {1, q.data_ptr()}, {2, k.data_ptr()}, {3, v.data_ptr()}, {4, o.data_ptr()}};
        std::vector<std::function<void()>> fs;
        fs.push_back([&] { at::scaled_dot_product_attention(q0, k0, v0, {}, 0.0, causal); });
        fs.push_back([&] { at::_scaled_dot_product_cudnn_attention(q, k, v, {}, false, 0.0, causal, false); });
        std::vector<bool> ok(n, true);
        for (int64_t i = 0; i < n; i++) {
          fs.push_back([&, i] {
            if (ok[i] && g->execute_plan_at_index(handle, pack, ws[i].data_ptr(), i).is_bad()) ok[i] = false;
          });
        }
        // Correctness of each plan against libtorch's cuDNN on the same memory.
        auto ref = std::get<0>(at::_scaled_dot_product_cudnn_attention(q, k, v, {}, false, 0.0, causal, false));
        std::vector<double> err(n);
        for (int64_t i = 0; i < n; i++) {
          o.zero_();
          fs[2 + i]();
          err[i] = (o.to(at::kFloat) - ref.to(at::kFloat)).abs().max().item<double>();
        }
        for (auto& f : fs) time_ms(f, 3);
        int reps = 7, m = fs.size();
        std::vector<std::vector<double>> t(m);
        for (int r = 0; r < reps; r++)
          for (int j = 0; j < m; j++) {
            int idx = (j + r) % m;
            t[idx].push_back(time_ms(fs[idx], 10));
          }
        std::vector<double> med(m);
        for (int j = 0; j < m; j++) {
          std::sort(t[j].begin(), t[j].end());
          med[j] = t[j][reps / 2];
        }
        printf("hd%ld %-6s s%-5ld b%-2ld default %6.1f  torch-cudnn-sbhd %6.1f |", hd, causal ? "causal" : "full", s,
               b, flops / med[0] / 1e9, flops / med[1] / 1e9);
        for (int64_t i = 0; i < n; i++)
          printf(" p%ld %6.1f%s(err %.3g)", i, ok[i] ? flops / med[2 + i] / 1e9 : 0.0, "", err[i]);
        printf("  TFLOP/s\n");
        fflush(stdout);
      }
    }
  }
  return 0;
}
