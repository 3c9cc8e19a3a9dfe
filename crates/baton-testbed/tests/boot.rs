//! Booting every flavor, alone and in parallel.

use std::thread;

use baton_testbed::{Flavor, Testbed, skip_unless_root};

#[test]
fn host_flavor_runs_systemd_252() {
    if !skip_unless_root("host_flavor_runs_systemd_252") {
        return;
    }
    let tb = Testbed::boot(Flavor::Host).expect("boot host testbed");
    eprintln!("host (systemd {}) booted in {:?}", tb.systemd_version(), tb.boot_duration());
    assert_eq!(tb.systemd_version(), 252);
    assert_eq!(tb.flavor(), Flavor::Host);
    // PID 1 of the namespace is systemd, and it is the process we know.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", tb.pid())).unwrap();
    assert_eq!(comm.trim(), "systemd");
    let state = tb.systemctl(&["is-system-running"]).unwrap();
    assert!(matches!(state.stdout_trimmed(), "running" | "degraded"), "{state}");
    tb.shutdown().expect("clean teardown");
}

#[test]
fn trixie_flavor_runs_systemd_257() {
    if !skip_unless_root("trixie_flavor_runs_systemd_257") {
        return;
    }
    let tb = Testbed::boot(Flavor::Trixie).expect("boot trixie testbed");
    eprintln!("trixie (systemd {}) booted in {:?}", tb.systemd_version(), tb.boot_duration());
    assert_eq!(tb.systemd_version(), 257);
    let os = tb.run_checked(&["cat", "/etc/os-release"]).unwrap();
    assert!(os.stdout.contains("trixie"), "{}", os.stdout);
    tb.shutdown().expect("clean teardown");
}

#[test]
fn forky_flavor_runs_systemd_262() {
    if !skip_unless_root("forky_flavor_runs_systemd_262") {
        return;
    }
    let tb = Testbed::boot(Flavor::Forky).expect("boot forky testbed");
    let version = tb.systemctl_checked(&["--version"]).unwrap();
    eprintln!("forky ({}) booted in {:?}", version.stdout.lines().next().unwrap_or_default(), tb.boot_duration());
    assert_eq!(tb.systemd_version(), Flavor::Forky.expected_systemd());
    let os = tb.run_checked(&["cat", "/etc/os-release"]).unwrap();
    assert!(os.stdout.contains("forky"), "{}", os.stdout);
    tb.shutdown().expect("clean teardown");
}

#[test]
fn two_testbeds_boot_in_parallel_and_are_isolated() {
    if !skip_unless_root("two_testbeds_boot_in_parallel_and_are_isolated") {
        return;
    }
    let boots: Vec<_> = (0..2).map(|_| thread::spawn(|| Testbed::boot(Flavor::Host))).collect();
    let tbs: Vec<Testbed> = boots.into_iter().map(|h| h.join().expect("boot thread").expect("boot")).collect();
    assert_ne!(tbs[0].pid(), tbs[1].pid());
    assert_ne!(tbs[0].scratch(), tbs[1].scratch());

    tbs[0].install_unit("baton-only-here.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n").unwrap();
    assert_eq!(tbs[0].show("baton-only-here.service", "LoadState").unwrap(), "loaded");
    assert_eq!(tbs[1].show("baton-only-here.service", "LoadState").unwrap(), "not-found");

    // Each has its own machine id (so its own journal).
    let ids: Vec<String> = tbs.iter().map(|tb| tb.run_checked(&["cat", "/etc/machine-id"]).unwrap().stdout).collect();
    assert_ne!(ids[0], ids[1]);
    for tb in tbs {
        tb.shutdown().expect("clean teardown");
    }
}
