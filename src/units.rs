//! `baton units`: writes the `.socket` and `.service` units that run an app
//! under systemd with restarts that drop no connection.
//!
//! Two topologies ([`Topology`]):
//!
//! - **supervised** (the default): Baton is the service's main process
//!   (`ExecStart=baton run … -- COMMAND`) and runs the app as generations;
//!   `systemctl reload` is an overlapped restart (new generation ready before
//!   the old one drains). On every systemd version the service is
//!   `Type=notify` with `ExecReload=+baton restart --wait` (`+`: outside the
//!   sandbox, whose setup costs more than the restart): only a failing
//!   `ExecReload=` command can fail `systemctl reload` (systemd's
//!   `src/core/service.c`: `READY=1` after `RELOADING=1` is a successful
//!   reload, `ERRNO=` does not change the result), so `Type=notify-reload`
//!   alone would report a refused restart as a successful reload.
//! - **direct**: systemd socket-activates the app itself; `systemctl
//!   restart` stops it and starts the next one while the `.socket` unit keeps
//!   listening, and the fd store carries what the app hands over.
//!
//! In both, the listening sockets belong to `.socket` units, never to the
//! service: systemd keeps them open across every restart and crash of the
//! service (Baton included), so connections queue in the kernel's backlog
//! instead of being refused, and a package upgrade that restarts the service
//! never closes them. In the supervised topology Baton is therefore
//! socket-activated and passes the sockets on by name (`baton run` gets no
//! `-l`).
//!
//! Sockets are grouped by their fd name, because `FileDescriptorName=` names
//! every socket of one `.socket` unit: the first `--listen`'s name (and every
//! other `--listen` with the same name) goes to `NAME.socket`, each further
//! name to `NAME-FDNAME.socket`. An unnamed `--listen` (no `FDNAME=`) gets no
//! `FileDescriptorName=` (systemd then names the fd after the unit) and so
//! must come first.
//!
//! Steering (`--steering auto`: the default of the supervised topology, as
//! of `baton run`): every fd name with TCP or UDP sockets also gets a
//! sibling unit, `NAME-b.socket` (`NAME-FDNAME-b.socket`), on the same
//! addresses, with `ReusePort=yes` in both, so that Baton holds two sockets
//! per address in one `SO_REUSEPORT` group and sends new connections to the
//! proven generation only ([`crate::steering`]). The service `Requires=` the
//! first units and only `Wants=` the siblings: a sibling that cannot listen
//! leaves Baton unsteered (it says so), not down. One cannot when its twin's
//! listener was bound before its unit said `ReusePort=yes` (an upgrade from
//! units without siblings: `EADDRINUSE` until both are stopped and started).
//! The proving options of `baton run` (`--health-http`, `--ready`,
//! `--quiet-period`, `--probation`, `--canary`, …) pass into `ExecStart=`
//! when given ([`UnitsArgs::proving_words`]), else `baton run`'s defaults
//! apply.
//!
//! [`generate`] is pure (text in, text out); [`run`] resolves the target
//! systemd version and writes the files.
// Field docs double as clap's --help text, where brackets such as
// `[::]:443` and `[NAME=]ADDR` are literal, not intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::listen::{ListenAddr, ListenSpec, UNNAMED, UnixKind};

mod args;
mod render;
mod validate;
pub use args::{
    FdStorePreserve, SteeringMode, UnitsArgs, format_duration, format_readiness, parse_whole_ms_duration,
    parse_whole_ms_readiness,
};
use render::{service_unit, sibling_unit, socket_unit};
use validate::{check_addr, check_name, check_proving, check_unit_value, valid_user};

/// The systemd assumed when `--systemd-version` is not given and
/// `systemctl --version` cannot be run: Debian 12's.
pub const DEFAULT_SYSTEMD_VERSION: u32 = 252;

/// The oldest systemd the generated units are written for.
pub const MIN_SYSTEMD_VERSION: u32 = 252;

/// The first systemd with `FileDescriptorStorePreserve=` (`--fdstore-preserve`).
pub const FDSTORE_PRESERVE_SINCE: u32 = 254;

/// Default of `--fdstore-max`: `baton-httpd` hands over one fd per idle
/// connection, and Baton's own default store size is the same.
pub const DEFAULT_FDSTORE_MAX: u32 = 4096;

