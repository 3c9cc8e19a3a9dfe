//! Typed outcomes: how a process ended, why a generation never took over,
//! and what `baton status` shows as the last failure.
//!
//! The supervisor decides on the variants; text is rendered only at the edge
//! (`Display`: control answers, `status`, logs, the exit message). Scripts
//! parse those texts, so each rendering is pinned by a unit test below to
//! the exact words Baton has always used.

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

/// How a process ended, as the reaper saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// Killed by a signal, or another wait status: the reaper's words for
    /// it ([`crate::reaper::describe`], e.g. `killed by SIGKILL (core
    /// dumped)`).
    Other(String),
    /// It ended while Baton re-executed itself: the previous image reaped
    /// it, so its status is lost.
    LostDuringUpgrade,
}

impl Exit {
    /// From a wait status.
    pub fn from_status(status: &ExitStatus) -> Exit {
        match status.code() {
            Some(code) => Exit::Code(code),
            None => Exit::Other(crate::reaper::describe(status)),
        }
    }

    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Other(text) => f.write_str(text),
            Exit::LostDuringUpgrade => f.write_str("ended during baton's upgrade (exit status unknown)"),
        }
    }
}

/// Why a new generation did not take over (the `reason` of a failed
/// restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// It could not be started at all.
    SpawnFailed(String),
    /// No READY=1 within the ready timeout.
    NoReady {
        /// `--ready-timeout`.
        timeout: Duration,
    },
    /// It ended before READY=1.
    ExitedBeforeReady {
        /// How.
        exit: Exit,
        /// Its last `STATUS=`.
        last_status: Option<String>,
    },
    /// It ended after READY=1, while its health check ran.
    ExitedDuringHealthCheck {
        /// How.
        exit: Exit,
        /// Its last `STATUS=`.
        last_status: Option<String>,
    },
    /// The health check did not succeed.
    HealthCheckFailed {
        /// How the check ended.
        exit: Exit,
    },
    /// The health check was still running at the ready timeout.
    HealthCheckTimedOut {
        /// `--ready-timeout`.
        timeout: Duration,
    },
    /// The health check could not be started.
    HealthCheckNotRun(String),
    /// It sent `WATCHDOG=trigger` before it took over (it is sent SIGABRT,
    /// as systemd does).
    WatchdogTriggered,
    /// `--ready probe`: no built-in probe passed within the ready timeout.
    NoPassingProbe {
        /// `--ready-timeout`.
        timeout: Duration,
        /// The last probe's failure, if one was answered.
        last: Option<String>,
    },
    /// It was ready but not proven (too few probes passed in a row) within
    /// the ready timeout.
    NotProven {
        /// `--ready-timeout`.
        timeout: Duration,
        /// Probes passed in a row.
        passes: u32,
        /// `--health-passes`.
        needed: u32,
    },
    /// It ended before it was ready (`--ready probe` or `after:`).
    ExitedUnready {
        /// How.
        exit: Exit,
        /// Its last `STATUS=`.
        last_status: Option<String>,
    },
    /// It ended after it was ready, before it got any real traffic.
    ExitedWhileProving {
        /// How.
        exit: Exit,
        /// Its last `STATUS=`.
        last_status: Option<String>,
    },
    /// A built-in probe failed after it was ready, before it got any real
    /// traffic.
    ProbeFailed {
        /// The probe's failure.
        detail: String,
    },
    /// It failed on probation, after it took the traffic: the traffic went
    /// back to the generation it was to replace.
    OnProbation(ProbationFailure),
}

/// How a generation failed on probation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbationFailure {
    /// It ended.
    Exited {
        /// How.
        exit: Exit,
        /// Its last `STATUS=`.
        last_status: Option<String>,
    },
    /// A built-in probe failed.
    ProbeFailed {
        /// The probe's failure.
        detail: String,
    },
    /// It missed its watchdog, or sent `WATCHDOG=trigger`.
    Watchdog,
    /// It sent `STOPPING=1`.
    Stopping,
}

