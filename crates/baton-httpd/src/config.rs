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
    /// `TimeoutStopSec=` and Baton's `--stop-timeout`.
    // 25 s, not 30 s: Baton's `--stop-timeout` defaults to 30 s, and a
    // generation whose own deadline equals it is SIGKILLed at that very
    // moment, before it can hand its last idle connections over, send
    // `BARRIER=1` and exit 0. 5 s is room for that on a loaded machine.
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long a client may take to send a request head, counted from its
    /// first byte (so an idle keep-alive connection, which has sent nothing,
    /// is never cut by it and can still be handed over). The connection is
    /// closed when it passes. `0s` disables it.
    // 20 s: a real client sends its head in one round trip; this is
    // Apache's mod_reqtimeout first stage, and is below the drain deadline,
    // so a client stalled mid-head is cut by this deadline rather than
    // holding a stop to the drain deadline.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a keep-alive connection may stay idle (no request in flight,
    /// no byte of a next one) before it is closed. Restarts the count at
    /// every response and at adoption by a new generation. `0s` disables it.
    // 75 s, as nginx's keepalive_timeout: longer than the 60 s idle timeout
    // of common load balancers, so a proxy in front closes first (it can
    // retry; a client whose connection the server closes under it cannot
    // always).
    #[arg(long, value_name = "DURATION", default_value = "75s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Most connections served at once (adopted and pushed ones included).
    /// Beyond it a new connection is answered `503` with `Retry-After` and
    /// `Connection: close`. Default: three quarters of the soft
    /// `RLIMIT_NOFILE` (`LimitNOFILE=`), leaving the rest for the files
    /// being sent, the refusals themselves and the runtime.
    #[arg(long, value_name = "N", value_parser = parse_connection_limit)]
    pub max_connections: Option<NonZeroUsize>,

    /// Largest request head (request line and headers) in bytes; a larger
    /// one is answered `431` and the connection closed. It is also what one
    /// connection may buffer of a head: memory for heads is at most
    /// `--max-connections` times this.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_REQUEST_HEAD,
          value_parser = parse_head_size)]
    pub max_request_head: usize,

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

/// Default of `--max-request-head`: 64 KiB, room for large cookies and
/// tokens (nginx allows 4 × 8 KiB lines, Apache 8 KiB a line).
pub const DEFAULT_MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Bounds of `--max-request-head`: hyper needs at least 8 KiB of read
/// buffer; more than 1 MiB per connection defeats the point of a limit.
pub const REQUEST_HEAD_RANGE: std::ops::RangeInclusive<usize> = 8 * 1024..=1024 * 1024;

/// Parses `--max-connections`.
fn parse_connection_limit(value: &str) -> Result<NonZeroUsize, String> {
    let n: usize = value.trim().parse().map_err(|_| format!("{value:?} is not a number of connections, e.g. 10000"))?;
    NonZeroUsize::new(n).ok_or_else(|| {
        "0 would refuse every client: give at least 1, or leave the option out for the default from LimitNOFILE="
            .to_owned()
    })
}

/// Parses `--max-request-head`.
fn parse_head_size(value: &str) -> Result<usize, String> {
    let n: usize = value.trim().parse().map_err(|_| format!("{value:?} is not a number of bytes, e.g. 65536"))?;
    if !REQUEST_HEAD_RANGE.contains(&n) {
        return Err(format!(
            "{n} bytes is outside {}..={}: give a size in that range (the default is {DEFAULT_MAX_REQUEST_HEAD})",
            REQUEST_HEAD_RANGE.start(),
            REQUEST_HEAD_RANGE.end()
        ));
    }
    Ok(n)
}

impl Config {
    /// `--header-timeout`, `None` when disabled.
    pub fn header_deadline(&self) -> Option<Duration> {
        Some(self.header_timeout).filter(|d| !d.is_zero())
    }

    /// `--idle-timeout`, `None` when disabled.
    pub fn idle_deadline(&self) -> Option<Duration> {
        Some(self.idle_timeout).filter(|d| !d.is_zero())
    }

    /// `--max-connections`, or its default from the soft `RLIMIT_NOFILE`.
    pub fn connection_limit(&self) -> usize {
        self.max_connections.map_or_else(|| default_max_connections(soft_nofile_limit()), NonZeroUsize::get)
    }
}

/// The soft `RLIMIT_NOFILE`; `None` when unlimited.
fn soft_nofile_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Three quarters of the fd limit (at least 1); an unlimited one counts as
/// 2^20, Linux's default `fs.nr_open`.
pub fn default_max_connections(soft_nofile: Option<u64>) -> usize {
    let limit = soft_nofile.unwrap_or(1 << 20);
    usize::try_from(limit / 4 * 3).unwrap_or(usize::MAX).max(1)
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
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.header_deadline(), Some(Duration::from_secs(20)));
        assert_eq!(c.idle_deadline(), Some(Duration::from_secs(75)));
        assert_eq!(c.max_request_head, 64 * 1024);
        assert!(c.connection_limit() >= 1);
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
        let c =
            Config::try_parse_from(["baton-httpd", "--root=/srv", "--header-timeout=0s", "--idle-timeout=0"]).unwrap();
        assert_eq!((c.header_deadline(), c.idle_deadline()), (None, None), "0 disables");
        for bad in
            ["--max-request-head=100", "--max-request-head=x", "--max-request-head=99999999", "--max-connections=0"]
        {
            let e = Config::try_parse_from(["baton-httpd", "--root=/srv", bad]).unwrap_err().to_string();
            assert!(e.contains("max-"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_connection_limit_leaves_fds_spare() {
        assert_eq!(default_max_connections(Some(1024)), 768);
        assert_eq!(default_max_connections(Some(65536)), 49152);
        assert_eq!(default_max_connections(Some(1)), 1);
        assert_eq!(default_max_connections(None), 786_432);
    }
}
