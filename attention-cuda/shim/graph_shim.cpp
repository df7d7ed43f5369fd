// CUDA-graph capture and replay through libtorch's own at::cuda::CUDAGraph (its private memory
// pool keeps the captured tensors' memory for the replays), the way torch.cuda.graph does it:
// synchronise, switch libtorch's current stream to a side stream, capture, switch back.
// Needs the CUDA runtime headers of the PyTorch wheel (nvidia/cu13/include); calls only
// exported libtorch/c10 functions, so nothing links against the CUDA runtime directly.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>
#include <optional>

namespace {
void set_err(char* err, int64_t errlen, const char* msg) {
  if (err && errlen > 0) {
    std::strncpy(err, msg, errlen - 1);
    err[errlen - 1] = 0;
  }
}

struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> previous;  // set while capturing
};
}  // namespace

extern "C" {

// Starts capturing on `device`: synchronises it, makes a pool stream libtorch's current stream
// and begins the capture. Returns the graph, or nullptr with `err` set.
void* attn_graph_begin(int64_t device, char* err, int64_t errlen) {
  Graph* g = nullptr;
  try {
    auto dev = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(dev);
    c10::cuda::device_synchronize();
    g = new Graph();
    g->previous = c10::cuda::getCurrentCUDAStream(dev);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, dev));
    g->graph.capture_begin();
    return g;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    if (g) {
      if (g->previous) c10::cuda::setCurrentCUDAStream(*g->previous);
      delete g;
    }
    return nullptr;
  }
}

// Ends the capture and restores the previous stream (also when ending fails). 0 on success.
int attn_graph_end(void* graph, char* err, int64_t errlen) {
  auto* g = static_cast<Graph*>(graph);
  int rc = 0;
  try {
    g->graph.capture_end();
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    rc = 1;
  }
  if (g->previous) {
    c10::cuda::setCurrentCUDAStream(*g->previous);
    g->previous.reset();
  }
  return rc;
}

// Replays the captured work on libtorch's current stream. 0 on success.
int attn_graph_replay(void* graph, char* err, int64_t errlen) {
  try {
    static_cast<Graph*>(graph)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return 1;
  }
}

void attn_graph_free(void* graph) {
  try {
    delete static_cast<Graph*>(graph);
  } catch (...) {
  }
}
}
