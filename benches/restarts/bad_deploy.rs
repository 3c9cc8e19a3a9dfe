//! A bad deploy under load (issue 12): the deploy switches baton-httpd's
//! root to a broken release, whose every file request answers 404 while
//! the process starts, sends READY=1 and answers its built-in `/healthz`
//! like a good one (a liveness check alone would pass it). The load asks
//! for the release's file, `GET /index.html`.
//!
//! Compared: systemd's stop→start with socket activation and the fd-store
//! handoff (setup 3: the best systemd alone does on a good restart), Baton
//! standalone proving the candidate with `--health-http /index.html` over
//! its private probe socket while steering keeps real traffic on the old
//! generation (the default), and the same with `--steering off` (shared
//! accept: the candidate takes real connections from READY=1 until its
//! probe fails).
//!
//! Each bad deploy is observed for a fixed window from its command (the
//! restart command returns inside it); a request counts when it was in
//! flight in that window. After the window the good release is put back
//! and, if the broken one serves, restarted (a rollback, not counted).

use std::time::{Duration, Instant};

use baton_testbed::load::{FailureKind, LoadReport, Outcome};

use super::analysis::{ms, summary};
use super::setups::{Bins, Deployment, INDEX_PATH, Options, Release, SetupKind, WAIT, fetch, probe_generation};

/// One of the compared bad-deploy setups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// Setup 3: socket activation + fd-store handoff, `systemctl restart`.
    Systemd,
    /// Baton standalone, `--health-http /index.html`, steering (default).
    Baton,
    /// Baton standalone, `--health-http /index.html`, `--steering off`.
    BatonShared,
}

impl BadKind {
    pub const ALL: [BadKind; 3] = [BadKind::Systemd, BadKind::Baton, BadKind::BatonShared];

    /// The row's label.
    pub fn label(self) -> &'static str {
        match self {
            BadKind::Systemd => "B3",
            BadKind::Baton => "B5",
            BadKind::BatonShared => "B5s",
        }
    }

    /// Short machine-readable name (JSON key, `BATON_BENCH_SETUPS`).
    pub fn key(self) -> &'static str {
        match self {
            BadKind::Systemd => "bad-socket-activation-handoff",
            BadKind::Baton => "bad-baton-steered",
            BadKind::BatonShared => "bad-baton-shared-accept",
        }
    }

    /// For the table.
    pub fn title(self) -> &'static str {
        match self {
            BadKind::Systemd => "socket activation + fd-store handoff (setup 3), Type=notify",
            BadKind::Baton => "Baton standalone, --health-http /index.html, steering (default)",
            BadKind::BatonShared => "Baton standalone, --health-http /index.html, --steering off (shared accept)",
        }
    }

    /// The deployment it runs on.
    pub fn setup(self) -> SetupKind {
        match self {
            BadKind::Systemd => SetupKind::FdStoreHandoff,
            BadKind::Baton | BadKind::BatonShared => SetupKind::BatonStandalone,
        }
    }

    fn options(self) -> Options {
        let mut baton_args: Vec<String> = match self {
            BadKind::Systemd => Vec::new(),
            BadKind::Baton | BadKind::BatonShared => vec!["--health-http".into(), INDEX_PATH.into()],
        };
        if self == BadKind::BatonShared {
            baton_args.extend(["--steering".into(), "off".into()]);
        }
        Options { releases: true, baton_args }
    }

    /// Parses a `BATON_BENCH_SETUPS` entry (label or key, any case).
    pub fn parse(s: &str) -> Option<BadKind> {
        let s = s.trim();
        Self::ALL.into_iter().find(|k| k.key().eq_ignore_ascii_case(s) || k.label().eq_ignore_ascii_case(s))
    }
}

/// One bad deploy, as driven.
#[derive(Debug, Clone)]
pub struct Deploy {
    pub t_cmd: Instant,
    pub t_returned: Instant,
    /// The observation window ended.
    pub t_end: Instant,
    /// The restart command exited 0 (the deploy was not refused).
    pub accepted: bool,
    pub exit_code: Option<i32>,
    /// The first line of the command's output (Baton's reason when it
    /// refused).
    pub first_line: String,
}

