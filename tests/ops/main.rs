//! The Burn ops end to end, one test binary for all three families: each test binary links and
//! monomorphises Burn's backends (wgpu, fusion, autodiff, NdArray) again, so one binary is built
//! once where three were.

#[macro_use]
mod common;

mod adamw;
mod attn;
mod bench_seed;
mod blas;
mod cross_entropy;
mod delta;
mod embedding;
mod gated;
mod linear;
mod norm;
mod swiglu;