/// Default of `--baton`.
pub const DEFAULT_BATON: &str = "/usr/bin/baton";

/// How much longer systemd waits (`TimeoutStopSec=`) than the drain deadline
/// (`--stop-timeout`), so that the drain, not systemd's SIGKILL, ends a stop.
pub const STOP_MARGIN: Duration = Duration::from_secs(15);

/// Longest socket path in bytes (`sun_path` less its NUL), for the control
/// and notify sockets Baton creates in the runtime directory.
const UNIX_PATH_MAX: usize = crate::listen::UNIX_PATH_MAX;

/// Longest unit name systemd accepts (`UNIT_NAME_MAX` less the NUL).
const UNIT_NAME_MAX: usize = 255;

/// The suffix of a sibling `.socket` unit's stem: `web.socket`'s sibling is
/// `web-b.socket`.
pub const SIBLING_SUFFIX: &str = "-b";

/// Who runs the app and who owns the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Baton is the main process; the app runs as its generations.
    Supervised,
    /// systemd runs the app directly.
    Direct,
}

/// One generated unit file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// The unit's file name, e.g. `web.socket`.
    pub name: String,
    /// The whole file.
    pub contents: String,
}

/// Why units could not be generated or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnitsError {
    /// `--name` is not usable as a unit, directory and socket name.
    #[error("invalid --name {name:?}: {reason}")]
    Name {
        /// As given.
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// `--user` is not a valid user name or uid, or is `nobody`.
    #[error("invalid --user {user:?}: {reason}, or leave --user out for DynamicUser=yes")]
    User {
        /// As given.
        user: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A `--listen` cannot be expressed in a `.socket` unit or is unsafe there.
    #[error("cannot use --listen {spec}: {reason}")]
    Listen {
        /// The spec as given (normalised).
        spec: String,
        /// What is wrong and the fix.
        reason: String,
    },
    /// The COMMAND after `--` cannot be used.
    #[error("invalid COMMAND: {reason}")]
    Command {
        /// What is wrong and the fix.
        reason: String,
    },
    /// `--baton` is not an absolute path.
    #[error("invalid --baton {path:?}: give the absolute path of baton on the target machine, such as /usr/bin/baton")]
    BatonPath {
        /// As given.
        path: PathBuf,
    },
    /// `--steering auto` cannot be honoured.
    #[error("cannot use --steering auto: {reason}")]
    Steering {
        /// What is wrong and the fix.
        reason: String,
    },
    /// The proving options (`--health-http`, `--ready`, …) cannot be used
    /// as given.
    #[error("cannot use the proving options: {reason}")]
    Proving {
        /// What is wrong and the fix.
        reason: String,
    },
    /// `--watchdog` is zero.
    #[error("--watchdog must be longer than 0; leave it out to run without a watchdog")]
    ZeroWatchdog,
    /// The target systemd is too old.
    #[error(
        "systemd {version} is not supported: the units need systemd {MIN_SYSTEMD_VERSION} or later (pass --systemd-version if the detected version is wrong)"
    )]
    SystemdVersion {
        /// The version asked for or detected.
        version: u32,
    },
    /// `--fdstore-preserve` for a systemd that has no
    /// `FileDescriptorStorePreserve=`.
    #[error(
        "--fdstore-preserve needs systemd {FDSTORE_PRESERVE_SINCE} or later (FileDescriptorStorePreserve=), and the \
         units are for systemd {version}: leave --fdstore-preserve out (systemd {version} keeps the fd store across \
         restarts but not across `systemctl stop`), or pass --systemd-version if the target runs a newer systemd"
    )]
    FdStorePreserve {
        /// The version asked for or detected.
        version: u32,
    },
    /// Writing a unit file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file (or directory) being written.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Printing the units failed.
    #[error("cannot print the units: {source}")]
    Stdout {
        /// The cause.
        source: io::Error,
    },
}

impl UnitsError {
    /// Whether the error is in the command line (exit code 2) rather than in
    /// writing the result (exit code 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, UnitsError::Write { .. } | UnitsError::Stdout { .. })
    }
}

