//! What the `fla-train`, `fla-generate` and `fla-eval` binaries share: the training text and
//! its tokenisers.

pub mod data;
pub mod tokenizer;
