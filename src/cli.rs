//! The command line of `baton`, as a library item so packaging can render
//! man pages and shell completions from the same definition.
//!
//! Exit codes: 0 success; 1 the operation failed (a restart that did not
//! take, a crash loop); 2 bad usage; 3 no baton is running at the control
//! socket; 4 the control conversation failed (also: a control socket this
//! user may not use, which says nothing about whether a baton runs there).
// Field docs double as clap's --help text, where brackets such as
// `[::]:443` and `[NAME=]ADDR` are literal, not intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::control;
use crate::listen::ListenSpec;

/// Restart Linux services without dropping a connection.
///
/// Baton holds your service's listening sockets, starts the new generation,
/// waits for its READY=1, and only then retires the old one.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about,
    long_about,
    after_long_help = "Exit codes: 0 success; 1 the operation failed (a restart that did not take, a crash loop); \
                       2 bad usage; 3 no baton is running at the control socket; 4 the control conversation failed \
                       (also: permission denied on the control socket)."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `baton`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run COMMAND under supervision, holding its sockets.
    Run(RunArgs),
    /// Start a new generation and retire the current one once it is ready.
    Restart(RestartArgs),
    /// Show generations, sockets and the last failure.
    Status(StatusArgs),
    /// Stop all generations and the supervisor.
    Stop(Target),
    /// Write systemd .socket and .service units for an app.
    Units(crate::units::UnitsArgs),
    /// Send a notification to $NOTIFY_SOCKET (like systemd-notify).
    ///
    /// Waits until the manager has processed it (BARRIER=1). Exits 1 if
    /// baton refused it: the sender is not a process --notify-access admits
    /// (with `main`, a script's `baton notify` is its child, not the main
    /// process; `exec baton notify` or --notify-access all fixes that).
    /// systemd never tells a sender it was refused, so under systemd a
    /// refused notification still exits 0.
    Notify(NotifyArgs),
    /// Replace the running baton's own binary in place (same pid), keeping its sockets and generations.
    ///
    /// The new binary is checked first (it must be a baton that can take over
    /// the running one's state); if it is not, nothing changes. Then baton
    /// re-executes itself: the app keeps serving, its generations and
    /// connections are untouched, and under systemd the main pid stays.
    Upgrade(UpgradeArgs),
    /// Print the state format this binary can take over (used by `baton upgrade`).
    #[command(name = "upgrade-probe", hide = true)]
    UpgradeProbe,
}

/// Which running baton to talk to.
#[derive(Debug, Args)]
pub struct Target {
    /// Instance name of the baton to talk to; unlike `baton run`'s, never taken from the app.
    ///
    /// `baton run` takes its instance name from its own --name, else from its
    /// app's program name (`baton run -- baton-httpd` is instance
    /// baton-httpd): pass that name here, or its --control path.
    #[arg(long, short = 'n', default_value = "baton")]
    pub name: String,
    /// Control socket path (default: derived from --name).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

impl Target {
    /// The control socket path.
    pub fn path(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(|| control::default_path(&self.name))
    }
}

/// Options of `baton restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Which baton.
    #[command(flatten)]
    pub target: Target,
    /// Return once the request is accepted instead of waiting for the outcome.
    #[arg(long, conflicts_with = "wait")]
    pub no_block: bool,
    /// Wait for the outcome (the default).
    #[arg(long)]
    pub wait: bool,
}

