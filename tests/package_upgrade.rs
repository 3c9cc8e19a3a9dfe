//! Package upgrades never restart Baton (issue 14): the packages built by
//! `packaging/build.sh`, installed inside a real systemd (baton-testbed),
//! upgraded under loopback load.
//!
//! Each upgrade (`dpkg -i` and `apt-get install` of a newer .deb on every
//! flavor in the [`baton_testbed::systemd_tests!`] list, `rpm -U` on 252)
//! must: fail no request (`baton_testbed::load`, fresh and keep-alive connections), keep every one
//! of [`IDLE`] idle keep-alive connections opened before it (each answers
//! afterwards, from the new generation: handed over), keep systemd's
//! `MainPID` (`baton upgrade` re-executes the new binary in place) and
//! advance the generation (the reload that follows). The fallback: a newer
//! package whose `baton` fails the upgrade probe is refused by the running
//! Baton, and the maintainer script restarts the service instead, saying why
//! on the terminal and in the journal, still failing no request.
//!
//! The maintainer scripts' logic is `packaging/upgrade-service.sh`; the
//! lifecycle around it (install, reload, restart, purge) is tests/packages.rs.
//! Needs root, `cargo-deb`, `cargo-generate-rpm`, `dpkg-deb` and (for the
//! rpm case) `rpm`; without them the tests skip outside CI and fail in CI.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use baton_testbed::httpd;
use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};
use baton_testbed::{Bed, CmdOutput, Flavor, skip_unless_root};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(60);
/// One package operation inside a testbed.
const PACKAGE_OP: Duration = Duration::from_secs(300);
/// Idle keep-alive connections opened before each upgrade and counted after.
const IDLE: usize = 20;
const SERVICE: &str = "baton-httpd.service";
const SOCKET: &str = "baton-httpd.socket";
/// Its steering sibling (the second socket of the port), new in the packages
/// since steering: revision 0 below is a package without it.
const SIBLING: &str = "baton-httpd-b.socket";
/// Baton's control socket in the packaged service.
const CONTROL: &str = "/run/baton-httpd/baton-httpd.sock";
/// What the running Baton's probe of the fallback package's `baton` prints.
const PROBE_REFUSAL: &str = "this baton reads state format 99 only";

// One `#[test]` per systemd flavor running the .deb upgrades: adding a
// flavor is one line (`deb_upgrades_on_262: Forky,`).
baton_testbed::systemd_tests! { deb_upgrades:
    deb_upgrades_on_252: Host,
    deb_upgrades_on_257: Trixie,
    deb_upgrades_on_262: Forky,
}

// ---- building -----------------------------------------------------------------

/// Whether `tool` is on `$PATH`; else skips (printing why) outside CI and
/// panics in CI, like [`skip_unless_root`].
fn have(test: &str, tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: cannot run in CI: `{tool}` not found");
        eprintln!("SKIP {test}: `{tool}` not found (see packaging/README.md)");
    }
    found
}

/// The packages of revisions 1, 2 and 3 of the workspace version, a
/// revision 4 .deb whose `baton` refuses the upgrade probe, and a revision 0
/// .deb as packages were before steering: no `baton-httpd-b.socket`.
struct Built {
    deb: [PathBuf; 3],
    rpm: [PathBuf; 3],
    deb_refusing: PathBuf,
    deb_unsteered: PathBuf,
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn built(test: &str) -> Option<&'static Built> {
    if !["cargo-deb", "cargo-generate-rpm", "dpkg-deb"].iter().all(|t| have(test, t)) {
        return None;
    }
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(build_all) {
        Ok(b) => Some(b),
        Err(e) => panic!("{test}: building the packages failed: {e}"),
    }
}

