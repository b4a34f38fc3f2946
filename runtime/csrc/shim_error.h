// mmsp-runtime C++ shims: the one error convention they share. Every extern "C" function
// returns nullptr on success or a malloc'd, NUL-terminated message that the Rust side copies and
// frees with mmsp_free_error (defined in attn_shim.cpp); no C++ exception crosses into Rust.
//
//     char *mmsp_something(...) {
//         MMSP_SHIM_TRY
//         ...
//         MMSP_SHIM_CATCH("mmsp something shim")
//     }
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

namespace mmsp_shim {
// A malloc'd copy of `msg` (nullptr only if malloc fails).
inline char *dup_error(const std::string &msg) {
    char *p = static_cast<char *>(std::malloc(msg.size() + 1));
    if (p != nullptr) std::memcpy(p, msg.c_str(), msg.size() + 1);
    return p;
}
}  // namespace mmsp_shim

#define MMSP_SHIM_TRY try {
#define MMSP_SHIM_CATCH(shim_name)                                          \
    }                                                                       \
    catch (const std::exception &e) {                                       \
        return mmsp_shim::dup_error(e.what());                              \
    }                                                                       \
    catch (...) {                                                           \
        return mmsp_shim::dup_error("unknown C++ exception in " shim_name); \
    }                                                                       \
    return nullptr;
