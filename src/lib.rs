//! flash-linear-attention for Burn.
//!
//! This crate re-exports the workspace's public API:
//! - [`ops`] (crate `fla-burn`): the Burn ops, e.g. [`ops::fused_recurrent_gla`];
//! - [`kernels`] (crate `fla-cubecl-kernels`): the CubeCL kernels and their f64 references.
//!
//! ```no_run
//! use burn::backend::{Autodiff, Wgpu};
//! use burn::tensor::{Distribution, Tensor};
//! use fla::ops::{fused_recurrent_gla, RecurrentOptions};
//!
//! type B = Autodiff<Wgpu>;
//! let device = Default::default();
//! let [b, t, h, k, v] = [2, 64, 4, 32, 32];
//! let q = Tensor::<B, 4>::random([b, t, h, k], Distribution::Normal(0.0, 1.0), &device);
//! let kk = Tensor::<B, 4>::random([b, t, h, k], Distribution::Normal(0.0, 1.0), &device);
//! let vv = Tensor::<B, 4>::random([b, t, h, v], Distribution::Normal(0.0, 1.0), &device);
//! // Log gates in (-inf, 0): logsigmoid of anything.
//! let gk = burn::tensor::activation::log_sigmoid(
//!     Tensor::<B, 4>::random([b, t, h, k], Distribution::Normal(0.0, 1.0), &device),
//! );
//! let out = fused_recurrent_gla(q, kk, vv, gk, None, RecurrentOptions::default().with_final_state())
//!     .expect("valid inputs");
//! let grads = out.o.sum().backward();
//! ```

pub use fla_burn as ops;
pub use fla_burn::FlaError;
pub use fla_cubecl_kernels as kernels;
