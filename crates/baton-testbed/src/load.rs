//! A loopback-only HTTP/1.1 load generator that accounts for **every**
//! request, for checking that a restart drops nothing.
//!
//! [`Load::start`] runs `connections` workers on a dedicated OS thread with
//! its own current-thread tokio runtime, so plain `#[test]` functions can use
//! it. The client is hand-written (not hyper): each request ends in exactly
//! one [`Outcome`], nothing is retried, and a connection is never silently
//! replaced without being counted.
//!
//! # Accounting
//!
//! - [`LoadReport::requests`] counts requests *attempted*: a request is
//!   attempted once its worker has taken a slot within
//!   [`LoadConfig::max_requests`]. Each ends either `ok` or in
//!   [`LoadReport::failures`] under exactly one [`FailureKind`], so
//!   `requests == ok + failed()`. A failed `connect()` is a failed request
//!   (usually [`FailureKind::Refused`]). Requests still in flight when the
//!   load is stopped (or reaches `max_duration`) are abandoned and not
//!   counted anywhere.
//! - [`LoadReport::server_closed_connections`] counts pooled connections
//!   (KeepAlive, Idle) that had served at least one response and that the
//!   server then closed (EOF or RST) while the client still meant to use
//!   them. Detected (a) while the connection waits for its next send (a
//!   read is kept pending), (b) right before reuse (a non-blocking peek):
//!   in both cases nothing was sent and only this counter moves; or (c) when
//!   a request written onto it gets EOF/RST with zero response bytes: then
//!   that request is *also* a failure ([`FailureKind::ServerClosed`] or
//!   [`FailureKind::Reset`]). A response carrying `Connection: close` is a
//!   graceful end, not counted. Fresh connections closed before answering
//!   are only failures.
//! - Latency is in microseconds from [`Sample::at`]: with a [`LoadConfig::rate`]
//!   (or [`Mode::Idle`]) that is the *scheduled* send time when the worker
//!   was still busy with its previous request at that time, so a stall of the
//!   server shows up in latency instead of silently lowering the send rate
//!   (coordinated omission); a worker idle at its slot is measured from the
//!   actual send, so the timer's own lateness (up to a millisecond) is not
//!   charged to the server. A worker that falls behind sends at once,
//!   measured from its missed slot, then resumes its schedule from now: no
//!   unbounded catch-up bursts. Without a rate (closed loop) `at` is the
//!   actual send time.
//! - [`LoadReport::histogram`] holds latencies of successful requests only;
//!   [`LoadReport::samples`] holds every outcome up to
//!   [`LoadConfig::max_samples`], then counts the rest in
//!   [`LoadReport::samples_dropped`]. Samples are in completion order.
//! - [`LoadReport::per_generation`] counts successes by their
//!   `baton-generation` header (else `pid:<baton-pid>`, else `unknown`).
//!
//! # Bounds
//!
//! The load ends at [`LoadConfig::max_duration`], after
//! [`LoadConfig::max_requests`], or at [`Load::stop`] / drop, whichever comes
//! first; every wait is bounded by [`LoadConfig::request_timeout`]. In
//! closed-loop mode a worker whose attempt failed in under 1 ms pauses for
//! the rest of that millisecond, so an unreachable server is not spun on.

mod http;
mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

/// Highest latency the histogram resolves (1 h in µs); larger values are
/// clamped to it.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// Most distinct [`FailureKind::Other`] descriptions kept in
/// [`LoadReport::other_errors`]; more are merged under `"(more)"`.
const MAX_OTHER_KEYS: usize = 64;

/// How the load uses connections.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// One TCP connection per request, sent with `Connection: close`.
    NewConnection,
    /// A pool of [`LoadConfig::connections`] persistent connections, each
    /// carrying requests one after the other.
    KeepAlive,
    /// [`LoadConfig::connections`] long-lived connections, each sending one
    /// request every `interval` and staying idle in between (the situation a
    /// restart must hand over). Ignores [`LoadConfig::rate`].
    Idle {
        /// Time between two requests on one connection.
        interval: Duration,
    },
}