impl fmt::Display for ProbationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbationFailure::Exited { exit, last_status: Some(s) } => write!(f, "{exit} (last status: {s})"),
            ProbationFailure::Exited { exit, last_status: None } => write!(f, "{exit}"),
            ProbationFailure::ProbeFailed { detail } => write!(f, "probe failed: {detail}"),
            ProbationFailure::Watchdog => f.write_str("missed its watchdog"),
            ProbationFailure::Stopping => f.write_str("sent STOPPING=1"),
        }
    }
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = |f: &mut fmt::Formatter<'_>, status: &Option<String>| match status {
            Some(s) => write!(f, " (last status: {s})"),
            None => Ok(()),
        };
        match self {
            StartFailure::SpawnFailed(why) => f.write_str(why),
            StartFailure::NoReady { timeout } => write!(f, "no READY=1 within {timeout:?}"),
            StartFailure::ExitedBeforeReady { exit, last_status } => {
                write!(f, "{exit} before READY=1")?;
                last(f, last_status)
            }
            StartFailure::ExitedDuringHealthCheck { exit, last_status } => {
                write!(f, "{exit} after READY=1, during its health check")?;
                last(f, last_status)
            }
            StartFailure::HealthCheckFailed { exit } => write!(f, "health check {exit}"),
            StartFailure::HealthCheckTimedOut { timeout } => {
                write!(f, "health check did not finish within the ready timeout of {timeout:?}")
            }
            StartFailure::HealthCheckNotRun(why) => write!(f, "cannot run the health check: {why}"),
            StartFailure::WatchdogTriggered => f.write_str("sent WATCHDOG=trigger before it took over"),
            StartFailure::NoPassingProbe { timeout, last } => {
                write!(f, "no passing probe within {timeout:?}")?;
                match last {
                    Some(l) => write!(f, " (last: {l})"),
                    None => Ok(()),
                }
            }
            StartFailure::NotProven { timeout, passes, needed } => write!(
                f,
                "ready, but {passes} of {needed} probes in a row passed within the ready timeout of {timeout:?}"
            ),
            StartFailure::ExitedUnready { exit, last_status } => {
                write!(f, "{exit} before it was ready")?;
                last(f, last_status)
            }
            StartFailure::ExitedWhileProving { exit, last_status } => {
                write!(f, "{exit} during its quiet period, before it took over")?;
                last(f, last_status)
            }
            StartFailure::ProbeFailed { detail } => {
                write!(f, "probe failed during its quiet period, before it took over: {detail}")
            }
            StartFailure::OnProbation(why) => {
                write!(f, "{why} on probation, after it took the traffic (handed back to the old generation)")
            }
        }
    }
}

/// What triggered the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogCause {
    /// No `WATCHDOG=1` within the interval.
    Timeout,
    /// The app sent `WATCHDOG=trigger`.
    Triggered,
}

impl fmt::Display for WatchdogCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchdogCause::Timeout => "watchdog timeout: no WATCHDOG=1 in time",
            WatchdogCause::Triggered => "WATCHDOG=trigger",
        })
    }
}

/// The last failure, as `baton status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A generation did not take over.
    Start {
        /// Which.
        generation: u64,
        /// Why.
        why: StartFailure,
        /// Where its output is, when Baton did not capture it.
        hint: Option<String>,
    },
    /// The serving generation ended on its own.
    CrashedWhileServing {
        /// Which.
        generation: u64,
        /// How.
        exit: Exit,
        /// Where its output is, when Baton did not capture it.
        hint: Option<String>,
    },
    /// The watchdog fired for the serving generation.
    Watchdog {
        /// Which.
        generation: u64,
        /// Why.
        cause: WatchdogCause,
    },
    /// Too many failures in the restart interval: Baton gave up.
    CrashLoop {
        /// Failures within the window.
        failures: usize,
        /// `--restart-interval`.
        interval: Duration,
    },
    /// Reported by the image before `baton upgrade`, as it rendered it.
    Inherited(String),
}

