//! `baton units`: the generated `.socket`/`.service` text (each option in
//! its directive, bad input refused), `systemd-analyze verify` on 252 (the
//! host's), 257 (Debian trixie) and 262 (Debian forky) over a matrix of
//! options, the reference units in `units/` kept identical to what the
//! generator writes, and the generated units really running — hardening
//! included — under a real systemd 252, 257 and 262: the conformance probe supervised by Baton
//! (`systemctl reload` overlapped, Baton's own crash) and socket-activated
//! directly (`systemctl restart`), and the reference server from `units/`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::units::{self, UnitFile, UnitsArgs, UnitsError, generate, to_stdout_text, write_files};
use baton_testbed::probe::ask;
use baton_testbed::{Bed, Flavor, cargo_bin, free_loopback_port};
use clap::Parser;

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: UnitsArgs,
}

fn try_parse(argv: &[&str]) -> Result<UnitsArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("baton-units").chain(argv.iter().copied())).map(|c| c.args)
}

fn parse(argv: &[&str]) -> UnitsArgs {
    try_parse(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn gen_for(argv: &[&str], version: u32) -> Vec<UnitFile> {
    generate(&parse(argv), version).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn gen_err(argv: &[&str]) -> UnitsError {
    generate(&parse(argv), 252).expect_err(&format!("{argv:?} should be refused"))
}

/// A unit file's directives: (section, key) → values in order, comments and
/// blank lines skipped.
struct Ini(BTreeMap<(String, String), Vec<String>>);

impl Ini {
    fn parse(text: &str) -> Ini {
        let mut map: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_owned();
                continue;
            }
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {line:?}"));
            map.entry((section.clone(), k.to_owned())).or_default().push(v.to_owned());
        }
        Ini(map)
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.0
            .get(&(section.to_owned(), key.to_owned()))
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The single value of `key`, or `None`; panics if it appears twice.
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        let all = self.all(section, key);
        assert!(all.len() <= 1, "{key} appears {} times", all.len());
        all.first().copied()
    }

    fn one(&self, section: &str, key: &str) -> &str {
        self.get(section, key).unwrap_or_else(|| panic!("no {key}= in [{section}]"))
    }
}

fn file<'a>(files: &'a [UnitFile], name: &str) -> &'a UnitFile {
    files
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no {name} among {:?}", files.iter().map(|f| &f.name).collect::<Vec<_>>()))
}

fn ini(files: &[UnitFile], name: &str) -> Ini {
    Ini::parse(&file(files, name).contents)
}

/// A private directory under the system's temporary directory, removed on
/// drop (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("baton-units-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(files: &[UnitFile]) -> Vec<&str> {
    files.iter().map(|f| f.name.as_str()).collect()
}

// ---- the text -----------------------------------------------------------

#[test]
fn supervised_on_252_uses_exec_reload() {
    let files = gen_for(&["--name", "web", "--listen", "http=8080", "--", "/usr/bin/app", "--flag"], 252);
    // Steering is on by default (as for `baton run`): a sibling socket unit.
    assert_eq!(names(&files), ["web.socket", "web-b.socket", "web.service"]);
    let sock = ini(&files, "web.socket");
    assert_eq!(sock.all("Socket", "ListenStream"), ["8080"]);
    assert_eq!(sock.one("Socket", "BindIPv6Only"), "both");
    assert_eq!(sock.one("Socket", "FileDescriptorName"), "http");
    assert_eq!(sock.one("Socket", "Service"), "web.service");
    assert_eq!(sock.one("Install", "WantedBy"), "sockets.target");
    assert_eq!(sock.get("Unit", "PartOf"), None, "the socket must outlive service restarts");

    let svc = ini(&files, "web.service");
    assert_eq!(svc.one("Service", "Type"), "notify");
    assert_eq!(
        svc.one("Service", "ExecStart"),
        "/usr/bin/baton run --name web --fdstore-max 4096 --stop-timeout 30s -- /usr/bin/app --flag"
    );
    assert_eq!(svc.one("Service", "ExecReload"), "+/usr/bin/baton restart --name web --wait");
    assert_eq!(svc.get("Service", "ReloadSignal"), None);
    assert_eq!(svc.one("Service", "NotifyAccess"), "main");
    assert_eq!(svc.one("Service", "Sockets"), "web.socket web-b.socket");
    assert_eq!(svc.one("Unit", "Requires"), "web.socket");
    // Wanted only: a sibling that cannot listen leaves Baton unsteered, not down.
    assert_eq!(svc.one("Unit", "Wants"), "web-b.socket");
    assert_eq!(svc.one("Unit", "After"), "web.socket web-b.socket");
    assert_eq!(svc.one("Service", "FileDescriptorStoreMax"), "4096");
    // Baton's own crash lets the generations drain (see tests/under_systemd.rs for the figures).
    assert_eq!(svc.one("Service", "KillMode"), "control-group");
    assert_eq!(svc.one("Service", "TimeoutStopSec"), "45s");
    assert_eq!(svc.one("Service", "Restart"), "on-failure");
    assert_eq!(svc.one("Service", "RuntimeDirectory"), "web");
    assert_eq!(svc.one("Service", "DynamicUser"), "yes");
    assert_eq!(svc.get("Service", "User"), None);
    assert_eq!(svc.get("Service", "WatchdogSec"), None);
    assert_eq!(svc.one("Service", "LimitNOFILE"), "65536");
    assert_eq!(svc.one("Unit", "StartLimitBurst"), "20");
    assert_eq!(svc.one("Install", "Also"), "web.socket web-b.socket");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(svc.one("Service", key), value, "{key}");
    }
    assert_eq!(svc.all("Service", "SystemCallFilter"), ["@system-service", "~@privileged @resources"]);

    let header =
        "# Generated by: baton units --name web --listen http=8080 --systemd-version 252 -- /usr/bin/app --flag\n";
    for f in &files {
        assert!(f.contents.starts_with(header), "{}:\n{}", f.name, f.contents);
    }
}

#[test]
fn supervised_on_253_and_later_reloads_through_exec_reload() {
    // Not Type=notify-reload: its reloads cannot fail (issue 14, tests/reload_failure.rs).
    for version in [253, 257] {
        let files = gen_for(&["--name", "web", "--listen", "http=8080", "--", "/usr/bin/app"], version);
        let svc = ini(&files, "web.service");
        assert_eq!(svc.one("Service", "Type"), "notify", "{version}");
        assert_eq!(svc.get("Service", "ReloadSignal"), None);
        assert_eq!(svc.one("Service", "ExecReload"), "+/usr/bin/baton restart --name web --wait");
        assert!(file(&files, "web.service").contents.contains(&format!("--systemd-version {version} ")));
    }
}

#[test]
fn direct_runs_the_app_itself() {
    let files =
        gen_for(&["--name", "web", "--listen", "http=8080", "--direct", "--watchdog", "10", "--", "/usr/bin/app"], 257);
    let svc = ini(&files, "web.service");
    assert_eq!(svc.one("Service", "Type"), "notify", "direct never uses notify-reload");
    assert_eq!(svc.one("Service", "ExecStart"), "/usr/bin/app");
    assert_eq!(svc.get("Service", "ExecReload"), None);
    assert_eq!(svc.one("Service", "WatchdogSec"), "10s");
    assert_eq!(svc.one("Service", "KillMode"), "control-group");
    assert_eq!(svc.one("Service", "TimeoutStopSec"), "45s");
    assert_eq!(svc.one("Service", "FileDescriptorStoreMax"), "4096");
    assert_eq!(svc.one("Service", "Sockets"), "web.socket");
    assert!(!file(&files, "web.service").contents.contains("/usr/bin/baton"));
    assert!(file(&files, "web.service").contents.contains(" --direct "));
}

