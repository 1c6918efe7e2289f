fn main() -> std::process::ExitCode {
    hyperty_host::cli::main_with_args(std::env::args_os())
}
