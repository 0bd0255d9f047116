//! The Burn ops end to end, one test binary for all three families: each test binary links and
//! monomorphises Burn's backends (wgpu, fusion, autodiff, NdArray) again, so one binary builds in
//! about a third of the time three did.

#[macro_use]
mod common;

mod attn;
mod delta;
mod gated;