#[test]
fn options_land_in_their_directives() {
    let argv = [
        "--name",
        "web",
        "-l",
        "http=127.0.0.1:80",
        "--user",
        "www-data",
        "--fdstore-max",
        "100",
        "--watchdog",
        "1500ms",
        "--stop-timeout",
        "10s",
        "--baton",
        "/opt/baton/bin/baton",
        "--supervised",
        "--",
        "/usr/bin/app",
    ];
    let files = gen_for(&argv, 252);
    let svc = ini(&files, "web.service");
    assert_eq!(svc.one("Service", "User"), "www-data");
    assert_eq!(svc.get("Service", "DynamicUser"), None);
    assert_eq!(svc.one("Service", "FileDescriptorStoreMax"), "100");
    assert_eq!(
        svc.one("Service", "ExecStart"),
        "/opt/baton/bin/baton run --name web --fdstore-max 100 --stop-timeout 10s --watchdog 1500ms -- /usr/bin/app"
    );
    assert_eq!(svc.one("Service", "ExecReload"), "+/opt/baton/bin/baton restart --name web --wait");
    assert_eq!(svc.get("Service", "WatchdogSec"), None, "Baton does not ping systemd's watchdog");
    assert_eq!(svc.one("Service", "TimeoutStopSec"), "25s");
    let sock = ini(&files, "web.socket");
    assert_eq!(sock.all("Socket", "ListenStream"), ["127.0.0.1:80"]);
    assert_eq!(sock.get("Socket", "BindIPv6Only"), None);
    assert!(file(&files, "web.service").contents.starts_with(
        "# Generated by: baton units --name web --listen http=127.0.0.1:80 --user www-data --fdstore-max 100 \
         --watchdog 1500ms --stop-timeout 10s --systemd-version 252 --baton /opt/baton/bin/baton -- /usr/bin/app\n"
    ));

    // The fd store is passed in at every start: the fd limit grows with it.
    let big = gen_for(&["--name", "web", "-l", "8080", "--fdstore-max", "40000", "--", "/usr/bin/app"], 252);
    assert_eq!(ini(&big, "web.service").one("Service", "LimitNOFILE"), "81024");
    let none = gen_for(&["--name", "web", "-l", "8080", "--fdstore-max", "0", "--direct", "--", "/usr/bin/app"], 252);
    assert_eq!(ini(&none, "web.service").one("Service", "FileDescriptorStoreMax"), "0");
    let uid = gen_for(&["--name", "web", "-l", "8080", "--user", "1000", "--", "/usr/bin/app"], 252);
    assert_eq!(ini(&uid, "web.service").one("Service", "User"), "1000");
}

#[test]
fn listen_forms_map_to_socket_directives() {
    let cases: &[(&str, &str, &str)] = &[
        ("8080", "ListenStream", "8080"),
        ("tcp:8080", "ListenStream", "8080"),
        ("[::]:8080", "ListenStream", "8080"),
        ("127.0.0.1:80", "ListenStream", "127.0.0.1:80"),
        ("[::1]:443", "ListenStream", "[::1]:443"),
        ("udp:53", "ListenDatagram", "53"),
        ("udp:127.0.0.1:53", "ListenDatagram", "127.0.0.1:53"),
        ("unix:/run/web.sock", "ListenStream", "/run/web.sock"),
        ("/run/web.sock", "ListenStream", "/run/web.sock"),
        ("unix:@web", "ListenStream", "@web"),
        ("seqpacket:/run/web.seq", "ListenSequentialPacket", "/run/web.seq"),
        ("seqpacket:@web", "ListenSequentialPacket", "@web"),
        ("unixgram:/run/web.log", "ListenDatagram", "/run/web.log"),
        ("unixgram:@web", "ListenDatagram", "@web"),
        ("unix:/run/100%.sock", "ListenStream", "/run/100%%.sock"),
        ("unix:/run/a b.sock", "ListenStream", "/run/a b.sock"),
    ];
    for &(listen, key, value) in cases {
        let files = gen_for(&["--name", "web", "--listen", listen, "--", "/usr/bin/app"], 252);
        let sock = ini(&files, "web.socket");
        assert_eq!(sock.all("Socket", key), [value], "{listen}");
        for other in ["ListenStream", "ListenDatagram", "ListenSequentialPacket"] {
            if other != key {
                assert!(sock.all("Socket", other).is_empty(), "{listen}: {other}");
            }
        }
        // Unnamed: systemd names the fd after the unit.
        assert_eq!(sock.get("Socket", "FileDescriptorName"), None, "{listen}");
        let dual = value.bytes().all(|b| b.is_ascii_digit());
        assert_eq!(sock.get("Socket", "BindIPv6Only"), dual.then_some("both"), "{listen}");
        // The header writes it back in a form that parses to the same spec.
        let regenerated = regenerate(&file(&files, "web.socket").contents);
        assert_eq!(regenerated, files, "{listen}");
    }
}

#[test]
fn several_fd_names_make_several_socket_units() {
    let files = gen_for(
        &[
            "--name",
            "web",
            "-l",
            "http=80",
            "-l",
            "admin=unix:/run/web-admin.sock",
            "-l",
            "http=[::1]:8080",
            "-l",
            "metrics=udp:127.0.0.1:9125",
            "--",
            "/usr/bin/app",
        ],
        252,
    );
    assert_eq!(
        names(&files),
        ["web.socket", "web-b.socket", "web-admin.socket", "web-metrics.socket", "web-metrics-b.socket", "web.service"]
    );
    let http = ini(&files, "web.socket");
    assert_eq!(http.all("Socket", "ListenStream"), ["80", "[::1]:8080"]);
    assert_eq!(http.one("Socket", "FileDescriptorName"), "http");
    let admin = ini(&files, "web-admin.socket");
    assert_eq!(admin.all("Socket", "ListenStream"), ["/run/web-admin.sock"]);
    assert_eq!(admin.one("Socket", "FileDescriptorName"), "admin");
    assert_eq!(admin.one("Socket", "Service"), "web.service");
    assert_eq!(admin.get("Socket", "BindIPv6Only"), None);
    let metrics = ini(&files, "web-metrics.socket");
    assert_eq!(metrics.all("Socket", "ListenDatagram"), ["127.0.0.1:9125"]);
    let svc = ini(&files, "web.service");
    let all = "web.socket web-b.socket web-admin.socket web-metrics.socket web-metrics-b.socket";
    assert_eq!(svc.one("Service", "Sockets"), all);
    assert_eq!(svc.one("Unit", "Requires"), "web.socket web-admin.socket web-metrics.socket");
    assert_eq!(svc.one("Unit", "Wants"), "web-b.socket web-metrics-b.socket");
    assert_eq!(svc.one("Install", "Also"), all);

    // Unnamed first: NAME.socket without FileDescriptorName=, named ones apart.
    let files = gen_for(&["--name", "web", "-l", "80", "-l", "admin=unix:@web-admin", "--", "/usr/bin/app"], 252);
    assert_eq!(names(&files), ["web.socket", "web-b.socket", "web-admin.socket", "web.service"]);
    assert_eq!(ini(&files, "web.socket").get("Socket", "FileDescriptorName"), None);
}

