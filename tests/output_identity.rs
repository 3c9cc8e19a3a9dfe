//! Whose lines the journal shows, and that `baton upgrade` loses none.
//!
//! - Without systemd: an app writing numbered lines (and lines written in
//!   two parts) without pause through `--output pipe` across several
//!   `baton upgrade`s: every line arrives exactly once, in order.
//! - Under a real systemd (252, 257), for `--output pipe`, `inherit` and
//!   `auto`: `journalctl -u app -o json` files the lines of generations 1
//!   and 2 under the app's identifier, and tells them apart
//!   (`BATON_GENERATION=`/`BATON_PID=` for piped lines; the writer's
//!   `_PID=` and a `_STREAM_ID=` per generation for inherited ones); the
//!   same numbered lines across `baton upgrade` arrive exactly once.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_testbed::{Flavor, Testbed, poll_until, skip_unless_root};

const WAIT: Duration = Duration::from_secs(60);

/// The app: says hello with its generation, reports ready, then writes
/// `n PID I` lines without pause, every 50th line followed by one written
/// in two parts (`part`, 10 ms, `ial PID I`), until `$STOP` exists; then
/// `stopped pid=PID` and it idles. `$BATON` is baton's binary.
const APP: &str = r#"#!/bin/sh
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

struct Local {
    child: Child,
    dir: PathBuf,
    control: PathBuf,
}

