//! Whose lines the journal shows, and that `baton upgrade` loses none.
//!
//! - Without systemd: an app writing numbered lines (and lines written in
//!   two parts) without pause through `--output pipe` across several
//!   `baton upgrade`s, Baton's stderr a pipe that fills at each upgrade:
//!   every line arrives exactly once, in order.
//! - Under a real systemd (252, 257, 262), with the units `baton units`
//!   generates: for the default output (`auto`, which is `inherit` under
//!   the journal) and for `--output pipe`, `journalctl -u app -o json`
//!   files the app's lines under the app's identifier and tells the
//!   generations apart (the writer's `_PID=` for inherited lines,
//!   `BATON_GENERATION=`/`BATON_PID=` for piped ones), also for a
//!   generation that writes one line and exits at once; Baton's own lines
//!   stay `SYSLOG_IDENTIFIER=baton` and carry `BATON_GENERATION=` and
//!   `BATON_PID=`; piped numbered lines across `baton upgrade`s arrive
//!   exactly once.

use std::process::Command;
use std::time::{Duration, Instant};

use baton_testbed::baton::BatonBuilder;
use baton_testbed::{Bed, Flavor, Testbed, free_loopback_port, poll_until};

const WAIT: Duration = Duration::from_secs(60);

/// The app: with `$FAIL` present, says `failing gen=G pid=PID` and exits
/// at once. Else says hello with its generation, reports ready, then writes
/// `n PID I` lines without pause, every 50th line followed by one written
/// in two parts (`part`, 10 ms, `ial PID I`), until `$STOP` exists; then
/// `stopped pid=PID` and it idles. `$BATON` is baton's binary.
const APP: &str = r#"#!/bin/sh
if [ -e "$FAIL" ]; then echo "failing gen=$BATON_GENERATION pid=$$"; exit 3; fi
echo "hello gen=$BATON_GENERATION pid=$$"
"$BATON" notify --ready
i=0
while [ ! -e "$STOP" ]; do
  printf 'n %s %d\n' $$ $i
  i=$((i+1))
  if [ $((i % 50)) = 0 ]; then printf 'part'; sleep 0.01; printf 'ial %s %d\n' $$ $i; fi
done
echo "stopped pid=$$"
while :; do sleep 1; done
"#;

/// Checks that `lines` hold, for writer `pid`, `n PID 0`, `n PID 1`, ...
/// each exactly once and in order, with every two-part line whole; returns
/// how many numbered lines there were.
fn assert_complete(lines: &[String], pid: u32) -> usize {
    let numbered = format!("n {pid} ");
    let partial = format!("partial {pid} ");
    let mut next = 0u64;
    let mut parts = 0;
    for l in lines {
        if let Some(i) = l.strip_prefix(&numbered) {
            let i: u64 = i.parse().unwrap_or_else(|_| panic!("garbled line {l:?}"));
            assert_eq!(i, next, "after line {}: {l:?} (lost or repeated output)", next.wrapping_sub(1));
            next += 1;
        } else if let Some(i) = l.strip_prefix(&partial) {
            let i: u64 = i.parse().unwrap_or_else(|_| panic!("garbled line {l:?}"));
            assert_eq!(i, next, "two-part line {l:?} out of place");
            assert_eq!(i % 50, 0);
            parts += 1;
        } else {
            assert!(!l.contains(&numbered) && !l.contains(&partial), "garbled line {l:?}");
        }
    }
    assert!(next >= 100 && parts >= 2, "too little output: {next} lines, {parts} two-part lines");
    next as usize
}

// ---- without systemd ---------------------------------------------------------

