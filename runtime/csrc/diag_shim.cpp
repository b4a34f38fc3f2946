// mmsp-runtime C++ shim, diagnostics part: what a measured run needs to explain itself.
//
// - mmsp_alloc_stats / mmsp_alloc_reset_peak: the CUDA caching allocator's allocated and
//   reserved bytes (current and peak since the last reset), so that a run can tell the memory
//   its tensors hold from what the allocator keeps (fragmentation and cache).
// - mmsp_kernel_profile_start / _stop: libtorch's Kineto profiler (CUPTI, device activities
//   only) around a span of work; the stop writes the Chrome trace (Perfetto) and a
//   tab-separated list of the device activities (kernels, copies, memsets) that the Rust side
//   aggregates.
// - mmsp_set_deterministic: ATen's deterministic-algorithms switch and cuDNN's deterministic /
//   benchmark flags, for bitwise-reproducible runs.
//
// Same conventions as attn_shim.cpp: nullptr on success or a malloc'd message freed with
// mmsp_free_error; every C++ exception is caught here. Only device-generic c10 interfaces are
// used, so the shim needs no CUDA headers.
#include <ATen/ATen.h>
#include "shim_error.h"
#include <ATen/Context.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

namespace {
namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
}  // namespace


extern "C" {

// out[0..4] = allocated bytes now, allocated peak, reserved bytes now, reserved peak.
char *mmsp_alloc_stats(int device, int64_t *out) {
    MMSP_SHIM_TRY
    auto s = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
    MMSP_SHIM_CATCH("mmsp diag shim")
}

char *mmsp_alloc_reset_peak(int device) {
    MMSP_SHIM_TRY
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    MMSP_SHIM_CATCH("mmsp diag shim")
}

char *mmsp_kernel_profile_start(void) {
    MMSP_SHIM_TRY
    ProfilerConfig cfg(ProfilerState::KINETO);
    // Device activities only: recording every CPU op would slow the host and open gaps on the
    // device that the unprofiled run does not have.
    std::set<ActivityType> acts{ActivityType::CUDA};
    prof::prepareProfiler(cfg, acts);
    prof::enableProfiler(cfg, acts);
    MMSP_SHIM_CATCH("mmsp diag shim")
}

// Stops the profiler; writes the Chrome trace to `trace_path` (if not empty) and one line per
// device activity to `tsv_path`: start_ns, duration_ns, device index, name (tabs in names are
// replaced by spaces).
char *mmsp_kernel_profile_stop(const char *trace_path, const char *tsv_path) {
    MMSP_SHIM_TRY
    auto r = prof::disableProfiler();
    if (!r) throw std::runtime_error("the profiler returned no result");
    FILE *f = std::fopen(tsv_path, "w");
    if (f == nullptr) throw std::runtime_error(std::string("cannot write ") + tsv_path);
    for (const auto &e : r->events()) {
        if (e.deviceType() != c10::DeviceType::CUDA) continue;
        std::string name = e.name();
        for (auto &c : name)
            if (c == '\t' || c == '\n') c = ' ';
        std::fprintf(f, "%llu\t%llu\t%d\t%s\n", static_cast<unsigned long long>(e.startNs()),
                     static_cast<unsigned long long>(e.durationNs()), e.deviceIndex(), name.c_str());
    }
    if (std::fclose(f) != 0) throw std::runtime_error(std::string("cannot close ") + tsv_path);
    if (trace_path != nullptr && trace_path[0] != '\0') r->save(trace_path);
    MMSP_SHIM_CATCH("mmsp diag shim")
}

char *mmsp_set_deterministic(int on) {
    MMSP_SHIM_TRY
    auto &ctx = at::globalContext();
    ctx.setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    ctx.setDeterministicCuDNN(on != 0);
    if (on != 0) ctx.setBenchmarkCuDNN(false);
    MMSP_SHIM_CATCH("mmsp diag shim")
}

}  // extern "C"
