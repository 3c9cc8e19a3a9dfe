//! `baton run --probe`, with real processes and sockets: each generation
//! gets a private loopback listener named `probe`, after the listening
//! sockets; the health command reaches that generation, and only it,
//! through `$BATON_PROBE_ADDR`; `baton status` shows the address; the
//! listener is closed once its generation is gone, and survives `baton
//! upgrade`. Without `--probe` nothing is passed.
//!
//! The health command is this test binary itself (the
//! `probe_health_helper` test, run by Baton with `T_ROLE=probe-health`):
//! it asks `GET /healthz` on `$BATON_PROBE_ADDR`, fails unless
//! `baton-httpd` of generation `$BATON_GENERATION`, pid `$BATON_PID`,
//! answered, and appends what it saw to `DIR/health`. No root needed.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::expect_success as ok;
use baton_testbed::load::{Load, LoadConfig, Mode};
use baton_testbed::{cargo_bin, poll_until};

fn scratch(test: &str) -> PathBuf {
    baton_testbed::unique_temp_dir("baton-probe", test)
}

fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// How long a request to a probe address may take: a listener that is
/// still open but no longer served would hold the request this long (and
/// fail the test), a closed one refuses at once.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who answered `GET /healthz` at `addr`: `(baton-generation, baton-pid)`.
fn healthz_at(addr: SocketAddr) -> std::io::Result<(String, u32)> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    match (head.starts_with("HTTP/1.1 200"), header("baton-generation"), header("baton-pid")) {
        (true, Some(generation), Some(pid)) => {
            Ok((generation, pid.parse().map_err(|_| std::io::Error::other(format!("bad pid in {head:?}")))?))
        }
        _ => Err(std::io::Error::other(format!("not a 200 from baton-httpd: {out:?}"))),
    }
}

/// The health command (see the module docs). Does nothing as a plain test.
#[test]
fn probe_health_helper() {
    if std::env::var_os("T_ROLE").as_deref() != Some(OsStr::new("probe-health")) {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let (generation, pid, addr) = (var("BATON_GENERATION"), var("BATON_PID"), var("BATON_PROBE_ADDR"));
    let answer = addr.parse().map_err(|e| format!("{e}")).and_then(|a| healthz_at(a).map_err(|e| e.to_string()));
    let line = match &answer {
        Ok((g, p)) => format!("gen={generation} pid={pid} addr={addr} served-gen={g} served-pid={p}\n"),
        Err(e) => format!("gen={generation} pid={pid} addr={addr} error={e}\n"),
    };
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(Path::new(&var("T_DIR")).join("health"));
    log.as_mut().unwrap().write_all(line.as_bytes()).unwrap();
    let (g, p) = answer.unwrap();
    assert_eq!((g, p.to_string()), (generation, pid), "the probe was answered by another generation");
}

/// One health check as the helper recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Check {
    generation: u64,
    addr: SocketAddr,
    served_by: u64,
}

fn checks(dir: &Path) -> Vec<Check> {
    let text = std::fs::read_to_string(dir.join("health")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or_else(|| panic!("no {k} in health line {l:?}"))
            };
            Check {
                generation: field("gen").parse().unwrap(),
                addr: field("addr").parse().unwrap(),
                served_by: field("served-gen").parse().unwrap(),
            }
        })
        .collect()
}

/// Baton with `ARGS` running `baton-httpd --root DIR/www`, the health
/// command set to the helper; returns with generation 1 active.
fn start_httpd(dir: &Path, args: &[&str]) -> Baton {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "probe suite\n").unwrap();
    let httpd = cargo_bin("baton-httpd", "baton-httpd");
    let exe = std::env::current_exe().unwrap();
    let health = r#"T_ROLE=probe-health exec "$T_SELF" --exact probe_health_helper --nocapture --test-threads=1"#;
    let root = dir.join("www");
    let app: [&OsStr; 3] = [httpd.as_os_str(), OsStr::new("--root"), root.as_os_str()];
    let b = BatonBuilder::new(baton_bin(), dir)
        .args(args)
        .args(["--health-cmd", health])
        .app(app)
        .env("T_DIR", dir)
        .env("T_SELF", &exe)
        .current_dir(dir)
        .spawn();
    b.wait_active(1);
    b
}

/// The probe address `status` shows for generation `n`.
fn status_probe(b: &Baton, n: u64) -> Option<SocketAddr> {
    let s = b.status();
    let g = s.generations.iter().find(|g| g.generation == n).unwrap_or_else(|| panic!("no generation {n}: {s:?}"));
    g.probe.as_ref().map(|a| a.parse().unwrap_or_else(|e| panic!("probe address {a:?}: {e}")))
}

