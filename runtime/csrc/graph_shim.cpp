// mmsp-runtime C++ shim: CUDA graphs through ATen's at::cuda::CUDAGraph. A chain of kernels
// that libtorch queues is captured once (on a side stream, as torch.cuda.graph does) and then
// replayed with one launch: the per-token decode chain, whose ~80 small kernels are otherwise
// bound by the host's per-op work (runtime/README.md, issue 18).
//
// Needs the CUDA runtime headers (cuda_runtime_api.h, from torch's nvidia wheels); build.rs
// defines MMSP_CUDA_GRAPHS when it finds them. Without them every entry point returns an error
// and the runtime decodes eagerly. Error convention: shim_error.h.
#include "shim_error.h"

#ifdef MMSP_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>
#include <optional>
#include <stdexcept>

namespace {
struct Graph {
    at::cuda::CUDAGraph graph;
    // The stream that was current before the capture began; made current again after it.
    std::optional<c10::cuda::CUDAStream> prev;
    bool captured = false;
};

Graph *as_graph(void *g) {
    if (g == nullptr) throw std::runtime_error("null CUDA graph handle");
    return static_cast<Graph *>(g);
}
}  // namespace

extern "C" {

char *mmsp_graph_new(void **out) {
    MMSP_SHIM_TRY
    *out = nullptr;
    *out = new Graph();
    MMSP_SHIM_CATCH("mmsp graph shim")
}

void mmsp_graph_free(void *g) { delete static_cast<Graph *>(g); }

// Starts capturing this thread's libtorch work on `device`: a pool stream becomes current
// (after waiting, on the device, for the work queued so far on the current one) and the graph
// records everything queued there until mmsp_graph_end. Nothing runs while capturing.
char *mmsp_graph_begin(void *gp, int device) {
    MMSP_SHIM_TRY
    Graph *g = as_graph(gp);
    if (g->prev || g->captured) throw std::runtime_error("CUDA graph already captured or capturing");
    const auto dev = static_cast<c10::DeviceIndex>(device);
    const c10::cuda::CUDAStream prev = c10::cuda::getCurrentCUDAStream(dev);
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, dev);
    c10::Event ready(c10::DeviceType::CUDA);
    ready.record(prev);
    ready.block(side);
    c10::cuda::setCurrentCUDAStream(side);
    g->prev = prev;
    try {
        // Thread-local mode: other threads' CUDA calls do not invalidate this capture.
        g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
        c10::cuda::setCurrentCUDAStream(prev);
        g->prev.reset();
        throw;
    }
    MMSP_SHIM_CATCH("mmsp graph shim")
}

// Ends the capture begun by mmsp_graph_begin and makes the former stream current again
// (also when ending fails, e.g. after a kernel that may not be captured).
char *mmsp_graph_end(void *gp) {
    MMSP_SHIM_TRY
    Graph *g = as_graph(gp);
    if (!g->prev) throw std::runtime_error("CUDA graph capture was not begun");
    const c10::cuda::CUDAStream prev = *g->prev;
    g->prev.reset();
    try {
        g->graph.capture_end();
    } catch (...) {
        c10::cuda::setCurrentCUDAStream(prev);
        throw;
    }
    c10::cuda::setCurrentCUDAStream(prev);
    g->captured = true;
    MMSP_SHIM_CATCH("mmsp graph shim")
}

// Replays the captured work on this thread's current stream.
char *mmsp_graph_replay(void *gp) {
    MMSP_SHIM_TRY
    Graph *g = as_graph(gp);
    if (!g->captured) throw std::runtime_error("CUDA graph replayed before its capture ended");
    g->graph.replay();
    MMSP_SHIM_CATCH("mmsp graph shim")
}

int mmsp_graph_available() { return 1; }

}  // extern "C"

#else  // no CUDA headers at build time

namespace {
const char *kNoGraphs = "this mmsp-runtime was built without the CUDA runtime headers: no CUDA graphs";
}

extern "C" {
char *mmsp_graph_new(void **out) {
    *out = nullptr;
    return mmsp_shim::dup_error(kNoGraphs);
}
void mmsp_graph_free(void *) {}
char *mmsp_graph_begin(void *, int) { return mmsp_shim::dup_error(kNoGraphs); }
char *mmsp_graph_end(void *) { return mmsp_shim::dup_error(kNoGraphs); }
char *mmsp_graph_replay(void *) { return mmsp_shim::dup_error(kNoGraphs); }
int mmsp_graph_available() { return 0; }
}  // extern "C"
#endif
