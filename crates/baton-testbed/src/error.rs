//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::cmd::CmdOutput;

/// Everything that can go wrong while booting, driving or tearing down a
/// [`Testbed`](crate::Testbed).
///
/// The `Display` text is meant to be read by a person looking at a failed
/// test: it carries the command, its output and an excerpt of the journal
/// wherever that helps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A prerequisite (root, a tool, a kernel feature) is missing.
    #[error("{what} is missing: {hint}")]
    Missing {
        /// The missing thing.
        what: String,
        /// How to get it.
        hint: String,
    },

    /// `debootstrap` failed while building the cached trixie root.
    #[error("debootstrap failed ({status}); full log in {}; last lines:\n{tail}", log.display())]
    Debootstrap {
        /// Exit status as text.
        status: String,
        /// The log file, kept for inspection.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },

    /// The cached root file system exists but cannot be used.
    #[error("root file system cache {} is unusable: {reason}", path.display())]
    BadCache {
        /// The cache directory.
        path: PathBuf,
        /// Why it cannot be used and what to do.
        reason: String,
    },

    /// systemd did not come up.
    #[error("testbed did not boot: {reason}\n{diagnostics}")]
    Boot {
        /// What went wrong.
        reason: String,
        /// Logs of the supervisor, of PID 1 and (if it got that far) the journal.
        diagnostics: String,
    },

    /// A command did not finish in time (it was killed).
    #[error("`{argv}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    CommandTimeout {
        /// The command line.
        argv: String,
        /// The limit that was hit.
        timeout: Duration,
        /// What it printed to stdout until then.
        stdout: String,
        /// What it printed to stderr until then.
        stderr: String,
    },

    /// A command run by a `*_checked` method exited unsuccessfully.
    #[error("{output}\n--- journal (last lines) ---\n{journal}")]
    CommandFailed {
        /// The command and everything it printed.
        output: Box<CmdOutput>,
        /// The tail of the testbed's journal at the time of the failure.
        journal: String,
    },

    /// A condition polled by [`Testbed::wait_for`](crate::Testbed::wait_for)
    /// or [`poll_until`](crate::poll_until) did not become true in time.
    #[error("timed out after {timeout:?} waiting for {what}{detail}")]
    Timeout {
        /// The awaited condition, as described by the caller.
        what: String,
        /// The limit that was hit.
        timeout: Duration,
        /// Extra context (e.g. a journal excerpt), empty or starting with a newline.
        detail: String,
    },

    /// An argument was rejected before anything was done.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// `cargo build` of a helper binary failed.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    CargoBuild {
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// What cargo printed.
        stderr: String,
    },

    /// Tearing down left something behind.
    #[error("teardown incomplete: {0}")]
    Teardown(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a human-readable context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::Io { context: context(), source: errno.into() })
    }
}
