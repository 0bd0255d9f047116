//! What the benchmark binaries share: METHOD.md's timing (warm-up, then the median of runs each
//! closed by a device sync).

use std::time::Instant;

use burn::tensor::backend::Backend;

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Median milliseconds of `f`, each run closed by a device sync. Each run's output is dropped only
/// after its sync: fusion does not compute what a fused block drops unread, so timing a dropped
/// result would time less than the op (measured: a fused matmul with an element-wise op after it
/// took 0.05 ms dropped, 1.5 ms kept, on lavapipe).
pub fn time<B: Backend, T>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> T,
) -> f64 {
    for _ in 0..warmup {
        let out = f();
        B::sync(device).expect("device sync");
        drop(out);
    }
    let runs = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            let out = f();
            B::sync(device).expect("device sync");
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            drop(out);
            ms
        })
        .collect();
    median(runs)
}