/// `baton units`: generates the units for the target systemd (the
/// `--systemd-version`, else the local one, else
/// [`DEFAULT_SYSTEMD_VERSION`]) and writes them into `--output` (printing
/// the paths written), or prints them with a `# ---- NAME ----` line before
/// each.
pub fn run(args: &UnitsArgs) -> Result<(), UnitsError> {
    let version = args.systemd_version.or_else(detect_systemd_version).unwrap_or(DEFAULT_SYSTEMD_VERSION);
    let files = generate(args, version)?;
    let mut stdout = io::stdout().lock();
    let text = match &args.output {
        Some(dir) => {
            let mut text = String::new();
            for path in write_files(dir, &files)? {
                let _ = writeln!(text, "wrote {}", path.display());
            }
            text
        }
        None => to_stdout_text(&files),
    };
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(|source| UnitsError::Stdout { source })
}

/// The units as one text: each file preceded by `# ---- NAME ----`.
pub fn to_stdout_text(files: &[UnitFile]) -> String {
    let mut text = String::new();
    for f in files {
        let _ = writeln!(text, "# ---- {} ----", f.name);
        text.push_str(&f.contents);
    }
    text
}

/// Writes each file into `dir` (created if missing), replacing it
/// atomically (temporary file, then `rename`), and returns the paths.
pub fn write_files(dir: &Path, files: &[UnitFile]) -> Result<Vec<PathBuf>, UnitsError> {
    std::fs::create_dir_all(dir).map_err(|source| UnitsError::Write { path: dir.to_owned(), source })?;
    let mut written = Vec::with_capacity(files.len());
    for f in files {
        let path = dir.join(&f.name);
        let tmp = dir.join(format!(".{}.tmp-{}", f.name, std::process::id()));
        let result = std::fs::write(&tmp, &f.contents).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(source) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(UnitsError::Write { path, source });
        }
        written.push(path);
    }
    Ok(written)
}

/// The major version of the local systemd, from `systemctl --version`
/// (`systemd 252 (252.38-1~deb12u1)`), or `None` if it cannot be run or
/// read.
pub fn detect_systemd_version() -> Option<u32> {
    let out = std::process::Command::new("systemctl").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_systemctl_version(&String::from_utf8_lossy(&out.stdout))
}

/// The major version in the first line of `systemctl --version`.
pub fn parse_systemctl_version(text: &str) -> Option<u32> {
    let mut words = text.lines().next()?.split_whitespace();
    (words.next()? == "systemd").then_some(())?;
    words.next()?.parse().ok()
}

/// The sockets of one `.socket` unit: all `--listen`s with one fd name.
struct SocketGroup<'a> {
    /// The unit's name, e.g. `web.socket` or `web-admin.socket`.
    unit: String,
    /// The fd name, `None` for unnamed specs.
    fdname: Option<&'a str>,
    specs: Vec<&'a ListenSpec>,
    /// With `--steering auto` and TCP or UDP specs: the sibling unit's name
    /// (`web-b.socket`), which listens on the same IP addresses.
    sibling: Option<String>,
}

impl SocketGroup<'_> {
    /// The specs a sibling unit repeats: the TCP and UDP ones.
    fn ip_specs(&self) -> impl Iterator<Item = &&ListenSpec> {
        self.specs.iter().filter(|s| matches!(s.addr, ListenAddr::Tcp(_) | ListenAddr::Udp(_)))
    }

    /// The fd name both units of a pair give their sockets: the
    /// `FileDescriptorName=`, or for an unnamed group the unit's name (what
    /// systemd names the first unit's fds), so that Baton pairs them.
    fn pair_fdname(&self) -> &str {
        self.fdname.unwrap_or(&self.unit)
    }
}

/// Everything [`generate`] derives from the options, checked.
struct Plan<'a> {
    args: &'a UnitsArgs,
    header: String,
    groups: Vec<SocketGroup<'a>>,
    /// The app's command line, quoted for `ExecStart=`.
    app_exec: String,
    /// Baton's path, quoted for `ExecStart=`.
    baton_exec: String,
    /// `SyslogIdentifier=` for the supervised service: the file name of the
    /// app's program, escaped; `None` when a unit file cannot hold it.
    syslog_identifier: Option<String>,
}