fn build_all() -> Result<Built, String> {
    // cargo-deb deletes other versions' .deb from target/debian: keep copies.
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-upgrade");
    std::fs::create_dir_all(&keep).map_err(|e| format!("{}: {e}", keep.display()))?;
    let mut debs = Vec::new();
    let mut rpms = Vec::new();
    for rev in 1..=3 {
        let version = format!("{}-{rev}", env!("CARGO_PKG_VERSION"));
        let out = Command::new("bash")
            .arg(workspace_root().join("packaging/build.sh"))
            .args(["--version", &version])
            .current_dir(workspace_root())
            .output()
            .map_err(|e| format!("running packaging/build.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "build.sh --version {version}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for (key, list) in [("deb: ", &mut debs), ("rpm: ", &mut rpms)] {
            let path =
                stdout.lines().find_map(|l| l.strip_prefix(key)).ok_or_else(|| format!("no {key:?} in {stdout}"))?;
            let dest = keep.join(Path::new(path).file_name().unwrap_or_default());
            std::fs::copy(path, &dest).map_err(|e| format!("copying {path}: {e}"))?;
            list.push(dest);
        }
    }
    let deb_refusing = repack_refusing(&debs[2], &keep)?;
    let deb_unsteered = repack_unsteered(&debs[0], &keep)?;
    let three = |v: Vec<PathBuf>| -> [PathBuf; 3] { [v[0].clone(), v[1].clone(), v[2].clone()] };
    Ok(Built { deb: three(debs), rpm: three(rpms), deb_refusing, deb_unsteered })
}

/// Runs a host command, which must succeed.
fn host(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0]).args(&argv[1..]).output().map_err(|e| format!("{argv:?}: {e}"))?;
    out.status.success().then_some(()).ok_or_else(|| format!("{argv:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Sets the `Version:` of an unpacked .deb's control file.
fn set_deb_version(tree: &Path, version: &str) -> Result<(), String> {
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).map_err(|e| e.to_string())?;
    let text: String = text
        .lines()
        .map(|l| if l.starts_with("Version:") { format!("Version: {version}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&control, text).map_err(|e| e.to_string())
}

/// Revision 0: revision 1 as the package was before steering, with the
/// units `baton units --steering off` writes for it (one socket unit, no
/// `baton-httpd-b.socket`, `baton run --steering off`). Its maintainer
/// scripts are revision 1's, which act on the missing unit harmlessly (each
/// such call is `|| true`); what is under test is the next package's
/// postinst meeting a running service without the sibling.
fn repack_unsteered(deb: &Path, dir: &Path) -> Result<PathBuf, String> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: baton::units::UnitsArgs,
    }
    let tree = dir.join("unsteered");
    let _ = std::fs::remove_dir_all(&tree);
    let t = tree.to_str().unwrap();
    host(&["dpkg-deb", "-R", deb.to_str().unwrap(), t])?;
    let units = tree.join("usr/lib/systemd/system");
    std::fs::remove_file(units.join(SIBLING)).map_err(|e| format!("{SIBLING} in {}: {e}", deb.display()))?;
    let argv = [
        "units",
        "--name",
        "baton-httpd",
        "--listen",
        "http=80",
        "--steering",
        "off",
        "--systemd-version",
        "252",
        "--",
        "/usr/bin/baton-httpd",
        "--root",
        "/usr/share/baton-httpd/www",
    ];
    let args = <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?.args;
    let files = baton::units::generate(&args, 252).map_err(|e| e.to_string())?;
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    if names != [SOCKET, SERVICE] {
        return Err(format!("baton units --steering off wrote {names:?}"));
    }
    baton::units::write_files(&units, &files).map_err(|e| e.to_string())?;
    // md5sums lists the removed unit; dpkg-deb does not check it, but keep it true.
    let md5sums = tree.join("DEBIAN/md5sums");
    if let Ok(text) = std::fs::read_to_string(&md5sums) {
        let kept: String = text.lines().filter(|l| !l.ends_with(SIBLING)).map(|l| format!("{l}\n")).collect();
        std::fs::write(&md5sums, kept).map_err(|e| e.to_string())?;
    }
    let version = format!("{}-0", env!("CARGO_PKG_VERSION"));
    set_deb_version(&tree, &version)?;
    let out = dir.join(format!("baton_{version}_unsteered.deb"));
    host(&["dpkg-deb", "--root-owner-group", "-b", t, out.to_str().unwrap()])?;
    Ok(out)
}

/// Revision 4: revision 3 with `/usr/bin/baton` moved to `baton-real` and
/// replaced by a wrapper that fails `baton upgrade-probe` (as a Baton with
/// an incompatible state format would) and runs the real one otherwise.
fn repack_refusing(deb: &Path, dir: &Path) -> Result<PathBuf, String> {
    let tree = dir.join("refusing");
    let _ = std::fs::remove_dir_all(&tree);
    let run = |argv: &[&str]| -> Result<(), String> {
        let out = Command::new(argv[0]).args(&argv[1..]).output().map_err(|e| format!("{argv:?}: {e}"))?;
        out.status.success().then_some(()).ok_or_else(|| format!("{argv:?}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let t = tree.to_str().unwrap();
    run(&["dpkg-deb", "-R", deb.to_str().unwrap(), t])?;
    let bin = tree.join("usr/bin");
    std::fs::rename(bin.join("baton"), bin.join("baton-real")).map_err(|e| e.to_string())?;
    let wrapper = format!(
        "#!/bin/sh\nif [ \"$1\" = upgrade-probe ]; then echo '{PROBE_REFUSAL}' >&2; exit 1; fi\nexec /usr/bin/baton-real \"$@\"\n"
    );
    std::fs::write(bin.join("baton"), wrapper).map_err(|e| e.to_string())?;
    run(&["chmod", "755", bin.join("baton").to_str().unwrap()])?;
    let version = format!("{}-4", env!("CARGO_PKG_VERSION"));
    set_deb_version(&tree, &version)?;
    let out = dir.join(format!("baton_{version}_refusing.deb"));
    run(&["dpkg-deb", "--root-owner-group", "-b", t, out.to_str().unwrap()])?;
    Ok(out)
}

// ---- static check of the scripts --------------------------------------------

/// The upgrade path of both packages' scripts is `baton upgrade` + reload,
/// with a restart only as the fallback, and nothing relies on SysV init.
#[test]
fn scripts_upgrade_in_place_without_sysv() {
    let test = "scripts_upgrade_in_place_without_sysv";
    if !have(test, "rpm") {
        return;
    }
    let Some(b) = built(test) else { return };
    let control = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-upgrade/control");
    let _ = std::fs::remove_dir_all(&control);
    let out = Command::new("dpkg-deb").arg("--control").arg(&b.deb[0]).arg(&control).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut scripts = BTreeMap::new();
    for name in ["postinst", "prerm", "postrm"] {
        scripts.insert(format!("deb {name}"), std::fs::read_to_string(control.join(name)).unwrap());
    }
    let rpm = Command::new("rpm").arg("-qp").arg("--scripts").arg(&b.rpm[0]).output().unwrap();
    scripts.insert("rpm scriptlets".into(), String::from_utf8_lossy(&rpm.stdout).into_owned());
    for (name, text) in &scripts {
        let code: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
        for l in &code {
            let words = l.split(|c: char| c.is_whitespace() || ";|&()`\"'".contains(c));
            for word in words {
                let sysv = ["service", "update-rc.d", "invoke-rc.d"].contains(&word)
                    || word.contains("/etc/init.d")
                    || word.starts_with("/etc/rc");
                assert!(!sysv, "{name} depends on SysV init ({word}): {l}");
            }
        }
        assert!(!text.lines().any(|l| l.trim() == "#BATON_UPGRADE_SERVICE#"), "{name}: build.sh left the marker");
    }
    for name in ["deb postinst", "rpm scriptlets"] {
        let text = &scripts[name];
        assert!(text.contains("/usr/bin/baton upgrade --name baton-httpd"), "{name}: no `baton upgrade`:\n{text}");
        assert!(text.contains("systemctl reload \"$BATON_SERVICE\""), "{name}: no reload after the upgrade");
        assert!(text.contains("logger"), "{name}: the fallback's reason is not logged");
    }
    assert!(scripts["deb postinst"].contains("baton_upgrade_service deb-systemd-invoke restart \"$SERVICE\""));
    assert!(scripts["rpm scriptlets"].contains("baton_upgrade_service systemctl try-restart baton-httpd.service"));
    std::fs::remove_dir_all(&control).unwrap();
}

// ---- the testbed ---------------------------------------------------------------

/// What the upgrade tests add to the shared [`Bed`].
trait UpgradeBed {
    /// Boots `flavor` with the socket moved to a free loopback port (the
    /// network namespace is the host's) and no policy-rc.d.
    fn boot_prepared(flavor: Flavor, name: &str) -> Option<Bed>;
    /// Runs a package operation (its long timeout), which must succeed.
    fn package_op(&self, argv: &[&str]) -> CmdOutput;
    /// Number of baton-httpd processes (generations) inside.
    fn generations_running(&self) -> usize;
    fn addr(&self) -> SocketAddr;
}

impl UpgradeBed for Bed {
    fn boot_prepared(flavor: Flavor, name: &str) -> Option<Bed> {
        let bed = Bed::builder(flavor, name).wait(WAIT).boot()?;
        bed.package_op(&["rm", "-f", "/usr/sbin/policy-rc.d"]);
        // Both units of the steered pair move (a pair keeps one address).
        let dropin = format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{}\n", bed.port);
        for socket in [SOCKET, SIBLING] {
            bed.tb.write_file(format!("/etc/systemd/system/{socket}.d/port.conf"), &dropin).unwrap();
        }
        Some(bed)
    }

    fn package_op(&self, argv: &[&str]) -> CmdOutput {
        self.run_ok_with_timeout(argv, PACKAGE_OP)
    }

    fn generations_running(&self) -> usize {
        self.pids_named("baton-httpd").len()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

// ---- idle keep-alive connections ----------------------------------------------

/// One `GET /` on `conn` (kept alive): the answering generation.
fn get(conn: &mut BufReader<TcpStream>) -> Result<u64, String> {
    let r = httpd::get(conn, "/", false)?;
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    r.generation()
}

fn open_idle(addr: SocketAddr) -> (Vec<BufReader<TcpStream>>, u64) {
    let mut conns = Vec::new();
    let mut generation = 0;
    for _ in 0..IDLE {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = BufReader::new(s);
        generation = get(&mut c).unwrap_or_else(|e| panic!("idle connection before the upgrade: {e}"));
        conns.push(c);
    }
    (conns, generation)
}

// ---- one upgrade under load ------------------------------------------------------

/// What one package operation under load measured.
struct Figures {
    took: Duration,
    load: LoadReport,
    idle_kept: usize,
    idle_generations: Vec<u64>,
    main_pid: (String, String),
    generation: (u64, u64),
    output: CmdOutput,
}

/// Runs `argv` (a package upgrade) under load with [`IDLE`] idle keep-alive
/// connections open; every figure printed, none asserted (the caller does).
fn upgrade_under_load(bed: &Bed, what: &str, argv: &[&str]) -> Figures {
    let (mut idle, generation_before) = open_idle(bed.addr());
    let main_before = bed.show(SERVICE, "MainPID");
    let config = |mode: Mode, connections: usize, rate: u32| {
        LoadConfig::new(bed.addr())
            .path("/")
            .mode(mode)
            .connections(connections)
            .rate(Some(rate))
            .max_duration(PACKAGE_OP)
    };
    let busy = Load::start(config(Mode::KeepAlive, 4, 200)).unwrap();
    let fresh = Load::start(config(Mode::NewConnection, 2, 100)).unwrap();
    assert!(busy.wait_for_ok(100, WAIT) && fresh.wait_for_ok(50, WAIT), "{}: no load served before {what}", bed.name);
    let t0 = Instant::now();
    let output = bed.tb.run_with_timeout(argv, PACKAGE_OP).unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", bed.name));
    let took = t0.elapsed();
    assert!(output.success(), "{}: {what}: {output}", bed.name);
    // The old generation drains (handing its idle connections over) and
    // exits; then every client reaches the new one a few times.
    bed.tb.wait_for("one generation left", WAIT, || bed.generations_running() == 1).unwrap();
    assert!(busy.wait_for_ok(200, WAIT) && fresh.wait_for_ok(100, WAIT), "{}: load stalled after {what}", bed.name);
    let mut load = busy.stop();
    let fresh = fresh.stop();
    load.requests += fresh.requests;
    load.ok += fresh.ok;
    for (kind, n) in fresh.failures {
        *load.failures.entry(kind).or_default() += n;
    }
    load.server_closed_connections += fresh.server_closed_connections;
    load.histogram.add(&fresh.histogram).expect("same histogram bounds");
    for (g, n) in fresh.per_generation {
        *load.per_generation.entry(g).or_default() += n;
    }
    let answers: Vec<Result<u64, String>> = idle.iter_mut().map(get).collect();
    let idle_generations: Vec<u64> = answers.iter().filter_map(|a| a.as_ref().ok().copied()).collect();
    let generation_after = bed
        .show(SERVICE, "StatusText")
        .strip_prefix("generation ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("{}: StatusText {:?}", bed.name, bed.show(SERVICE, "StatusText")));
    let figures = Figures {
        took,
        idle_kept: idle_generations.len(),
        idle_generations,
        main_pid: (main_before, bed.show(SERVICE, "MainPID")),
        generation: (generation_before, generation_after),
        output,
        load,
    };
    eprintln!(
        "MEASURED {} {what}: took {:?}; load {} requests, {} ok, {} failed {:?}, {} pooled connections closed by the \
         server, latency p99 {} µs max {} µs, per generation {:?}; idle keep-alive connections kept {} of {IDLE} (answering generations {:?}; \
         errors {:?}); MainPID {} -> {}; generation {} -> {}",
        bed.name,
        figures.took,
        figures.load.requests,
        figures.load.ok,
        figures.load.failed(),
        figures.load.failures,
        figures.load.server_closed_connections,
        figures.load.histogram.value_at_quantile(0.99),
        figures.load.histogram.max(),
        figures.load.per_generation,
        figures.idle_kept,
        figures.idle_generations,
        answers.iter().filter_map(|a| a.as_ref().err()).collect::<Vec<_>>(),
        figures.main_pid.0,
        figures.main_pid.1,
        figures.generation.0,
        figures.generation.1,
    );
    for line in terminal(&figures).lines().filter(|l| l.starts_with("baton: ")) {
        eprintln!("MEASURED {} {what}: maintainer script said: {line}", bed.name);
    }
    figures
}

/// What the package tool showed (apt-get puts the scripts' stderr on its
/// stdout).
fn terminal(f: &Figures) -> String {
    format!("{}{}", f.output.stdout, f.output.stderr)
}

/// The in-place upgrade's figures: nothing failed, nothing restarted.
fn assert_in_place(bed: &Bed, what: &str, f: &Figures) {
    let ctx = format!("{} {what}", bed.name);
    assert_eq!(f.load.failed(), 0, "{ctx}: failed requests {:?} {:?}", f.load.failures, f.load.other_errors);
    assert_eq!(f.main_pid.0, f.main_pid.1, "{ctx}: Baton was restarted (MainPID changed): {}", f.output);
    assert!(f.generation.1 > f.generation.0, "{ctx}: no reload (generation {:?}): {}", f.generation, f.output);
    assert_eq!(f.idle_kept, IDLE, "{ctx}: idle keep-alive connections lost");
    assert!(
        f.idle_generations.iter().all(|g| *g == f.generation.1),
        "{ctx}: idle connections not all answered by the new generation {}: {:?}",
        f.generation.1,
        f.idle_generations
    );
    assert_eq!(
        bed.tb.run(&["readlink", &format!("/proc/{}/exe", f.main_pid.1)]).unwrap().stdout_trimmed(),
        "/usr/bin/baton"
    );
    assert!(
        terminal(f).contains("baton: baton-httpd.service: upgraded: pid"),
        "{ctx}: not on the terminal: {}",
        f.output
    );
}

fn deb_upgrades(flavor: Flavor, name: &str) {
    if !skip_unless_root(name) {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(flavor, name) else { return };
    assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd());
    let debs = b.deb.each_ref().map(|d| bed.carry(d));
    bed.package_op(&["dpkg", "-i", &debs[0]]);
    bed.tb.wait_for("baton-httpd serving", WAIT, || TcpStream::connect(bed.addr()).is_ok()).unwrap();
    let socket_since = bed.tb.show(SOCKET, "ActiveEnterTimestampMonotonic").unwrap();
    let sibling_since = bed.tb.show(SIBLING, "ActiveEnterTimestampMonotonic").unwrap();
    assert_eq!(bed.tb.show(SIBLING, "ActiveState").unwrap(), "active", "{SIBLING} not started at install");

    let f = upgrade_under_load(&bed, "dpkg -i (upgrade)", &["dpkg", "-i", &debs[1]]);
    assert_in_place(&bed, "dpkg -i", &f);
    // As an administrator types it: a path starting with ./ from the
    // package's directory.
    let (dir, file) = debs[2].rsplit_once('/').unwrap();
    let apt = format!("cd {dir} && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{file}");
    let f = upgrade_under_load(&bed, "apt-get install ./newer.deb", &["/bin/sh", "-c", &apt]);
    assert_in_place(&bed, "apt-get install", &f);

    // The fallback: the running Baton refuses the new binary; the postinst
    // restarts the service and says why.
    let refusing = bed.carry(&b.deb_refusing);
    let f = upgrade_under_load(&bed, "dpkg -i (baton upgrade refused: restart)", &["dpkg", "-i", &refusing]);
    let ctx = format!("{name} fallback");
    assert_eq!(f.load.failed(), 0, "{ctx}: failed requests {:?} {:?}", f.load.failures, f.load.other_errors);
    assert_ne!(f.main_pid.0, f.main_pid.1, "{ctx}: not restarted: {}", f.output);
    assert_eq!(f.generation.1, 1, "{ctx}: a new Baton starts at generation 1");
    assert_eq!(f.idle_kept, IDLE, "{ctx}: the restart lost idle keep-alive connections");
    let reason = "the running Baton cannot take the upgrade (baton upgrade exited 1:";
    assert!(terminal(&f).contains(reason) && terminal(&f).contains(PROBE_REFUSAL), "{ctx}: {}", f.output);
    for unit in [None, Some(SERVICE)] {
        let journal = bed.tb.journal(unit).unwrap();
        let logged = journal.lines().find(|l| l.contains("baton-package") && l.contains(reason));
        assert!(logged.is_some_and(|l| l.contains(PROBE_REFUSAL)), "{ctx}: reason not in the journal ({unit:?})");
    }
    assert_eq!(bed.tb.show(SOCKET, "ActiveEnterTimestampMonotonic").unwrap(), socket_since, "{SOCKET} restarted");
    assert_eq!(bed.tb.show(SOCKET, "ActiveState").unwrap(), "active");
    assert_eq!(bed.tb.show(SIBLING, "ActiveEnterTimestampMonotonic").unwrap(), sibling_since, "{SIBLING} restarted");
}

/// `baton status` of the packaged service.
fn status(bed: &Bed) -> String {
    bed.run_ok(&["/usr/bin/baton", "status", "--name", "baton-httpd", "--control", CONTROL])
}

/// `n` fresh connections, one `GET /` each: how many were answered 200.
fn fresh_gets(bed: &Bed, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            let Ok(s) = TcpStream::connect(bed.addr()) else { return false };
            s.set_read_timeout(Some(WAIT)).unwrap();
            get(&mut BufReader::new(s)).is_ok()
        })
        .count()
}

/// An upgrade from a package without `baton-httpd-b.socket` (before
/// steering), under load: in place as ever, the new sibling enabled but not
/// started while the service runs (it could not take it, and the socket
/// would hold connections nobody accepts), the reason on the terminal;
/// Baton unsteered, every connection served, also after `systemctl restart`
/// of the service (the sibling cannot join the old listener, which lacks
/// SO_REUSEPORT: the service starts without it); restarting both sockets
/// and the service then steers the pair.
fn deb_upgrade_from_unsteered(flavor: Flavor, name: &str) {
    if !skip_unless_root(name) {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(flavor, name) else { return };
    let (old, new) = (bed.carry(&b.deb_unsteered), bed.carry(&b.deb[0]));
    bed.package_op(&["dpkg", "-i", &old]);
    bed.tb.wait_for("baton-httpd serving", WAIT, || TcpStream::connect(bed.addr()).is_ok()).unwrap();
    assert_eq!(bed.tb.show(SIBLING, "LoadState").unwrap(), "not-found", "revision 0 has no {SIBLING}");
    assert!(!status(&bed).contains(" takes new connections "), "revision 0 steers: {}", status(&bed));
    let socket_since = bed.tb.show(SOCKET, "ActiveEnterTimestampMonotonic").unwrap();

    let f = upgrade_under_load(&bed, "dpkg -i (upgrade from a package without the sibling)", &["dpkg", "-i", &new]);
    assert_in_place(&bed, "dpkg -i from unsteered", &f);
    assert_eq!(bed.tb.show(SOCKET, "ActiveEnterTimestampMonotonic").unwrap(), socket_since, "{SOCKET} restarted");
    assert_eq!(bed.run(&["systemctl", "is-enabled", SIBLING]).stdout_trimmed(), "enabled", "{SIBLING}");
    assert_eq!(bed.tb.show(SIBLING, "ActiveState").unwrap(), "inactive", "{SIBLING} started under a running Baton");
    let notice = format!(
        "{SIBLING} (new: the second listener of each address, for steering new connections to proven generations only) is left inactive"
    );
    assert!(terminal(&f).contains(&notice), "{name}: the postinst did not say why: {}", f.output);
    let unsteered = status(&bed);
    assert!(!unsteered.contains(" takes new connections "), "steered without a pair: {unsteered}");
    let answered = fresh_gets(&bed, 40);
    eprintln!("MEASURED {name}: unsteered after the upgrade, {answered} of 40 fresh connections answered");
    assert_eq!(answered, 40, "{name}: fresh connections lost after the upgrade");

    // The service's next start cannot take the sibling: the running
    // listener was bound before its unit said ReusePort=yes. The service
    // only wants it, and starts unsteered.
    let main = bed.show(SERVICE, "MainPID");
    bed.systemctl_ok(&["restart", SERVICE]);
    assert_ne!(bed.show(SERVICE, "MainPID"), main);
    assert_ne!(bed.tb.show(SIBLING, "ActiveState").unwrap(), "active", "{SIBLING} joined a non-reuseport listener");
    assert_eq!(bed.tb.show(SOCKET, "ActiveEnterTimestampMonotonic").unwrap(), socket_since, "{SOCKET} restarted");
    bed.tb.wait_for("baton-httpd serving", WAIT, || fresh_gets(&bed, 1) == 1).unwrap();
    let unsteered = status(&bed);
    assert!(!unsteered.contains(" takes new connections "), "steered without a pair: {unsteered}");
    assert_eq!(fresh_gets(&bed, 40), 40, "{name}: fresh connections lost after the service's restart");

    // The administrator stops and starts both sockets and the service (the
    // listener closes once; stopped first, so that the old listener is gone
    // before the sibling binds): steered.
    bed.systemctl_ok(&["stop", SERVICE, SOCKET, SIBLING]);
    bed.systemctl_ok(&["start", SOCKET, SIBLING, SERVICE]);
    assert_eq!(bed.tb.show(SIBLING, "ActiveState").unwrap(), "active", "{SIBLING} after the restart");
    bed.tb.wait_for("baton-httpd serving", WAIT, || fresh_gets(&bed, 1) == 1).unwrap();
    let steered = status(&bed);
    assert!(steered.contains(" takes new connections "), "not steered after the restart: {steered}");
    let answered = fresh_gets(&bed, 40);
    eprintln!("MEASURED {name}: steered after restarting both sockets and the service, {answered} of 40 answered");
    assert_eq!(answered, 40, "{name}: fresh connections lost once steered");
    bed.package_op(&["dpkg", "--purge", "baton"]);
}

baton_testbed::systemd_tests! { deb_upgrade_from_unsteered:
    deb_upgrade_from_unsteered_on_252: Host,
    deb_upgrade_from_unsteered_on_257: Trixie,
}

/// `rpm -U` on 252 (Debian's rpm): the old package's %postun upgrades Baton
/// in place and reloads.
#[test]
fn rpm_upgrade_on_252() {
    let name = "rpm_upgrade_on_252";
    if !skip_unless_root(name) || !have(name, "rpm") {
        return;
    }
    let Some(b) = built(name) else { return };
    let Some(bed) = Bed::boot_prepared(Flavor::Host, name) else { return };
    let (rpm1, rpm2) = (bed.carry(&b.rpm[0]), bed.carry(&b.rpm[1]));
    // --nodeps: the rpm database of a Debian system knows no libc.
    bed.package_op(&["rpm", "-i", "--nodeps", &rpm1]);
    bed.tb.wait_for("baton-httpd serving", WAIT, || TcpStream::connect(bed.addr()).is_ok()).unwrap();
    let f = upgrade_under_load(&bed, "rpm -U", &["rpm", "-U", "--nodeps", &rpm2]);
    assert_in_place(&bed, "rpm -U", &f);
    bed.package_op(&["rpm", "-e", "baton"]);
}
