//! Issue 14: `systemctl reload` of a unit written by `baton units` fails when
//! the new generation does, on every systemd the testbed boots, with the
//! reason in the journal and in `systemctl status`, while the old generation
//! keeps serving; and `--fdstore-preserve yes` (systemd ≥ 254) keeps the
//! app's stored fds across `systemctl stop` and start.
//!
//! Each scenario runs once per systemd through
//! [`baton_testbed::systemd_tests!`]: adding a version is one `name: Flavor`
//! entry in its list.
//!
//! Needs root (the testbed boots systemd in private namespaces); skips
//! otherwise, and fails under `CI=true`.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton::units::{UnitFile, UnitsArgs, generate};
use baton_testbed::{Bed, Flavor, cargo_bin};
use clap::Parser;

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);

/// While this file exists, new probe generations exit 3 before READY=1.
/// Readable by the hardened service: not under /tmp, not in a home.
const FAIL_FLAG: &str = "/etc/baton-reload-fail";

/// Where the probe reports (writable for the service through a drop-in).
const REPORT_DIR: &str = "/var/lib/baton-reload-report";

const BATON: &str = "/usr/local/bin/baton";
const PROBE: &str = "/usr/local/bin/baton-sd-probe";

// One `#[test]` per systemd for each scenario `scenario(flavor, test_name)`;
// adding a version is one more `name: Flavor` entry.
baton_testbed::systemd_tests! { refused_restart_fails_reload:
    refused_restart_fails_reload_on_252: Host,
    refused_restart_fails_reload_on_257: Trixie,
    refused_restart_fails_reload_on_262: Forky,
}

baton_testbed::systemd_tests! { fdstore_preserve_yes_keeps_the_store_across_stop:
    fdstore_preserve_yes_keeps_the_store_across_stop_on_257: Trixie,
    fdstore_preserve_yes_keeps_the_store_across_stop_on_262: Forky,
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: UnitsArgs,
}