/// Options of `baton upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Which baton.
    #[command(flatten)]
    pub target: Target,
    /// The new binary (default: the path the running baton was started from,
    /// e.g. /usr/bin/baton after a package upgrade replaced it).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// Options of `baton status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Which baton.
    #[command(flatten)]
    pub target: Target,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `baton run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Socket to hold and pass on, as [NAME=]ADDR: 127.0.0.1:8080, [::]:443, 8080,
    /// udp:ADDR, unix:/path, unix:@abstract, seqpacket:/path. Repeatable.
    #[arg(long = "listen", short = 'l', value_name = "[NAME=]ADDR")]
    pub listen: Vec<ListenSpec>,
    /// Instance name, for the control socket and logs (default: the program's name).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// Control socket path; its directory must be owned by you or root and not writable by others
    /// (sticky /tmp is fine); the notify and handoff sockets go beside it as .notify and .handoff.
    ///
    /// Default: $RUNTIME_DIRECTORY/NAME.sock under systemd, /run/baton/NAME.sock as root, else
    /// $XDG_RUNTIME_DIR/baton/NAME.sock or /tmp/baton-UID/NAME.sock. Baton creates its own
    /// directory 0700 and refuses one that is a symlink, another user's, or writable by others.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// listen() backlog.
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Set SO_REUSEPORT.
    #[arg(long)]
    pub reuse_port: bool,
    /// IPV6_V6ONLY for IPv6 sockets.
    #[arg(long)]
    pub v6_only: Option<bool>,
    /// Allow binding addresses not (yet) configured (IP_FREEBIND).
    #[arg(long)]
    pub freebind: bool,
    /// Mode of unix socket files, octal.
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
    /// Owner uid of unix socket files.
    #[arg(long)]
    pub socket_uid: Option<u32>,
    /// Owner gid of unix socket files.
    #[arg(long)]
    pub socket_gid: Option<u32>,
    /// How long a new generation may take to send READY=1.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Signal asking a generation to drain and exit.
    #[arg(long, default_value = "SIGTERM", value_parser = parse_signal)]
    pub stop_signal: rustix::process::Signal,
    /// Drain deadline after the stop signal, then SIGKILL.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// Who may send notifications.
    #[arg(long, value_enum, default_value = "main")]
    pub notify_access: Access,
    /// Watchdog interval for generations (WATCHDOG_USEC), enforced.
    #[arg(long, value_parser = parse_duration)]
    pub watchdog: Option<Duration>,
    /// Fd-store capacity (FDSTORE=1 from the app); 0 disables it.
    #[arg(long, default_value_t = 4096)]
    pub fdstore_max: usize,
    /// Shell command run after READY=1 (with BATON_PID, BATON_GENERATION and, with --probe,
    /// BATON_PROBE_ADDR set); the cutover happens only if it succeeds.
    #[arg(long)]
    pub health_cmd: Option<String>,
    /// Give each generation a private loopback listener (127.0.0.1 or ::1, like the first
    /// listening socket), passed after the listening sockets as `probe` in LISTEN_FDNAMES; its
    /// address (host:port) is $BATON_PROBE_ADDR in --health-cmd, so the check reaches that
    /// generation only. Needs a TCP or UDP first listening socket.
    #[arg(long)]
    pub probe: bool,
    /// Built-in probe: GET PATH over the generation's probe listener (implies --probe); a 2xx
    /// answer passes. Probes run every --health-interval from readiness to the end of
    /// probation; one failure rejects the new generation.
    #[arg(long, value_name = "PATH", value_parser = parse_http_path, conflicts_with = "health_tcp")]
    pub health_http: Option<String>,
    /// Built-in probe: a TCP connect to the generation's probe listener (implies --probe).
    #[arg(long)]
    pub health_tcp: bool,
    /// Time between two built-in probes of one generation.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// How long one built-in probe may take before it fails.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// Consecutive passing probes needed before the new generation gets real traffic.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_passes: u32,
    /// When a new generation is ready: `notify` (it sends READY=1), `probe` (its first passing
    /// built-in probe: for apps without sd_notify; needs --health-http or --health-tcp), or
    /// `after:DURATION` (a timer from its start).
    #[arg(long, default_value = "notify", value_parser = parse_readiness, value_name = "WHEN")]
    pub ready: crate::supervisor::Readiness,
    /// After readiness, how long the new generation must stay alive and keep passing its probes,
    /// with no real traffic (steered away), before it gets any. 0 turns it off.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub quiet_period: Duration,
    /// After the new generation got the traffic, how long the old one keeps running, unsignalled:
    /// should the new one exit, fail a probe or miss its watchdog meanwhile, the traffic goes back
    /// to the old one and the restart fails. 0 turns it off.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub probation: Duration,
    /// `auto` steers new connections to the proven generation only (TCP and UDP listeners, by a
    /// SO_REUSEPORT pair and a classic BPF program); `off` lets every generation accept from the
    /// same sockets.
    #[arg(long, value_enum, default_value = "auto")]
    pub steering: SteeringArg,
    /// Percent of new connections the new generation gets during its quiet period (0-99).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..100))]
    pub canary: u8,
    /// Also speak another supervisor's protocol to the app: `crank` (NOTIFY_FD, CRANK_NAME) or
    /// `einhorn` (EINHORN_FDS, EINHORN_FD_COUNT, EINHORN_FD_n). Repeatable.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub compat: Vec<CompatArg>,
    /// Draining generations allowed at once; the oldest is killed beyond this.
    #[arg(long, default_value_t = 4)]
    pub max_draining: usize,
    /// Crash restarts allowed within --restart-interval before giving up.
    #[arg(long, default_value_t = 10)]
    pub restart_burst: u32,
    /// Window for --restart-burst.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub restart_interval: Duration,
    /// Where the app's stdout and stderr go: `inherit` gives every generation
    /// baton's own stdout and stderr (under systemd the journal stream, kept
    /// open by the app itself: its logging never depends on baton staying
    /// alive, and $JOURNAL_STREAM lets it log natively; its lines carry the
    /// writer's _PID and the unit's SyslogIdentifier=, which `baton units`
    /// sets to the app's program name; failure reports name the journalctl
    /// command instead of quoting lines); `pipe` passes them through baton,
    /// which keeps the last lines for failure reports and, under the
    /// journal, writes each line as a journal entry with the app's program
    /// name as SYSLOG_IDENTIFIER and BATON_GENERATION=, BATON_PID= (_PID is
    /// baton's); nothing read is lost at `baton upgrade`; should baton die,
    /// the app's next write fails (EPIPE, or death by SIGPIPE). Baton's own
    /// lines are SYSLOG_IDENTIFIER=baton with BATON_GENERATION= and
    /// BATON_PID= in either mode. `auto` is `inherit` when baton's stderr is
    /// the journal ($JOURNAL_STREAM matches it), `pipe` otherwise.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    pub output: OutputArg,
    /// The app and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// The supervisor's policy these options ask for (`--output auto`
    /// decided now, from baton's stderr).
    pub fn policy(&self) -> crate::supervisor::Policy {
        use crate::supervisor::{Backoff, NotifyAccess, Policy};
        Policy {
            ready_timeout: self.ready_timeout,
            stop_signal: self.stop_signal,
            stop_timeout: self.stop_timeout,
            notify_access: match self.notify_access {
                Access::Main => NotifyAccess::Main,
                Access::Exec => NotifyAccess::Exec,
                Access::All => NotifyAccess::All,
            },
            watchdog: self.watchdog,
            fdstore_max: self.fdstore_max,
            health_cmd: self.health_cmd.clone(),
            // One at least: the generation a cutover retires.
            max_draining: self.max_draining.max(1),
            backoff: Backoff { burst: self.restart_burst, interval: self.restart_interval, ..Backoff::default() },
            output: self.output.resolve(),
            probe: self.probe || self.proving().needs_probe_socket(),
            proving: self.proving(),
            compat: crate::supervisor::Compat {
                crank: self.compat.contains(&CompatArg::Crank),
                einhorn: self.compat.contains(&CompatArg::Einhorn),
            },
        }
    }

    /// How new generations are proven, from these options.
    fn proving(&self) -> crate::supervisor::Proving {
        use crate::supervisor::{HealthProbe, Proving, SteeringMode};
        let probe = match (&self.health_http, self.health_tcp) {
            (Some(path), _) => Some(HealthProbe::Http { path: path.clone() }),
            (None, true) => Some(HealthProbe::Tcp),
            (None, false) => None,
        };
        Proving {
            ready: self.ready,
            probe,
            interval: self.health_interval,
            timeout: self.health_timeout,
            passes: self.health_passes,
            quiet_period: self.quiet_period,
            probation: self.probation,
            steering: match self.steering {
                SteeringArg::Auto => SteeringMode::Auto,
                SteeringArg::Off => SteeringMode::Off,
            },
            canary: self.canary,
        }
    }

    /// Options that contradict each other, refused before anything is
    /// bound, with the fix named.
    pub fn check(&self) -> Result<(), String> {
        use crate::supervisor::Readiness;
        if self.ready == Readiness::Probe && self.health_http.is_none() && !self.health_tcp {
            return Err("--ready probe needs a built-in probe: add --health-http PATH or --health-tcp".into());
        }
        if self.canary > 0 && self.quiet_period.is_zero() {
            return Err("--canary needs a quiet period to send that share in: set --quiet-period".into());
        }
        Ok(())
    }
}

/// `--steering` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SteeringArg {
    /// Steer where the listener allows it; share the others.
    Auto,
    /// Share every listener between generations.
    Off,
}

/// `--compat` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompatArg {
    /// pusher/crank: NOTIFY_FD and CRANK_NAME.
    Crank,
    /// einhorn: EINHORN_FDS, EINHORN_FD_COUNT, EINHORN_FD_n.
    Einhorn,
}

/// Parses `--ready`: `notify`, `probe` or `after:DURATION`.
pub fn parse_readiness(s: &str) -> Result<crate::supervisor::Readiness, String> {
    use crate::supervisor::Readiness;
    match s.trim() {
        "notify" => Ok(Readiness::Notify),
        "probe" => Ok(Readiness::Probe),
        other => match other.strip_prefix("after:") {
            Some(d) => parse_duration(d).map(Readiness::After),
            None => Err(format!("{other:?} is not a readiness: use notify, probe or after:DURATION (e.g. after:1s)")),
        },
    }
}

/// Parses `--health-http`'s path: an origin-form request target, printable
/// ASCII without spaces (it goes into the request line as it is).
pub fn parse_http_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?} is not a request path: start it with / (e.g. /healthz)"));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{s:?} has {c:?} in it: percent-encode it (a request path is printable ASCII without spaces)"
        ));
    }
    Ok(s.to_string())
}

/// `--output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    /// `inherit` when stderr is the journal, `pipe` otherwise.
    Auto,
    /// Through a pipe to baton, which keeps the last lines for failure reports.
    Pipe,
    /// Baton's own stdout and stderr (the journal under systemd).
    Inherit,
}