/// Generates the `.socket` unit(s) and then the `.service` for `args`, for
/// systemd `systemd_version` (which overrides `args.systemd_version`).
pub fn generate(args: &UnitsArgs, systemd_version: u32) -> Result<Vec<UnitFile>, UnitsError> {
    let plan = plan(args, systemd_version)?;
    let mut files = Vec::new();
    for g in &plan.groups {
        files.push(socket_unit(&plan, g));
        if g.sibling.is_some() {
            files.push(sibling_unit(&plan, g));
        }
    }
    files.push(service_unit(&plan));
    Ok(files)
}

fn plan(args: &UnitsArgs, version: u32) -> Result<Plan<'_>, UnitsError> {
    if version < MIN_SYSTEMD_VERSION {
        return Err(UnitsError::SystemdVersion { version });
    }
    check_name(&args.name)?;
    if let Some(user) = &args.user {
        if !valid_user(user) {
            let reason = "give an existing user's name (letters, digits, '_', '-', '.', starting with a letter or '_') \
                          or a numeric uid";
            return Err(UnitsError::User { user: user.clone(), reason });
        }
        if user == "nobody" || user == "65534" {
            let reason = "systemd refuses to call nobody safe (every unmapped file and process is nobody's); \
                          create a user for the service";
            return Err(UnitsError::User { user: user.clone(), reason });
        }
    }
    if args.watchdog.is_some_and(|w| w.is_zero()) {
        return Err(UnitsError::ZeroWatchdog);
    }
    if args.fdstore_preserve.is_some() && version < FDSTORE_PRESERVE_SINCE {
        return Err(UnitsError::FdStorePreserve { version });
    }
    if !args.baton.is_absolute() || args.baton.to_str().is_none() {
        return Err(UnitsError::BatonPath { path: args.baton.clone() });
    }
    let mut groups = group_sockets(args)?;
    if args.steering() == SteeringMode::Auto {
        add_siblings(args, &mut groups)?;
    }
    check_proving(args)?;
    let app_exec = exec_command(&args.command)?;
    let baton_exec = exec_quote(args.baton.to_str().unwrap_or_default());
    let syslog_identifier = syslog_identifier(&args.command);
    Ok(Plan { args, header: args.command_line(version), groups, app_exec, baton_exec, syslog_identifier })
}

fn group_sockets(args: &UnitsArgs) -> Result<Vec<SocketGroup<'_>>, UnitsError> {
    let mut groups: Vec<SocketGroup<'_>> = Vec::new();
    for (i, spec) in args.listen.iter().enumerate() {
        let fail = |reason: String| UnitsError::Listen { spec: spec_text(spec), reason };
        check_addr(args, spec).map_err(fail)?;
        if args.listen[..i].iter().any(|s| s.addr == spec.addr) {
            return Err(fail("the address is given twice".into()));
        }
        let fdname = (spec.name != UNNAMED).then_some(spec.name.as_str());
        if let Some(g) = groups.iter_mut().find(|g| g.fdname == fdname) {
            g.specs.push(spec);
            continue;
        }
        let unit = if groups.is_empty() {
            format!("{}.socket", args.name)
        } else {
            match fdname {
                Some(n) => format!("{}-{n}.socket", args.name),
                None => {
                    return Err(fail(
                        "an unnamed --listen must come first (its socket unit is NAME.socket); \
                         list it first or give it a name (FDNAME=ADDR)"
                            .into(),
                    ));
                }
            }
        };
        if unit.len() > UNIT_NAME_MAX {
            return Err(fail(format!(
                "the unit name {unit} is longer than {UNIT_NAME_MAX} bytes; use a shorter FDNAME"
            )));
        }
        groups.push(SocketGroup { unit, fdname, specs: vec![spec], sibling: None });
    }
    Ok(groups)
}