#[test]
fn steering_auto_writes_a_sibling_unit_per_ip_fd_name() {
    let argv = [
        "--name",
        "web",
        "-l",
        "http=80",
        "-l",
        "http=unix:/run/web-http.sock",
        "-l",
        "admin=unix:/run/web-admin.sock",
        "-l",
        "dns=udp:127.0.0.1:53",
        "--steering",
        "auto",
        "--",
        "/usr/bin/app",
    ];
    let files = gen_for(&argv, 252);
    assert_eq!(
        names(&files),
        ["web.socket", "web-b.socket", "web-admin.socket", "web-dns.socket", "web-dns-b.socket", "web.service"]
    );
    // Both units of a pair: ReusePort=yes, one fd name, the same IP addresses
    // (the sibling without the group's Unix socket).
    let http = ini(&files, "web.socket");
    assert_eq!(http.all("Socket", "ListenStream"), ["80", "/run/web-http.sock"]);
    assert_eq!(http.one("Socket", "ReusePort"), "yes");
    let sib = ini(&files, "web-b.socket");
    assert_eq!(sib.all("Socket", "ListenStream"), ["80"]);
    assert_eq!(sib.one("Socket", "ReusePort"), "yes");
    assert_eq!(sib.one("Socket", "FileDescriptorName"), "http");
    assert_eq!(sib.one("Socket", "BindIPv6Only"), "both");
    assert_eq!(sib.one("Socket", "Service"), "web.service");
    assert_eq!(sib.one("Install", "WantedBy"), "sockets.target");
    let dns = ini(&files, "web-dns-b.socket");
    assert_eq!(dns.all("Socket", "ListenDatagram"), ["127.0.0.1:53"]);
    assert_eq!(dns.one("Socket", "FileDescriptorName"), "dns");
    assert_eq!(dns.get("Socket", "BindIPv6Only"), None);
    // A Unix-only name has no sibling and no ReusePort=.
    assert_eq!(ini(&files, "web-admin.socket").get("Socket", "ReusePort"), None);
    // The service takes every socket, siblings included.
    let svc = ini(&files, "web.service");
    let all = "web.socket web-b.socket web-admin.socket web-dns.socket web-dns-b.socket";
    assert_eq!(svc.one("Service", "Sockets"), all);
    assert_eq!(svc.one("Unit", "Requires"), "web.socket web-admin.socket web-dns.socket");
    assert_eq!(svc.one("Unit", "Wants"), "web-b.socket web-dns-b.socket");
    assert_eq!(svc.one("Unit", "After"), all);
    assert_eq!(svc.one("Install", "Also"), all);
    // Baton pairs by name and address: nothing to add to `baton run`.
    assert!(!svc.one("Service", "ExecStart").contains("steering"));
    // The header regenerates the same units.
    assert_eq!(regenerate(&file(&files, "web-b.socket").contents), files);

    // Unnamed: systemd names the first unit's fds after it, so the sibling
    // gives its sockets that name.
    let files = gen_for(&["--name", "web", "-l", "8080", "--steering", "auto", "--", "/usr/bin/app"], 252);
    assert_eq!(names(&files), ["web.socket", "web-b.socket", "web.service"]);
    assert_eq!(ini(&files, "web.socket").get("Socket", "FileDescriptorName"), None);
    assert_eq!(ini(&files, "web-b.socket").one("Socket", "FileDescriptorName"), "web.socket");

    // Auto is the default of the supervised topology: the same units, and
    // the header needs no --steering.
    let default = gen_for(&["--name", "web", "-l", "http=8080", "--", "/usr/bin/app"], 252);
    let auto = gen_for(&["--name", "web", "-l", "http=8080", "--steering", "auto", "--", "/usr/bin/app"], 252);
    assert_eq!(default, auto);
    assert_eq!(names(&default), ["web.socket", "web-b.socket", "web.service"]);
    assert!(!file(&default, "web.socket").contents.lines().next().unwrap().contains("--steering"));

    // Off: one unit per name, no ReusePort=, and Baton told so (its status
    // then says steering is off rather than that a sibling is missing).
    let files = gen_for(&["--name", "web", "-l", "http=8080", "--steering", "off", "--", "/usr/bin/app"], 252);
    assert_eq!(names(&files), ["web.socket", "web.service"]);
    assert_eq!(ini(&files, "web.socket").get("Socket", "ReusePort"), None);
    assert_eq!(ini(&files, "web.service").get("Unit", "Wants"), None);
    assert!(file(&files, "web.socket").contents.lines().next().unwrap().contains(" --steering off "));
    assert_eq!(
        ini(&files, "web.service").one("Service", "ExecStart"),
        "/usr/bin/baton run --name web --fdstore-max 4096 --stop-timeout 30s --steering off -- /usr/bin/app"
    );
    assert_eq!(regenerate(&file(&files, "web.service").contents), files);

    // Direct: no Baton, no steering, whether off is said or not.
    for off in [&["--steering", "off"][..], &[]] {
        let mut argv = vec!["--name", "web", "-l", "http=8080", "--direct"];
        argv.extend(off);
        argv.extend(["--", "/usr/bin/app"]);
        let files = gen_for(&argv, 252);
        assert_eq!(names(&files), ["web.socket", "web.service"]);
        assert_eq!(ini(&files, "web.socket").get("Socket", "ReusePort"), None);
        assert!(!file(&files, "web.socket").contents.lines().next().unwrap().contains("--steering"));
        assert_eq!(regenerate(&file(&files, "web.service").contents), files);
    }
    // Unix sockets only: nothing to steer, no sibling.
    let files = gen_for(&["--name", "web", "-l", "unix:/run/web.sock", "--", "/usr/bin/app"], 252);
    assert_eq!(names(&files), ["web.socket", "web.service"]);
}

