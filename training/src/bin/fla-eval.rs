//! `fla-eval`: see [`training::eval`] for what it does and its options.

fn main() -> std::process::ExitCode {
    training::eval::main()
}