/// Names the sibling unit of every group with TCP or UDP sockets, refusing
/// names that clash with another unit.
fn add_siblings(args: &UnitsArgs, groups: &mut [SocketGroup<'_>]) -> Result<(), UnitsError> {
    let fail = |reason: String| Err(UnitsError::Steering { reason });
    if args.topology() == Topology::Direct {
        return fail(
            "in the direct topology systemd runs the app itself and no Baton steers its sockets; use the \
             supervised topology, or leave --steering out"
                .into(),
        );
    }
    let units: Vec<String> = groups.iter().map(|g| g.unit.clone()).collect();
    for g in groups.iter_mut() {
        if g.ip_specs().next().is_none() {
            continue;
        }
        let stem = g.unit.strip_suffix(".socket").unwrap_or(&g.unit);
        let sibling = format!("{stem}{SIBLING_SUFFIX}.socket");
        if units.contains(&sibling) {
            return fail(format!(
                "{sibling}, the steering sibling of {}, is already the unit of another fd name; rename that FDNAME",
                g.unit
            ));
        }
        if sibling.len() > UNIT_NAME_MAX {
            return fail(format!("the unit name {sibling} is longer than {UNIT_NAME_MAX} bytes; use a shorter FDNAME"));
        }
        g.sibling = Some(sibling);
    }
    Ok(())
}

/// `--listen` as written back into the header: a bare port for the dual-stack
/// wildcard, else [`ListenSpec`]'s own form (both parse back to `spec`).
fn spec_text(spec: &ListenSpec) -> String {
    let addr = match &spec.addr {
        ListenAddr::Tcp(a) if is_dual_wildcard(a) => a.port().to_string(),
        ListenAddr::Udp(a) if is_dual_wildcard(a) => format!("udp:{}", a.port()),
        other => other.to_string(),
    };
    if spec.name == UNNAMED { addr } else { format!("{}={addr}", spec.name) }
}

/// `[::]:PORT` without scope: Baton's bare port, serving IPv4 too.
fn is_dual_wildcard(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v6) if v6.ip().is_unspecified() && v6.scope_id() == 0 && v6.flowinfo() == 0)
}

/// The `Listen*=` directive and value for one socket.
fn listen_directive(addr: &ListenAddr) -> (&'static str, String) {
    let inet = |a: &SocketAddr| {
        // A bare port is systemd's dual-stack wildcard, and unlike `[::]:P`
        // falls back to IPv4 on hosts without IPv6, as `baton run` does.
        if is_dual_wildcard(a) { a.port().to_string() } else { a.to_string() }
    };
    let unix_key = |kind: &UnixKind| match kind {
        UnixKind::Stream => "ListenStream",
        UnixKind::SeqPacket => "ListenSequentialPacket",
        UnixKind::Datagram => "ListenDatagram",
    };
    match addr {
        ListenAddr::Tcp(a) => ("ListenStream", inet(a)),
        ListenAddr::Udp(a) => ("ListenDatagram", inet(a)),
        ListenAddr::Unix { path, kind } => (unix_key(kind), escape_specifiers(&path.to_string_lossy())),
        ListenAddr::UnixAbstract { name, kind } => (unix_key(kind), format!("@{}", escape_specifiers(name))),
    }
}

/// `%` starts a specifier in most directives.
fn escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// One word of an `ExecStart=` command line, quoted so that systemd passes
/// it on unchanged: `%` (specifiers) and `$` (variables) doubled, words with
/// anything but plain characters double-quoted with C escapes.
pub fn exec_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return escape_specifiers(word);
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn exec_command(command: &[OsString]) -> Result<String, UnitsError> {
    let fail = |reason: String| UnitsError::Command { reason };
    let words: Vec<&str> = command
        .iter()
        .map(|w| w.to_str().ok_or_else(|| fail(format!("{w:?} is not UTF-8, which a unit file cannot hold"))))
        .collect::<Result<_, _>>()?;
    let Some(program) = words.first() else { return Err(fail("it is empty; give the app after --".into())) };
    if !program.starts_with('/') {
        return Err(fail(format!(
            "the program {program:?} is not an absolute path; give its full path, such as /usr/bin/{program}"
        )));
    }
    Ok(words.iter().map(|w| exec_quote(w)).collect::<Vec<_>>().join(" "))
}