#[test]
fn proving_options_pass_through_into_exec_start() {
    let argv = [
        "--name",
        "web",
        "-l",
        "http=127.0.0.1:8080",
        "--probe",
        "--health-http",
        "/healthz?full=1",
        "--health-cmd",
        "curl -fsS \"http://$BATON_PROBE_ADDR/\" > /dev/null; echo 100%",
        "--health-interval",
        "250ms",
        "--health-timeout",
        "1.5s",
        "--health-passes",
        "5",
        "--ready",
        "after:1500ms",
        "--quiet-period",
        "3s",
        "--probation",
        "1min",
        "--canary",
        "10",
        "--",
        "/usr/bin/app",
    ];
    let files = gen_for(&argv, 252);
    assert_eq!(
        ini(&files, "web.service").one("Service", "ExecStart"),
        "/usr/bin/baton run --name web --fdstore-max 4096 --stop-timeout 30s --probe --health-http \"/healthz?full=1\" \
         --health-cmd \"curl -fsS \\\"http://$$BATON_PROBE_ADDR/\\\" > /dev/null; echo 100%%\" --health-interval 250ms \
         --health-timeout 1500ms --health-passes 5 --ready after:1500ms --quiet-period 3s --probation 60s --canary 10 \
         -- /usr/bin/app"
    );
    let header = file(&files, "web.service").contents.lines().next().unwrap().to_owned();
    assert!(
        header.contains(" --health-cmd 'curl -fsS \"http://$BATON_PROBE_ADDR/\" > /dev/null; echo 100%' "),
        "{header}"
    );
    // The header reproduces the same units.
    assert_eq!(regenerate(&file(&files, "web.service").contents), files);
    // `baton run` itself takes the words (unquoted as systemd passes them).
    let args = parse(&argv);
    let mut run = vec!["baton".to_owned(), "run".into()];
    run.extend(args.run_words());
    run.extend(["--".into(), "/usr/bin/app".into()]);
    let cli = baton::cli::Cli::try_parse_from(&run).unwrap_or_else(|e| panic!("{run:?}: {e}"));
    let baton::cli::Command::Run(run) = cli.command else { panic!("not run") };
    run.check().unwrap();
    let policy = run.policy();
    assert!(policy.probe);
    assert_eq!(policy.health_cmd.as_deref(), Some("curl -fsS \"http://$BATON_PROBE_ADDR/\" > /dev/null; echo 100%"));
    assert_eq!(policy.proving.passes, 5);
    assert_eq!(policy.proving.interval, Duration::from_millis(250));
    assert_eq!(policy.proving.timeout, Duration::from_millis(1500));
    assert_eq!(policy.proving.quiet_period, Duration::from_secs(3));
    assert_eq!(policy.proving.probation, Duration::from_secs(60));
    assert_eq!(policy.proving.canary, 10);

    // Left out, they are left to `baton run`'s defaults.
    let plain = gen_for(&["--name", "web", "-l", "http=8080", "--", "/usr/bin/app"], 252);
    let exec = ini(&plain, "web.service").one("Service", "ExecStart").to_owned();
    for option in ["--probe", "--health", "--ready", "--quiet-period", "--probation", "--canary", "--steering"] {
        assert!(!exec.contains(option), "{exec}");
    }
    // A zero turns a period off and is written out.
    let zero =
        gen_for(&["--name", "web", "-l", "8080", "--quiet-period", "0", "--probation", "0", "--", "/usr/bin/app"], 252);
    assert!(ini(&zero, "web.service").one("Service", "ExecStart").contains(" --quiet-period 0s --probation 0s -- "));
    let tcp = gen_for(&["--name", "web", "-l", "8080", "--health-tcp", "--ready", "probe", "--", "/usr/bin/app"], 252);
    assert!(ini(&tcp, "web.service").one("Service", "ExecStart").contains(" --health-tcp --ready probe -- "));
    assert!(file(&tcp, "web.service").contents.contains("# Its probe: a TCP connect to its private probe socket.\n"));
}

#[test]
fn proving_refusals_name_the_fix() {
    let app = ["--", "/usr/bin/app"];
    let refused = |extra: &[&str]| {
        let argv: Vec<&str> = ["--name", "web", "-l", "8080"].iter().chain(extra).chain(&app).copied().collect();
        let e = gen_err(&argv);
        assert!(matches!(e, UnitsError::Proving { .. }) && e.is_usage(), "{extra:?}: {e}");
        e.to_string()
    };
    let e = refused(&["--direct", "--health-http", "/"]);
    assert!(e.contains("--health-http") && e.contains("use the supervised topology"), "{e}");
    let e = refused(&["--direct", "--probation", "5s"]);
    assert!(e.contains("leave --probation out"), "{e}");
    let e = refused(&["--ready", "probe"]);
    assert!(e.contains("add --health-http PATH or --health-tcp"), "{e}");
    let e = refused(&["--canary", "10", "--quiet-period", "0"]);
    assert!(e.contains("set --quiet-period"), "{e}");
    // Refused by the parser, with `baton run`'s own messages.
    for (extra, needle) in [
        (&["--health-http", "healthz"][..], "start it with /"),
        (&["--health-http", "/a b"], "percent-encode"),
        (&["--health-http", "/", "--health-tcp"], "cannot be used with"),
        (&["--health-passes", "0"], "--health-passes"),
        (&["--canary", "100"], "--canary"),
        (&["--ready", "later"], "use notify, probe or after:DURATION"),
        (&["--ready", "after:0.5ms"], "whole number of milliseconds"),
        (&["--quiet-period", "0.5ms"], "whole number of milliseconds"),
        (&["--health-interval", "soon"], "not a duration"),
    ] {
        let argv: Vec<&str> = ["--name", "web", "-l", "8080"].iter().chain(extra).chain(&app).copied().collect();
        let e = try_parse(&argv).map(|_| ()).expect_err(&format!("{extra:?} should be refused")).to_string();
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
}

#[test]
fn steering_auto_refusals_name_the_fix() {
    let e = gen_err(&["--name", "web", "-l", "8080", "--direct", "--steering", "auto", "--", "/usr/bin/app"]);
    assert!(matches!(e, UnitsError::Steering { .. }), "{e}");
    assert!(e.to_string().contains("supervised topology"), "{e}");
    assert!(e.is_usage());
    // An fd name "b" already owns web-b.socket.
    let e =
        gen_err(&["--name", "web", "-l", "http=8080", "-l", "b=unix:@x", "--steering", "auto", "--", "/usr/bin/app"]);
    assert!(e.to_string().contains("web-b.socket"), "{e}");
    assert!(e.to_string().contains("rename that FDNAME"), "{e}");
    let e = try_parse(&["--name", "web", "-l", "8080", "--steering", "on", "--", "/usr/bin/app"]).unwrap_err();
    assert!(e.to_string().contains("auto"), "{e}");
}

#[test]
fn command_words_are_quoted_for_exec_start() {
    let files = gen_for(
        &["--name", "web", "-l", "8080", "--", "/usr/bin/app", "a b", "$HOME", "50%", "", ";", "\"q\"\\", "it's"],
        252,
    );
    let svc = ini(&files, "web.service");
    assert_eq!(
        svc.one("Service", "ExecStart"),
        r#"/usr/bin/baton run --name web --fdstore-max 4096 --stop-timeout 30s -- /usr/bin/app "a b" "$$HOME" 50%% "" ";" "\"q\"\\" "it's""#
    );
    // The header is a shell command that reproduces the same units.
    assert_eq!(regenerate(&file(&files, "web.service").contents), files);
}

#[test]
fn bad_input_is_refused_with_the_fix() {
    let app = ["--", "/usr/bin/app"];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(app.iter().map(|s| s.to_string()));
        v
    };
    let err = |extra: &[&str]| {
        let v = with(extra);
        gen_err(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let long = "x".repeat(48);
    for (name, needle) in [
        ("", "empty"),
        ("web app", "only ASCII letters"),
        ("web/x", "only ASCII letters"),
        ("web@1", "only ASCII letters"),
        ("-web", "start with a letter or a digit"),
        (".web", "start with a letter or a digit"),
        ("web.service", "without a unit suffix"),
        (long.as_str(), "107-byte limit"),
    ] {
        let e = err(&[&format!("--name={name}"), "-l", "8080"]);
        assert!(matches!(e, UnitsError::Name { .. }) && e.to_string().contains(needle), "{name:?}: {e}");
        assert!(e.is_usage());
    }
    // 47 bytes is the longest name whose notify socket path fits.
    gen_for(&with(&["--name", &"x".repeat(47), "-l", "8080"]).iter().map(String::as_str).collect::<Vec<_>>(), 252);

    for user in ["a b", "-x", "root:root", "4294967295", "ünï", "nobody", "65534"] {
        let e = err(&["--name", "web", "-l", "8080", &format!("--user={user}")]);
        assert!(matches!(e, UnitsError::User { .. }) && e.to_string().contains("DynamicUser"), "{user:?}: {e}");
    }
    for (listen, needle) in [
        ("127.0.0.1:0", "fixed port"),
        ("udp:0", "fixed port"),
        ("unix:/run/web/app.sock", "RuntimeDirectory="),
        ("unix:/run/a\\b", "backslash"),
        ("unix:/run/a ", "blank"),
    ] {
        let e = err(&["--name", "web", "-l", listen]);
        assert!(matches!(e, UnitsError::Listen { .. }) && e.to_string().contains(needle), "{listen}: {e}");
    }
    let e = err(&["--name", "web", "-l", "http=80", "-l", "8080"]);
    assert!(e.to_string().contains("unnamed --listen must come first"), "{e}");
    let e = err(&["--name", "web", "-l", "http=80", "-l", "other=[::]:80"]);
    assert!(e.to_string().contains("given twice"), "{e}");
    let e = err(&["--name", "web", "-l", "8080", "--watchdog", "0"]);
    assert!(matches!(e, UnitsError::ZeroWatchdog), "{e}");
    let e = err(&["--name", "web", "-l", "8080", "--baton", "bin/baton"]);
    assert!(matches!(e, UnitsError::BatonPath { .. }) && e.to_string().contains("absolute"), "{e}");

    let e = gen_err(&["--name", "web", "-l", "8080", "--", "app"]);
    assert!(e.to_string().contains("/usr/bin/app"), "{e}");
    let mut args = parse(&["--name", "web", "-l", "8080", "--", "/usr/bin/app"]);
    args.command.push(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(vec![0xff]));
    let e = generate(&args, 252).unwrap_err();
    assert!(matches!(e, UnitsError::Command { .. }) && e.to_string().contains("not UTF-8"), "{e}");
    let e = generate(&parse(&["--name", "web", "-l", "8080", "--", "/usr/bin/app"]), 251).unwrap_err();
    assert!(e.to_string().contains("252 or later"), "{e}");

    // Refused by the parser already.
    for argv in [
        &["--name", "web", "--", "/usr/bin/app"][..],
        &["--name", "web", "-l", "8080"],
        &["--name", "web", "-l", "8080", "--direct", "--supervised", "--", "/usr/bin/app"],
        &["--name", "web", "-l", "bad name=8080", "--", "/usr/bin/app"],
        &["--name", "web", "-l", "8080", "--watchdog", "soon", "--", "/usr/bin/app"],
    ] {
        assert!(try_parse(argv).is_err(), "{argv:?}");
    }
}

#[test]
fn output_to_a_directory_or_stdout() {
    let scratch = Scratch::new("test");
    let dir = scratch.0.clone();
    let files = gen_for(&["--name", "web", "-l", "http=8080", "-l", "admin=unix:@a", "--", "/usr/bin/app"], 252);
    let out = dir.join("nested");
    let written = write_files(&out, &files).unwrap();
    assert_eq!(written, files.iter().map(|f| out.join(&f.name)).collect::<Vec<_>>());
    for f in &files {
        assert_eq!(std::fs::read_to_string(out.join(&f.name)).unwrap(), f.contents);
    }
    let mut listed: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, ["web-admin.socket", "web-b.socket", "web.service", "web.socket"], "no temporary file is left");
    // Writing again replaces the files.
    write_files(&out, &files).unwrap();

    // A file where the directory should be.
    std::fs::write(dir.join("plain"), "x").unwrap();
    let e = write_files(&dir.join("plain"), &files).unwrap_err();
    assert!(matches!(e, UnitsError::Write { .. }) && !e.is_usage() && e.to_string().contains("plain"), "{e}");

    let text = to_stdout_text(&files);
    let mut parts = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("# ---- ").and_then(|l| l.strip_suffix(" ----")) {
            parts.push((name.to_owned(), String::new()));
        } else {
            let (_, body) = parts.last_mut().expect("a separator comes first");
            body.push_str(line);
            body.push('\n');
        }
    }
    assert_eq!(parts, files.iter().map(|f| (f.name.clone(), f.contents.clone())).collect::<Vec<_>>());
}

