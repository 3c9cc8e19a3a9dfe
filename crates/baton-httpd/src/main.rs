//! `baton-httpd`: see the library documentation and `--help`.

fn main() -> std::process::ExitCode {
    baton_httpd::app::main()
}
