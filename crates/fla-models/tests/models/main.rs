//! Layer, model and parity tests, one test binary (each test binary links and monomorphises
//! Burn's backends again; one builds much faster than five). Select a file's tests by its module:
//! `cargo test -p fla-models --test models parity::`.

mod gated_deltanet;
mod layers;
mod model;
mod parity;
mod transformer;
