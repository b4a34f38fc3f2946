//! Helpers shared by the subcommands: timing, the GPU device, and the bad-input error that
//! maps to exit code 2.
use anyhow::Result;
use mmsp_runtime::RuntimeError;
use tch::Device;

/// A bad flag or file named by the user: reported in one line with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// A [`Usage`] error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

/// Returns early with a [`Usage`] error (exit code 2).
#[macro_export]
macro_rules! usage {
    ($($t:tt)*) => {
        return Err($crate::util::usage(format!($($t)*)))
    };
}

/// Whether an error is the user's input (exit 2) rather than a failure of the run (exit 1).
pub fn is_bad_input(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Usage>()
            || c.is::<std::num::ParseIntError>()
            || c.is::<std::num::ParseFloatError>()
            || c.downcast_ref::<RuntimeError>()
                .is_some_and(RuntimeError::is_bad_input)
    })
}

/// The first CUDA device, or an error saying why there is none.
pub fn gpu() -> Result<Device> {
    if !tch::Cuda::is_available() {
        anyhow::bail!(
            "CUDA is not available to libtorch (is libtorch_cuda linked and a GPU visible?)"
        );
    }
    Ok(Device::Cuda(0))
}

/// Waits for the device's work (no-op on the CPU).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `iters` runs of `f` after one warm-up, each run synchronised.
pub fn time<F: FnMut() -> Result<()>>(device: Device, iters: usize, mut f: F) -> Result<f64> {
    f()?;
    sync(device);
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = std::time::Instant::now();
        f()?;
        sync(device);
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

/// Causal attention forward FLOPs: 4 * S^2 * H * D / 2; fwd+bwd = 3.5 x fwd, as
/// attn_bench.py counts.
pub fn causal_flops(s: usize, h: usize, d: usize) -> f64 {
    4.0 * (s as f64) * (s as f64) * h as f64 * d as f64 / 2.0
}