/// Counts over the observation windows of one setup's bad deploys.
#[derive(Debug, Clone, Default)]
pub struct BadResult {
    pub kind: Option<BadKind>,
    pub deploys: Vec<Deploy>,
    pub requests: u64,
    pub failed: u64,
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Complete answers that were not 2xx/3xx.
    pub non_2xx: u64,
    /// Failed requests per deploy.
    pub failed_per_deploy: Vec<u64>,
    /// Last failed request's end, after its deploy command (µs), per deploy
    /// with a failure.
    pub last_failure_us: Vec<u64>,
    pub observe: Duration,
}

/// Sums what the loads recorded in each deploy's observation window.
pub fn analyse(kind: BadKind, deploys: Vec<Deploy>, loads: &[LoadReport], observe: Duration) -> BadResult {
    let mut r = BadResult { kind: Some(kind), observe, ..BadResult::default() };
    for d in &deploys {
        let mut failed_here = 0;
        let mut last = None;
        for s in loads.iter().flat_map(|l| l.samples.iter()) {
            let end = s.at + Duration::from_micros(s.latency_us);
            if end < d.t_cmd || s.at >= d.t_end {
                continue;
            }
            r.requests += 1;
            if let Outcome::Failed(why) = &s.outcome {
                failed_here += 1;
                *r.failures.entry(why.to_string()).or_insert(0) += 1;
                if *why == FailureKind::BadStatus {
                    r.non_2xx += 1;
                }
                last = last.max(Some(end.saturating_duration_since(d.t_cmd).as_micros() as u64));
            }
        }
        r.failed += failed_here;
        r.failed_per_deploy.push(failed_here);
        r.last_failure_us.extend(last);
    }
    r.deploys = deploys;
    r
}

/// Starts `kind`'s deployment, runs the loads `start_loads` makes against
/// its port, deploys the broken release `count` times and tears it down.
pub fn run(
    kind: BadKind,
    bins: &Bins,
    count: usize,
    observe: Duration,
    settle: Duration,
    start_loads: &dyn Fn(u16) -> Result<Vec<baton_testbed::load::Load>, String>,
) -> (Option<BadResult>, Vec<String>) {
    let mut errors = Vec::new();
    let mut d = match Deployment::start_with(kind.setup(), bins, &kind.options()) {
        Ok(d) => d,
        Err(e) => return (None, vec![format!("bad deploy {} ({}): start: {e}", kind.label(), kind.key())]),
    };
    let result = match start_loads(d.port()).and_then(|loads| drive(&mut d, count, observe, settle, loads)) {
        Ok((deploys, reports)) => Some(analyse(kind, deploys, &reports, observe)),
        Err(e) => {
            errors.push(format!("bad deploy {} ({}): {e}\n{}", kind.label(), kind.key(), d.diagnostics()));
            None
        }
    };
    if let Err(e) = d.teardown() {
        errors.push(format!("bad deploy {} ({}): teardown: {e}", kind.label(), kind.key()));
    }
    (result, errors)
}

