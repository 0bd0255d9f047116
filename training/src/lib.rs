//! Training, generation and evaluation of fla-models' language models: the library behind the
//! `fla-train`, `fla-generate` and `fla-eval` binaries, each of which is one call into it
//! ([`train::main`], [`generate::main`], [`eval::main`]).
//!
//! The code lives here rather than in the binaries because every family × backend × precision
//! the binaries dispatch over is monomorphised where the concrete types are named: in the
//! library, once, instead of once per binary and again per binary's test harness (in CI's build
//! profile on 2 cores this library alone takes about 16 minutes of one core).

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod generate;
pub mod learner;
pub mod plot;
pub mod precision;
pub mod saved;
pub mod strategy;
pub mod tokenizer;
pub mod train;