#[test]
fn run_writes_the_units_for_the_local_systemd() {
    let scratch = Scratch::new("run");
    let dir = scratch.0.clone();
    let out = dir.to_string_lossy().into_owned();
    let args = parse(&["--name", "web", "-l", "http=8080", "--output", &out, "--", "/usr/bin/app"]);
    units::run(&args).unwrap();
    let version = units::detect_systemd_version().unwrap_or(units::DEFAULT_SYSTEMD_VERSION);
    for f in generate(&args, version).unwrap() {
        assert_eq!(std::fs::read_to_string(dir.join(&f.name)).unwrap(), f.contents, "{}", f.name);
        assert!(f.contents.contains(&format!(" --systemd-version {version} ")), "{}", f.contents);
        assert!(!f.contents.contains("--output"), "where the files went is not part of them");
    }
    // An explicit version wins over the local one.
    let args = parse(&["--name", "web", "-l", "8080", "-o", &out, "--systemd-version", "257", "--", "/usr/bin/app"]);
    units::run(&args).unwrap();
    let svc = std::fs::read_to_string(dir.join("web.service")).unwrap();
    assert!(svc.contains(" --systemd-version 257 "), "{svc}");
}

#[test]
fn detected_systemd_version_is_the_local_one() {
    let Ok(out) = std::process::Command::new("systemctl").arg("--version").output() else {
        assert_eq!(units::detect_systemd_version(), None);
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let expected: Option<u32> = text.split_whitespace().nth(1).and_then(|v| v.parse().ok());
    assert_eq!(units::detect_systemd_version(), expected);
}

// ---- header round trip and the reference units ---------------------------

/// Splits a shell command line written by the generator: plain words and
/// `'single-quoted'` parts (with `'\''`).
fn shell_split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// Runs the command recorded in a unit's `# Generated by:` header.
fn regenerate(contents: &str) -> Vec<UnitFile> {
    let line = contents.lines().next().and_then(|l| l.strip_prefix("# Generated by: ")).expect("header");
    let words = shell_split(line);
    assert_eq!(words[..2], ["baton", "units"], "{line}");
    let argv: Vec<&str> = words[2..].iter().map(String::as_str).collect();
    let args = parse(&argv);
    let version = args.systemd_version.expect("the header records --systemd-version");
    generate(&args, version).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("units")
}

/// Every unit file under `units/`, by directory.
fn reference_files() -> BTreeMap<PathBuf, Vec<UnitFile>> {
    let mut out: BTreeMap<PathBuf, Vec<UnitFile>> = BTreeMap::new();
    let mut dirs = vec![reference_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "socket" || e == "service") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let contents = std::fs::read_to_string(&path).unwrap();
                out.entry(dir.clone()).or_default().push(UnitFile { name, contents });
            }
        }
    }
    out
}