/// Waits until the good release answers on `port` (bounded by [`WAIT`]).
fn wait_good(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match fetch(port, INDEX_PATH) {
            Ok((200, _)) => return Ok(()),
            Ok((status, g)) => format!("{status} from generation {g:?}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("the good release did not answer {INDEX_PATH} within {WAIT:?} (last: {last})"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drive(
    d: &mut Deployment,
    count: usize,
    observe: Duration,
    settle: Duration,
    loads: Vec<baton_testbed::load::Load>,
) -> Result<(Vec<Deploy>, Vec<LoadReport>), String> {
    let port = d.port();
    for load in &loads {
        if !load.wait_for_ok(10, WAIT) {
            let pr = load.progress();
            return Err(format!("a load got no 10 successful requests within {WAIT:?} ({pr:?})"));
        }
    }
    wait_good(port)?;
    std::thread::sleep(settle * 2);
    let mut deploys = Vec::with_capacity(count);
    for i in 1..=count {
        probe_generation(port).map_err(|e| format!("before bad deploy {i}: not serving: {e}"))?;
        d.prepare_restart().map_err(|e| format!("before bad deploy {i}: {e}"))?;
        d.switch_release(Release::Broken)?;
        let t_cmd = Instant::now();
        let attempt = d.try_restart().map_err(|e| format!("bad deploy {i}: {e}"))?;
        let t_returned = Instant::now();
        if let Some(left) = (t_cmd + observe).checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        let t_end = Instant::now();
        let first_line = attempt.output.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().to_owned();
        eprintln!(
            "restarts:   bad deploy {i}/{count}: exit {:?} after {:.0?}: {first_line}",
            attempt.code,
            t_returned - t_cmd
        );
        deploys.push(Deploy {
            t_cmd,
            t_returned,
            t_end,
            accepted: attempt.success,
            exit_code: attempt.code,
            first_line,
        });
        // Roll back (not counted): the good release again, and a restart
        // if the broken one is what serves.
        d.switch_release(Release::Good)?;
        if !matches!(fetch(port, INDEX_PATH), Ok((200, _))) {
            d.prepare_restart().map_err(|e| format!("before rollback {i}: {e}"))?;
            d.restart().map_err(|e| format!("rollback {i}: {e}"))?;
        }
        wait_good(port).map_err(|e| format!("after bad deploy {i}: {e}"))?;
        std::thread::sleep(settle);
    }
    Ok((deploys, loads.into_iter().map(|l| l.stop()).collect()))
}

/// The markdown table of the bad deploys.
pub fn table(results: &[BadResult]) -> String {
    let mut t = String::new();
    t.push_str(
        "| # | setup | deploy by | bad deploys | requests | failed | non-2xx answers | refused? (exit code) | \
         time to the verdict median / max (ms) | last failure after the command, max (ms) |\n",
    );
    t.push_str("|---|---|---|--:|--:|--:|--:|---|--:|--:|\n");
    for r in results {
        let Some(kind) = r.kind else { continue };
        let failed = if r.failures.is_empty() {
            "0".to_owned()
        } else {
            let kinds: Vec<String> = r.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{} ({})", r.failed, kinds.join(", "))
        };
        let refused = r.deploys.iter().filter(|d| !d.accepted).count();
        let mut codes: Vec<String> = r.deploys.iter().map(|d| format!("{:?}", d.exit_code.unwrap_or(-1))).collect();
        codes.dedup();
        let verdict_us: Vec<u64> =
            r.deploys.iter().filter(|d| !d.accepted).map(|d| (d.t_returned - d.t_cmd).as_micros() as u64).collect();
        let (v50, _, vmax) = summary(&verdict_us);
        let verdict = if refused == 0 {
            let returned: Vec<u64> = r.deploys.iter().map(|d| (d.t_returned - d.t_cmd).as_micros() as u64).collect();
            let (c50, _, _) = summary(&returned);
            format!("none: exit 0 after {:.0} ms, the broken release serves", ms(c50))
        } else {
            format!("{:.0} / {:.0}", ms(v50), ms(vmax))
        };
        let refused_text = if refused == r.deploys.len() {
            format!("yes, {refused} of {} (exit {})", r.deploys.len(), codes.join(", "))
        } else if refused == 0 {
            format!("no (exit {})", codes.join(", "))
        } else {
            format!("{refused} of {} (exit {})", r.deploys.len(), codes.join(", "))
        };
        let last = r.last_failure_us.iter().max().map_or("–".to_owned(), |us| format!("{:.0}", ms(*us)));
        t.push_str(&format!(
            "| {} | {} | `{}` | {} | {} | {} | {} | {} | {} | {} |\n",
            kind.label(),
            kind.title(),
            kind.setup().restart_command(),
            r.deploys.len(),
            r.requests,
            failed,
            r.non_2xx,
            refused_text,
            verdict,
            last,
        ));
    }
    t
}

/// The JSON of one setup's bad deploys.
pub fn json(r: &BadResult) -> serde_json::Value {
    let kind = r.kind.unwrap_or(BadKind::Systemd);
    serde_json::json!({
        "label": kind.label(),
        "key": kind.key(),
        "title": kind.title(),
        "deploy_command": kind.setup().restart_command(),
        "observe_ms": r.observe.as_millis() as u64,
        "requests": r.requests,
        "failed": r.failed,
        "failures": r.failures,
        "non_2xx": r.non_2xx,
        "deploys": r.deploys.iter().zip(&r.failed_per_deploy).map(|(d, failed)| serde_json::json!({
            "refused": !d.accepted,
            "exit_code": d.exit_code,
            "command_ms": ms((d.t_returned - d.t_cmd).as_micros() as u64),
            "failed": failed,
            "output_first_line": d.first_line,
        })).collect::<Vec<_>>(),
    })
}
