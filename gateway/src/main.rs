//! The `shuyuan` command: parses the CLI, starts logging, and hands over to the library.
//! Exit codes: 0 success, 1 failure, 2 usage error, 64 invalid configuration (EX_USAGE).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
