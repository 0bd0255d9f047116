//! What the `Autodiff` and `Fusion` wrappers of every op family share.
//!
//! Each family's ops take up to six float tensors (absent optional ones are `None`) and return an
//! output `o` and, when asked, a final state `hT` in `f32`; the backward returns one gradient per
//! present input. A family describes its forward and backward on a backend through [`StateOp`],
//! implemented on its options type, and these modules record it in Burn's autodiff graph
//! ([`autodiff`]) or in a fusion stream ([`fusion`]).

pub(crate) mod autodiff;
pub(crate) mod fusion;

use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use crate::FlaError;

/// Inputs in a family's fixed order; `None` where an optional input is absent.
pub(crate) type Inputs<B> = [Option<FloatTensor<B>>; 6];

/// Forward results: `o` in the inputs' dtype, `hT` in `f32` when requested, and an intermediate
/// the backward reads where the forward kept one (`aux`: GLA's in-chunk scores), never a result
/// of the op: recorded, it is saved for the backward and not returned.
#[derive(Debug)]
pub(crate) struct Outputs<B: Backend> {
    pub o: FloatTensor<B>,
    pub ht: Option<FloatTensor<B>>,
    pub aux: Option<FloatTensor<B>>,
}

/// One family's op on backend `B`, as the wrappers call it. Inputs reaching these methods have
/// been validated by the family (the wrappers validate before recording).
pub(crate) trait StateOp<B: Backend>: Clone + Debug + Send + Sync + 'static {
    /// Names of the forward and backward ops in Burn's fusion IR.
    const FORWARD: &'static str;
    const BACKWARD: &'static str;
    /// Whether the backward reads the forward's outputs.
    const READS_OUTPUTS: bool;
    /// Whether `hT` is an intermediate the backward keeps rather than an output (attention's
    /// log-sum-exp): recorded, `o` alone is the node's output and `hT` is saved, not returned.
    const SAVED_HT: bool = false;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError>;

    /// Gradients for `d_o` and `d_ht` (absent: zero), one per present input, in input order.
    /// `out` is the forward's outputs, for families whose backward reads them (the wrappers
    /// pass them, `aux` included, when [`StateOp::READS_OUTPUTS`] says so).
    fn backward(
        &self,
        x: Inputs<B>,
        out: Option<Outputs<B>>,
        d_o: FloatTensor<B>,
        d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError>;
}