/// What load to generate. Build with [`LoadConfig::new`] and the chained
/// setters, or fill the fields.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Server address; must be loopback ([`LoadError::NotLoopback`]).
    pub addr: SocketAddr,
    /// Request path, starting with `/` (default `/healthz`).
    pub path: String,
    /// Connection usage (default [`Mode::KeepAlive`]).
    pub mode: Mode,
    /// Number of workers = concurrent connections (default 8).
    pub connections: usize,
    /// Total requests per second across all workers, paced (open loop:
    /// latency counted from the scheduled send time). `None` (default):
    /// closed loop, each worker sends as soon as its previous request ends.
    pub rate: Option<u32>,
    /// Bound on one request, connect included (default 5 s).
    pub request_timeout: Duration,
    /// The load ends after this long (default 120 s).
    pub max_duration: Duration,
    /// The load ends after this many requests (default unbounded).
    pub max_requests: Option<u64>,
    /// Most [`Sample`]s retained (default 2 000 000); later ones are counted
    /// in [`LoadReport::samples_dropped`].
    pub max_samples: usize,
}

impl Default for LoadConfig {
    /// Keep-alive load on `127.0.0.1:80/healthz`; set [`LoadConfig::addr`].
    fn default() -> LoadConfig {
        LoadConfig {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 80)),
            path: "/healthz".to_owned(),
            mode: Mode::KeepAlive,
            connections: 8,
            rate: None,
            request_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(120),
            max_requests: None,
            max_samples: 2_000_000,
        }
    }
}

impl LoadConfig {
    /// The defaults, aimed at `addr`.
    pub fn new(addr: SocketAddr) -> LoadConfig {
        LoadConfig { addr, ..LoadConfig::default() }
    }

    /// Sets [`LoadConfig::path`].
    pub fn path(mut self, path: impl Into<String>) -> LoadConfig {
        self.path = path.into();
        self
    }

    /// Sets [`LoadConfig::mode`].
    pub fn mode(mut self, mode: Mode) -> LoadConfig {
        self.mode = mode;
        self
    }

    /// Sets [`LoadConfig::connections`].
    pub fn connections(mut self, connections: usize) -> LoadConfig {
        self.connections = connections;
        self
    }

    /// Sets [`LoadConfig::rate`].
    pub fn rate(mut self, rate: Option<u32>) -> LoadConfig {
        self.rate = rate;
        self
    }

    /// Sets [`LoadConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> LoadConfig {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`LoadConfig::max_duration`].
    pub fn max_duration(mut self, duration: Duration) -> LoadConfig {
        self.max_duration = duration;
        self
    }

    /// Sets [`LoadConfig::max_requests`].
    pub fn max_requests(mut self, max: Option<u64>) -> LoadConfig {
        self.max_requests = max;
        self
    }

    /// Sets [`LoadConfig::max_samples`].
    pub fn max_samples(mut self, max: usize) -> LoadConfig {
        self.max_samples = max;
        self
    }

