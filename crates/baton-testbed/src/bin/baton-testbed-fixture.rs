//! A trivial program for baton-testbed's own tests: built through
//! `cargo_bin` (proving nested cargo works inside `cargo test`) and run inside
//! testbeds (proving the shared target directory and that host-built binaries
//! run on the trixie root).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("baton-testbed-fixture: {}", args.join(" "));
}