fn units_for(argv: &[&str], version: u32) -> Vec<UnitFile> {
    let args = Cli::try_parse_from(std::iter::once("baton-units").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .args;
    generate(&args, version).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// What these scenarios add to the shared [`Bed`].
trait ReloadBed {
    /// Boots `flavor` with Baton and the probe at [`BATON`] and [`PROBE`].
    fn boot_with_binaries(flavor: Flavor, test: &str) -> Option<Bed>;
    /// Generates the supervised units of `name` for this systemd (with
    /// `extra` options) running the probe with `probe_args`, and installs
    /// them.
    fn install(&self, name: &str, extra: &[&str], probe_args: &[&str]);
    /// Connects to the probe and returns the pid in its answer `http PID`.
    fn serving_pid(&self) -> Option<String>;
    fn serving(&self) -> String;
    /// `systemctl reload`, timed.
    fn reload(&self, svc: &str) -> (baton_testbed::CmdOutput, Duration);
}

impl ReloadBed for Bed {
    fn boot_with_binaries(flavor: Flavor, test: &str) -> Option<Bed> {
        Bed::builder(flavor, test)
            .wait(WAIT)
            .binary(env!("CARGO_BIN_EXE_baton"), BATON)
            .binary(cargo_bin("sd-probe", "baton-sd-probe"), PROBE)
            .boot()
    }

    fn install(&self, name: &str, extra: &[&str], probe_args: &[&str]) {
        let listen = format!("http=127.0.0.1:{}", self.port);
        let mut argv = vec!["--name", name, "--listen", &listen, "--baton", BATON];
        argv.extend_from_slice(extra);
        argv.extend(["--", PROBE, "--serve", "http"]);
        argv.extend_from_slice(probe_args);
        self.install_units(units_for(&argv, self.tb.systemd_version()).into_iter().map(|f| (f.name, f.contents)));
    }

    fn serving_pid(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(WAIT)).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.trim().strip_prefix("http ").map(str::to_owned)
    }

    fn serving(&self) -> String {
        self.serving_pid().unwrap_or_else(|| panic!("nothing answers on port {}", self.port))
    }

    fn reload(&self, svc: &str) -> (baton_testbed::CmdOutput, Duration) {
        let t = Instant::now();
        let out = self.tb.systemctl(&["reload", svc]).unwrap();
        (out, t.elapsed())
    }
}

/// A good reload succeeds; a reload whose new generation exits before
/// READY=1 fails `systemctl reload`, the old generation keeps answering
/// (same pid), Baton stays the main process, and the reason is in the
/// journal lines of the ExecReload= process and in `systemctl status`
/// (STATUS=); once the cause is gone, reloads succeed again.
fn refused_restart_fails_reload(flavor: Flavor, test: &str) {
    let Some(bed) = Bed::boot_with_binaries(flavor, test) else { return };
    let version = bed.tb.systemd_version();
    let name = "reload-fail";
    let svc = "reload-fail.service";
    bed.install(name, &[], &["--fail-if-exists", FAIL_FLAG]);
    bed.systemctl_ok(&["start", "reload-fail.socket", svc]);
    let baton = bed.show(svc, "MainPID");
    let first = bed.serving();

    let (good, took_good) = bed.reload(svc);
    assert!(good.success(), "systemd {version}: a good reload failed: {good:?}");
    let second = bed.serving();
    assert_ne!(second, first, "systemd {version}: the reload did not replace the generation");

    bed.tb.write_file(FAIL_FLAG, "").unwrap();
    let (bad, took_bad) = bed.reload(svc);
    assert!(
        !bad.success(),
        "systemd {version}: `systemctl reload` succeeded although the new generation failed: {bad:?}"
    );
    assert_eq!(bed.serving(), second, "systemd {version}: the old generation must keep serving");
    assert_eq!(bed.show(svc, "ActiveState"), "active");
    assert_eq!(bed.show(svc, "MainPID"), baton, "systemd {version}: Baton stays the main process");
    let reason = "exited with status 3 before READY=1";
    let status_text = bed.show(svc, "StatusText");
    assert!(
        status_text.contains(&format!("failed: {reason}")) && status_text.ends_with("generation 2 keeps serving"),
        "systemd {version}: STATUS= should carry the reason: {status_text:?}"
    );
    let status = bed.tb.systemctl(&["status", "--no-pager", "--lines=0", svc]).unwrap();
    assert!(status.stdout.contains(reason), "systemd {version}: systemctl status:\n{}", status.stdout);
    // The ExecReload= process (`baton restart --wait`) says why on its stderr,
    // which is the unit's journal.
    let mut journal = String::new();
    bed.wait_for("the ExecReload= process's failure in the journal", || {
        journal = bed.tb.journal(Some(svc)).unwrap_or_default();
        journal.contains(&format!("baton: restart failed: generation 3 {reason}"))
    });
    assert!(journal.contains("generation 2 keeps serving"), "systemd {version}:\n{journal}");

    bed.tb.run_checked(&["rm", FAIL_FLAG]).unwrap();
    let (again, _) = bed.reload(svc);
    assert!(again.success(), "systemd {version}: the reload after the failure failed: {again:?}");
    let fourth = bed.serving();
    assert_ne!(fourth, second);
    assert_eq!(bed.show(svc, "MainPID"), baton);
    assert_eq!(bed.show(svc, "StatusText"), format!("generation 4 serving as pid {fourth}"));
    println!(
        "{test}: systemd {version}: `systemctl reload` took {} ms (good) and {} ms (refused, exit {:?})",
        took_good.as_millis(),
        took_bad.as_millis(),
        bad.code()
    );
    bed.systemctl_ok(&["stop", svc, "reload-fail.socket", "reload-fail-b.socket"]);
}

/// The probe's report blocks, one per start.
fn report_blocks(bed: &Bed, file: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(bed.tb.host_path(file)).unwrap_or_default();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with("start pid=") {
            blocks.push(Vec::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push(line.to_owned());
        }
    }
    blocks
}

/// `--fdstore-preserve yes`: the probe's stored memfd (`app/state` in
/// systemd's store) survives `systemctl stop` and is passed to the first
/// generation of the next start. The same units without the option lose
/// it at the stop, which shows the check can fail.
fn fdstore_preserve_yes_keeps_the_store_across_stop(flavor: Flavor, test: &str) {
    let Some(bed) = Bed::boot_with_binaries(flavor, test) else { return };
    let version = bed.tb.systemd_version();
    bed.tb.run_checked(&["mkdir", "-p", REPORT_DIR]).unwrap();
    bed.tb.run_checked(&["chmod", "1777", REPORT_DIR]).unwrap();
    for (name, preserve) in [("keep", Some("yes")), ("lose", None)] {
        let svc = format!("{name}.service");
        let report = format!("{REPORT_DIR}/{name}");
        let extra: Vec<&str> = preserve.map(|p| vec!["--fdstore-preserve", p]).unwrap_or_default();
        bed.install(name, &extra, &["--store", "state=kept", "--report", &report]);
        bed.tb.install_dropin(&svc, "report", &format!("[Service]\nReadWritePaths={REPORT_DIR}\n")).unwrap();
        if let Some(p) = preserve {
            assert_eq!(bed.show(&svc, "FileDescriptorStorePreserve"), p);
            let unit_path = format!("/etc/systemd/system/{svc}");
            let verify = bed.tb.run(&["systemd-analyze", "verify", "--man=no", &unit_path]).unwrap();
            assert!(verify.success() && verify.stderr.trim().is_empty(), "systemd-analyze verify: {verify:?}");
        }
        bed.systemctl_ok(&["start", &format!("{name}.socket"), &svc]);
        bed.wait_for("the first generation to store its fd", || {
            report_blocks(&bed, &report).first().is_some_and(|b| b.iter().any(|l| l == "store-sent name=state"))
        });
        bed.wait_for("Baton to mirror it into systemd's store", || bed.show(&svc, "NFileDescriptorStore") == "1");

        bed.systemctl_ok(&["stop", &svc]);
        assert_eq!(bed.show(&svc, "ActiveState"), "inactive");
        let kept_while_stopped = bed.show(&svc, "NFileDescriptorStore");
        bed.systemctl_ok(&["start", &svc]);
        bed.wait_for("the next start to serve", || bed.serving_pid().is_some());
        let blocks = report_blocks(&bed, &report);
        let second = blocks.get(1).unwrap_or_else(|| panic!("no second start in {blocks:?}"));
        let passed_in = second.iter().any(|l| l == "stored name=state content=kept");
        println!(
            "{test}: systemd {version}, FileDescriptorStorePreserve={}: {kept_while_stopped} fd(s) kept while \
             stopped; passed to the next start: {passed_in}",
            preserve.unwrap_or("(default: restart)")
        );
        if preserve.is_some() {
            assert_eq!(kept_while_stopped, "1", "systemd {version}: the store must survive `systemctl stop`");
            assert!(passed_in, "systemd {version}: the stored fd did not reach the app again: {second:?}");
            assert!(!second.iter().any(|l| l.starts_with("store-sent")), "{second:?}");
            assert_eq!(bed.show(&svc, "NFileDescriptorStore"), "1", "not stored twice");
        } else {
            assert_eq!(kept_while_stopped, "0", "systemd {version}: the default empties the store at stop");
            assert!(!passed_in, "{second:?}");
        }
        // The steering sibling too: left listening on the port, the next
        // units' sockets would join its SO_REUSEPORT group.
        bed.systemctl_ok(&["stop", &svc, &format!("{name}.socket"), &format!("{name}-b.socket")]);
    }
}
