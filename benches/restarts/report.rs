//! The outputs: a markdown table (stdout and docs/bench/restarts.md), JSON,
//! and the machine the numbers were measured on.

use std::fmt::Write as _;
use std::process::Command;
use std::time::SystemTime;

use super::analysis::{Analysis, ms, summary};

/// The machine the benchmark ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub systemd: String,
    /// UTC, `YYYY-MM-DD`.
    pub date: String,
}

impl Machine {
    /// Reads uname, /proc/cpuinfo and `systemctl --version`;
    /// `testbed_systemd` is the version the testbeds reported, used when
    /// the host's `systemctl` does not answer.
    pub fn detect(testbed_systemd: Option<u32>) -> Machine {
        let kernel = rustix::system::uname().release().to_string_lossy().into_owned();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = cpuinfo.lines().filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor")).count();
        let cpus = if cpus > 0 { cpus } else { std::thread::available_parallelism().map_or(0, |n| n.get()) };
        let systemd = Command::new("systemctl")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
            .and_then(|l| l.strip_prefix("systemd ").map(str::to_owned))
            .or_else(|| testbed_systemd.map(|v| v.to_string()))
            .unwrap_or_else(|| "unknown".into());
        Machine { kernel, cpu_model, cpus, systemd, date: utc_date(SystemTime::now()) }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel,
            "cpu_model": self.cpu_model,
            "cpus": self.cpus,
            "systemd": self.systemd,
            "date": self.date,
        })
    }

    pub fn line(&self) -> String {
        format!(
            "Linux {}, {} × {} CPUs, systemd {}, {}",
            self.kernel, self.cpu_model, self.cpus, self.systemd, self.date
        )
    }
}

/// `YYYY-MM-DD` (UTC) of `t` (days-to-civil, proleptic Gregorian).
fn utc_date(t: SystemTime) -> String {
    let days = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn triple(p50: u64, p99: u64, max: u64) -> String {
    format!("{} / {} / {}", fmt_ms(p50), fmt_ms(p99), fmt_ms(max))
}

/// Milliseconds with 2–3 significant decimals, compact for the table.
fn fmt_ms(us: u64) -> String {
    let v = ms(us);
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.0}") }
}

/// The markdown table of all setups.
pub fn table(results: &[Analysis]) -> String {
    let mut t = String::new();
    t.push_str(
        "| # | setup | restart by | requests | failed | server-closed connections | \
         restart windows p50 / p99 / max (ms) | steady state p50 / p99 / max (ms) | \
         restart → first response from the new generation median / p90 / max (ms) |\n",
    );
    t.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|\n");
    for a in results {
        let failed = if a.failures.is_empty() {
            "0".to_owned()
        } else {
            let kinds: Vec<String> = a.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{} ({})", a.failed, kinds.join(", "))
        };
        let (s50, s90, smax) = summary(&a.to_serving_us);
        let _ = writeln!(
            t,
            "| {} | {} | `{}` | {} | {} | {} | {} | {} | {} |",
            a.kind.label(),
            a.kind.title(),
            a.kind.restart_command(),
            a.requests,
            failed,
            a.server_closed,
            triple(a.window.p50_us, a.window.p99_us, a.window.max_us),
            triple(a.steady.p50_us, a.steady.p99_us, a.steady.max_us),
            triple(s50, s90, smax),
        );
    }
    t
}

/// The rows of one restart split: (what, values in µs).
fn split_rows(a: &Analysis) -> Vec<(&'static str, Vec<u64>)> {
    let us = |v: u64| v * 1000;
    let reports = &a.reports;
    let proven: Vec<_> =
        reports.iter().filter_map(|r| Some((r.ready_ms, r.took_traffic_ms?, r.probation_ms?))).collect();
    vec![
        ("ready: spawn → READY=1", reports.iter().map(|r| us(r.ready_ms)).collect()),
        ("probes + quiet period: READY=1 → flip", proven.iter().map(|(r, t, _)| us(t.saturating_sub(*r))).collect()),
        ("spawn → new generation takes all traffic (the flip)", proven.iter().map(|(_, t, _)| us(*t)).collect()),
        ("probation: flip → old generation asked to drain", proven.iter().map(|(_, _, p)| us(*p)).collect()),
        ("restart command → first response from the new generation (load)", a.to_serving_us.clone()),
        ("restart command → `baton restart` returned", a.command_us.clone()),
    ]
}

