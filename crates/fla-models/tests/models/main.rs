//! Layer, model and parity tests, one test binary (each test binary links and monomorphises
//! Burn's backends again; one is built where five were). Select a file's tests by its module:
//! `cargo test -p fla-models --test models parity::`.

mod gated_deltanet;
mod layers;
mod model;
mod parity;
mod transformer;
