//! Builds the C++ shims (attention, optimizer/autograd, diagnostics) against the libtorch that torch-sys found, and forces
//! libtorch_cuda into the link (`--as-needed` drops it otherwise and CUDA is then unavailable).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/attn_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/optim_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/diag_shim.cpp");
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
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