/// `reason` of a failed start with where its output is: the `reason` of
/// the control answer, and the part after `failed: ` in `status`.
pub fn with_hint(why: &StartFailure, hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!("{why}; {h}"),
        None => why.to_string(),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Start { generation, why, hint } => {
                write!(f, "generation {generation} failed: {}", with_hint(why, hint))
            }
            Failure::CrashedWhileServing { generation, exit, hint } => {
                write!(f, "generation {generation} {exit} while serving")?;
                match hint {
                    Some(h) => write!(f, "; {h}"),
                    None => Ok(()),
                }
            }
            Failure::Watchdog { generation, cause } => write!(f, "generation {generation}: {cause}"),
            Failure::CrashLoop { failures, interval } => {
                write!(f, "{failures} failures within {interval:?}; giving up (see the log for each)")
            }
            Failure::Inherited(text) => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// The texts scripts and tests/cli_messages.rs rely on, word for word.
    #[test]
    fn failures_render_exactly_as_before() {
        let killed = Exit::from_status(&ExitStatus::from_raw(9));
        assert_eq!(killed, Exit::Other("killed by SIGKILL".into()));
        let cases: Vec<(String, &str)> = vec![
            (Exit::from_status(&ExitStatus::from_raw(3 << 8)).to_string(), "exited with status 3"),
            (killed.to_string(), "killed by SIGKILL"),
            (Exit::LostDuringUpgrade.to_string(), "ended during baton's upgrade (exit status unknown)"),
            (StartFailure::NoReady { timeout: Duration::from_millis(1500) }.to_string(), "no READY=1 within 1.5s"),
            (
                StartFailure::ExitedBeforeReady { exit: Exit::Code(2), last_status: Some("loading".into()) }
                    .to_string(),
                "exited with status 2 before READY=1 (last status: loading)",
            ),
            (
                StartFailure::ExitedDuringHealthCheck { exit: killed.clone(), last_status: None }.to_string(),
                "killed by SIGKILL after READY=1, during its health check",
            ),
            (StartFailure::HealthCheckFailed { exit: Exit::Code(1) }.to_string(), "health check exited with status 1"),
            (
                StartFailure::HealthCheckTimedOut { timeout: Duration::from_secs(2) }.to_string(),
                "health check did not finish within the ready timeout of 2s",
            ),
            (StartFailure::HealthCheckNotRun("no sh".into()).to_string(), "cannot run the health check: no sh"),
            (StartFailure::SpawnFailed("cannot fork".into()).to_string(), "cannot fork"),
            (StartFailure::WatchdogTriggered.to_string(), "sent WATCHDOG=trigger before it took over"),
            (
                Failure::Start {
                    generation: 4,
                    why: StartFailure::NoReady { timeout: Duration::from_secs(1) },
                    hint: Some("see journalctl".into()),
                }
                .to_string(),
                "generation 4 failed: no READY=1 within 1s; see journalctl",
            ),
            (
                Failure::CrashedWhileServing { generation: 2, exit: Exit::Code(1), hint: None }.to_string(),
                "generation 2 exited with status 1 while serving",
            ),
            (
                Failure::Watchdog { generation: 3, cause: WatchdogCause::Timeout }.to_string(),
                "generation 3: watchdog timeout: no WATCHDOG=1 in time",
            ),
            (
                Failure::Watchdog { generation: 3, cause: WatchdogCause::Triggered }.to_string(),
                "generation 3: WATCHDOG=trigger",
            ),
            (
                Failure::CrashLoop { failures: 11, interval: Duration::from_secs(60) }.to_string(),
                "11 failures within 60s; giving up (see the log for each)",
            ),
        ];
        for (rendered, expected) in cases {
            assert_eq!(rendered, expected);
        }
    }

    #[test]
    fn only_status_0_is_success() {
        assert!(Exit::from_status(&ExitStatus::from_raw(0)).success());
        assert!(!Exit::from_status(&ExitStatus::from_raw(1 << 8)).success());
        assert!(!Exit::from_status(&ExitStatus::from_raw(15)).success());
        assert!(!Exit::LostDuringUpgrade.success());
    }
}
