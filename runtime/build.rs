//! Builds the C++ shims (attention, optimizer/autograd, diagnostics, CUDA graphs) against the
//! libtorch that torch-sys found, and forces libtorch_cuda and libc10_cuda into the link
//! (`--as-needed` drops them otherwise and CUDA is then unavailable).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc/attn_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/optim_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/diag_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/graph_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; is LIBTORCH_USE_PYTORCH=1 set?");
    let lib = PathBuf::from(lib);
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/attn_shim.cpp")
        .file("csrc/optim_shim.cpp")
        .file("csrc/diag_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-w")
        .compile("mmsp_attn_shim");
    graph_shim(&root, &include);
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// The CUDA runtime headers that torch's CUDA wheels install beside it
/// (`site-packages/nvidia/*/include/cuda_runtime.h`), if any, with the `crt/` headers that
/// `cuda_runtime.h` includes (the nvidia-cuda-crt wheel, which runtime/env.sh installs).
fn cuda_include(torch_root: &Path) -> Option<PathBuf> {
    let nvidia = torch_root.parent()?.join("nvidia");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .filter(|d| d.join("cuda_runtime.h").is_file() && d.join("crt/host_config.h").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// The CUDA-graph shim: with the CUDA runtime headers (and a CUDA libtorch), ATen's
/// `CUDAGraph`; without them, entry points that report graphs unavailable.
fn graph_shim(torch_root: &Path, include: &Path) {
    let cuda = torch_root.join("lib").join("libtorch_cuda.so").exists();
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/graph_shim.cpp")
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-w");
    match cuda_include(torch_root) {
        Some(dir) if cuda => {
            b.include(dir).define("MMSP_CUDA_GRAPHS", None);
        }
        _ => println!(
            "cargo:warning=no CUDA runtime and crt headers beside torch (source runtime/env.sh): \
             CUDA graphs disabled"
        ),
    }
    b.compile("mmsp_graph_shim");
}
