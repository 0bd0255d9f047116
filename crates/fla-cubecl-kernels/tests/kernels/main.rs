//! Kernel-level tests against the naive f64 references, one test binary for every kernel family
//! (each test binary links and monomorphises CubeCL's runtimes again; one is built where four
//! were).
//!
//! Runtime: wgpu by default (lavapipe in CI); CUDA when built with `--features cuda` and
//! `FLA_TEST_RUNTIME=cuda`. Select a family by its module: `cargo test -p fla-cubecl-kernels --test kernels delta::`.

#[macro_use]
mod common;

mod adamw;
mod attn;
mod buffers;
mod cross_entropy;
mod delta;
mod embedding;
mod gated;
mod norm;
mod swiglu;
mod tile;
