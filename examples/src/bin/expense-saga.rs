//! `expense-saga`: the expense approval example as a command-line program.

fn main() -> std::process::ExitCode {
    saga_examples::cli::main::<saga_examples::expense::ExpenseSaga>()
}
