//! Ten thousand idle keep-alive connections across a restart: `baton
//! restart` (standalone), `systemctl reload` and `systemctl restart`
//! (supervised by systemd 252 and 257), and a SIGKILL of Baton while it
//! holds them stored, each connection used once before and answered again
//! afterwards, on the same TCP connection, by a new generation. Nothing
//! here is timed: `cargo bench --bench idle_handover` measures how fast.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use baton_testbed::baton::BatonBuilder;
use baton_testbed::{Bed, Flavor, cargo_bin, httpd, unique_temp_dir};

/// The figure.
const IDLE: usize = 10_000;
/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(120);

/// One test at a time: each holds [`IDLE`] client fds in this process, and
/// a process may hold 20,000 here.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (children inherit
/// it), which must leave room for the clients here and the connections in
/// a generation.
fn raise_nofile() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: lim.maximum, maximum: lim.maximum },
    )
    .expect("raise RLIMIT_NOFILE");
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(now >= IDLE as u64 + 2048, "RLIMIT_NOFILE {now} is too low for {IDLE} connections");
}

/// [`IDLE`] connections to `port`, each answered once: the pid that
/// answered them all.
fn open_idle(port: u16) -> (Vec<BufReader<TcpStream>>, u32) {
    let mut conns = Vec::with_capacity(IDLE);
    let mut pid = 0;
    for i in 0..IDLE {
        let mut c = httpd::connect(port, WAIT).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let r = httpd::get(&mut c, "/healthz", false).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(r.status, 200, "connection {i}");
        let p = r.pid().unwrap();
        assert!(pid == 0 || p == pid, "connection {i} answered by pid {p}, the others by {pid}");
        pid = p;
        conns.push(c);
    }
    (conns, pid)
}

/// One more request on every connection (all written first, then all
/// read): every one must be answered 200 by a pid other than `old`, the
/// same one for all.
fn all_answered_by_the_new_generation(conns: &mut [BufReader<TcpStream>], old: u32, what: &str) {
    const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
    for (i, c) in conns.iter_mut().enumerate() {
        c.get_mut().write_all(REQUEST).unwrap_or_else(|e| panic!("{what}: connection {i} is closed: {e}"));
    }
    let mut new = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        let r = httpd::read_response(c).unwrap_or_else(|e| panic!("{what}: connection {i} was not answered: {e}"));
        assert_eq!(r.status, 200, "{what}: connection {i}");
        let pid = r.pid().unwrap();
        assert_ne!(pid, old, "{what}: connection {i} was answered by the old generation");
        assert!(new == 0 || pid == new, "{what}: connection {i} answered by pid {pid}, the others by {new}");
        new = pid;
    }
}

#[test]
fn ten_thousand_idle_connections_survive_baton_restart() {
    let _one = one_at_a_time();
    raise_nofile();
    let dir = unique_temp_dir("baton-test", "idle-handover");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let baton = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), &dir)
        .args(["--fdstore-max", "32768"])
        .app([cargo_bin("baton-httpd", "baton-httpd").into_os_string(), "--root".into(), dir.join("www").into()])
        .env("RUST_LOG", "warn")
        .log_level(Some("info"))
        .kill_on_drop()
        .start();
    let (mut conns, old) = open_idle(baton.port());
    assert_eq!(baton.active_pid(), old);
    let generation = baton.restart();
    baton.wait_status("the old generation to exit", |s| s.generations.len() == 1);
    all_answered_by_the_new_generation(&mut conns, old, "baton restart");
    assert_eq!(baton.generation_pid(generation), baton.active_pid());
}

/// baton-httpd supervised by Baton under systemd `flavor`, holding
/// [`IDLE`] idle connections (each answered once, by the pid returned);
/// `None` when this machine cannot boot it (the reason is printed).
fn supervised_with_idle_connections(flavor: Flavor, name: &str) -> Option<(Bed, Vec<BufReader<TcpStream>>, u32)> {
    supervised_with(flavor, name, &[])
}

/// [`supervised_with_idle_connections`], `httpd_args` added to baton-httpd's
/// command line.
fn supervised_with(flavor: Flavor, name: &str, httpd_args: &[&str]) -> Option<(Bed, Vec<BufReader<TcpStream>>, u32)> {
    raise_nofile();
    let bed = Bed::builder(flavor, name)
        .wait(WAIT)
        .binary(env!("CARGO_BIN_EXE_baton"), "/usr/bin/baton")
        .binary(cargo_bin("baton-httpd", "baton-httpd"), "/usr/bin/baton-httpd")
        .boot()?;
    let httpd: Vec<&str> = ["--root", "/tmp"].iter().chain(httpd_args).copied().collect();
    bed.generate_httpd_units(&["--fdstore-max", "32768"], &httpd);
    bed.systemctl_ok(&["start", "baton-httpd.socket", "baton-httpd.service"]);
    let port = bed.port;
    bed.wait_for("baton-httpd to serve", || httpd::healthz(port).is_ok());
    let (conns, old) = open_idle(port);
    Some((bed, conns, old))
}

fn systemctl_reload(flavor: Flavor, name: &str) {
    let _one = one_at_a_time();
    let Some((bed, mut conns, old)) = supervised_with_idle_connections(flavor, name) else { return };
    let main_pid = bed.show("baton-httpd.service", "MainPID");
    bed.systemctl_ok(&["reload", "baton-httpd.service"]);
    bed.wait_for("the old generation to exit", || {
        status(&bed).and_then(|v| v["generations"].as_array().map(Vec::len)) == Some(1)
    });
    all_answered_by_the_new_generation(&mut conns, old, &format!("{name}: systemctl reload"));
    assert_eq!(bed.show("baton-httpd.service", "MainPID"), main_pid, "{name}: Baton itself stayed");
}