/// `units/` holds exactly what the generator writes for the command line
/// recorded in each file: regenerate with that command and compare byte for
/// byte (set `BATON_UNITS_BLESS=1` to rewrite them after a deliberate change).
#[test]
fn reference_units_match_the_generator() {
    let bless = std::env::var_os("BATON_UNITS_BLESS").is_some();
    let found = reference_files();
    assert!(found.len() >= 2, "units/ and units/direct/ hold the reference units: {found:?}", found = found.keys());
    for (dir, files) in found {
        let mut by_header: BTreeMap<String, Vec<&UnitFile>> = BTreeMap::new();
        for f in &files {
            by_header.entry(f.contents.lines().next().unwrap_or_default().to_owned()).or_default().push(f);
        }
        for (header, group) in by_header {
            let expected = regenerate(&group[0].contents);
            if bless {
                write_files(&dir, &expected).unwrap();
                continue;
            }
            let mut got: Vec<&str> = group.iter().map(|f| f.name.as_str()).collect();
            got.sort();
            let mut want: Vec<&str> = expected.iter().map(|f| f.name.as_str()).collect();
            want.sort();
            assert_eq!(got, want, "{}: files of {header}", dir.display());
            for f in &expected {
                let on_disk = group.iter().find(|g| g.name == f.name).unwrap();
                assert!(
                    on_disk.contents == f.contents,
                    "{}/{} drifted from the generator (rerun with BATON_UNITS_BLESS=1 if intended):\n--- on disk\n{}\n--- generated\n{}",
                    dir.display(),
                    f.name,
                    on_disk.contents,
                    f.contents
                );
            }
        }
    }
}

#[test]
fn reference_units_are_the_documented_ones() {
    let files = reference_files();
    let supervised = &files[&reference_dir()];
    let svc = Ini::parse(&file(supervised, "baton-httpd.service").contents);
    assert_eq!(svc.one("Service", "Type"), "notify", "the 252 baseline");
    assert_eq!(
        svc.one("Service", "ExecStart"),
        "/usr/bin/baton run --name baton-httpd --fdstore-max 4096 --stop-timeout 30s --health-http /healthz -- \
         /usr/bin/baton-httpd --root /usr/share/baton-httpd/www"
    );
    // Steered: the package ships both units of the pair.
    assert_eq!(svc.one("Service", "Sockets"), "baton-httpd.socket baton-httpd-b.socket");
    for socket in ["baton-httpd.socket", "baton-httpd-b.socket"] {
        let sock = Ini::parse(&file(supervised, socket).contents);
        assert_eq!(sock.one("Socket", "FileDescriptorName"), "http", "{socket}");
        assert_eq!(sock.one("Socket", "ReusePort"), "yes", "{socket}");
        assert_eq!(sock.all("Socket", "ListenStream"), ["80"], "{socket}");
    }
    let direct = &files[&reference_dir().join("direct")];
    let svc = Ini::parse(&file(direct, "baton-httpd.service").contents);
    assert_eq!(svc.one("Service", "ExecStart"), "/usr/bin/baton-httpd --root /usr/share/baton-httpd/www");
}

// ---- systemd-analyze verify ------------------------------------------------

/// The option matrix: topology × user × watchdog × socket kind (steered
/// pairs, steering turned off and the proving options: supervised only;
/// TCP and UDP are steered by default there).
fn matrix(baton: &str, app: &str, version: u32) -> Vec<(String, Vec<UnitFile>)> {
    let mut out = Vec::new();
    let kinds = [
        ("tcp", vec!["http=127.0.0.1:8080"]),
        ("unix", vec!["http=unix:/run/baton-units-test.sock"]),
        ("udp", vec!["http=udp:127.0.0.1:5353"]),
        ("multi", vec!["http=8080", "admin=seqpacket:@baton-units-test", "log=unixgram:/run/baton-units-test.log"]),
        ("steered", vec!["http=8080", "http=unix:/run/baton-units-steer.sock", "dns=udp:127.0.0.1:5353"]),
        ("unsteered", vec!["http=127.0.0.1:8080"]),
        ("proving", vec!["http=8080"]),
    ];
    for topology in ["--supervised", "--direct"] {
        for user in [None, Some("daemon")] {
            for watchdog in [None, Some("10s")] {
                for (kind, listens) in &kinds {
                    let supervised_only = ["steered", "unsteered", "proving"].contains(kind);
                    if supervised_only && topology == "--direct" {
                        continue;
                    }
                    let name = format!(
                        "t-{}-{}-{}-{kind}",
                        &topology[2..5],
                        user.unwrap_or("dyn"),
                        if watchdog.is_some() { "wd" } else { "nowd" }
                    );
                    let mut argv = vec!["--name", &name, topology, "--baton", baton];
                    for l in listens {
                        argv.extend(["--listen", l]);
                    }
                    if let Some(u) = user {
                        argv.extend(["--user", u]);
                    }
                    if let Some(w) = watchdog {
                        argv.extend(["--watchdog", w]);
                    }
                    match *kind {
                        "steered" => argv.extend(["--steering", "auto"]),
                        "unsteered" => argv.extend(["--steering", "off"]),
                        "proving" => argv.extend([
                            "--health-http",
                            "/healthz",
                            "--health-cmd",
                            "test -n \"$BATON_PROBE_ADDR\" && echo 100%",
                            "--ready",
                            "after:1s",
                            "--quiet-period",
                            "1500ms",
                            "--probation",
                            "3s",
                            "--canary",
                            "5",
                        ]),
                        _ => {}
                    }
                    argv.extend(["--", app, "--serve", "http", "50%", "$x"]);
                    let files = gen_for(&argv, version);
                    out.push((name.clone(), files));
                }
            }
        }
    }
    out
}

/// The complaints in `systemd-analyze verify` output (it exits 0 on
/// warnings such as unknown directives, so stderr must be read).
fn verify_problems(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn generated_units_verify_on_the_host() {
    let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs systemd-analyze");
        eprintln!("generated_units_verify_on_the_host: skipped, no systemd-analyze");
        return;
    };
    assert!(out.status.success());
    let baton = env!("CARGO_BIN_EXE_baton");
    let probe = cargo_bin("sd-probe", "baton-sd-probe");
    let host = units::detect_systemd_version().unwrap_or(252);
    let scratch = Scratch::new("verify");
    let dir = scratch.0.clone();
    for version in [252, host] {
        for (name, files) in matrix(baton, &probe.to_string_lossy(), version) {
            let sub = dir.join(format!("{version}-{name}"));
            let paths = write_files(&sub, &files).unwrap();
            let out = std::process::Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .args(&paths)
                .env("SYSTEMD_LOG_COLOR", "0")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && verify_problems(&stderr).is_empty(),
                "systemd-analyze verify {version}-{name}: {}\n{stderr}\n{}",
                out.status,
                to_stdout_text(&files)
            );
        }
    }
    // The check is real: units for a newer systemd do not pass on 252.
    if host == 252 {
        let argv = ["--name", "newer", "-l", "8080", "--fdstore-preserve", "yes", "--baton", baton, "--", baton];
        let files = gen_for(&argv, 257);
        let paths = write_files(&dir.join("newer"), &files).unwrap();
        let out =
            std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&paths).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("FileDescriptorStorePreserve"), "{stderr}");
    }
}

/// Boots `flavor` with Baton and the probe installed at /usr/local/bin, a
/// path that none of the hardening hides (ProtectHome= would hide a target
/// dir under /root).
fn boot(flavor: Flavor, test: &str) -> Option<Bed> {
    Bed::builder(flavor, test)
        .wait(WAIT)
        .binary(env!("CARGO_BIN_EXE_baton"), "/usr/local/bin/baton")
        .binary(cargo_bin("sd-probe", "baton-sd-probe"), "/usr/local/bin/baton-sd-probe")
        .boot()
}