impl OutputArg {
    /// The mode to use, `auto` decided now from baton's stderr.
    pub fn resolve(self) -> crate::output::OutputMode {
        match self {
            OutputArg::Auto => crate::output::OutputMode::auto(),
            OutputArg::Pipe => crate::output::OutputMode::Pipe,
            OutputArg::Inherit => crate::output::OutputMode::Inherit,
        }
    }
}

/// `--notify-access` values, as systemd's `NotifyAccess=`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Access {
    /// Only a generation's main process.
    Main,
    /// The main process and the health check.
    Exec,
    /// Any process of the generation's process group that descends from its
    /// main process (by parent chain: not one that only joined the group,
    /// nor an orphan reparented to baton), and the health check.
    All,
}

/// Options of `baton notify`.
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// READY=1.
    #[arg(long)]
    pub ready: bool,
    /// RELOADING=1 with MONOTONIC_USEC.
    #[arg(long)]
    pub reloading: bool,
    /// STOPPING=1.
    #[arg(long)]
    pub stopping: bool,
    /// STATUS=TEXT.
    #[arg(long)]
    pub status: Option<String>,
    /// Fd to store (FDSTORE=1), open in this process; repeatable.
    #[arg(long = "fd", value_name = "FD", value_parser = parse_fd, allow_negative_numbers = true)]
    pub fds: Vec<i32>,
    /// FDNAME= for --fd.
    #[arg(long)]
    pub fdname: Option<String>,
    /// The service's main process is PID now (a number, or `parent`: the
    /// caller's shell), as with systemd-notify --pid: MAINPID=PID with the
    /// process's pidfd attached (MAINPIDFD=1, systemd >= 257), so a reused
    /// pid cannot be mistaken for it.
    #[arg(long, value_name = "PID", value_parser = parse_main_pid, conflicts_with = "fds")]
    pub pid: Option<MainPidArg>,
    /// Do not wait for the manager to process the message (no BARRIER=1);
    /// then not even Baton's refusal of it is reported.
    #[arg(long)]
    pub no_block: bool,
    /// More assignments, KEY=VALUE.
    pub assignments: Vec<String>,
}

