//! The deployments of baton-httpd the benchmark restarts, each started from
//! scratch (its own testbed, its own port) and torn down after its run.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_testbed::{Flavor, Testbed, free_loopback_port, unique_temp_dir};

/// Where the binaries go inside a testbed: a path none of the generated
/// units' hardening hides (`ProtectHome=` would hide a target dir under
/// /root), readable by a `DynamicUser=`.
const BIN_DIR: &str = "/usr/local/bin";
/// The served directory inside a testbed (the load asks `/healthz`, but
/// `--root` is mandatory).
const WWW: &str = "/srv/bench-www";
/// The broken release inside a testbed: an empty directory.
const WWW_BROKEN: &str = "/srv/bench-www-broken";
/// The `current` symlink inside a testbed, to [`WWW`] or [`WWW_BROKEN`].
const WWW_CURRENT: &str = "/srv/bench-current";
/// The file of the good release (the bad-deploy load asks for it).
pub const INDEX_PATH: &str = "/index.html";
const INDEX_HTML: &str = "<!doctype html><title>bench</title>\n";
/// Deadline for a start, a stop, a new generation to serve.
pub const WAIT: Duration = Duration::from_secs(30);

/// One of the compared deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupKind {
    /// The app binds its own port, `Type=simple`, `systemctl restart`.
    Naive,
    /// `.socket` + `Type=notify` service, `--handoff=false`, `systemctl restart`.
    SocketActivation,
    /// The same with connection handoff through the fd store.
    FdStoreHandoff,
    /// `baton run` as the service's main process (`baton units`, supervised),
    /// `systemctl reload`, on systemd 252 (`ExecReload=+baton restart`).
    BatonSystemd,
    /// The same on systemd 257 (the same units: `ExecReload=+baton restart`
    /// on every version since issue 14).
    BatonSystemd257,
    /// `baton run` on the host, `baton restart --control`.
    BatonStandalone,
}

impl SetupKind {
    pub const ALL: [SetupKind; 6] = [
        SetupKind::Naive,
        SetupKind::SocketActivation,
        SetupKind::FdStoreHandoff,
        SetupKind::BatonSystemd,
        SetupKind::BatonSystemd257,
        SetupKind::BatonStandalone,
    ];

    /// The row's label: 1–5 as in issue 6 and the README; `4b` is setup 4
    /// on systemd 257, added later without renumbering 5.
    pub fn label(self) -> &'static str {
        match self {
            SetupKind::Naive => "1",
            SetupKind::SocketActivation => "2",
            SetupKind::FdStoreHandoff => "3",
            SetupKind::BatonSystemd => "4",
            SetupKind::BatonSystemd257 => "4b",
            SetupKind::BatonStandalone => "5",
        }
    }

    /// Short machine-readable name (JSON key).
    pub fn key(self) -> &'static str {
        match self {
            SetupKind::Naive => "naive",
            SetupKind::SocketActivation => "socket-activation",
            SetupKind::FdStoreHandoff => "fd-store-handoff",
            SetupKind::BatonSystemd => "baton-systemd",
            SetupKind::BatonSystemd257 => "baton-systemd-257",
            SetupKind::BatonStandalone => "baton-standalone",
        }
    }

    /// For the table.
    pub fn title(self) -> &'static str {
        match self {
            SetupKind::Naive => "naive: app binds its port, Type=simple",
            SetupKind::SocketActivation => "systemd socket activation, Type=notify",
            SetupKind::FdStoreHandoff => "socket activation + fd-store handoff",
            SetupKind::BatonSystemd => {
                "Baton under systemd 252 (supervised: ExecReload=+baton restart; one socket unit: shared accept)"
            }
            SetupKind::BatonSystemd257 => {
                "Baton under systemd 257 (supervised: ExecReload=+baton restart; one socket unit: shared accept)"
            }
            SetupKind::BatonStandalone => "Baton standalone",
        }
    }

    /// How a restart is asked for.
    pub fn restart_command(self) -> &'static str {
        match self {
            SetupKind::Naive | SetupKind::SocketActivation | SetupKind::FdStoreHandoff => "systemctl restart",
            SetupKind::BatonSystemd | SetupKind::BatonSystemd257 => "systemctl reload",
            SetupKind::BatonStandalone => "baton restart",
        }
    }

    /// Whether it runs in a testbed, and which systemd.
    fn flavor(self) -> Option<Flavor> {
        match self {
            SetupKind::BatonStandalone => None,
            SetupKind::BatonSystemd257 => Some(Flavor::Trixie),
            _ => Some(Flavor::Host),
        }
    }

    /// Issue 6's targets: zero failed requests and zero server-closed
    /// connections for 3–5 (4b included).
    pub fn wants_zero_failures(self) -> bool {
        !matches!(self, SetupKind::Naive | SetupKind::SocketActivation)
    }

    /// Issue 6's targets: restart-window p99 within 1.5× steady state for
    /// 4–5 (4b included).
    pub fn wants_flat_latency(self) -> bool {
        matches!(self, SetupKind::BatonSystemd | SetupKind::BatonSystemd257 | SetupKind::BatonStandalone)
    }

    /// Parses a `BATON_BENCH_SETUPS` entry: a label (`1`–`5`, `4b`) or a
    /// key, case-insensitively.
    pub fn parse(s: &str) -> Option<SetupKind> {
        let s = s.trim();
        Self::ALL.into_iter().find(|k| k.key().eq_ignore_ascii_case(s) || k.label().eq_ignore_ascii_case(s))
    }
}

