use std::time::Duration;

/// Who may send notifications (`NotifyAccess=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotifyAccess {
    /// Only a generation's main process.
    #[default]
    Main,
    /// The main process and Baton's control processes (the health check).
    Exec,
    /// The main process, the health check, and any process of the
    /// generation's process group that also descends from its leader (its
    /// parent chain, checked twice: see [`crate::lineage`]). Group
    /// membership alone is not enough: anyone in Baton's session can
    /// `setpgid()` into that group.
    All,
}

/// Crash-restart policy for generations that die on their own.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Upper bound of the doubling delay.
    pub max: Duration,
    /// Crashes allowed within `interval` before Baton gives up.
    pub burst: u32,
    /// The window for `burst`.
    pub interval: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            burst: 10,
            interval: Duration::from_secs(60),
        }
    }
}