/// Baton's stderr is a pipe (the app's lines pass unchanged), full at each
/// upgrade; Baton's own logs are off so that only the app's lines are there.
#[test]
fn upgrade_loses_no_piped_output() {
    let dir = baton_testbed::unique_temp_dir("baton-output", "upgrade_loses_no_piped_output");
    let app = dir.join("app");
    std::fs::write(&app, APP).unwrap();
    let out_path = dir.join("out");
    let mut out = std::fs::File::create(&out_path).unwrap();
    let mut b = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), &dir)
        .no_http_listener()
        .args(["--output", "pipe", "--notify-access", "all"])
        .app([std::ffi::OsStr::new("/bin/sh"), app.as_os_str()])
        .env("BATON", env!("CARGO_BIN_EXE_baton"))
        .env("STOP", dir.join("stop"))
        .env("FAIL", dir.join("fail"))
        .log_level(Some("error"))
        .stderr_piped()
        .spawn();
    // The test reads Baton's stderr, and stops reading at each upgrade
    // until the pipe is full: Baton then holds output it cannot write yet.
    let stderr: std::os::fd::OwnedFd = b.take_stderr().unwrap().into();
    let queued = stderr.try_clone().unwrap();
    let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_paused = std::sync::Arc::clone(&paused);
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut stderr = std::fs::File::from(stderr);
        let mut buf = [0u8; 4096];
        loop {
            if reader_paused.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match stderr.read(&mut buf) {
                Ok(n @ 1..) => out.write_all(&buf[..n]).unwrap(),
                _ => break,
            }
        }
    });
    let log = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let hello = poll_until("the app's hello", WAIT, || {
        log().lines().find_map(|l| l.strip_prefix("hello gen=1 pid=").and_then(|p| p.parse::<u32>().ok()))
    })
    .unwrap();
    let t0 = Instant::now();
    let upgrades = 5;
    for k in 1..=upgrades {
        poll_until("more output", WAIT, || (log().lines().count() > k * 1000).then_some(())).unwrap();
        paused.store(true, std::sync::atomic::Ordering::SeqCst);
        // Full: more than half its 64 KiB queued and no longer growing,
        // while the app writes without pause (Baton has read more than it
        // could write).
        let mut before = 0;
        poll_until("baton's stderr full", WAIT, || {
            std::thread::sleep(Duration::from_millis(50));
            let now = rustix::io::ioctl_fionread(&queued).unwrap_or(0);
            let full = now > 32 * 1024 && now == before;
            before = now;
            full.then_some(())
        })
        .unwrap();
        let o = b.cli(&["upgrade"]);
        paused.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(o.status.success(), "upgrade: {}", String::from_utf8_lossy(&o.stderr));
    }
    let took = t0.elapsed();
    std::fs::write(dir.join("stop"), "").unwrap();
    let stopped = format!("stopped pid={hello}");
    poll_until("the app's last line", WAIT, || log().contains(&stopped).then_some(())).unwrap();
    let lines: Vec<String> = log().lines().map(str::to_owned).collect();
    let n = assert_complete(&lines, hello);
    eprintln!("upgrade_loses_no_piped_output: {n} lines across {upgrades} upgrades ({took:?}), none lost or repeated");
}

// ---- under systemd -------------------------------------------------------------

const BATON_INSIDE: &str = "/usr/local/bin/baton";
const APP_INSIDE: &str = "/usr/local/bin/identity-app";
const STOP_INSIDE: &str = "/etc/identity-stop";
const FAIL_INSIDE: &str = "/etc/identity-fail";
const UNIT: &str = "app.service";
const CONTROL: &str = "/run/app/app.sock";

fn run(tb: &Testbed, argv: &[&str]) -> String {
    let out = tb.run(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.success(), "{argv:?}: {out}");
    out.stdout
}

