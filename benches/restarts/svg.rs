//! A hand-written SVG of latency over time: one panel per setup, every
//! request a dot (log scale), failures in red, restart windows shaded.
//!
//! Dots are snapped to a 2-pixel grid and drawn once per grid cell, so the
//! file stays small (tens of KiB per panel) without hiding any outlier: a
//! cell shows up as soon as one request landed in it.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::analysis::{Analysis, ms, summary};

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const HEADER: f64 = 72.0;
const PANEL: f64 = 208.0;
const TITLE: f64 = 34.0;
const PLOT_H: f64 = 140.0;
/// Latency axis, log10 of microseconds: 10 µs to 10 s.
const Y_MIN: f64 = 1.0;
const Y_MAX: f64 = 7.0;
/// Grid the dots are snapped to, in pixels.
const CELL: f64 = 2.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG document for all panels; `subtitle` (two lines) says what was
/// run where.
pub fn render(results: &[Analysis], subtitle: [&str; 2]) -> String {
    let height = HEADER + PANEL * results.len() as f64 + 8.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r##"<rect width="{WIDTH}" height="{height}" fill="#fff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">Latency of every request across restarts</text>"#
    );
    for (line, y) in subtitle.iter().zip([34, 48]) {
        let _ = writeln!(s, r##"<text x="{LEFT}" y="{y}" fill="#555">{}</text>"##, esc(line));
    }
    let _ = writeln!(
        s,
        r##"<g transform="translate({LEFT},58)"><path d="M0 4h0" stroke="#1f77b4" stroke-width="4" stroke-linecap="round"/><text x="8" y="8">successful request (open-loop latency)</text><path d="M380 4h0" stroke="#d62728" stroke-width="5" stroke-linecap="round"/><text x="388" y="8">failed request</text><rect x="490" y="-1" width="12" height="10" fill="#ffc078" opacity="0.6"/><line x1="490" y1="-1" x2="490" y2="9" stroke="#e8590c"/><text x="508" y="8">restart command → first response of the new generation</text></g>"##
    );
    for (i, a) in results.iter().enumerate() {
        let top = HEADER + PANEL * i as f64;
        let p = &a.plot;
        let duration = p.duration_s.max(0.001);
        let x = |t: f64| (t / duration).clamp(0.0, 1.0) * plot_w;
        let y = |us: u64| {
            let l = (us.max(1) as f64).log10().clamp(Y_MIN, Y_MAX);
            PLOT_H - (l - Y_MIN) / (Y_MAX - Y_MIN) * PLOT_H
        };
        let _ = writeln!(s, r#"<g transform="translate({LEFT},{top})">"#);
        let title = format!("{}. {} — {}", a.kind.label(), a.kind.title(), a.kind.restart_command());
        let _ = writeln!(s, r#"<text x="0" y="14" font-size="12" font-weight="bold">{}</text>"#, esc(&title));
        let summary = format!(
            "{} requests, {} failed, {} server-closed connections · p99 {} ms in restart windows, {} ms steady · \
             restart → serving {} ms (median)",
            a.requests,
            a.failed,
            a.server_closed,
            short(ms(a.window.p99_us)),
            short(ms(a.steady.p99_us)),
            short(ms(summary(&a.to_serving_us).0)),
        );
        let _ = writeln!(s, r##"<text x="0" y="28" fill="#333">{}</text>"##, esc(&summary));
        let _ = writeln!(s, r#"<g transform="translate(0,{TITLE})">"#);
        let _ = writeln!(s, r##"<rect width="{plot_w}" height="{PLOT_H}" fill="#fbfbfb" stroke="#bbb"/>"##);
        // Restart windows, under the dots.
        for (cmd, served) in &p.restarts {
            let (x0, x1) = (x(*cmd), x(*served));
            let _ = write!(
                s,
                r##"<rect x="{x0:.1}" width="{:.1}" height="{PLOT_H}" fill="#ffc078" opacity="0.6"/><line x1="{x0:.1}" x2="{x0:.1}" y2="{PLOT_H}" stroke="#e8590c" stroke-width="0.6"/>"##,
                (x1 - x0).max(1.0)
            );
        }
        s.push('\n');
        // Decades.
        for d in (Y_MIN as i32)..=(Y_MAX as i32) {
            let yy = PLOT_H - (f64::from(d) - Y_MIN) / (Y_MAX - Y_MIN) * PLOT_H;
            let label = match d {
                1 => "0.01 ms",
                2 => "0.1 ms",
                3 => "1 ms",
                4 => "10 ms",
                5 => "100 ms",
                6 => "1 s",
                _ => "10 s",
            };
            let _ = write!(
                s,
                r##"<line x2="{plot_w}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e3e3"/><text x="-4" y="{:.1}" text-anchor="end" fill="#555">{label}</text>"##,
                yy + 4.0
            );
        }
        s.push('\n');
        // Seconds.
        let step = if duration > 60.0 {
            10.0
        } else if duration > 20.0 {
            5.0
        } else if duration > 5.0 {
            1.0
        } else {
            0.5
        };
        let mut t = 0.0;
        while t <= duration + 1e-9 {
            let xx = x(t);
            let _ = write!(
                s,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{PLOT_H}" y2="{:.1}" stroke="#888"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                PLOT_H + 4.0,
                PLOT_H + 15.0,
                short(t)
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r##"<text x="{plot_w}" y="{:.1}" text-anchor="end" fill="#555">s since steady state</text>"##,
            PLOT_H + 28.0
        );
        // The dots: successful ones first, failures on top.
        for failed in [false, true] {
            let cells: BTreeSet<(u32, u32)> = p
                .points
                .iter()
                .filter(|pt| pt.failed == failed)
                .map(|pt| ((x(pt.t_s) / CELL).round() as u32, (y(pt.latency_us) / CELL).round() as u32))
                .collect();
            if cells.is_empty() {
                continue;
            }
            let (color, width, opacity) = if failed { ("#d62728", 4.0, 0.9) } else { ("#1f77b4", 2.2, 0.5) };
            let _ = write!(
                s,
                r#"<path fill="none" stroke="{color}" stroke-width="{width}" stroke-linecap="round" opacity="{opacity}" d=""#
            );
            for (cx, cy) in cells {
                let _ = write!(s, "M{} {}h0", f64::from(cx) * CELL, f64::from(cy) * CELL);
            }
            s.push_str("\"/>\n");
        }
        s.push_str("</g></g>\n");
    }
    s.push_str("</svg>\n");
    s
}

/// A number with at most 2 decimals and no trailing zeros.
fn short(v: f64) -> String {
    let t = format!("{v:.2}");
    let t = t.trim_end_matches('0').trim_end_matches('.');
    t.to_owned()
}
