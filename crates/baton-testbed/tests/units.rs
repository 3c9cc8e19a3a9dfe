//! Driving units, the shared scratch directory and the shared target dir.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use baton_testbed::{Flavor, Testbed, cargo_bin, skip_unless_root};

const SLEEPER: &str = "\
[Unit]
Description=baton-testbed sleeper

[Service]
ExecStart=/bin/sleep infinity
";

fn unit_starts_and_is_logged(flavor: Flavor) {
    let tb = Testbed::boot(flavor).expect("boot");
    tb.install_unit("baton-sleep.service", SLEEPER).unwrap();
    tb.systemctl_checked(&["start", "baton-sleep.service"]).unwrap();

    let active = tb.systemctl(&["is-active", "baton-sleep.service"]).unwrap();
    assert!(active.success(), "{active}");
    assert_eq!(active.stdout_trimmed(), "active");
    assert_ne!(tb.show("baton-sleep.service", "MainPID").unwrap(), "0");

    // systemd logs "Started baton-sleep.service - baton-testbed sleeper."
    // through journald, asynchronously: poll, don't assume.
    tb.wait_for("the start in the journal", Duration::from_secs(30), || {
        tb.journal(Some("baton-sleep.service")).is_ok_and(|j| j.contains("Started baton-sleep.service"))
    })
    .unwrap();

    tb.systemctl_checked(&["stop", "baton-sleep.service"]).unwrap();
    assert_eq!(tb.show("baton-sleep.service", "ActiveState").unwrap(), "inactive");
    tb.shutdown().expect("clean teardown");
}

#[test]
fn unit_starts_and_is_logged_host() {
    if skip_unless_root("unit_starts_and_is_logged_host") {
        unit_starts_and_is_logged(Flavor::Host);
    }
}

#[test]
fn unit_starts_and_is_logged_trixie() {
    if skip_unless_root("unit_starts_and_is_logged_trixie") {
        unit_starts_and_is_logged(Flavor::Trixie);
    }
}

#[test]
fn unit_starts_and_is_logged_forky() {
    if skip_unless_root("unit_starts_and_is_logged_forky") {
        unit_starts_and_is_logged(Flavor::Forky);
    }
}

fn scratch_is_shared_both_ways(flavor: Flavor) {
    let tb = Testbed::boot(flavor).expect("boot");
    let scratch = tb.scratch().to_owned();

    // Host -> inside: a script the unit runs, and an input file.
    fs::write(scratch.join("input"), "from the host\n").unwrap();
    let script = scratch.join("write.sh");
    fs::write(
        &script,
        "#!/bin/sh\nset -e\n{ cat \"$1/input\"; echo \"written inside by pid $$\"; } >\"$1/out.tmp\"\nmv \"$1/out.tmp\" \"$1/out\"\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    tb.install_unit(
        "baton-writer.service",
        &format!("[Service]\nType=oneshot\nExecStart={} {}\n", script.display(), scratch.display()),
    )
    .unwrap();

    // A oneshot `start` returns after ExecStart finished.
    tb.systemctl_checked(&["start", "baton-writer.service"]).unwrap();

    // Inside -> host.
    let out = fs::read_to_string(scratch.join("out")).expect("file written inside visible on host");
    assert!(out.starts_with("from the host\nwritten inside by pid "), "{out:?}");
    tb.shutdown().expect("clean teardown");
}

#[test]
fn scratch_is_shared_both_ways_host() {
    if skip_unless_root("scratch_is_shared_both_ways_host") {
        scratch_is_shared_both_ways(Flavor::Host);
    }
}

#[test]
fn scratch_is_shared_both_ways_trixie() {
    if skip_unless_root("scratch_is_shared_both_ways_trixie") {
        scratch_is_shared_both_ways(Flavor::Trixie);
    }
}

#[test]
fn scratch_is_shared_both_ways_forky() {
    if skip_unless_root("scratch_is_shared_both_ways_forky") {
        scratch_is_shared_both_ways(Flavor::Forky);
    }
}

fn cargo_binary_runs_inside(flavor: Flavor) {
    let bin = cargo_bin("baton-testbed", "baton-testbed-fixture");
    let tb = Testbed::boot(flavor).expect("boot");
    let out = tb.run_checked(&[bin.to_str().unwrap(), "inside", &flavor.to_string()]).unwrap();
    assert_eq!(out.stdout, format!("baton-testbed-fixture: inside {flavor}\n"));
    tb.shutdown().expect("clean teardown");
}

#[test]
fn cargo_binary_runs_inside_host() {
    if skip_unless_root("cargo_binary_runs_inside_host") {
        cargo_binary_runs_inside(Flavor::Host);
    }
}

#[test]
fn cargo_binary_runs_inside_trixie() {
    if skip_unless_root("cargo_binary_runs_inside_trixie") {
        cargo_binary_runs_inside(Flavor::Trixie);
    }
}

#[test]
fn cargo_binary_runs_inside_forky() {
    if skip_unless_root("cargo_binary_runs_inside_forky") {
        cargo_binary_runs_inside(Flavor::Forky);
    }
}

/// A shared directory below /tmp (say, a checkout in /tmp on CI) must survive
/// the boot-time cleaning of /tmp by systemd-tmpfiles inside: it is a mount
/// point there, and tmpfiles does not descend into mount points.
fn bind_below_tmp_survives_boot(flavor: Flavor) {
    let dir = std::env::temp_dir().join(format!("baton-testbed-bind-{flavor}-{}", std::process::id()));
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/keep"), "keep me\n").unwrap();

    let tb = Testbed::builder(flavor).bind(&dir).boot().expect("boot");
    let inside = tb.run_checked(&["cat", dir.join("sub/keep").to_str().unwrap()]).unwrap();
    assert_eq!(inside.stdout, "keep me\n");
    tb.shutdown().expect("clean teardown");

    assert_eq!(fs::read_to_string(dir.join("sub/keep")).unwrap(), "keep me\n");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bind_below_tmp_survives_boot_host() {
    if skip_unless_root("bind_below_tmp_survives_boot_host") {
        bind_below_tmp_survives_boot(Flavor::Host);
    }
}

#[test]
fn bind_below_tmp_survives_boot_trixie() {
    if skip_unless_root("bind_below_tmp_survives_boot_trixie") {
        bind_below_tmp_survives_boot(Flavor::Trixie);
    }
}

#[test]
fn bind_below_tmp_survives_boot_forky() {
    if skip_unless_root("bind_below_tmp_survives_boot_forky") {
        bind_below_tmp_survives_boot(Flavor::Forky);
    }
}