/// The boot's entries under `-u app`, with more `journalctl` matches.
fn entries(tb: &Testbed, matches: &[&str]) -> Vec<serde_json::Value> {
    let _ = tb.run(&["journalctl", "--sync"]);
    let mut argv = vec!["journalctl", "--no-pager", "-b", "-u", UNIT, "-o", "json"];
    argv.extend_from_slice(matches);
    let out = run(tb, &argv);
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn message(e: &serde_json::Value) -> String {
    e["MESSAGE"].as_str().unwrap_or_default().to_owned()
}

fn field(e: &serde_json::Value, k: &str) -> String {
    e[k].as_str().unwrap_or_default().to_owned()
}

/// Waits for the app's line `text` under `-u app` (a field match: cheap
/// however long the journal).
fn wait_message(tb: &Testbed, text: &str) {
    let arg = format!("MESSAGE={text}");
    poll_until(&format!("{text:?} under -u {UNIT}"), WAIT, || {
        let out = tb.run(&["journalctl", "--no-pager", "-b", "-u", UNIT, "-o", "cat", &arg]).ok()?;
        out.stdout.contains(text).then_some(())
    })
    .unwrap()
}

/// Waits for the entry under `-u app` whose message starts with `prefix`
/// and is not from one of the pids in `not`; returns it with the pid its
/// message names (`pid=N` last).
fn wait_entry(tb: &Testbed, prefix: &str, not: &[u32]) -> (serde_json::Value, u32) {
    poll_until(&format!("{prefix:?} under -u {UNIT}"), WAIT, || {
        entries(tb, &[]).into_iter().find_map(|e| {
            let m = message(&e);
            let pid: u32 = m.strip_prefix(prefix)?.rsplit("pid=").next()?.parse().ok()?;
            (!not.contains(&pid)).then_some((e, pid))
        })
    })
    .unwrap()
}

/// Installs `app.socket` and `app.service` as `baton units` generates them
/// for [`APP`], `--notify-access all` (the script's `baton notify` is its
/// child) and `output` added to `baton run`, and a drop-in that turns off
/// journald's rate limit (the numbered lines come faster than it allows)
/// and gives the app its paths.
fn install_generated(tb: &Testbed, output: Option<&str>) -> String {
    let dir = tb.scratch().join(format!("units-{}", output.unwrap_or("auto")));
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["units", "--name", "app", "-l"])
        .arg(format!("http=127.0.0.1:{}", free_loopback_port()))
        // Only app.socket is installed: its subject is not steering, whose
        // sibling socket unit (the default) it would need.
        .args(["--steering", "off", "--baton", BATON_INSIDE, "--systemd-version"])
        .arg(tb.systemd_version().to_string())
        .arg("-o")
        .arg(&dir)
        .args(["--", APP_INSIDE])
        .output()
        .unwrap();
    assert!(out.status.success(), "baton units: {}", String::from_utf8_lossy(&out.stderr));
    let mut service = String::new();
    for name in ["app.socket", UNIT] {
        let mut text = std::fs::read_to_string(dir.join(name)).unwrap();
        if name == UNIT {
            let run = format!("{BATON_INSIDE} run --name app ");
            assert!(text.contains(&run), "{text}");
            let mode = output.map(|o| format!("--output {o} ")).unwrap_or_default();
            text = text.replace(&run, &format!("{BATON_INSIDE} run --notify-access all {mode}--name app "));
            service = text.clone();
        }
        tb.install_unit(name, &text).unwrap();
    }
    let dropin = format!(
        "[Service]\nLogRateLimitIntervalSec=0\nEnvironment=BATON={BATON_INSIDE} STOP={STOP_INSIDE} FAIL={FAIL_INSIDE}\n"
    );
    tb.install_dropin(UNIT, "test", &dropin).unwrap();
    service
}

/// Touches (or removes) a flag file of the app's.
fn flag(tb: &Testbed, path: &str, on: bool) {
    if on {
        tb.write_file(path, "").unwrap()
    } else {
        run(tb, &["rm", "-f", path]);
    }
}

/// A generation that writes one line and exits at once: `systemctl reload`
/// fails, and the line is under `-u app` with the app's identifier
/// (journald reads the writer's cgroup when it files the line; the writer
/// may be gone by then). Returns the entry.
fn failing_generation(tb: &Testbed, generation: u64, not: &[u32]) -> (serde_json::Value, u32) {
    flag(tb, FAIL_INSIDE, true);
    let out = tb.systemctl(&["reload", UNIT]).unwrap();
    assert!(!out.success(), "a generation that exits at once fails the reload: {out}");
    let found = wait_entry(tb, &format!("failing gen={generation} "), not);
    flag(tb, FAIL_INSIDE, false);
    found
}

/// Baton's own entries about `generation`: found with the
/// `BATON_GENERATION=` match, identified as baton's, with `BATON_PID=`.
fn batons_entries(tb: &Testbed, generation: u64, pid: u32) -> Vec<serde_json::Value> {
    let matches = format!("BATON_GENERATION={generation}");
    let all = entries(tb, &[&matches]);
    let batons: Vec<serde_json::Value> =
        all.iter().filter(|e| field(e, "SYSLOG_IDENTIFIER") == "baton").cloned().collect();
    let spawned = batons
        .iter()
        .find(|e| field(e, "BATON_EVENT") == "spawned" && field(e, "BATON_PID") == pid.to_string())
        .unwrap_or_else(|| panic!("no spawned entry of baton's for generation {generation} pid {pid}: {all:?}"));
    assert_eq!(field(spawned, "_TRANSPORT"), "journal", "{spawned}");
    batons
}

