//! From the load generator's samples and the restart times to the numbers
//! of the table: restart windows versus steady state, and how long each
//! restart took until the new generation served.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::load::{LoadReport, Outcome, Sample};
use super::setups::{RestartReport, SetupKind};

/// One restart, as the benchmark drove it.
#[derive(Debug, Clone)]
pub struct Restart {
    /// The restart command was issued.
    pub t_cmd: Instant,
    /// It returned.
    pub t_returned: Instant,
    /// The benchmark's own probe first saw the new generation (fallback
    /// when no load sample did).
    pub t_probe: Instant,
    /// The generation serving before.
    pub old: String,
    /// The generation started by this restart.
    pub new: String,
    /// What `baton restart` reported (standalone only).
    pub report: Option<RestartReport>,
}

/// Everything one setup's run produced.
pub struct Run {
    pub kind: SetupKind,
    pub systemd_version: Option<u32>,
    /// Warm-up ended: samples before are left out of the latency figures.
    pub steady_from: Instant,
    /// The last restart's settle time ended.
    pub steady_to: Instant,
    pub restarts: Vec<Restart>,
    /// (mode, report) for each concurrent load.
    pub loads: Vec<(&'static str, LoadReport)>,
}

/// Latency of successful requests in a set of samples, and failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Lat {
    fn of(mut latencies: Vec<u64>, failed: u64) -> Lat {
        latencies.sort_unstable();
        Lat {
            ok: latencies.len() as u64,
            failed,
            p50_us: percentile(&latencies, 0.50),
            p99_us: percentile(&latencies, 0.99),
            max_us: latencies.last().copied().unwrap_or(0),
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": ms(self.p50_us),
            "p99_ms": ms(self.p99_us),
            "max_ms": ms(self.max_us),
        })
    }
}

/// Successful latencies and failures, split into restart windows and
/// steady state.
#[derive(Default)]
struct Split {
    window: Vec<u64>,
    steady: Vec<u64>,
    window_failed: u64,
    steady_failed: u64,
}

impl Split {
    fn push(&mut self, in_window: bool, ok: bool, latency_us: u64) {
        match (in_window, ok) {
            (true, true) => self.window.push(latency_us),
            (true, false) => self.window_failed += 1,
            (false, true) => self.steady.push(latency_us),
            (false, false) => self.steady_failed += 1,
        }
    }

    /// (restart windows, steady state).
    fn finish(self) -> (Lat, Lat) {
        (Lat::of(self.window, self.window_failed), Lat::of(self.steady, self.steady_failed))
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds as milliseconds.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A target of issue 6 and whether this run met it.
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub pass: bool,
    pub detail: String,
}

/// One point of the plot: seconds since the steady state started, latency.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub t_s: f64,
    pub latency_us: u64,
    pub failed: bool,
}

/// What the SVG needs of a run.
#[derive(Debug, Clone, Default)]
pub struct Plot {
    pub duration_s: f64,
    pub points: Vec<Point>,
    /// (command issued, new generation serving), seconds since the start.
    pub restarts: Vec<(f64, f64)>,
}

