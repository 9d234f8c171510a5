fn main() -> std::process::ExitCode {
    cuboids::cli::main()
}