/// The default output under the journal (`auto`: inherited). Returns the
/// pids of the generations.
fn inherited(tb: &Testbed, name: &str) -> Vec<u32> {
    flag(tb, STOP_INSIDE, true);
    let service = install_generated(tb, None);
    assert!(service.contains("\nSyslogIdentifier=identity-app\n"), "{service}");
    tb.systemctl_checked(&["start", UNIT]).unwrap();
    let (hello1, pid1) = wait_entry(tb, "hello gen=1 ", &[]);
    tb.systemctl_checked(&["reload", UNIT]).unwrap();
    let (hello2, pid2) = wait_entry(tb, "hello gen=2 ", &[pid1]);
    let main = tb.show(UNIT, "MainPID").unwrap();
    for (e, pid) in [(&hello1, pid1), (&hello2, pid2)] {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "identity-app", "the app's identifier: {e}");
        assert_eq!(field(e, "_SYSTEMD_UNIT"), UNIT, "{e}");
        assert_eq!(field(e, "_PID"), pid.to_string(), "the writer's pid: {e}");
        assert_eq!(field(e, "_TRANSPORT"), "stdout", "{e}");
    }
    let inherited = entries(tb, &["SYSLOG_IDENTIFIER=baton"]);
    assert!(
        inherited.iter().any(|e| message(e).contains("the app's stdout and stderr: inherited")),
        "auto is inherit under the journal"
    );
    let batons = batons_entries(tb, 2, pid2);
    let (failing, failing_pid) = failing_generation(tb, 3, &[]);
    assert_eq!(field(&failing, "SYSLOG_IDENTIFIER"), "identity-app", "{failing}");
    assert_eq!(field(&failing, "_PID"), failing_pid.to_string(), "{failing}");
    assert_eq!(field(&failing, "_SYSTEMD_UNIT"), UNIT, "{failing}");
    tb.systemctl_checked(&["stop", UNIT]).unwrap();
    eprintln!(
        "{name}: inherited: app entries SYSLOG_IDENTIFIER={} _TRANSPORT={} _PID={} (app {pid1}, baton {main}) \
         _SYSTEMD_UNIT={} BATON_GENERATION={:?}; the one that exited at once: _PID={} _SYSTEMD_UNIT={} \
         _COMM={:?}; baton's entries about generation 2: {} with SYSLOG_IDENTIFIER=baton BATON_PID={}",
        field(&hello1, "SYSLOG_IDENTIFIER"),
        field(&hello1, "_TRANSPORT"),
        field(&hello1, "_PID"),
        field(&hello1, "_SYSTEMD_UNIT"),
        field(&hello1, "BATON_GENERATION"),
        field(&failing, "_PID"),
        field(&failing, "_SYSTEMD_UNIT"),
        field(&failing, "_COMM"),
        batons.len(),
        field(&batons[0], "BATON_PID"),
    );
    vec![pid1, pid2, failing_pid]
}