/// Which release the served root points at. A deploy switches the
/// `current` symlink, as release-directory deploys (Capistrano's
/// `current`) do; baton-httpd opens its root once at start, so a running
/// generation keeps the release it started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// `index.html` present: every request answers 200.
    Good,
    /// An empty directory: every file request answers 404 (`/healthz`,
    /// built in, still answers 200: a liveness check alone passes).
    Broken,
}

/// What a deployment needs beyond its kind.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve `--root` through a `current` symlink to a good or a broken
    /// [`Release`] (good at start).
    pub releases: bool,
    /// Extra `baton run` options (standalone only).
    pub baton_args: Vec<String>,
}

/// How a restart command ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// It exited 0.
    pub success: bool,
    /// Its exit code.
    pub code: Option<i32>,
    /// What `baton restart` reported of a successful restart (standalone
    /// only).
    pub report: Option<RestartReport>,
    /// Its output, for messages.
    pub output: String,
}

/// The timings `baton restart` prints for a successful restart, from the
/// new generation's spawn (src/main.rs: `generation N (pid P) ready after R
/// ms, took the traffic after T ms, replacing generation M after B ms of
/// probation`; `baton restart` has no `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartReport {
    /// Spawn → READY=1.
    pub ready_ms: u64,
    /// Spawn → the flip (readiness, quiet period, probes), when it was
    /// proven while another generation served.
    pub took_traffic_ms: Option<u64>,
    /// The flip → the old generation asked to drain.
    pub probation_ms: Option<u64>,
}

impl RestartReport {
    /// Parses `baton restart`'s success line; `None` for any other line.
    pub fn parse(line: &str) -> Option<RestartReport> {
        let rest = line.trim().strip_prefix("generation ")?;
        let number_after = |marker: &str| -> Option<u64> {
            let (_, tail) = rest.split_once(marker)?;
            tail.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        Some(RestartReport {
            ready_ms: number_after(" ready after ")?,
            took_traffic_ms: number_after(", took the traffic after "),
            probation_ms: rest
                .split_once(" ms of probation")
                .and_then(|(head, _)| head.rsplit(' ').next()?.parse().ok()),
        })
    }
}

/// Checks [`RestartReport::parse`] on the lines `baton restart` prints
/// (src/main.rs); run by every invocation, the smoke run included, so a
/// changed format fails CI instead of silently emptying the split table.
///
/// # Panics
/// When a line is parsed wrong.
pub fn check_report_parser() {
    let cases = [
        (
            "generation 7 (pid 4242) ready after 3 ms, took the traffic after 2004 ms, replacing generation 6 after 2001 ms of probation",
            Some(RestartReport { ready_ms: 3, took_traffic_ms: Some(2004), probation_ms: Some(2001) }),
        ),
        (
            "generation 2 (pid 17) ready after 12 ms, replacing generation 1",
            Some(RestartReport { ready_ms: 12, took_traffic_ms: None, probation_ms: None }),
        ),
        (
            "generation 1 (pid 9) ready after 0 ms",
            Some(RestartReport { ready_ms: 0, took_traffic_ms: None, probation_ms: None }),
        ),
        ("restart requested", None),
        ("baton: restart failed: generation 3 probe failed", None),
    ];
    for (line, want) in cases {
        assert_eq!(RestartReport::parse(line), want, "RestartReport::parse({line:?})");
    }
}

/// Points the `current` symlink at `target`, atomically (a new symlink
/// renamed over the old one).
fn point_current(current: &Path, target: &Path) -> Result<(), String> {
    let tmp = current.with_extension("next");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, current))
        .map_err(|e| format!("pointing {} at {}: {e}", current.display(), target.display()))
}

