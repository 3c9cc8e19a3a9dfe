//! The command line: what to serve, where to get the socket, and how to
//! shut down.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// `baton-httpd`'s options.
///
/// The socket comes, in this order, from: a passed fd named
/// [`socket_name`](Self::socket_name) (systemd socket activation or `baton
/// run`), a listener this service stored itself in the fd store
/// (`listen/<name>`), or binding [`listen`](Self::listen).
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "baton-httpd",
    version,
    about = "Baton's reference HTTP server: static files, socket activation, graceful drain and live connection handoff"
)]
pub struct Config {
    /// Directory whose files are served. Requests can never reach outside it
    /// (no `..`, no symlinks that leave it).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,

    /// Name of the passed listening socket to serve on: `FileDescriptorName=`
    /// of the `.socket` unit, or the listen name given to `baton run`.
    #[arg(long, value_name = "NAME", default_value = "http")]
    pub socket_name: String,

    /// Bind this address (e.g. `127.0.0.1:8080`) when no socket was passed.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// On SIGTERM, how long in-flight requests may take to finish before
    /// their connections are closed. Keep it below the unit's
    /// `TimeoutStopSec=`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Hand idle keep-alive connections over to the next generation through
    /// the service manager's fd store instead of closing them
    /// (`--handoff=false` to disable).
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub handoff: bool,

    /// Test knob: wait this long before starting (READY=1 comes after it).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub startup_delay: Duration,

    /// Test knob: exit with status 1 before READY=1, after the startup
    /// delay and before touching any passed fd (so fd-store entries stay for
    /// the next attempt).
    #[arg(long)]
    pub fail_startup: bool,

    /// Test knob: exit abruptly with status 1 this long after READY=1
    /// (default 0s when given without a value), like a crash.
    #[arg(long, value_name = "DELAY", num_args = 0..=1, default_missing_value = "0s", value_parser = parse_duration)]
    pub fail_after_ready: Option<Duration>,

    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// A duration on the command line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not a number followed by an optional unit.
    #[error("{value:?} is not a duration: write a number with a unit, e.g. 250ms, 30s, 2m (a bare number is seconds)")]
    Invalid {
        /// What was given.
        value: String,
    },
    /// Too large to represent.
    #[error("{value:?} is too long a duration")]
    Overflow {
        /// What was given.
        value: String,
    },
}

/// Parses `250ms`, `1.5s`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid { value: value.to_owned() };
    let s = value.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid()),
    };
    // `f64::from_str` accepts "inf"/"nan"; the split above lets only digits
    // and dots through, so those cannot reach it.
    let n: f64 = number.parse().map_err(|_| invalid())?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| DurationError::Overflow { value: value.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1s", "1x", "inf", "nan", "1..2s", "1 2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_duration("1e400"), Err(DurationError::Invalid { .. })));
        assert!(matches!(parse_duration("99999999999999999999999h"), Err(DurationError::Overflow { .. })));
    }

    #[test]
    fn command_line() {
        let c = Config::try_parse_from(["baton-httpd", "--root", "/srv"]).unwrap();
        assert_eq!(c.socket_name, "http");
        assert!(c.handoff);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.fail_after_ready, None);
        let c = Config::try_parse_from([
            "baton-httpd",
            "--root=/srv",
            "--handoff=false",
            "--fail-after-ready",
            "--listen",
            "127.0.0.1:8080",
        ])
        .unwrap();
        assert!(!c.handoff);
        assert_eq!(c.fail_after_ready, Some(Duration::ZERO));
        assert_eq!(c.listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert!(Config::try_parse_from(["baton-httpd"]).is_err(), "--root is required");
    }
}