/// The numbers of one setup.
pub struct Analysis {
    pub kind: SetupKind,
    pub systemd_version: Option<u32>,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub server_closed: u64,
    pub samples_dropped: u64,
    /// Requests in flight during a restart window.
    pub window: Lat,
    /// The other requests after warm-up.
    pub steady: Lat,
    /// Window requests scheduled before the new generation's first response.
    pub window_starting: Lat,
    /// Window requests scheduled after it (the tail).
    pub window_after: Lat,
    /// Restart command → first response of the new generation, per restart.
    pub to_serving_us: Vec<u64>,
    /// What `baton restart` reported, per restart that reported it.
    pub reports: Vec<RestartReport>,
    /// Restarts whose new generation no load sample saw (the benchmark's
    /// probe time was used).
    pub served_from_probe: usize,
    /// How long the restart command itself took, per restart.
    pub command_us: Vec<u64>,
    /// (old, new) generation of each restart.
    pub generations: Vec<(String, String)>,
    pub targets: Vec<Target>,
    pub loads: Vec<(&'static str, serde_json::Value)>,
    pub plot: Plot,
}

fn generation_of(s: &Sample) -> Option<String> {
    match &s.outcome {
        Outcome::Ok { generation, .. } => generation.as_ref().map(|g| g.to_string()),
        _ => None,
    }
}

fn is_ok(s: &Sample) -> bool {
    matches!(s.outcome, Outcome::Ok { .. })
}

/// Computes the table's numbers; `tail` extends each restart window past
/// the new generation's first response.
pub fn analyse(run: &Run, tail: Duration) -> Analysis {
    let samples: Vec<&Sample> = run.loads.iter().flat_map(|(_, r)| r.samples.iter()).collect();
    let done = |s: &Sample| s.at + Duration::from_micros(s.latency_us);

    // The first response of each new generation.
    let by_gen: HashMap<&str, usize> = run.restarts.iter().enumerate().map(|(i, r)| (r.new.as_str(), i)).collect();
    let mut first: Vec<Option<Instant>> = vec![None; run.restarts.len()];
    for s in &samples {
        if let Some(g) = generation_of(s)
            && let Some(&i) = by_gen.get(g.as_str())
        {
            let t = done(s);
            if first[i].is_none_or(|f| t < f) {
                first[i] = Some(t);
            }
        }
    }
    let mut served_from_probe = 0;
    let served: Vec<Instant> = run
        .restarts
        .iter()
        .zip(&first)
        .map(|(r, f)| {
            f.unwrap_or_else(|| {
                served_from_probe += 1;
                r.t_probe
            })
        })
        .collect();
    // Until the later of the first response and the command's return: a
    // proven Baton restart returns after its probation, when the old
    // generation is asked to drain and hands its idle connections over.
    let windows: Vec<(Instant, Instant)> =
        run.restarts.iter().zip(&served).map(|(r, s)| (r.t_cmd, (*s).max(r.t_returned) + tail)).collect();

    // A request belongs to a restart window when it was in flight during
    // one: open-loop latency counts from the scheduled send time.
    let mut all = Split::default();
    let mut per_load = Vec::new();
    // Within the windows: scheduled before the new generation's first
    // response, or in the tail after it.
    let (mut starting, mut after) = (Split::default(), Split::default());
    let mut plot = Plot { duration_s: secs(run.steady_from, run.steady_to), ..Plot::default() };
    for (mode, report) in &run.loads {
        let mut split = Split::default();
        for s in &report.samples {
            if s.at < run.steady_from || s.at >= run.steady_to {
                continue;
            }
            let end = done(s);
            let window = windows.iter().position(|(from, to)| s.at < *to && end >= *from);
            let ok = is_ok(s);
            split.push(window.is_some(), ok, s.latency_us);
            all.push(window.is_some(), ok, s.latency_us);
            if let Some(i) = window {
                if s.at < served[i] { &mut starting } else { &mut after }.push(true, ok, s.latency_us);
            }
            plot.points.push(Point { t_s: secs(run.steady_from, s.at), latency_us: s.latency_us, failed: !ok });
        }
        let (w, st) = split.finish();
        per_load.push((*mode, w, st));
    }
    plot.restarts = run
        .restarts
        .iter()
        .zip(&served)
        .map(|(r, s)| (secs(run.steady_from, r.t_cmd), secs(run.steady_from, *s)))
        .collect();

    let mut failures = BTreeMap::new();
    let (mut requests, mut ok, mut server_closed, mut samples_dropped) = (0, 0, 0, 0);
    for (_, r) in &run.loads {
        requests += r.requests;
        ok += r.ok;
        server_closed += r.server_closed_connections;
        samples_dropped += r.samples_dropped;
        for (kind, n) in &r.failures {
            *failures.entry(kind.to_string()).or_insert(0) += n;
        }
    }
    let failed = failures.values().sum();
    let (window, steady) = all.finish();
    let to_serving_us = run
        .restarts
        .iter()
        .zip(&served)
        .map(|(r, s)| s.saturating_duration_since(r.t_cmd).as_micros() as u64)
        .collect();
    let command_us = run.restarts.iter().map(|r| (r.t_returned - r.t_cmd).as_micros() as u64).collect();

    let mut targets = Vec::new();
    if run.kind.wants_zero_failures() {
        targets.push(Target {
            what: "zero failed requests".into(),
            pass: failed == 0,
            detail: format!("{failed} failed"),
        });
        targets.push(Target {
            what: "zero server-closed connections".into(),
            pass: server_closed == 0,
            detail: format!("{server_closed} closed"),
        });
    }
    if run.kind.wants_flat_latency() {
        let limit = steady.p99_us as f64 * 1.5;
        targets.push(Target {
            what: "restart-window p99 ≤ 1.5× steady p99".into(),
            pass: window.ok > 0 && steady.ok > 0 && window.p99_us as f64 <= limit,
            detail: format!(
                "{:.3} ms vs {:.3} ms (×{:.2})",
                ms(window.p99_us),
                ms(steady.p99_us),
                window.p99_us as f64 / steady.p99_us.max(1) as f64
            ),
        });
    }

    Analysis {
        kind: run.kind,
        systemd_version: run.systemd_version,
        requests,
        ok,
        failed,
        failures,
        server_closed,
        samples_dropped,
        window,
        steady,
        to_serving_us,
        reports: run.restarts.iter().filter_map(|r| r.report).collect(),
        served_from_probe,
        command_us,
        generations: run.restarts.iter().map(|r| (r.old.clone(), r.new.clone())).collect(),
        targets,
        window_starting: starting.finish().0,
        window_after: after.finish().0,
        loads: run
            .loads
            .iter()
            .zip(per_load)
            .map(|((mode, r), (_, w, st))| {
                let json = serde_json::json!({
                    "restart_windows": w.to_json(),
                    "steady_state": st.to_json(),
                    "load_report": r.to_json(),
                });
                (*mode, json)
            })
            .collect(),
        plot,
    }
}

fn secs(from: Instant, to: Instant) -> f64 {
    if to >= from { (to - from).as_secs_f64() } else { -(from - to).as_secs_f64() }
}

/// (median, p90, max) of unsorted microsecond values.
pub fn summary(values: &[u64]) -> (u64, u64, u64) {
    let mut v = values.to_vec();
    v.sort_unstable();
    (percentile(&v, 0.5), percentile(&v, 0.9), v.last().copied().unwrap_or(0))
}