/// Each generation's `probe` in `baton status --json`, as text (`None`:
/// the key is absent, as from Batons without probes).
fn json_probes(b: &Baton) -> Vec<Option<String>> {
    let json: serde_json::Value = serde_json::from_str(&ok(&b.cli(&["status", "--json"]))).unwrap();
    let generations = json["generations"].as_array().unwrap_or_else(|| panic!("no generations: {json}"));
    generations.iter().map(|g| g.get("probe").map(|p| p.as_str().unwrap().to_owned())).collect()
}

/// Requests to `addr` are no longer served by generation `gone`: refused
/// (its listener closed, by it and by Baton), or, should the port already
/// be another's, answered by someone else. A listener still open but not
/// served would time out and fail.
fn assert_not_served_by(addr: SocketAddr, gone: u64) {
    match healthz_at(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Ok((generation, _)) => assert_ne!(generation, gone.to_string(), "{addr} is still served by generation {gone}"),
        Err(e) => panic!("{addr}, generation {gone}'s probe address, is open but not served: {e}"),
    }
}

/// Restarts under load, each new generation checked through its own probe
/// listener; every request of the load is answered.
#[test]
fn health_checks_reach_each_new_generation_through_its_probe_under_load() {
    let dir = scratch("under-load");
    let b = start_httpd(&dir, &["--probe"]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, b.port()));
    let config = |mode, connections, rate| {
        LoadConfig::new(addr)
            .mode(mode)
            .connections(connections)
            .rate(Some(rate))
            .request_timeout(Duration::from_secs(30))
            .max_duration(Duration::from_secs(600))
    };
    let loads = [
        ("keep-alive", Load::start(config(Mode::KeepAlive, 4, 200)).expect("keep-alive load")),
        ("new-connection", Load::start(config(Mode::NewConnection, 2, 100)).expect("new-connection load")),
    ];
    for (name, load) in &loads {
        assert!(load.wait_for_ok(50, WAIT), "the {name} load got no answers: {:?}", load.progress());
    }

    let mut probes = vec![status_probe(&b, 1).expect("generation 1 has no probe address in status")];
    for n in [2, 3] {
        let out = ok(&b.cli(&["restart"]));
        assert!(out.contains(&format!("generation {n}")), "{out}");
        let probe = status_probe(&b, n).expect("no probe address in status");
        assert_eq!(probe.ip(), Ipv4Addr::LOCALHOST, "the first socket is IPv4");
        // Served by generation n only, however often it is asked.
        for _ in 0..20 {
            let (generation, pid) = healthz_at(probe).unwrap();
            assert_eq!((generation, pid), (n.to_string(), b.generation_pid(n)));
        }
        probes.push(probe);
        for (name, load) in &loads {
            assert!(load.wait_for_ok(50, WAIT), "after restart {n}: the {name} load stalled: {:?}", load.progress());
        }
    }
    let mut served = BTreeSet::new();
    for (name, load) in loads {
        let r = load.stop();
        eprintln!("{name} load: {}", r.to_json());
        assert_eq!(r.failed(), 0, "{} {name} requests failed: {}", r.failed(), r.to_json());
        served.extend(r.per_generation.keys().cloned());
    }
    assert!(served.contains("3"), "the load never reached generation 3: {served:?}");

    // One check per generation, each answered by its own generation at
    // the address status showed; every address different.
    let seen = checks(&dir);
    let expected: Vec<Check> =
        probes.iter().zip(1..).map(|(addr, n)| Check { generation: n, addr: *addr, served_by: n }).collect();
    assert_eq!(seen, expected, "{}", b.log_tail());
    assert_eq!(probes.iter().collect::<BTreeSet<_>>().len(), 3, "{probes:?}");

    b.wait_status("generations 1 and 2 gone", |s| s.generations.len() == 1);
    assert_not_served_by(probes[0], 1);
    assert_not_served_by(probes[1], 2);
    assert_eq!(healthz_at(probes[2]).unwrap().0, "3");

    // Shown in the text status too, on the generation's line.
    let text = ok(&b.cli(&["status"]));
    assert!(text.contains(&format!("generation 3 pid {} active", b.active_pid())), "{text}");
    assert!(text.contains(&format!(" probe {} ", probes[2])), "{text}");
}