/// The restart split of the setups whose `baton restart` reported it
/// (standalone); empty when none did.
pub fn split_table(results: &[Analysis]) -> String {
    let mut t = String::new();
    for a in results.iter().filter(|a| !a.reports.is_empty()) {
        if t.is_empty() {
            t.push_str("| # | phase | restarts | median / p90 / max (ms) |\n|---|---|--:|--:|\n");
        }
        for (what, values) in split_rows(a) {
            let (m, p90, max) = summary(&values);
            let _ = writeln!(t, "| {} | {what} | {} | {} |", a.kind.label(), values.len(), triple(m, p90, max));
        }
    }
    t
}

/// PASS/MISS lines for the targets of issue 6.
pub fn targets(results: &[Analysis]) -> String {
    let mut t = String::new();
    for a in results {
        for target in &a.targets {
            let _ = writeln!(
                t,
                "- {} **{}** — {}. {}: {}",
                if target.pass { "PASS" } else { "MISS" },
                a.kind.key(),
                a.kind.label(),
                target.what,
                target.detail
            );
        }
    }
    t
}

/// The whole JSON document.
pub fn json(
    params: &serde_json::Value,
    machine: &Machine,
    results: &[Analysis],
    errors: &[String],
) -> serde_json::Value {
    let setups: Vec<serde_json::Value> = results
        .iter()
        .map(|a| {
            let (s50, s90, smax) = summary(&a.to_serving_us);
            let (c50, c90, cmax) = summary(&a.command_us);
            serde_json::json!({
                "label": a.kind.label(),
                "key": a.kind.key(),
                "title": a.kind.title(),
                "restart_command": a.kind.restart_command(),
                "systemd_version": a.systemd_version,
                "requests": a.requests,
                "ok": a.ok,
                "failed": a.failed,
                "failures": a.failures,
                "server_closed_connections": a.server_closed,
                "samples_dropped": a.samples_dropped,
                "restart_windows": a.window.to_json(),
                "restart_windows_until_new_generation_served": a.window_starting.to_json(),
                "restart_windows_tail_after_it": a.window_after.to_json(),
                "steady_state": a.steady.to_json(),
                "restart_to_serving_ms": {
                    "median": ms(s50), "p90": ms(s90), "max": ms(smax),
                    "from_probe_not_load": a.served_from_probe,
                },
                "restart_command_ms": { "median": ms(c50), "p90": ms(c90), "max": ms(cmax) },
                "restart_split_ms": split_rows(a).into_iter().filter(|_| !a.reports.is_empty()).map(|(what, v)| {
                    let (m, p90, max) = summary(&v);
                    serde_json::json!({ "phase": what, "median": ms(m), "p90": ms(p90), "max": ms(max) })
                }).collect::<Vec<_>>(),
                "restarts": a.generations.iter().zip(&a.to_serving_us).zip(&a.command_us)
                    .map(|(((old, new), serving), command)| serde_json::json!({
                        "old_generation": old, "new_generation": new,
                        "command_ms": ms(*command), "to_serving_ms": ms(*serving),
                    }))
                    .collect::<Vec<_>>(),
                "targets": a.targets.iter().map(|t| serde_json::json!({
                    "target": t.what, "pass": t.pass, "detail": t.detail,
                })).collect::<Vec<_>>(),
                "loads": a.loads.iter().map(|(mode, j)| serde_json::json!({ "mode": mode, "stats": j }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "benchmark": "restarts",
        "params": params,
        "machine": machine.to_json(),
        "setups": setups,
        "errors": errors,
    })
}
