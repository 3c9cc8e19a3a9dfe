//! Admitting connections: the connection limit and what happens at the fd
//! limit.
//!
//! - **Over `--max-connections`**, a new connection is accepted and
//!   answered `503 Service Unavailable` with `Retry-After: 1` and
//!   `Connection: close` (the response fits a fresh socket's send buffer, so
//!   it is written without waiting), then its write side is shut down and
//!   what the client sends is read and dropped for up to [`REFUSAL_LINGER`],
//!   so that closing does not reset the connection before the client has
//!   read the answer. At most [`MAX_REFUSING`] refusals linger at once;
//!   beyond that a connection is closed at once, which a client also sees
//!   straight away. Either way no client is left waiting in the backlog.
//! - **At the fd limit** (`EMFILE`, `ENFILE`, also `ENOBUFS`/`ENOMEM`),
//!   accepting pauses, doubling from [`PAUSE_MIN`] to [`PAUSE_MAX`] while it
//!   keeps failing, and the failures are logged once, then summarised at
//!   most every [`LOG_EVERY`]. Connections already accepted are served
//!   meanwhile: the pause only gates the accept branch of the server's loop.
//!
//! Refusals are logged the same way (once, then a summary per
//! [`LOG_EVERY`]), so a flood costs a few log lines, not one per connection.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The answer to a connection over the limit.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 36\r\n\
    Retry-After: 1\r\n\
    Connection: close\r\n\
    \r\n\
    too many connections; retry shortly\n";

/// How long a refused connection is read from before it is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Most refusals lingering at once (each holds an fd).
pub const MAX_REFUSING: usize = 64;

/// Most bytes read from a refused connection before it is closed anyway.
const REFUSAL_DRAIN_MAX: usize = 64 * 1024;

/// First pause after an accept failed for lack of resources.
pub const PAUSE_MIN: Duration = Duration::from_millis(10);

/// Longest pause between accept attempts while resources lack.
pub const PAUSE_MAX: Duration = Duration::from_secs(1);

/// Shortest gap between two log lines about the same kind of trouble.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A log line at most every [`LOG_EVERY`], counting what it left out.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    /// Events since the last line, that line's own included.
    count: u64,
}

impl LogLimiter {
    /// Counts one event; returns how many happened since the last line
    /// (this one included) when a line is due now.
    pub fn event(&mut self) -> Option<u64> {
        self.event_at(Instant::now())
    }

    fn event_at(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|last| now.duration_since(last) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Whether an accept error means the process or system lacks resources
/// (rather than one client having given up).
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Accept pacing while resources lack (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct AcceptPacer {
    /// Accepting resumes at this instant.
    paused_until: Option<Instant>,
    pause: Option<Duration>,
    log: LogLimiter,
}

impl AcceptPacer {
    /// When accepting may resume, if it is paused.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// The pause is over.
    pub fn resume(&mut self) {
        self.paused_until = None;
    }

    /// An accept succeeded: the next failure starts from the shortest pause.
    pub fn accepted(&mut self) {
        self.pause = None;
    }

    /// An accept failed.
    pub fn failed(&mut self, e: &std::io::Error) {
        self.failed_at(e, Instant::now());
    }

    fn failed_at(&mut self, e: &std::io::Error, now: Instant) {
        if !is_exhaustion(e) {
            tracing::debug!(error = %e, "accept failed");
            return;
        }
        let pause = self.pause.map_or(PAUSE_MIN, |p| (p * 2).min(PAUSE_MAX));
        self.pause = Some(pause);
        self.paused_until = Some(now + pause);
        if let Some(failures) = self.log.event_at(now) {
            tracing::warn!(
                error = %e,
                failures,
                "cannot accept connections: out of resources (file descriptors or memory); accepting pauses up to \
                 {PAUSE_MAX:?} at a time while this lasts, connections already open are still served; lower \
                 --max-connections or raise LimitNOFILE= (this message repeats at most every {LOG_EVERY:?}, with \
                 the number of failures since the last one)"
            );
        }
    }
}

/// Refuses connections over the limit (see the [module docs](self)).
#[derive(Debug)]
pub struct Refuser {
    limit: usize,
    lingering: Arc<AtomicUsize>,
    log: LogLimiter,
}

/// Decrements the lingering count when a refusal ends.
struct Lingering(Arc<AtomicUsize>);

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Refuser {
    /// For a server that serves at most `limit` connections at once.
    pub fn new(limit: usize) -> Self {
        Self { limit, lingering: Arc::new(AtomicUsize::new(0)), log: LogLimiter::default() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a new connection is over the limit with `open` served now.
    pub fn over_limit(&self, open: usize) -> bool {
        open >= self.limit
    }

    /// Answers `stream` with [`REFUSAL`] and closes it. Must be called
    /// inside a tokio runtime.
    pub fn refuse(&mut self, stream: TcpStream) {
        if let Some(refused) = self.log.event() {
            tracing::warn!(
                limit = self.limit,
                refused,
                "refusing connections with 503: {} are open (--max-connections); this message repeats at most every \
                 {LOG_EVERY:?}, with the number refused since the last one",
                self.limit
            );
        }
        // A fresh socket's send buffer is empty: the answer fits, or the
        // client is gone.
        let written = matches!(stream.try_write(REFUSAL), Ok(n) if n == REFUSAL.len());
        if !written {
            return;
        }
        let _ = rustix::net::shutdown(&stream, rustix::net::Shutdown::Write);
        if self.lingering.fetch_add(1, Relaxed) >= MAX_REFUSING {
            self.lingering.fetch_sub(1, Relaxed);
            return;
        }
        let guard = Lingering(Arc::clone(&self.lingering));
        tokio::spawn(async move {
            let _guard = guard;
            let _ = tokio::time::timeout(REFUSAL_LINGER, drain(stream)).await;
        });
    }
}

/// Reads and drops what a refused client sends, until it closes (or sent
/// too much), so that closing does not reset the connection under the
/// answer.
async fn drain(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < REFUSAL_DRAIN_MAX {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_well_formed() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
        assert_eq!(len, body.len());
    }

    #[test]
    fn logs_are_limited_and_count_what_they_left_out() {
        let mut log = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(log.event_at(t0), Some(1));
        for _ in 0..99 {
            assert_eq!(log.event_at(t0 + LOG_EVERY / 2), None);
        }
        assert_eq!(log.event_at(t0 + LOG_EVERY), Some(100));
    }

    #[test]
    fn pauses_double_up_to_the_cap_and_reset() {
        let mut p = AcceptPacer::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let now = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..10 {
            p.failed_at(&emfile, now);
            pauses.push(p.paused_until().unwrap() - now);
            p.resume();
        }
        assert_eq!(pauses[0], PAUSE_MIN);
        assert_eq!(pauses[1], PAUSE_MIN * 2);
        assert_eq!(*pauses.last().unwrap(), PAUSE_MAX);
        p.accepted();
        p.failed_at(&emfile, now);
        assert_eq!(p.paused_until().unwrap() - now, PAUSE_MIN);
        p.resume();
        p.failed_at(&std::io::Error::from_raw_os_error(libc::ECONNABORTED), now);
        assert_eq!(p.paused_until(), None, "a client giving up pauses nothing");
    }
}