/// `baton upgrade` hands each generation's probe listener over: the same
/// address keeps reaching that generation, and the adopted copy is closed
/// once the generation is gone.
#[test]
fn probe_listeners_survive_baton_upgrade() {
    let dir = scratch("upgrade");
    let b = start_httpd(&dir, &["--probe"]);
    ok(&b.cli(&["restart"]));
    let probe1 = status_probe(&b, 1).unwrap();
    let probe2 = status_probe(&b, 2).unwrap();
    let out = ok(&b.cli(&["upgrade"]));
    assert!(out.contains("upgraded"), "{out}");
    assert_eq!(status_probe(&b, 2), Some(probe2), "the active generation's probe address changed");
    assert_eq!(healthz_at(probe2).unwrap(), ("2".to_owned(), b.generation_pid(2)));
    // Generation 1 may have been handed over while draining: its adopted
    // probe listener is closed once it is gone.
    b.wait_status("generation 1 gone", |s| s.generations.len() == 1);
    assert_eq!(json_probes(&b), [Some(probe2.to_string())]);
    assert_not_served_by(probe1, 1);

    ok(&b.cli(&["restart"]));
    let probe3 = status_probe(&b, 3).unwrap();
    let last = checks(&dir).last().cloned();
    assert_eq!(last, Some(Check { generation: 3, addr: probe3, served_by: 3 }));
    b.wait_status("generation 2 gone", |s| s.generations.len() == 1);
    assert_not_served_by(probe2, 2);
    assert_eq!(healthz_at(probe3).unwrap(), ("3".to_owned(), b.generation_pid(3)));
}

/// The `probe` name comes right after the listening sockets, only with
/// `--probe`; without it, generations get what they always got and status
/// shows no probe.
#[test]
fn the_probe_fd_is_passed_after_the_listening_sockets_only_with_probe() {
    let sd_probe = cargo_bin("sd-probe", "baton-sd-probe");
    for with_probe in [true, false] {
        let dir = scratch(if with_probe { "names-probe" } else { "names-plain" });
        let report = dir.join("report");
        let app: [&OsStr; 5] = [
            sd_probe.as_os_str(),
            OsStr::new("--serve"),
            OsStr::new("http"),
            OsStr::new("--report"),
            report.as_os_str(),
        ];
        let args: &[&str] =
            if with_probe { &["--probe", "-l", "extra=127.0.0.1:0"] } else { &["-l", "extra=127.0.0.1:0"] };
        let b = BatonBuilder::new(baton_bin(), &dir).args(args).app(app).current_dir(&dir).spawn();
        b.wait_active(1);
        let text = poll_until("the fd lines in the report", WAIT, || {
            let t = std::fs::read_to_string(&report).ok()?;
            t.lines().any(|l| l.starts_with("fd ")).then_some(t)
        })
        .unwrap();
        let fds: Vec<&str> = text.lines().filter(|l| l.starts_with("fd ")).collect();
        let status = ok(&b.cli(&["status"]));
        if with_probe {
            assert_eq!(
                fds,
                [
                    "fd 3 name=http kind=a listening TCP socket",
                    "fd 4 name=extra kind=a listening TCP socket",
                    "fd 5 name=probe kind=a listening TCP socket",
                ],
                "{text}"
            );
            let addr = status_probe(&b, 1).unwrap();
            assert_eq!(json_probes(&b), [Some(addr.to_string())]);
            assert!(status.contains(&format!(" probe {addr} ")), "{status}");
        } else {
            assert_eq!(
                fds,
                ["fd 3 name=http kind=a listening TCP socket", "fd 4 name=extra kind=a listening TCP socket"],
                "{text}"
            );
            assert_eq!(status_probe(&b, 1), None);
            assert_eq!(json_probes(&b), [None]);
            assert!(!status.contains(" probe "), "{status}");
        }
    }
}

/// A Unix first socket has no loopback address of its family: `--probe`
/// is refused at start, naming the fix, before any generation runs.
#[test]
fn probe_with_a_unix_first_socket_is_refused_with_the_fix() {
    let dir = scratch("unix");
    let out = Command::new(baton_bin())
        .arg("run")
        .arg("--control")
        .arg(dir.join("baton.sock"))
        .args(["--probe", "-l", &format!("app=@baton-probe-test-{}", std::process::id())])
        .args(["--", "/bin/sh", "-c", "echo started > started"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--probe needs a TCP or UDP first listening socket, but app is unix @baton-probe-test"),
        "{err}"
    );
    assert!(err.contains("drop --probe"), "{err}");
    assert!(!dir.join("started").exists(), "a generation was started");
    let _ = std::fs::remove_dir_all(&dir);
}