/// `--output pipe`: native entries, nothing lost across `baton upgrade`.
/// `not`: the pids of earlier generations in this boot.
fn piped(tb: &Testbed, name: &str, not: &[u32]) {
    flag(tb, STOP_INSIDE, false);
    install_generated(tb, Some("pipe"));
    tb.systemctl_checked(&["start", UNIT]).unwrap();
    let (hello1, pid1) = wait_entry(tb, "hello gen=1 ", not);
    assert_eq!(field(&hello1, "SYSLOG_IDENTIFIER"), "identity-app", "the app's identifier: {hello1}");
    assert_eq!(field(&hello1, "BATON_GENERATION"), "1", "{hello1}");

    // Numbered lines across upgrades: every one arrives, once, in order.
    let t0 = Instant::now();
    let upgrades = 3;
    for k in 1..=upgrades {
        wait_message(tb, &format!("n {pid1} {}", k * 2000));
        run(tb, &[BATON_INSIDE, "upgrade", "--control", CONTROL]);
    }
    let took = t0.elapsed();
    flag(tb, STOP_INSIDE, true);
    wait_message(tb, &format!("stopped pid={pid1}"));
    let all = entries(tb, &[]);
    let texts: Vec<String> = all.iter().map(message).collect();
    let n = assert_complete(&texts, pid1);
    let numbered = format!("n {pid1} ");
    assert!(
        all.iter().filter(|e| message(e).starts_with(&numbered)).all(|e| field(e, "BATON_GENERATION") == "1"),
        "every numbered line names its generation"
    );

    tb.systemctl_checked(&["reload", UNIT]).unwrap();
    let g2 = 2;
    let (hello2, pid2) = wait_entry(tb, &format!("hello gen={g2} "), not);
    let main = tb.show(UNIT, "MainPID").unwrap();
    for (e, generation, pid) in [(&hello1, 1, pid1), (&hello2, g2, pid2)] {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "identity-app", "the app's identifier: {e}");
        assert_eq!(field(e, "_SYSTEMD_UNIT"), UNIT, "{e}");
        assert_eq!(field(e, "_TRANSPORT"), "journal", "{e}");
        assert_eq!(field(e, "BATON_GENERATION"), generation.to_string(), "{e}");
        assert_eq!(field(e, "BATON_PID"), pid.to_string(), "{e}");
        assert_eq!(field(e, "SYSLOG_PID"), pid.to_string(), "{e}");
        assert_eq!(field(e, "_PID"), main, "sent by Baton, under its credentials: {e}");
    }
    // `-u app BATON_GENERATION=N`: the app's lines and Baton's.
    let batons = batons_entries(tb, g2, pid2);
    let of_g2 = entries(tb, &[&format!("BATON_GENERATION={g2}")]);
    assert!(of_g2.iter().any(|e| message(e) == format!("hello gen={g2} pid={pid2}")), "{of_g2:?}");
    let (failing, _) = failing_generation(tb, g2 + 1, not);
    assert_eq!(field(&failing, "SYSLOG_IDENTIFIER"), "identity-app", "{failing}");
    assert_eq!(field(&failing, "BATON_GENERATION"), (g2 + 1).to_string(), "{failing}");
    assert_eq!(field(&failing, "_SYSTEMD_UNIT"), UNIT, "{failing}");
    tb.systemctl_checked(&["stop", UNIT]).unwrap();
    eprintln!(
        "{name}: piped: app entries SYSLOG_IDENTIFIER={} _TRANSPORT={} _PID={} (app {pid1}, baton {main}) \
         BATON_GENERATION={} BATON_PID={} SYSLOG_PID={} _SYSTEMD_UNIT={}; the one that exited at once: \
         BATON_GENERATION={} _SYSTEMD_UNIT={}; baton's entries about generation {g2}: {}; {n} numbered lines across \
         {upgrades} upgrades ({took:?}), none lost or repeated",
        field(&hello1, "SYSLOG_IDENTIFIER"),
        field(&hello1, "_TRANSPORT"),
        field(&hello1, "_PID"),
        field(&hello1, "BATON_GENERATION"),
        field(&hello1, "BATON_PID"),
        field(&hello1, "SYSLOG_PID"),
        field(&hello1, "_SYSTEMD_UNIT"),
        field(&failing, "BATON_GENERATION"),
        field(&failing, "_SYSTEMD_UNIT"),
        batons.len(),
    );
}

fn identity(flavor: Flavor, name: &str) {
    let Some(bed) = Bed::boot(flavor, name) else { return };
    let tb = &bed.tb;
    assert_eq!(tb.systemd_version(), flavor.expected_systemd());
    std::fs::copy(env!("CARGO_BIN_EXE_baton"), tb.host_path(BATON_INSIDE)).unwrap();
    tb.write_file(APP_INSIDE, APP).unwrap();
    run(tb, &["chmod", "755", APP_INSIDE]);
    let earlier = inherited(tb, name);
    piped(tb, name, &earlier);
}

baton_testbed::systemd_tests! { identity:
    systemd_252: Host,
    systemd_257: Trixie,
    systemd_262: Forky,
}