impl Local {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(&args[..1])
            .arg("--control")
            .arg(&self.control)
            .args(&args[1..])
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("out")).unwrap_or_default()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        baton_testbed::terminate(&mut self.child, WAIT);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Baton's stderr is a pipe (the app's lines pass unchanged), full at each
/// upgrade; Baton's own logs are off so that only the app's lines are there.
#[test]
fn upgrade_loses_no_piped_output() {
    let dir = baton_testbed::unique_temp_dir("baton-output", "upgrade_loses_no_piped_output");
    let control = dir.join("baton.sock");
    let app = dir.join("app");
    std::fs::write(&app, APP).unwrap();
    let mut out = std::fs::File::create(dir.join("out")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("run")
        .arg("--control")
        .arg(&control)
        .args(["--output", "pipe", "--notify-access", "all", "--"])
        .arg("/bin/sh")
        .arg(&app)
        .env("BATON", env!("CARGO_BIN_EXE_baton"))
        .env("STOP", dir.join("stop"))
        .env("BATON_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The test reads Baton's stderr, and stops reading at each upgrade
    // until the pipe is full: Baton then holds output it cannot write yet.
    let stderr: std::os::fd::OwnedFd = child.stderr.take().unwrap().into();
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
    let b = Local { child, dir: dir.clone(), control };
    let hello = poll_until("the app's hello", WAIT, || {
        b.log().lines().find_map(|l| l.strip_prefix("hello gen=1 pid=").and_then(|p| p.parse::<u32>().ok()))
    })
    .unwrap();
    let t0 = Instant::now();
    let upgrades = 5;
    for k in 1..=upgrades {
        poll_until("more output", WAIT, || (b.log().lines().count() > k * 1000).then_some(())).unwrap();
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
    poll_until("the app's last line", WAIT, || b.log().contains(&stopped).then_some(())).unwrap();
    let lines: Vec<String> = b.log().lines().map(str::to_owned).collect();
    let n = assert_complete(&lines, hello);
    eprintln!("upgrade_loses_no_piped_output: {n} lines across {upgrades} upgrades ({took:?}), none lost or repeated");
}

// ---- under systemd -------------------------------------------------------------

const BATON_INSIDE: &str = "/usr/local/bin/baton";
const APP_INSIDE: &str = "/usr/local/bin/identity-app";
const STOP_INSIDE: &str = "/etc/identity-stop";
const UNIT: &str = "app.service";

fn run(tb: &Testbed, argv: &[&str]) -> String {
    let out = tb.run(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.success(), "{argv:?}: {out}");
    out.stdout
}

fn entries(tb: &Testbed) -> Vec<serde_json::Value> {
    let _ = tb.run(&["journalctl", "--sync"]);
    let out = run(tb, &["journalctl", "--no-pager", "-b", "-u", UNIT, "-o", "json"]);
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn message(e: &serde_json::Value) -> String {
    e["MESSAGE"].as_str().unwrap_or_default().to_owned()
}

/// The journal entry whose message is `text`, waited for (a field match:
/// cheap however long the journal).
fn wait_message(tb: &Testbed, text: &str) {
    let arg = format!("MESSAGE={text}");
    poll_until(&format!("{text:?} in the journal"), WAIT, || {
        let out = tb.run(&["journalctl", "--no-pager", "-b", "-u", UNIT, "-o", "cat", &arg]).ok()?;
        out.stdout.contains(text).then_some(())
    })
    .unwrap()
}

/// The journal entry whose message starts with `prefix`, waited for.
fn wait_entry(tb: &Testbed, prefix: &str) -> serde_json::Value {
    poll_until(&format!("{prefix:?} in the journal"), WAIT, || {
        entries(tb).into_iter().find(|e| message(e).starts_with(prefix))
    })
    .unwrap()
}

fn field(e: &serde_json::Value, k: &str) -> String {
    e[k].as_str().unwrap_or_default().to_owned()
}

fn identity(flavor: Flavor, version: u32, name: &str, mode: &str) {
    if !skip_unless_root(name) {
        return;
    }
    let tb = Testbed::boot(flavor).unwrap_or_else(|e| panic!("{name}: boot: {e}"));
    assert_eq!(tb.systemd_version(), version);
    std::fs::copy(env!("CARGO_BIN_EXE_baton"), tb.host_path(BATON_INSIDE)).unwrap();
    tb.write_file(APP_INSIDE, APP).unwrap();
    run(&tb, &["chmod", "755", APP_INSIDE]);
    let unit = format!(
        "[Service]\nType=notify\nRuntimeDirectory=baton\nLogRateLimitIntervalSec=0\n\
         Environment=BATON={BATON_INSIDE} STOP={STOP_INSIDE}\n\
         ExecStart={BATON_INSIDE} run --name app --notify-access all --output {mode} -- {APP_INSIDE}\n\
         ExecReload={BATON_INSIDE} restart --name app\n"
    );
    tb.install_unit(UNIT, &unit).unwrap();
    tb.systemctl_checked(&["start", UNIT]).unwrap();
    let hello1 = wait_entry(&tb, "hello gen=1 pid=");
    let pid1: u32 = message(&hello1).rsplit('=').next().unwrap().parse().unwrap();

    // Numbered lines across upgrades: every one arrives, once, in order.
    let t0 = Instant::now();
    for k in 1..=3 {
        wait_message(&tb, &format!("n {pid1} {}", k * 2000));
        run(&tb, &[BATON_INSIDE, "upgrade", "--name", "app"]);
    }
    let took = t0.elapsed();
    tb.write_file(STOP_INSIDE, "").unwrap();
    wait_message(&tb, &format!("stopped pid={pid1}"));
    let all = entries(&tb);
    let texts: Vec<String> = all.iter().map(message).collect();
    let n = assert_complete(&texts, pid1);

    run(&tb, &["rm", STOP_INSIDE]);
    tb.systemctl_checked(&["reload", UNIT]).unwrap();
    let hello2 = wait_entry(&tb, "hello gen=2 pid=");
    let pid2: u32 = message(&hello2).rsplit('=').next().unwrap().parse().unwrap();
    let main = tb.show(UNIT, "MainPID").unwrap();

    for (e, generation, pid) in [(&hello1, 1, pid1), (&hello2, 2, pid2)] {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "identity-app", "the app's identifier: {e}");
        assert_eq!(field(e, "_SYSTEMD_UNIT"), UNIT, "{e}");
        if mode == "pipe" {
            assert_eq!(field(e, "BATON_GENERATION"), generation.to_string(), "{e}");
            assert_eq!(field(e, "BATON_PID"), pid.to_string(), "{e}");
            assert_eq!(field(e, "SYSLOG_PID"), pid.to_string(), "{e}");
        } else {
            // A stream of its own per generation: the writer's pid, and a
            // stream id telling the generations apart.
            assert_eq!(field(e, "_PID"), pid.to_string(), "{e}");
            assert_eq!(field(e, "_TRANSPORT"), "stdout", "{e}");
        }
    }
    if mode != "pipe" {
        assert_ne!(field(&hello1, "_STREAM_ID"), field(&hello2, "_STREAM_ID"), "one stream per generation");
        // Every line of generation 1 came through its own stream.
        let stream1 = field(&hello1, "_STREAM_ID");
        let numbered = format!("n {pid1} ");
        assert!(all.iter().filter(|e| message(e).starts_with(&numbered)).all(|e| field(e, "_STREAM_ID") == stream1));
    }
    eprintln!(
        "{name}: --output {mode}: SYSLOG_IDENTIFIER={} _TRANSPORT={} _PID={} (generation {pid1}, baton {main}) \
         BATON_GENERATION={:?}; {n} numbered lines across 3 upgrades ({took:?}), none lost or repeated",
        field(&hello1, "SYSLOG_IDENTIFIER"),
        field(&hello1, "_TRANSPORT"),
        field(&hello1, "_PID"),
        field(&hello1, "BATON_GENERATION"),
    );
}

macro_rules! modes {
    ($($module:ident: $flavor:ident $version:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn pipe() {
                super::identity(baton_testbed::Flavor::$flavor, $version, concat!(stringify!($module), "::pipe"), "pipe");
            }
            #[test]
            fn inherit() {
                super::identity(baton_testbed::Flavor::$flavor, $version, concat!(stringify!($module), "::inherit"), "inherit");
            }
            #[test]
            fn auto() {
                super::identity(baton_testbed::Flavor::$flavor, $version, concat!(stringify!($module), "::auto"), "auto");
            }
        }
    )*};
}

// A 262 line (Flavor::Forky) joins these once the testbed has it.
modes!(systemd_252: Host 252, systemd_257: Trixie 257);