/// `baton notify --pid`'s value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainPidArg {
    /// This pid.
    Pid(u32),
    /// The parent of `baton notify` (the shell that ran it).
    Parent,
}

fn parse_main_pid(s: &str) -> Result<MainPidArg, String> {
    match s {
        "parent" => Ok(MainPidArg::Parent),
        _ => match s.parse::<u32>() {
            Ok(p) if (1..=i32::MAX as u32).contains(&p) => Ok(MainPidArg::Pid(p)),
            _ => Err(format!("{s:?} is not a pid: give a process id (e.g. $!) or `parent`")),
        },
    }
}

/// The longest duration any option takes: 365 days. Far beyond any sane
/// timeout, and far enough below the limits of `Instant` arithmetic and of
/// `EXTEND_TIMEOUT_USEC` (a `u64` of µs) that no deadline computed from it
/// can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `90`, `90s`, `500ms`, `2min`, `1h`, at most [`MAX_DURATION`]
/// (clap names the option in front of the error).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 500ms, 2min)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s, min or h")),
    };
    let max_hours = MAX_DURATION.as_secs() / 3600;
    let too_long = || format!("{s:?} is too long: the maximum is {max_hours}h (365 days)");
    let d = Duration::try_from_secs_f64(secs).map_err(|_| too_long())?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses a file descriptor number: 0 or more (`BorrowedFd` cannot even
/// hold -1).
pub fn parse_fd(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(fd) if fd >= 0 => Ok(fd),
        _ => Err(format!("{s:?} is not a file descriptor number: give an fd open in this process (0, 1, 2, 3, ...)")),
    }
}

