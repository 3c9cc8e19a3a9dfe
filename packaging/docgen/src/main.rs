//! `baton-docgen OUTDIR`: writes Baton's man pages and shell completions
//! into OUTDIR/{man,completions} (see the library docs for the layout).
//! Exit codes: 0 written; 1 a file could not be written; 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: baton-docgen OUTDIR (writes OUTDIR/man and OUTDIR/completions)");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    if out.as_os_str().to_str().is_some_and(|s| s.starts_with('-')) {
        eprintln!("usage: baton-docgen OUTDIR (writes OUTDIR/man and OUTDIR/completions)");
        return ExitCode::from(2);
    }
    match baton_docgen::generate(&out) {
        Ok(generated) => {
            println!(
                "baton-docgen: wrote {} man pages and {} completion files under {}",
                generated.man_pages.len(),
                generated.completions.len(),
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton-docgen: {e}");
            ExitCode::FAILURE
        }
    }
}
