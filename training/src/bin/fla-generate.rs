//! `fla-generate`: see [`training::generate`] for what it does and its options.

fn main() -> std::process::ExitCode {
    training::generate::main()
}
