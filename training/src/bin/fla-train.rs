//! `fla-train`: see [`training::train`] for what it does and its options.

fn main() -> std::process::ExitCode {
    training::train::main()
}
