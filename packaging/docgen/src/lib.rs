//! # baton-docgen
//!
//! Renders the documentation that ships in Baton's packages from the same
//! clap definitions the binaries parse with, so the man pages and shell
//! completions can never disagree with `--help`:
//!
//! - man pages (clap_mangen): `baton.1`, one page per subcommand
//!   (`baton-run.1`, `baton-restart.1`, …) and `baton-httpd.1`;
//! - completions (clap_complete) for bash, zsh and fish, for both binaries,
//!   already under the file names each shell looks for.
//!
//! Layout under the output directory, mirroring where the packages install
//! the files (the man pages are gzipped by `packaging/build.sh`):
//!
//! ```text
//! man/baton.1  man/baton-run.1  …  man/baton-httpd.1
//! completions/bash/baton           -> /usr/share/bash-completion/completions/baton
//! completions/zsh/_baton           -> /usr/share/zsh/vendor-completions/_baton
//! completions/fish/baton.fish      -> /usr/share/fish/vendor_completions.d/baton.fish
//! ```
#![deny(missing_docs)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// The section every page goes to: both binaries are user commands.
const SECTION: &str = "1";

/// The `.TH` manual name (centre of the page header).
const MANUAL: &str = "Baton";

/// What could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocgenError {
    /// An output directory could not be created.
    #[error("cannot create directory {path}: {source} (check that the parent exists and is writable)")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A generated file could not be written.
    #[error("cannot write {path}: {source} (check free space and permissions of the output directory)")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// clap_mangen failed to render a page (only a writer error can make it
    /// fail, and the writer is a `Vec`, so this means a bug in the renderer).
    #[error("cannot render the man page {page}: {source}")]
    Render {
        /// The page's file name, e.g. `baton-run.1`.
        page: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The files [`generate`] wrote, as paths under its output directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generated {
    /// `man/*.1`, uncompressed roff.
    pub man_pages: Vec<PathBuf>,
    /// `completions/{bash,zsh,fish}/*`.
    pub completions: Vec<PathBuf>,
}

/// The binaries whose documentation ships, each as its clap command with the
/// name it is installed under.
pub fn commands() -> Vec<clap::Command> {
    vec![baton::cli::Cli::command(), baton_httpd::config::Config::command()]
}

/// The shells completions are generated for, with the directory (under
/// `completions/`) and the file name each one expects for `bin`.
fn completion_file(shell: Shell, bin: &str) -> (&'static str, String) {
    match shell {
        Shell::Bash => ("bash", bin.to_owned()),
        Shell::Zsh => ("zsh", format!("_{bin}")),
        Shell::Fish => ("fish", format!("{bin}.fish")),
        // Not generated (see SHELLS); named like clap_complete would.
        other => ("other", format!("{bin}.{other}")),
    }
}

/// Shells completions are generated for: those Debian and Fedora have
/// vendor completion directories for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes every man page and completion file under `out` (created if
/// missing; existing files are overwritten) and returns what it wrote.
pub fn generate(out: &Path) -> Result<Generated, DocgenError> {
    let mut generated = Generated::default();
    let man_dir = out.join("man");
    create_dir(&man_dir)?;
    for cmd in commands() {
        for (name, page) in man_pages(cmd)? {
            let path = man_dir.join(name);
            write(&path, &page)?;
            generated.man_pages.push(path);
        }
    }
    for mut cmd in commands() {
        let bin = cmd.get_name().to_owned();
        for shell in SHELLS {
            let (dir, file) = completion_file(shell, &bin);
            let dir = out.join("completions").join(dir);
            create_dir(&dir)?;
            let mut text = Vec::new();
            // Writing into a Vec cannot fail, so clap_complete's `generate`
            // (which panics on a write error) cannot panic here.
            clap_complete::generate(shell, &mut cmd, &bin, &mut text);
            let path = dir.join(file);
            write(&path, &text)?;
            generated.completions.push(path);
        }
    }
    Ok(generated)
}

/// Renders the page of `cmd` and of each of its visible subcommands
/// (recursively), as (file name, roff text). Subcommand pages are named
/// `parent-sub.1`, as `man baton-run` expects.
pub fn man_pages(cmd: clap::Command) -> Result<Vec<(String, Vec<u8>)>, DocgenError> {
    // As clap_mangen::generate_to: no page for the implicit `help`
    // subcommand, and `build` sets the `baton-run` display names.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every page's footer names the program and version it documents
    // (subcommands have no version of their own).
    let header = Header {
        source: format!("{} {}", cmd.get_name(), cmd.get_version().unwrap_or_default()),
        date: iso_date(page_time()),
    };
    let mut pages = Vec::new();
    collect(&cmd, &header, &mut pages)?;
    Ok(pages)
}

/// The `.TH` fields shared by a program's pages.
struct Header {
    source: String,
    date: String,
}

fn collect(cmd: &clap::Command, header: &Header, pages: &mut Vec<(String, Vec<u8>)>) -> Result<(), DocgenError> {
    // Always a date: with an empty one, clap_mangen writes `.TH name 1  "source"`
    // and roff, which drops empty arguments, shifts the source into the date.
    let man = clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .manual(MANUAL)
        .source(header.source.clone())
        .date(header.date.clone());
    let name = man.get_filename();
    let mut text = Vec::new();
    man.render(&mut text).map_err(|source| DocgenError::Render { page: name.clone(), source })?;
    pages.push((name, text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, header, pages)?;
    }
    Ok(())
}

/// The pages' date: `SOURCE_DATE_EPOCH` when set (as `packaging/build.sh`
/// does, from the last commit) so that rebuilding the same commit gives the
/// same pages, else now.
fn page_time() -> i64 {
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    })
}

/// `YYYY-MM-DD` (UTC) of a Unix time, by Howard Hinnant's
/// `civil_from_days`.
fn iso_date(epoch: i64) -> String {
    let z = epoch.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn create_dir(path: &Path) -> Result<(), DocgenError> {
    fs::create_dir_all(path).map_err(|source| DocgenError::CreateDir { path: path.to_owned(), source })
}

fn write(path: &Path, contents: &[u8]) -> Result<(), DocgenError> {
    fs::write(path, contents).map_err(|source| DocgenError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::iso_date;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(951_782_400), "2000-02-29");
        assert_eq!(iso_date(1_795_607_476), "2026-11-25");
        assert_eq!(iso_date(-86_400), "1969-12-31");
    }
}