/// `(name, contents)` of each file, for [`Bed::install_units`].
fn named(files: &[UnitFile]) -> impl Iterator<Item = (&str, &str)> {
    files.iter().map(|f| (f.name.as_str(), f.contents.as_str()))
}

/// `systemd-analyze verify` inside `flavor`'s own systemd, on the units for
/// that version and on the 252 baseline.
fn generated_units_verify_in(flavor: Flavor, test: &str) {
    let Some(bed) = boot(flavor, test) else { return };
    let tb = &bed.tb;
    assert_eq!(tb.systemd_version(), flavor.expected_systemd());
    // Both the units for this systemd and the 252 baseline must pass.
    for version in [252, tb.systemd_version()] {
        for (name, files) in matrix("/usr/local/bin/baton", "/usr/local/bin/baton-sd-probe", version) {
            let dir = format!("/var/lib/baton-units-verify/{version}-{name}");
            let mut argv = vec!["systemd-analyze".to_owned(), "verify".into(), "--man=no".into()];
            for f in &files {
                let path = format!("{dir}/{}", f.name);
                tb.write_file(&path, &f.contents).unwrap();
                argv.push(path);
            }
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = tb.run(&argv).unwrap();
            assert!(
                out.success() && verify_problems(&out.stderr).is_empty(),
                "systemd-analyze verify {version}-{name} on {}: {:?}\n{}\n{}",
                tb.systemd_version(),
                out.code(),
                out.stderr,
                to_stdout_text(&files)
            );
        }
    }
}

// On forky: 262 has neither cgroup v1 (gone in 258) nor SysV scripts (gone
// in 260): a unit depending on either would fail to verify here.
baton_testbed::systemd_tests! { generated_units_verify_in:
    generated_units_verify_on_trixie: Trixie,
    generated_units_verify_on_forky: Forky,
}

// ---- running them ----------------------------------------------------------

/// Checks in /proc that `pid` runs hardened as generated: a dynamic
/// (non-root) user, no new privileges, a seccomp filter.
fn assert_hardened(bed: &Bed, pid: &str, what: &str) {
    let status = bed.tb.run_checked(&["cat", &format!("/proc/{pid}/status")]).unwrap().stdout;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("{what}: no {name} in\n{status}"))
    };
    let uid: u32 = field("Uid").parse().unwrap();
    assert!(uid >= 61184, "{what}: uid {uid} is not a DynamicUser= uid");
    assert_eq!(field("NoNewPrivs"), "1", "{what}");
    assert_eq!(field("Seccomp"), "2", "{what}: SystemCallFilter=");
    assert_eq!(field("CapBnd"), "0000000000000000", "{what}: CapabilityBoundingSet=");
}

fn probe_pid(port: u16) -> String {
    let answer = ask(port).unwrap_or_else(|e| panic!("no answer on port {port}: {e}"));
    answer.strip_prefix("http ").unwrap_or_else(|| panic!("unexpected answer {answer:?}")).to_owned()
}

/// While this file exists, new probe generations fail before READY=1
/// (readable by the hardened service: not under /tmp, not in a home).
const FAIL_FLAG: &str = "/etc/baton-units-fail";

/// Supervised: start, `systemctl reload` is overlapped (new generation
/// serves, Baton stays MainPID), a failed restart leaves the old generation
/// serving, the fd store survives, Baton's own crash
/// is survived with the socket still listening, and `systemctl stop` ends
/// cleanly.
fn supervised_probe(bed: &Bed) {
    let port = free_loopback_port();
    let listen = format!("http=127.0.0.1:{port}");
    let version = bed.tb.systemd_version();
    let files = gen_for(
        &[
            "--name",
            "probe-sup",
            "--listen",
            &listen,
            "--watchdog",
            "5s",
            "--baton",
            "/usr/local/bin/baton",
            "--",
            "/usr/local/bin/baton-sd-probe",
            "--serve",
            "http",
            "--watchdog",
            "--store",
            "state=kept",
            "--fail-if-exists",
            FAIL_FLAG,
        ],
        version,
    );
    bed.install_units(named(&files));
    let svc = "probe-sup.service";
    assert_eq!(bed.show(svc, "Type"), "notify");
    bed.systemctl_ok(&["start", "probe-sup.socket", svc]);
    let baton_pid = bed.show(svc, "MainPID");
    let first = probe_pid(port);
    assert_ne!(first, baton_pid, "the app runs as a generation, Baton is the main process");
    assert_hardened(bed, &baton_pid, "Baton");
    assert_hardened(bed, &first, "generation 1");
    assert_eq!(bed.show(svc, "NFileDescriptorStore"), "1", "Baton mirrors the app's stored fd");

    bed.systemctl_ok(&["reload", svc]);
    bed.wait_for("the new generation to serve", || ask(port).is_ok_and(|a| a != format!("http {first}")));
    let second = probe_pid(port);
    assert_eq!(bed.show(svc, "MainPID"), baton_pid, "reload keeps Baton");
    assert_eq!(bed.show(svc, "ActiveState"), "active");
    assert_eq!(bed.show(svc, "NFileDescriptorStore"), "1");
    bed.wait_for("the old generation to drain and exit", || !bed.alive(&first));
    let status = bed
        .tb
        .run(&["/usr/local/bin/baton", "status", "--name", "probe-sup", "--control", "/run/probe-sup/probe-sup.sock"])
        .unwrap();
    assert!(status.success() && status.stdout.contains(&format!("pid {second} active")), "{status:?}");

    // A new generation that fails to start: the old one keeps serving and
    // ExecReload= fails the reload, on every version (tests/reload_failure.rs).
    bed.tb.write_file(FAIL_FLAG, "").unwrap();
    let reload = bed.tb.systemctl(&["reload", svc]).unwrap();
    assert!(!reload.success(), "{reload:?}");
    assert_eq!(probe_pid(port), second);
    assert_eq!(bed.show(svc, "ActiveState"), "active");
    assert_eq!(bed.show(svc, "MainPID"), baton_pid);
    bed.tb.run_checked(&["rm", FAIL_FLAG]).unwrap();

    // Baton crashes: the .socket keeps listening, systemd restarts Baton,
    // which gets the socket and the stored fd back.
    bed.systemctl_ok(&["kill", "--signal=SIGKILL", "--kill-whom=main", svc]);
    bed.wait_for("Baton to be restarted", || {
        bed.show(svc, "NRestarts") == "1" && bed.show(svc, "ActiveState") == "active"
    });
    assert_eq!(bed.show("probe-sup.socket", "ActiveState"), "active");
    let third = probe_pid(port);
    assert_ne!(bed.show(svc, "MainPID"), baton_pid);
    // KillMode=control-group: systemd SIGTERMed the generation and restarted Baton only
    // once it had drained and exited.
    assert!(!bed.alive(&second), "the crashed Baton's generation outlived the restart");
    assert_ne!(third, second);
    assert_eq!(bed.show(svc, "NFileDescriptorStore"), "1");

    bed.systemctl_ok(&["stop", svc]);
    assert_eq!(bed.show(svc, "Result"), "success", "Baton drained the generation before TimeoutStopSec");
    assert!(!bed.alive(&third));
    assert_eq!(bed.show("probe-sup.socket", "ActiveState"), "active");
    // The socket starts the service again on the next connection.
    assert!(probe_pid(port).parse::<u32>().is_ok());
    bed.systemctl_ok(&["stop", svc, "probe-sup.socket", "probe-sup-b.socket"]);
}

