//! Logging: native journald records when stderr is the journal, readable
//! text otherwise.
//!
//! systemd.exec(5): a service whose stderr is connected to the journal gets
//! `JOURNAL_STREAM=<dev>:<inode>` naming that stream; a program should use
//! the native protocol only if stderr's device and inode still match
//! (stderr may have been redirected since, e.g. by a wrapper). Native
//! records keep the level as `PRIORITY=` and the fields as journal fields.
//!
//! The filter comes from `RUST_LOG` (default `info`).

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Native journald protocol (`/run/systemd/journal/socket`).
    Journal,
    /// Plain text on stderr.
    Stderr,
}

/// Installs the global subscriber and returns where records go. Call once,
/// first thing in `main`.
pub fn init() -> LogTarget {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        tracing_subscriber::registry().with(filter).with(layer).init();
        return LogTarget::Journal;
    }
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        // A write error on stderr must never take the server down: under
        // `baton run` stderr is a pipe to Baton, and if Baton is killed the
        // pipe breaks while this generation still drains its requests. By
        // default the subscriber reports its own write errors with
        // `eprintln!`, which panics on that same broken stderr.
        .log_internal_errors(false)
        .init();
    LogTarget::Stderr
}

/// Whether `JOURNAL_STREAM` names the file stderr is connected to.
pub fn stderr_is_journal() -> bool {
    journal_stream_matches(std::env::var_os("JOURNAL_STREAM").as_deref(), std::io::stderr().as_fd())
}

/// Whether a `JOURNAL_STREAM` value (`<dev>:<inode>`) names the file `fd`
/// refers to.
fn journal_stream_matches(value: Option<&std::ffi::OsStr>, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = value.and_then(|v| v.to_str()).and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match rustix::fs::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn journal_stream_must_name_the_same_file() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let st = rustix::fs::fstat(&file).unwrap();
        let matching = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(journal_stream_matches(Some(OsStr::new(&matching)), file.as_fd()));
        let other = format!("{}:{}", st.st_dev, st.st_ino + 1);
        for value in [Some(other.as_str()), Some("garbage"), Some("1:"), Some(""), None] {
            assert!(!journal_stream_matches(value.map(OsStr::new), file.as_fd()), "{value:?}");
        }
    }
}