    fn validate(&self) -> Result<(), LoadError> {
        if !self.addr.ip().is_loopback() {
            return Err(LoadError::NotLoopback { addr: self.addr });
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(LoadError::BadPath { path: self.path.clone() });
        }
        if self.connections == 0 || u32::try_from(self.connections).is_err() {
            return Err(LoadError::Connections { connections: self.connections });
        }
        if self.rate == Some(0) {
            return Err(LoadError::ZeroRate);
        }
        if let Mode::Idle { interval } = self.mode
            && interval.is_zero()
        {
            return Err(LoadError::ZeroInterval);
        }
        if self.request_timeout.is_zero() {
            return Err(LoadError::ZeroTimeout);
        }
        Ok(())
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// `connect()` got ECONNREFUSED: nothing listening.
    Refused,
    /// ECONNRESET / EPIPE / ECONNABORTED while writing or reading.
    Reset,
    /// [`LoadConfig::request_timeout`] passed (connect included).
    Timeout,
    /// A complete response whose status is not 2xx/3xx (see
    /// [`LoadReport::bad_statuses`]).
    BadStatus,
    /// EOF before a complete response.
    ServerClosed,
    /// Anything else, e.g. a malformed response (see
    /// [`LoadReport::other_errors`]).
    Other,
}

impl FailureKind {
    /// Stable snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::BadStatus => "bad_status",
            FailureKind::ServerClosed => "server_closed",
            FailureKind::Other => "other",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete 2xx/3xx response.
    Ok {
        /// Its `baton-generation` header, trimmed, if any.
        generation: Option<String>,
    },
    /// Failed, see [`FailureKind`].
    Failed(FailureKind),
}

/// One request's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Scheduled send time if the worker was late for it (paced), else the
    /// actual send time.
    pub at: Instant,
    /// Microseconds from `at` to the response (or the failure).
    pub latency_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Stats of the samples scheduled in a time window ([`LoadReport::window`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WindowStats {
    /// Samples in the window.
    pub requests: u64,
    /// Failed samples in the window.
    pub failed: u64,
    /// Median latency of the window's successful samples (0 if none).
    pub p50_us: u64,
    /// 99th percentile latency of the window's successful samples (0 if none).
    pub p99_us: u64,
    /// Highest latency of the window's successful samples (0 if none).
    pub max_us: u64,
    /// Successful samples in the window.
    pub ok: u64,
}

/// Everything a finished load measured (see the module docs for the
/// accounting).
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// When the load started.
    pub started: Instant,
    /// How long it ran.
    pub elapsed: Duration,
    /// Requests attempted (`ok + failed()`).
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by kind.
    pub failures: BTreeMap<FailureKind, u64>,
    /// Pooled connections the server closed while the client still wanted them.
    pub server_closed_connections: u64,
    /// Latency (µs) of successful requests.
    pub histogram: Histogram<u64>,
    /// Successes by `baton-generation` (else `pid:<baton-pid>`, else `unknown`).
    pub per_generation: BTreeMap<String, u64>,
    /// Per-request records, at most [`LoadConfig::max_samples`], in completion order.
    pub samples: Vec<Sample>,
    /// Samples not retained because of [`LoadConfig::max_samples`].
    pub samples_dropped: u64,
    /// [`FailureKind::BadStatus`] failures by status code.
    pub bad_statuses: BTreeMap<u16, u64>,
    /// [`FailureKind::Other`] failures by description (at most 64 distinct).
    pub other_errors: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Number of failed requests (sum of [`LoadReport::failures`]).
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Failures of one kind.
    pub fn failures_of(&self, kind: FailureKind) -> u64 {
        self.failures.get(&kind).copied().unwrap_or(0)
    }

    /// Stats of the retained samples whose [`Sample::at`] is in `[from, to)`.
    pub fn window(&self, from: Instant, to: Instant) -> WindowStats {
        let mut stats = WindowStats::default();
        let mut latencies = Vec::new();
        for s in self.samples.iter().filter(|s| s.at >= from && s.at < to) {
            stats.requests += 1;
            match s.outcome {
                Outcome::Ok { .. } => latencies.push(s.latency_us),
                Outcome::Failed(_) => stats.failed += 1,
            }
        }
        stats.ok = latencies.len() as u64;
        latencies.sort_unstable();
        stats.p50_us = nearest_rank(&latencies, 0.50);
        stats.p99_us = nearest_rank(&latencies, 0.99);
        stats.max_us = latencies.last().copied().unwrap_or(0);
        stats
    }

    /// Summary as JSON (no samples): counts, failures by kind, latency
    /// percentiles (µs), per-generation counts, achieved rate.
    pub fn to_json(&self) -> serde_json::Value {
        let h = &self.histogram;
        let secs = self.elapsed.as_secs_f64();
        let failures: BTreeMap<&str, u64> = self.failures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let bad_statuses: BTreeMap<String, u64> = self.bad_statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        json!({
            "elapsed_s": secs,
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed(),
            "failures": failures,
            "server_closed_connections": self.server_closed_connections,
            "requests_per_s": if secs > 0.0 { self.requests as f64 / secs } else { 0.0 },
            "latency_us": {
                "count": h.len(),
                "min": h.min(),
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
                "mean": h.mean(),
            },
            "per_generation": self.per_generation,
            "bad_statuses": bad_statuses,
            "other_errors": self.other_errors,
            "samples": self.samples.len(),
            "samples_dropped": self.samples_dropped,
        })
    }
}

fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Live counters of a running [`Load`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Requests finished (ok or failed).
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// See [`LoadReport::server_closed_connections`].
    pub server_closed_connections: u64,
}

/// Why a load could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The target is not a loopback address.
    #[error("load target {addr} is not a loopback address: the load generator only targets 127.0.0.0/8 or ::1")]
    NotLoopback {
        /// The rejected address.
        addr: SocketAddr,
    },
    /// The path is not an origin-form request target.
    #[error("load path {path:?} is invalid: it must start with '/' and contain no whitespace or control characters")]
    BadPath {
        /// The rejected path.
        path: String,
    },
    /// `connections` out of range.
    #[error("load connections = {connections} is invalid: use at least 1 (and fewer than 2^32)")]
    Connections {
        /// The rejected count.
        connections: usize,
    },
    /// `rate` is `Some(0)`.
    #[error("load rate 0 requests/s never sends: use Some(n) with n >= 1, or None for closed loop")]
    ZeroRate,
    /// `Mode::Idle` with a zero interval.
    #[error("Mode::Idle interval is zero: use a positive interval (or Mode::KeepAlive for back-to-back requests)")]
    ZeroInterval,
    /// `request_timeout` is zero.
    #[error("load request_timeout is zero: every request would time out; use a positive timeout")]
    ZeroTimeout,
    /// The latency histogram could not be created.
    #[error("cannot create the latency histogram: {0}")]
    Histogram(String),
    /// The tokio runtime could not be built.
    #[error("cannot build the load generator's tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The load thread could not be spawned.
    #[error("cannot spawn the load generator thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What workers fill in while the load runs.
struct Collector {
    histogram: Histogram<u64>,
    failures: BTreeMap<FailureKind, u64>,
    per_generation: BTreeMap<String, u64>,
    samples: Vec<Sample>,
    samples_dropped: u64,
    max_samples: usize,
    bad_statuses: BTreeMap<u16, u64>,
    other_errors: BTreeMap<String, u64>,
}

impl Collector {
    fn sample(&mut self, sample: Sample) {
        if self.samples.len() < self.max_samples {
            self.samples.push(sample);
        } else {
            self.samples_dropped += 1;
        }
    }
}

/// State shared by the workers, the load thread and [`Load`].
struct Shared {
    requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    server_closed: AtomicU64,
    /// Requests claimed against `max_requests`.
    claimed: AtomicU64,
    max_requests: Option<u64>,
    collector: Mutex<Collector>,
    /// Threads blocked in [`Load::wait_for_ok`]: successes notify
    /// `ok_changed` only when someone waits.
    waiters: AtomicUsize,
    wait_lock: Mutex<()>,
    ok_changed: Condvar,
    finished: AtomicBool,
}

impl Shared {
    /// Takes one request from the `max_requests` budget.
    fn claim(&self) -> bool {
        match self.max_requests {
            None => true,
            Some(max) => self.claimed.fetch_add(1, Ordering::Relaxed) < max,
        }
    }

    fn collector(&self) -> MutexGuard<'_, Collector> {
        // Recording never panics while holding the lock, but a poisoned
        // lock must not lose the data either.
        self.collector.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn server_closed_connection(&self) {
        self.server_closed.fetch_add(1, Ordering::Relaxed);
    }

    fn record_ok(&self, at: Instant, latency: Duration, response: http::Response) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        debug_assert!((200..400).contains(&response.status));
        {
            let mut c = self.collector();
            c.histogram.saturating_record(latency_us);
            let key = match (&response.generation, &response.pid) {
                (Some(g), _) => g.clone(),
                (None, Some(pid)) => format!("pid:{pid}"),
                (None, None) => "unknown".to_owned(),
            };
            *c.per_generation.entry(key).or_default() += 1;
            c.sample(Sample { at, latency_us, outcome: Outcome::Ok { generation: response.generation } });
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.ok.fetch_add(1, Ordering::SeqCst);
        self.wake_waiters();
    }

    fn record_failure(&self, at: Instant, latency: Duration, failure: http::Failure) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        {
            let mut c = self.collector();
            *c.failures.entry(failure.kind).or_default() += 1;
            if let Some(status) = failure.status {
                *c.bad_statuses.entry(status).or_default() += 1;
            }
            if let Some(detail) = failure.detail {
                let key = if c.other_errors.len() < MAX_OTHER_KEYS || c.other_errors.contains_key(&detail) {
                    detail
                } else {
                    "(more)".to_owned()
                };
                *c.other_errors.entry(key).or_default() += 1;
            }
            c.sample(Sample { at, latency_us, outcome: Outcome::Failed(failure.kind) });
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.failed.fetch_add(1, Ordering::SeqCst);
    }

    fn wake_waiters(&self) {
        // A waiter registers in `waiters` before checking `ok` under
        // `wait_lock`; taking the lock here orders this notify after its
        // check, so no wakeup is lost.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.ok_changed.notify_all();
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            requests: self.requests.load(Ordering::SeqCst),
            ok: self.ok.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            server_closed_connections: self.server_closed.load(Ordering::SeqCst),
        }
    }
}

/// A running load. [`Load::stop`] ends it and returns the [`LoadReport`];
/// dropping it also stops it (and joins its thread).
pub struct Load {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<LoadReport>>,
    started: Instant,
}

impl fmt::Debug for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load").field("started", &self.started).field("progress", &self.progress()).finish()
    }
}