/// What systemd would name the app's lines if it ran the program itself
/// (`SyslogIdentifier=`'s default: the file name of the command's path, as
/// `src/core/exec-invoke.c` passes it to `connect_logger_as()`), escaped
/// for the unit file; `None` for a name a unit file cannot hold verbatim.
fn syslog_identifier(command: &[OsString]) -> Option<String> {
    let name = Path::new(command.first()?).file_name()?.to_str()?;
    check_unit_value("program's file name", name).ok()?;
    Some(escape_specifiers(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_quoting() {
        assert_eq!(exec_quote("/usr/bin/app"), "/usr/bin/app");
        assert_eq!(exec_quote("--root=/srv/www"), "--root=/srv/www");
        assert_eq!(exec_quote("100%"), "100%%");
        assert_eq!(exec_quote(""), "\"\"");
        assert_eq!(exec_quote("a b"), "\"a b\"");
        assert_eq!(exec_quote("$HOME"), "\"$$HOME\"");
        assert_eq!(exec_quote("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(exec_quote(";"), "\";\"");
        assert_eq!(exec_quote("l1\nl2\x01"), "\"l1\\nl2\\x01\"");
        assert_eq!(exec_quote("é"), "\"é\"");
    }

    #[test]
    fn versions() {
        assert_eq!(parse_systemctl_version("systemd 252 (252.38-1~deb12u1)\n+PAM"), Some(252));
        assert_eq!(parse_systemctl_version("systemd 257 (257.9-1~deb13u1)"), Some(257));
        assert_eq!(parse_systemctl_version("nonsense"), None);
    }

    fn args(argv: &[&str]) -> UnitsArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: UnitsArgs,
        }
        let argv =
            ["baton-units", "--name", "web", "-l", "http=8080"].iter().chain(argv).chain(&["--", "/usr/bin/app"]);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    fn service(argv: &[&str], version: u32) -> String {
        generate(&args(argv), version).unwrap().pop().unwrap().contents
    }

    #[test]
    fn supervised_units_name_the_app_in_the_journal() {
        for version in [252, 257, 262] {
            let svc = service(&[], version);
            assert_eq!(svc.matches("\nSyslogIdentifier=app\n").count(), 1, "{version}:\n{svc}");
            // systemd names a directly run app's lines itself.
            assert!(!service(&["--direct"], version).contains("SyslogIdentifier="));
        }
        let odd = |program: &str| syslog_identifier(&[program.into()]);
        assert_eq!(odd("/opt/100%/web").as_deref(), Some("web"));
        assert_eq!(odd("/opt/w%eb").as_deref(), Some("w%%eb"), "a specifier escaped");
        assert_eq!(odd("/opt/we\\b"), None, "a backslash cannot be written verbatim");
        assert_eq!(odd("/opt/we\nb"), None);
    }

    #[test]
    fn fdstore_preserve_is_written_for_254_and_later_only() {
        for version in [254, 257, 262] {
            for (value, directive) in [("yes", "yes"), ("no", "no"), ("restart", "restart")] {
                for topology in [&["--fdstore-preserve", value][..], &["--fdstore-preserve", value, "--direct"]] {
                    let svc = service(topology, version);
                    let line = format!("\nFileDescriptorStorePreserve={directive}\n");
                    assert_eq!(svc.matches(&line).count(), 1, "{version} {topology:?}:\n{svc}");
                    assert!(svc.starts_with("# Generated by: baton units "), "{svc}");
                    assert!(svc.lines().next().unwrap().contains(&format!("--fdstore-preserve {value} ")), "{svc}");
                }
            }
        }
        // Left out unless asked for: systemd's default (restart) applies.
        assert!(!service(&[], 257).contains("FileDescriptorStorePreserve"));
        for version in [252, 253] {
            let err = generate(&args(&["--fdstore-preserve", "yes"]), version).unwrap_err();
            assert!(err.is_usage());
            let text = err.to_string();
            assert!(text.contains("needs systemd 254") && text.contains(&format!("for systemd {version}")), "{text}");
            assert!(text.contains("leave --fdstore-preserve out") && text.contains("--systemd-version"), "{text}");
        }
    }

    #[test]
    fn supervised_reloads_run_exec_reload_on_every_version() {
        for version in [252, 253, 257, 262] {
            let svc = service(&[], version);
            assert!(svc.contains("\nType=notify\n"), "{version}:\n{svc}");
            assert!(svc.contains("\nExecReload=+/usr/bin/baton restart --name web --wait\n"), "{version}:\n{svc}");
            assert!(!svc.contains("ReloadSignal="), "{version}:\n{svc}");
        }
    }

    #[test]
    fn users() {
        for ok in ["www-data", "_app", "nobody", "a.b", "1000", "0"] {
            assert!(valid_user(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "root:root", "4294967295", "65535", "9a", "x$y", &"a".repeat(32)] {
            assert!(!valid_user(bad), "{bad}");
        }
    }
}