/// utime + stime of `pid`, in ms (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat").1.split_whitespace().collect();
    (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) * 10
}

/// `systemctl restart` of the supervised service: Baton itself stops, the
/// connections its last generation stored wait in its vault in systemd's
/// store (one fd, see `baton::vault`), and the next Baton takes them back
/// and gives them to its first generation.
fn systemctl_restart(flavor: Flavor, name: &str) {
    let _one = one_at_a_time();
    let Some((bed, mut conns, old)) = supervised_with_idle_connections(flavor, name) else { return };
    let main_pid = bed.show("baton-httpd.service", "MainPID");
    let pid1_before = cpu_ms(bed.tb.pid());
    let started = std::time::Instant::now();
    bed.systemctl_ok(&["restart", "baton-httpd.service"]);
    let took = started.elapsed();
    let pid1_ms = cpu_ms(bed.tb.pid()) - pid1_before;
    assert_ne!(bed.show("baton-httpd.service", "MainPID"), main_pid, "{name}: Baton itself restarted");
    let journal = bed.journal(Some("baton-httpd.service"));
    assert!(journal.contains(&format!("took back {IDLE} connection(s) from vault/")), "{name}:\n{journal}");
    all_answered_by_the_new_generation(&mut conns, old, &format!("{name}: systemctl restart"));
    eprintln!("{name}: systemctl restart with {IDLE} idle connections took {took:?}; PID 1 spent {pid1_ms} ms of CPU");
    // `systemd-analyze fdstore` exists from 254 on. Adopted, the
    // connections leave Baton's store and the vault goes (the listeners
    // are the socket units').
    if bed.tb.systemd_version() >= 254 {
        bed.wait_for("the vault to go once every connection is adopted", || {
            !bed.run(&["systemd-analyze", "fdstore", "baton-httpd.service"]).stdout.contains("vault/")
        });
        let out = bed.run(&["systemd-analyze", "fdstore", "baton-httpd.service"]);
        assert!(!out.stdout.contains("conn"), "{name}: {out}");
    }
}

/// `baton status --json` of the supervised service, if Baton answers.
fn status(bed: &Bed) -> Option<serde_json::Value> {
    let out =
        bed.tb.run(&["/usr/bin/baton", "status", "--json", "--control", "/run/baton-httpd/baton-httpd.sock"]).ok()?;
    serde_json::from_str(&out.stdout).ok()
}

/// Baton killed (SIGKILL) while it holds [`IDLE`] stored connections, with
/// no generation that took them yet: they survive in its vault in
/// systemd's store, systemd restarts the service (`Restart=on-failure`),
/// and the next Baton gives them to its first generation, which answers
/// each on the same TCP connection.
///
/// To hold them there: the serving generation is stopped behind Baton's
/// back (SIGTERM to it alone), so it stores its idle connections with
/// Baton and exits; its replacement waits `--startup-delay` before it
/// adopts them, and Baton is killed meanwhile.
fn killed_baton(flavor: Flavor, name: &str) {
    let _one = one_at_a_time();
    let Some((bed, mut conns, old)) = supervised_with(flavor, name, &["--startup-delay", "5s"]) else { return };
    let main_pid = bed.show("baton-httpd.service", "MainPID");
    // The shell's kill: Debian's minimal roots have no /usr/bin/kill.
    bed.run_ok(&["sh", "-c", &format!("kill -TERM {old}")]);
    bed.wait_for("the stopped generation's connections to wait in Baton's store", || {
        status(&bed).is_some_and(|v| {
            v["fdstore"].as_u64().is_some_and(|n| n >= IDLE as u64)
                && v["generations"].as_array().is_some_and(|g| g.iter().all(|g| g["pid"].as_u64() != Some(old.into())))
        })
    });
    bed.run_ok(&["sh", "-c", &format!("kill -KILL {main_pid}")]);
    bed.wait_for("systemd to start the next Baton", || {
        let pid = bed.show("baton-httpd.service", "MainPID");
        pid != main_pid && pid != "0"
    });
    bed.wait_for("the next generation to serve", || httpd::healthz(bed.port).is_ok());
    let journal = bed.journal(Some("baton-httpd.service"));
    assert!(journal.contains(&format!("took back {IDLE} connection(s) from vault/")), "{name}:\n{journal}");
    all_answered_by_the_new_generation(&mut conns, old, &format!("{name}: Baton killed"));
}

baton_testbed::systemd_tests! {
    killed_baton:
    ten_thousand_stored_connections_survive_baton_killed_on_252: Host,
    ten_thousand_stored_connections_survive_baton_killed_on_257: Trixie,
}

baton_testbed::systemd_tests! {
    systemctl_restart:
    ten_thousand_idle_connections_survive_systemctl_restart_on_252: Host,
    ten_thousand_idle_connections_survive_systemctl_restart_on_257: Trixie,
}

baton_testbed::systemd_tests! {
    systemctl_reload:
    ten_thousand_idle_connections_survive_systemctl_reload_on_252: Host,
    ten_thousand_idle_connections_survive_systemctl_reload_on_257: Trixie,
}