/// Parses an octal file mode like `0660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("{s:?} is not an octal mode like 0660"))
}

/// Parses a signal name like `TERM` or `SIGTERM`.
pub fn parse_signal(s: &str) -> Result<rustix::process::Signal, String> {
    use rustix::process::Signal;
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Ok(match name {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "KILL" => Signal::KILL,
        "WINCH" => Signal::WINCH,
        _ => return Err(format!("unsupported signal {s:?}: use TERM, INT, QUIT, HUP, USR1, USR2, WINCH or KILL")),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let argv = ["baton", "run"].iter().chain(args).chain(&["--", "app"]).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(r) => r,
            _ => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn probe_is_off_unless_asked_and_reaches_the_policy() {
        assert!(!run_args(&[]).policy().probe);
        let policy = run_args(&["--probe", "--health-cmd", "true"]).policy();
        assert!(policy.probe);
        assert_eq!(policy.health_cmd.as_deref(), Some("true"));
    }

    #[test]
    fn proving_defaults_are_a_quiet_period_and_a_probation_with_steering() {
        let policy = run_args(&[]).policy();
        assert_eq!(policy.proving, crate::supervisor::Proving::defaults());
        assert!(!policy.probe, "no probe socket without a built-in probe");
    }

    #[test]
    fn built_in_probes_imply_the_probe_socket() {
        use crate::supervisor::{HealthProbe, Readiness};
        let policy = run_args(&["--health-http", "/healthz", "--ready", "probe", "--health-passes", "5"]).policy();
        assert!(policy.probe);
        assert_eq!(policy.proving.probe, Some(HealthProbe::Http { path: "/healthz".into() }));
        assert_eq!((policy.proving.ready, policy.proving.passes), (Readiness::Probe, 5));
        assert!(run_args(&["--health-tcp"]).policy().probe);
        assert_eq!(
            run_args(&["--ready", "after:1500ms"]).policy().proving.ready,
            Readiness::After(Duration::from_millis(1500))
        );
    }

    #[test]
    fn contradicting_proving_options_are_refused_with_the_fix() {
        let e = run_args(&["--ready", "probe"]).check().unwrap_err();
        assert!(e.contains("add --health-http PATH or --health-tcp"), "{e}");
        let e = run_args(&["--canary", "10", "--quiet-period", "0"]).check().unwrap_err();
        assert!(e.contains("set --quiet-period"), "{e}");
        assert!(run_args(&["--canary", "10"]).check().is_ok());
    }

    #[test]
    fn bad_readiness_and_paths_name_the_fix() {
        assert!(parse_readiness("later").unwrap_err().contains("use notify, probe or after:DURATION"));
        assert!(parse_readiness("after:soon").is_err());
        assert!(parse_http_path("healthz").unwrap_err().contains("start it with /"));
        assert!(parse_http_path("/a b").unwrap_err().contains("percent-encode"));
        assert_eq!(parse_http_path("/healthz?x=1").unwrap(), "/healthz?x=1");
        let argv = ["baton", "run", "--health-passes", "0", "--", "app"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = ["baton", "run", "--canary", "100", "--", "app"];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
