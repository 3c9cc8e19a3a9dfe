//! The supervisor's policy: every knob of `baton run` that decides how
//! generations are started, checked, drained and replaced.
//!
//! [`Policy`] is the one definition of those knobs: the command line fills
//! it ([`crate::cli::RunArgs::policy`]), the supervisor reads it, and
//! `baton upgrade` carries it to the next image as it is (serde, inside
//! [`crate::upgrade::SupervisorState`]), and `baton status --json` reports
//! it (`policy`). A new knob is a field here and an
//! option in the CLI; nothing else has to mirror it. Give it
//! `#[serde(default)]` (with the default that matches what Batons without
//! it did): states written by the previous release lack it, and a state
//! written for one (format 1, see [`crate::upgrade::format_v1`]) drops it.

use std::time::Duration;

use rustix::process::Signal;
use serde::{Deserialize, Serialize};

use crate::output::OutputMode;

/// Who may send notifications (`NotifyAccess=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
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

impl<'de> Deserialize<'de> for NotifyAccess {
    /// `main`, `exec` or `all`; anything else is refused by name (the
    /// handover's words since format 1).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "main" => Ok(NotifyAccess::Main),
            "exec" => Ok(NotifyAccess::Exec),
            "all" => Ok(NotifyAccess::All),
            other => Err(serde::de::Error::custom(format!("unknown notify access {other:?}"))),
        }
    }
}

/// Crash-restart policy for generations that die on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// How the supervisor treats its generations (`baton run`'s options).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// How long a new generation may take to send READY=1 (`--ready-timeout`).
    pub ready_timeout: Duration,
    /// Signal that asks a generation to drain and exit (`--stop-signal`),
    /// carried as its number.
    #[serde(with = "signal_number")]
    pub stop_signal: Signal,
    /// Drain deadline after the stop signal; then SIGKILL (`--stop-timeout`).
    pub stop_timeout: Duration,
    /// Who may notify (`--notify-access`).
    pub notify_access: NotifyAccess,
    /// `WATCHDOG_USEC` for generations, enforced (`--watchdog`).
    pub watchdog: Option<Duration>,
    /// Fd-store capacity, 0 disables it (`--fdstore-max`).
    pub fdstore_max: usize,
    /// Shell command that must succeed after READY=1 before the cutover
    /// (`--health-cmd`).
    pub health_cmd: Option<String>,
    /// Draining generations allowed at once; the oldest is killed beyond
    /// (`--max-draining`, at least 1).
    pub max_draining: usize,
    /// Crash-restart policy (`--restart-burst`, `--restart-interval`).
    pub backoff: Backoff,
    /// Where generations' stdout and stderr go (`--output`, resolved).
    pub output: OutputMode,
    /// Give each generation a private loopback listener, `probe` in
    /// `LISTEN_FDNAMES`, its address in the health command's
    /// `$BATON_PROBE_ADDR` (`--probe`). Absent in states written before it
    /// existed: off, as those Batons had none.
    #[serde(default)]
    pub probe: bool,
}

impl Default for Policy {
    /// `baton run`'s defaults (with `--output pipe`).
    fn default() -> Self {
        Policy {
            ready_timeout: Duration::from_secs(90),
            stop_signal: Signal::TERM,
            stop_timeout: Duration::from_secs(30),
            notify_access: NotifyAccess::Main,
            watchdog: None,
            fdstore_max: 4096,
            health_cmd: None,
            max_draining: 4,
            backoff: Backoff::default(),
            output: OutputMode::Pipe,
            probe: false,
        }
    }
}

/// A signal as its number (what the handover format has always carried).
mod signal_number {
    use rustix::process::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(signal.as_raw())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let raw = i32::deserialize(d)?;
        Signal::from_named_raw(raw)
            .ok_or_else(|| serde::de::Error::custom(format!("stop signal {raw} is not a known signal")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_round_trips_through_json() {
        let policy = Policy {
            ready_timeout: Duration::from_millis(1500),
            stop_signal: Signal::INT,
            notify_access: NotifyAccess::All,
            watchdog: Some(Duration::from_secs(3)),
            health_cmd: Some("true".into()),
            backoff: Backoff { burst: 3, ..Backoff::default() },
            output: OutputMode::Inherit,
            probe: true,
            ..Policy::default()
        };
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["probe"], true);
        assert_eq!(json["stop_signal"], 2);
        assert_eq!(json["notify_access"], "all");
        assert_eq!(json["output"], "inherit");
        assert_eq!(serde_json::from_value::<Policy>(json).unwrap(), policy);
    }

    #[test]
    fn a_policy_written_without_probe_reads_as_no_probe() {
        let mut json = serde_json::to_value(Policy { probe: true, ..Policy::default() }).unwrap();
        json.as_object_mut().unwrap().remove("probe");
        assert!(!serde_json::from_value::<Policy>(json).unwrap().probe);
    }

    #[test]
    fn unknown_notify_access_is_refused_by_name() {
        let mut json = serde_json::to_value(Policy::default()).unwrap();
        json["notify_access"] = "bogus".into();
        let e = serde_json::from_value::<Policy>(json).unwrap_err().to_string();
        assert!(e.contains("unknown notify access \"bogus\""), "{e}");
    }

    #[test]
    fn unknown_signal_numbers_are_refused_by_name() {
        let mut json = serde_json::to_value(Policy::default()).unwrap();
        json["stop_signal"] = 999.into();
        let e = serde_json::from_value::<Policy>(json).unwrap_err().to_string();
        assert!(e.contains("stop signal 999 is not a known signal"), "{e}");
    }
}