impl Load {
    /// Validates `config` and starts the load on its own thread.
    pub fn start(config: LoadConfig) -> Result<Load, LoadError> {
        config.validate()?;
        let histogram =
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).map_err(|e| LoadError::Histogram(format!("{e:?}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(LoadError::Runtime)?;
        let shared = Arc::new(Shared {
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            server_closed: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            max_requests: config.max_requests,
            collector: Mutex::new(Collector {
                histogram,
                failures: BTreeMap::new(),
                per_generation: BTreeMap::new(),
                samples: Vec::new(),
                samples_dropped: 0,
                max_samples: config.max_samples,
                bad_statuses: BTreeMap::new(),
                other_errors: BTreeMap::new(),
            }),
            waiters: AtomicUsize::new(0),
            wait_lock: Mutex::new(()),
            ok_changed: Condvar::new(),
            finished: AtomicBool::new(false),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("baton-load".to_owned())
            .spawn(move || run_load(runtime, config, thread_shared, stop_rx, started))
            .map_err(LoadError::Thread)?;
        Ok(Load { shared, stop, thread: Some(thread), started })
    }

    /// When the load started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Live counters.
    pub fn progress(&self) -> Progress {
        self.shared.progress()
    }

    /// Whether the load has ended by itself (`max_requests` or
    /// `max_duration` reached).
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Blocks until at least `n` more requests succeeded than at the time of
    /// the call; `false` if `timeout` passed or the load ended first.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let shared = &self.shared;
        let target = shared.ok.load(Ordering::SeqCst).saturating_add(n);
        let deadline = Instant::now() + timeout;
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = shared.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
        let reached = loop {
            if shared.ok.load(Ordering::SeqCst) >= target {
                break true;
            }
            if shared.finished.load(Ordering::SeqCst) {
                break false;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break false;
            };
            guard = shared.ok_changed.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(guard);
        shared.waiters.fetch_sub(1, Ordering::SeqCst);
        reached
    }

    /// Stops the load (abandoning requests in flight), joins its thread and
    /// returns the report.
    ///
    /// # Panics
    /// Re-raises a panic of the load thread (a bug in this module).
    pub fn stop(mut self) -> LoadReport {
        self.stop.send_replace(true);
        let thread = self.thread.take();
        match thread.map(JoinHandle::join) {
            Some(Ok(report)) => report,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            // `thread` is only taken here and in Drop, which runs after.
            None => unreachable!("Load::stop called twice"),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(thread) = self.thread.take() {
            // A panic of the load thread was already printed; dropping must
            // not panic in turn.
            let _ = thread.join();
        }
    }
}

/// Body of the load thread.
fn run_load(
    runtime: tokio::runtime::Runtime,
    config: LoadConfig,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    started: Instant,
) -> LoadReport {
    let tokio_started = tokio::time::Instant::from_std(started);
    let plan = Arc::new(worker::Plan::new(&config, tokio_started));
    let workers = config.connections;
    let max_duration = config.max_duration;
    runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for index in 0..workers {
            // `validate` checked that `connections` fits in a u32.
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            set.spawn(worker::run(Arc::clone(&plan), Arc::clone(&shared), index));
        }
        let deadline = tokio_started.checked_add(max_duration);
        let ends = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ends);
        loop {
            tokio::select! {
                // A stop request, or the Load dropped without one.
                _ = stop.changed() => break,
                () = &mut ends => break,
                joined = set.join_next() => match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Some(_) => {}
                },
            }
        }
        set.shutdown().await;
    });
    let elapsed = started.elapsed();
    drop(runtime);
    let progress = shared.progress();
    let report = {
        let mut c = shared.collector();
        LoadReport {
            started,
            elapsed,
            requests: progress.requests,
            ok: progress.ok,
            failures: std::mem::take(&mut c.failures),
            server_closed_connections: progress.server_closed_connections,
            histogram: c.histogram.clone(),
            per_generation: std::mem::take(&mut c.per_generation),
            samples: std::mem::take(&mut c.samples),
            samples_dropped: c.samples_dropped,
            bad_statuses: std::mem::take(&mut c.bad_statuses),
            other_errors: std::mem::take(&mut c.other_errors),
        }
    };
    shared.finished.store(true, Ordering::SeqCst);
    let _guard = shared.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.ok_changed.notify_all();
    report
}