/// The binaries under test, on the host.
#[derive(Debug, Clone)]
pub struct Bins {
    pub baton: PathBuf,
    pub httpd: PathBuf,
}

/// A running deployment.
pub struct Deployment {
    kind: SetupKind,
    port: u16,
    inner: Inner,
}

enum Inner {
    Systemd(SystemdBed),
    Host(HostBaton),
}

struct SystemdBed {
    tb: Testbed,
    /// The service restarted or reloaded.
    service: String,
    /// Every unit started, to stop at teardown (services first).
    units: Vec<String>,
    /// The next `BATON_GENERATION` given through the manager's environment
    /// (setups 1–3: without Baton and without a counter in the fd store
    /// every start would be generation 1, and the load could not tell the
    /// new process from the old one). `None`: Baton numbers them.
    next_generation: Option<u64>,
}

/// `baton run` on the host, in its own process group.
struct HostBaton {
    child: Option<Child>,
    control: PathBuf,
    baton: PathBuf,
    dir: PathBuf,
}

impl Deployment {
    /// Starts `kind` and waits until it serves on its port.
    pub fn start(kind: SetupKind, bins: &Bins) -> Result<Deployment, String> {
        Self::start_with(kind, bins, &Options::default())
    }

    /// Starts `kind` with `opts` and waits until it serves on its port.
    pub fn start_with(kind: SetupKind, bins: &Bins, opts: &Options) -> Result<Deployment, String> {
        let port = free_loopback_port();
        let inner = match kind.flavor() {
            None => Inner::Host(HostBaton::start(bins, port, opts)?),
            Some(flavor) => Inner::Systemd(SystemdBed::start(kind, flavor, bins, port, opts)?),
        };
        let d = Deployment { kind, port, inner };
        let mut last = String::new();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match probe_generation(port) {
                Ok(_) => return Ok(d),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{}: not serving on port {port} after {WAIT:?}: {last}\n{}", kind.key(), d.diagnostics()))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The testbed's systemd major version (setups 1–4b).
    pub fn systemd_version(&self) -> Option<u32> {
        match &self.inner {
            Inner::Systemd(s) => Some(s.tb.systemd_version()),
            Inner::Host(_) => None,
        }
    }

    /// What has to happen before the restart command, outside its timing.
    pub fn prepare_restart(&mut self) -> Result<(), String> {
        match &mut self.inner {
            Inner::Systemd(s) => s.set_next_generation(),
            Inner::Host(_) => Ok(()),
        }
    }

    /// Deploys `release`: points the `current` symlink at it (needs
    /// [`Options::releases`]); the next generation started serves it.
    pub fn switch_release(&mut self, release: Release) -> Result<(), String> {
        let (current, target) = match &self.inner {
            Inner::Systemd(s) => {
                let target = if release == Release::Good { WWW } else { WWW_BROKEN };
                (s.tb.host_path(WWW_CURRENT), PathBuf::from(target))
            }
            Inner::Host(h) => {
                let target = if release == Release::Good { "www" } else { "www-broken" };
                (h.dir.join("current"), h.dir.join(target))
            }
        };
        point_current(&current, &target)
    }

    /// Issues the restart command and returns when it returned (each one
    /// waits for the new generation's readiness, except `systemctl restart`
    /// of the `Type=simple` service, which returns once it forked); an
    /// unsuccessful command is an error. Standalone: what `baton restart`
    /// reported.
    pub fn restart(&mut self) -> Result<Option<RestartReport>, String> {
        let attempt = self.try_restart()?;
        if attempt.success { Ok(attempt.report) } else { Err(attempt.output) }
    }

    /// Like [`Deployment::restart`], but a command that ran and failed is
    /// an [`Attempt`] too (a refused bad deploy); `Err`: it could not run.
    pub fn try_restart(&mut self) -> Result<Attempt, String> {
        let verb = match self.kind {
            SetupKind::BatonSystemd | SetupKind::BatonSystemd257 => "reload",
            _ => "restart",
        };
        match &mut self.inner {
            // Diagnostic (see the module doc): the same restart Baton's
            // ExecReload=/SIGHUP would make, minus systemctl and PID 1.
            Inner::Systemd(s) if verb == "reload" && std::env::var_os("BATON_BENCH_DIRECT_RESTART").is_some() => {
                let name = s.service.trim_end_matches(".service").to_owned();
                let baton = format!("{BIN_DIR}/baton");
                let out =
                    s.tb.run(&[baton.as_str(), "restart", "--control", &format!("/run/{name}/{name}.sock"), "--wait"])
                        .map_err(|e| format!("baton restart: {e}"))?;
                Ok(Attempt { success: out.success(), code: out.code(), report: None, output: out.to_string() })
            }
            Inner::Systemd(s) => {
                let out = s.tb.systemctl(&[verb, &s.service]).map_err(|e| format!("systemctl {verb}: {e}"))?;
                Ok(Attempt { success: out.success(), code: out.code(), report: None, output: out.to_string() })
            }
            Inner::Host(h) => h.restart(),
        }
    }

    /// The evidence for an error message: the journal's tail or Baton's log.
    pub fn diagnostics(&self) -> String {
        match &self.inner {
            Inner::Systemd(s) => match s.tb.journal(None) {
                Ok(j) => {
                    let lines: Vec<&str> = j.lines().collect();
                    format!("--- journal (last lines) ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
                }
                Err(e) => format!("(no journal: {e})"),
            },
            Inner::Host(h) => {
                let log = std::fs::read_to_string(h.dir.join("baton.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!("--- baton.log (last lines) ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
            }
        }
    }

    /// Stops every unit or process and removes what the setup created.
    pub fn teardown(self) -> Result<(), String> {
        match self.inner {
            Inner::Systemd(s) => {
                let mut args = vec!["stop"];
                args.extend(s.units.iter().map(String::as_str));
                let stopped = s.tb.systemctl_checked(&args).map(drop).map_err(|e| format!("stopping the units: {e}"));
                let down = s.tb.shutdown().map_err(|e| format!("tearing the testbed down: {e}"));
                stopped.and(down)
            }
            Inner::Host(mut h) => h.stop(),
        }
    }
}

impl SystemdBed {
    fn start(kind: SetupKind, flavor: Flavor, bins: &Bins, port: u16, opts: &Options) -> Result<SystemdBed, String> {
        let tb = Testbed::boot(flavor).map_err(|e| format!("booting the {flavor} testbed: {e}"))?;
        // Copies at BIN_DIR, in both flavours: the host's binaries (built
        // against Debian 12's glibc) run in the trixie root too.
        for (bin, name) in [(&bins.baton, "baton"), (&bins.httpd, "baton-httpd")] {
            let dest = tb.host_path(format!("{BIN_DIR}/{name}"));
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))
                .and_then(|_| std::fs::copy(bin, &dest))
                .map_err(|e| format!("copying {} into the testbed: {e}", bin.display()))?;
        }
        tb.write_file(format!("{WWW}{INDEX_PATH}"), INDEX_HTML)
            .map_err(|e| format!("writing the served directory: {e}"))?;
        let www = if opts.releases {
            std::fs::create_dir_all(tb.host_path(WWW_BROKEN))
                .map_err(|e| format!("creating the broken release {WWW_BROKEN}: {e}"))?;
            point_current(&tb.host_path(WWW_CURRENT), Path::new(WWW))?;
            WWW_CURRENT
        } else {
            WWW
        };
        let httpd = format!("{BIN_DIR}/baton-httpd");
        let mut bed = SystemdBed { tb, service: String::new(), units: Vec::new(), next_generation: Some(1) };
        match kind {
            SetupKind::Naive => {
                // Today's common setup: nothing but the app and a restart.
                let unit = format!(
                    "[Unit]\nDescription=baton-httpd binding its own port\nStartLimitIntervalSec=0\n\
                     [Service]\nType=simple\n\
                     ExecStart={httpd} --root {www} --listen 127.0.0.1:{port} --handoff=false\n\
                     Restart=on-failure\n"
                );
                bed.tb.install_unit("naive.service", &unit).map_err(|e| format!("installing naive.service: {e}"))?;
                bed.service = "naive.service".into();
                bed.units = vec![bed.service.clone()];
            }
            SetupKind::SocketActivation | SetupKind::FdStoreHandoff => {
                let handoff = kind == SetupKind::FdStoreHandoff;
                let mut cmd = vec![httpd.clone(), "--root".into(), www.into()];
                if !handoff {
                    cmd.push("--handoff=false".into());
                }
                bed.install_generated("httpd-direct", port, true, &cmd, bins)?;
                // Setup 2 is plain socket activation: no fd store at all.
                let extra = if handoff { "" } else { "[Service]\nFileDescriptorStoreMax=0\n" };
                bed.dropin(&format!("[Unit]\nStartLimitIntervalSec=0\n{extra}"))?;
            }
            SetupKind::BatonSystemd | SetupKind::BatonSystemd257 => {
                // The units `baton units` writes for the testbed's systemd:
                // ExecReload=+baton restart on both (until issue 14, 257 got
                // Type=notify-reload, whose reloads cannot fail).
                bed.next_generation = None;
                let cmd = vec![httpd.clone(), "--root".into(), www.into()];
                bed.install_generated("httpd-baton", port, false, &cmd, bins)?;
                // A reload is no start: the limit would not be hit, but keep
                // every setup's units alike in this respect.
                // BATON_BENCH_DROPIN (setups 4/4b only): extra drop-in text,
                // `\n` escapes allowed, to measure what a unit setting costs
                // (e.g. `[Service]\nSystemCallFilter=`); the default is the
                // unit exactly as `baton units` writes it.
                let extra = std::env::var("BATON_BENCH_DROPIN").unwrap_or_default().replace("\\n", "\n");
                bed.dropin(&format!("[Unit]\nStartLimitIntervalSec=0\n{extra}\n"))?;
            }
            SetupKind::BatonStandalone => unreachable!("not under systemd"),
        }
        bed.set_next_generation()?;
        let mut args = vec!["start"];
        // Sockets first (they are last in `units`, stopped after the service).
        args.extend(bed.units.iter().rev().map(String::as_str));
        bed.tb.systemctl_checked(&args).map_err(|e| format!("starting {:?}: {e}", bed.units))?;
        Ok(bed)
    }

    /// Writes the units `baton units` generates (run on the host, for the
    /// testbed's systemd version) into the testbed as `NAME.socket` and
    /// `NAME.service`.
    fn install_generated(
        &mut self,
        name: &str,
        port: u16,
        direct: bool,
        command: &[String],
        bins: &Bins,
    ) -> Result<(), String> {
        let dir = self.tb.scratch().join(format!("units-{name}"));
        let mut gen_cmd = Command::new(&bins.baton);
        gen_cmd
            .args(["units", "--name", name, "--listen", &format!("http=127.0.0.1:{port}")])
            .args(["--systemd-version", &self.tb.systemd_version().to_string()])
            .args(["--baton", &format!("{BIN_DIR}/baton"), "-o"])
            .arg(&dir);
        if direct {
            gen_cmd.arg("--direct");
        }
        gen_cmd.arg("--").args(command);
        let out = gen_cmd.output().map_err(|e| format!("running baton units: {e}"))?;
        if !out.status.success() {
            return Err(format!("baton units {command:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        for suffix in ["service", "socket"] {
            let file = format!("{name}.{suffix}");
            let text = std::fs::read_to_string(dir.join(&file))
                .map_err(|e| format!("baton units wrote no {file} into {}: {e}", dir.display()))?;
            self.tb.write_file(format!("/etc/systemd/system/{file}"), &text).map_err(|e| format!("{file}: {e}"))?;
            self.units.push(file);
        }
        self.service = format!("{name}.service");
        self.tb.daemon_reload().map_err(|e| format!("daemon-reload: {e}"))
    }

    fn dropin(&self, text: &str) -> Result<(), String> {
        self.tb.install_dropin(&self.service, "bench", text).map_err(|e| format!("drop-in for {}: {e}", self.service))
    }

    fn set_next_generation(&mut self) -> Result<(), String> {
        let Some(n) = self.next_generation else { return Ok(()) };
        let var = format!("BATON_GENERATION={n}");
        self.tb.systemctl_checked(&["set-environment", &var]).map_err(|e| format!("set-environment: {e}"))?;
        self.next_generation = Some(n + 1);
        Ok(())
    }
}

impl HostBaton {
    fn start(bins: &Bins, port: u16, opts: &Options) -> Result<HostBaton, String> {
        let dir = unique_temp_dir("baton-bench-restarts", "standalone");
        let mut www = dir.join("www");
        std::fs::create_dir_all(&www)
            .and_then(|_| std::fs::write(www.join("index.html"), INDEX_HTML))
            .map_err(|e| format!("creating {}: {e}", www.display()))?;
        if opts.releases {
            let broken = dir.join("www-broken");
            std::fs::create_dir_all(&broken).map_err(|e| format!("creating {}: {e}", broken.display()))?;
            point_current(&dir.join("current"), &www)?;
            www = dir.join("current");
        }
        let control = dir.join("baton.sock");
        let log = File::create(dir.join("baton.log")).map_err(|e| format!("creating baton.log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("baton.log: {e}"))?;
        let child = Command::new(&bins.baton)
            .arg("run")
            .args(["-l", &format!("http=127.0.0.1:{port}"), "--control"])
            .arg(&control)
            .args(&opts.baton_args)
            .arg("--")
            .arg(&bins.httpd)
            .arg("--root")
            .arg(&www)
            .env("BATON_LOG", "warn")
            // Not ours to pass on: this process may itself run under a
            // service manager.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own group, so that teardown can reach every generation
            // even if Baton itself had to be killed.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bins.baton.display()))?;
        Ok(HostBaton { child: Some(child), control, baton: bins.baton.clone(), dir })
    }

    fn restart(&mut self) -> Result<Attempt, String> {
        let out = Command::new(&self.baton)
            .arg("restart")
            .arg("--control")
            .arg(&self.control)
            .arg("--wait")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running baton restart: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(Attempt {
            success: out.status.success(),
            code: out.status.code(),
            report: stdout.lines().find_map(RestartReport::parse),
            output: format!("baton restart ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)),
        })
    }

    /// SIGTERM to Baton (it drains and stops its generations), SIGKILL to
    /// the whole group if that takes longer than Baton's own stop timeout.
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(45);
        let result = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break Ok(()),
                Ok(Some(status)) => break Err(format!("baton run exited with {status} on SIGTERM")),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => break Err("baton run did not exit within 45 s of SIGTERM".to_owned()),
                Err(e) => break Err(format!("waiting for baton run: {e}")),
            }
        };
        // Whatever is left of the group (nothing, normally).
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }
}

impl Drop for HostBaton {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("restarts: standalone teardown: {e}");
        }
    }
}

/// One `GET /healthz` on a new connection; the `baton-generation` header of
/// a 200 answer.
pub fn probe_generation(port: u16) -> Result<String, String> {
    match fetch(port, "/healthz")? {
        (200, Some(generation)) => Ok(generation),
        (200, None) => Err("no baton-generation header".to_owned()),
        (status, _) => Err(format!("unexpected answer {status}")),
    }
}

/// One `GET path` on a new connection: the answer's status code and its
/// `baton-generation` header.
pub fn fetch(port: u16, path: &str) -> Result<(u16, Option<String>), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| format!("set_read_timeout: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| format!("set_write_timeout: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("unexpected answer {status_line:?}"))?;
    let generation = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("baton-generation").then(|| value.trim().to_owned())
    });
    Ok((status, generation))
}

/// Whether `candidate` is a later generation than `old` (numerically when
/// both are numbers: during an overlapped restart an even older generation
/// may still answer).
pub fn is_newer(candidate: &str, old: &str) -> bool {
    match (candidate.parse::<u64>(), old.parse::<u64>()) {
        (Ok(c), Ok(o)) => c > o,
        _ => candidate != old,
    }
}

/// Polls the port (every 5 ms, bounded by [`WAIT`]) until a generation
/// later than `old` answers; returns it and when it was seen.
pub fn wait_new_generation(port: u16, old: &str) -> Result<(String, Instant), String> {
    let deadline = Instant::now() + WAIT;
    let mut last;
    loop {
        match probe_generation(port) {
            Ok(g) if is_newer(&g, old) => return Ok((g, Instant::now())),
            Ok(g) => last = format!("generation {g} still answering"),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!("no generation after {old} served within {WAIT:?} (last: {last})"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