/// Direct: the probe is socket-activated by systemd; `systemctl restart`
/// replaces it with the fd store intact; reload is refused.
fn direct_probe(bed: &Bed) {
    let port = free_loopback_port();
    let listen = format!("http=127.0.0.1:{port}");
    let files = gen_for(
        &[
            "--name",
            "probe-dir",
            "--direct",
            "--listen",
            &listen,
            "--watchdog",
            "5s",
            "--",
            "/usr/local/bin/baton-sd-probe",
            "--serve",
            "http",
            "--watchdog",
            "--store",
            "state=kept",
        ],
        bed.tb.systemd_version(),
    );
    bed.install_units(named(&files));
    let svc = "probe-dir.service";
    assert_eq!(bed.show(svc, "Type"), "notify");
    bed.systemctl_ok(&["start", "probe-dir.socket", svc]);
    // A runtime property (252 and 257 alike): `infinity` until the service runs.
    assert_eq!(bed.show(svc, "WatchdogUSec"), "5s");
    let first = probe_pid(port);
    assert_eq!(bed.show(svc, "MainPID"), first);
    assert_hardened(bed, &first, "the directly run probe");
    assert_eq!(bed.show(svc, "NFileDescriptorStore"), "1");

    bed.systemctl_ok(&["restart", svc]);
    let second = probe_pid(port);
    assert_ne!(second, first);
    assert_eq!(bed.show(svc, "MainPID"), second);
    assert_eq!(bed.show(svc, "NFileDescriptorStore"), "1", "the stored fd survived the restart");
    assert_eq!(bed.show("probe-dir.socket", "ActiveState"), "active");
    assert!(!bed.tb.systemctl(&["reload", svc]).unwrap().success(), "direct units have no reload");

    bed.systemctl_ok(&["stop", svc, "probe-dir.socket"]);
    assert_eq!(bed.show(svc, "Result"), "success");
}

fn generated_units_run(flavor: Flavor, test: &str) {
    let Some(bed) = boot(flavor, test) else { return };
    supervised_probe(&bed);
    direct_probe(&bed);
}

baton_testbed::systemd_tests! { generated_units_run:
    generated_units_run_on_252: Host,
    generated_units_run_on_257: Trixie,
    generated_units_run_on_262: Forky,
}

/// One HTTP/1.0 GET; returns the whole response.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The units in `units/` run the reference server as shipped: binaries at
/// /usr/bin, the default document root, only the port moved by a drop-in.
fn reference_units_run(flavor: Flavor, test: &str) {
    let Some(bed) = boot(flavor, test) else { return };
    let httpd = cargo_bin("baton-httpd", "baton-httpd");
    bed.install_binary(Path::new(env!("CARGO_BIN_EXE_baton")), "/usr/bin/baton");
    bed.install_binary(&httpd, "/usr/bin/baton-httpd");
    bed.tb.write_file("/usr/share/baton-httpd/www/index.html", "hello from the reference units\n").unwrap();
    let all = reference_files();
    let svc = "baton-httpd.service";
    for (dir, files) in [("units", &all[&reference_dir()]), ("units/direct", &all[&reference_dir().join("direct")])] {
        let port = free_loopback_port();
        // Both units of the steered pair move (a pair must keep one address).
        let sockets: Vec<&str> = files.iter().map(|f| f.name.as_str()).filter(|n| n.ends_with(".socket")).collect();
        for socket in &sockets {
            bed.tb
                .write_file(
                    format!("/etc/systemd/system/{socket}.d/port.conf"),
                    &format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n"),
                )
                .unwrap();
        }
        bed.install_units(named(files));
        // The service pulls its sibling socket in (Wants=).
        bed.systemctl_ok(&["start", "baton-httpd.socket", svc]);
        for socket in &sockets {
            assert_eq!(bed.show(socket, "ActiveState"), "active", "{dir}: {socket}");
        }
        let get = || http_get(port, "/index.html").is_some_and(|r| r.contains("hello from the reference units"));
        assert!(get(), "{dir}: {:?}", http_get(port, "/index.html"));
        let main = bed.show(svc, "MainPID");
        if dir == "units" {
            // Both sockets of the pair reach Baton, which steers them.
            let control = "/run/baton-httpd/baton-httpd.sock";
            let status =
                bed.tb.run(&["/usr/bin/baton", "status", "--name", "baton-httpd", "--control", control]).unwrap();
            assert!(status.success(), "{dir}: {status:?}");
            assert!(status.stdout.contains(" takes new connections "), "{dir}: not steered: {}", status.stdout);
            bed.systemctl_ok(&["reload", svc]);
            assert_eq!(bed.show(svc, "MainPID"), main, "{dir}: reload keeps Baton");
            assert!(bed.show(svc, "StatusText").starts_with("generation 2 serving"), "{dir}");
            assert!(get(), "{dir} after reload");
        }
        bed.systemctl_ok(&["restart", svc]);
        assert_ne!(bed.show(svc, "MainPID"), main, "{dir}");
        assert!(get(), "{dir} after restart");
        let mut stop = vec!["stop", svc];
        stop.extend(&sockets);
        bed.systemctl_ok(&stop);
        for socket in &sockets {
            bed.tb.run_checked(&["rm", "-r", &format!("/etc/systemd/system/{socket}.d")]).unwrap();
        }
        assert_eq!(bed.show(svc, "Result"), "success", "{dir}");
    }
}

baton_testbed::systemd_tests! { reference_units_run:
    reference_units_run_on_252: Host,
    reference_units_run_on_257: Trixie,
    reference_units_run_on_262: Forky,
}

/// ExecStart= quoting survives systemd's own parser: a shell prints every
/// argument it got, and the journal shows them unchanged.
#[test]
fn exec_start_words_reach_the_app_unchanged() {
    let Some(bed) = boot(Flavor::Host, "exec_start_words_reach_the_app_unchanged") else { return };
    let words = [
        "a b",
        "$HOME",
        "${HOME}",
        "50%",
        "%n",
        "",
        ";",
        "\"q\"",
        "back\\slash",
        "it's",
        "tab\there",
        "é",
        "two\nlines",
    ];
    let mut argv =
        vec!["--name", "quoting", "--direct", "--listen", "unix:@baton-units-quoting", "--", "/bin/sh", "-c"];
    argv.extend(["printf '<%s>\\n' \"$@\"", "sh"]);
    argv.extend(words);
    let files = gen_for(&argv, bed.tb.systemd_version());
    bed.install_units(named(&files));
    // The shell never sends READY=1, so the start fails once it exits.
    let _ = bed.tb.systemctl(&["start", "quoting.socket", "quoting.service"]).unwrap();
    let expected: String = words.iter().map(|w| format!("<{w}>\n")).collect();
    let mut got = String::new();
    bed.wait_for("the shell's output in the journal", || {
        let out =
            bed.tb.run(&["journalctl", "--no-pager", "-u", "quoting.service", "-o", "cat", "SYSLOG_IDENTIFIER=sh"]);
        got = out.map(|o| o.stdout).unwrap_or_default();
        got.len() >= expected.len()
    });
    assert_eq!(got, expected);
}
