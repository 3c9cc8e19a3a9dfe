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
    /// How a new generation is proven before, and after, it takes real
    /// traffic (readiness, built-in probes, quiet period, steering,
    /// probation). Absent in states written before it existed: proven as
    /// those Batons did, by READY=1 (and `--health-cmd`) alone.
    #[serde(default = "Proving::by_ready_alone")]
    pub proving: Proving,
    /// Protocols of other supervisors Baton also speaks to its apps
    /// (`--compat`). Absent in older states: none.
    #[serde(default)]
    pub compat: Compat,
}

/// When a new generation counts as ready (`--ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// It sends `READY=1` (systemd's `Type=notify`).
    Notify,
    /// The first passing built-in probe (for apps without sd_notify).
    Probe,
    /// This long after it was spawned (einhorn's default, a timer).
    After(Duration),
}

/// A built-in probe Baton sends to a generation's private probe socket
/// (`--health-http`, `--health-tcp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// `GET path`: a 2xx answer passes.
    Http {
        /// The request target, starting with `/`.
        path: String,
    },
    /// A TCP connect that is accepted passes.
    Tcp,
}

/// Whether Baton steers new connections between generations
/// (`--steering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// Steer every listener that can be (TCP and UDP with a `SO_REUSEPORT`
    /// pair); the others are shared, as without steering.
    #[default]
    Auto,
    /// Every generation accepts from the same sockets.
    Off,
}

/// How a candidate generation is proven (see the lifecycle in README's
/// "No-impact deploys").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proving {
    /// When it counts as ready (`--ready`).
    pub ready: Readiness,
    /// The built-in probe, if any (`--health-http`, `--health-tcp`).
    pub probe: Option<HealthProbe>,
    /// Time between two probes of one generation (`--health-interval`).
    pub interval: Duration,
    /// How long one probe may take (`--health-timeout`).
    pub timeout: Duration,
    /// Consecutive passing probes needed before it takes traffic
    /// (`--health-passes`, at least 1).
    pub passes: u32,
    /// After readiness, how long it must stay alive and keep passing its
    /// probes, with no real traffic, before it takes any
    /// (`--quiet-period`).
    pub quiet_period: Duration,
    /// After it took the traffic, how long the old generation keeps
    /// running, unsignalled, to take it back should the new one fail
    /// (`--probation`).
    pub probation: Duration,
    /// Whether to steer (`--steering`).
    pub steering: SteeringMode,
    /// Share of new connections, in percent, the candidate gets during
    /// its quiet period (`--canary`, 0 to 99).
    pub canary: u8,
}

impl Proving {
    /// `baton run`'s defaults.
    pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(2);
    /// `baton run`'s default `--probation`.
    pub const DEFAULT_PROBATION: Duration = Duration::from_secs(2);

    /// Proven by READY=1 (and `--health-cmd`) alone, taking over at once:
    /// what Batons before `--quiet-period` did, and what their handed-over
    /// states mean.
    pub fn by_ready_alone() -> Proving {
        Proving {
            ready: Readiness::Notify,
            probe: None,
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
            passes: 1,
            quiet_period: Duration::ZERO,
            probation: Duration::ZERO,
            steering: SteeringMode::Off,
            canary: 0,
        }
    }

    /// `baton run`'s defaults: READY=1, a 2 s quiet period and a 2 s
    /// probation, steering where possible.
    pub fn defaults() -> Proving {
        Proving {
            passes: 3,
            quiet_period: Self::DEFAULT_QUIET_PERIOD,
            probation: Self::DEFAULT_PROBATION,
            steering: SteeringMode::Auto,
            ..Self::by_ready_alone()
        }
    }

    /// Whether Baton needs a private probe listener per generation for
    /// these probes.
    pub fn needs_probe_socket(&self) -> bool {
        self.probe.is_some() || self.ready == Readiness::Probe
    }
}

/// Protocols of other supervisors, spoken besides systemd's (`--compat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Compat {
    /// crank's: a datagram socket to Baton's notify socket as `NOTIFY_FD`
    /// (the fd after the listeners), and `CRANK_NAME`.
    pub crank: bool,
    /// einhorn's: `EINHORN_FDS`, `EINHORN_FD_COUNT`, `EINHORN_FD_<n>`.
    pub einhorn: bool,
}

impl Default for Policy {
    /// `baton run`'s defaults (with `--output pipe`), but proven by
    /// READY=1 alone ([`Proving::by_ready_alone`]): `baton run` itself
    /// proves with [`Proving::defaults`].
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
            proving: Proving::by_ready_alone(),
            compat: Compat::default(),
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
