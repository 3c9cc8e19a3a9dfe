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

/// `baton units`: the options.
#[derive(Debug, Clone, clap::Args)]
pub struct UnitsArgs {
    /// Service name: writes NAME.socket and NAME.service (letters, digits,
    /// '.', '_', '-'; it also names the runtime directory and Baton's
    /// control socket).
    #[arg(long, short = 'n')]
    pub name: String,
    /// The sockets, in `baton run -l` syntax; each fd name gets its own
    /// `.socket` unit.
    #[arg(
        long = "listen",
        short = 'l',
        value_name = "[FDNAME=]ADDR",
        required = true,
        help = "Socket to listen on, as [FDNAME=]ADDR (the forms of `baton run -l`): 8080, 127.0.0.1:8080, \
                [::1]:443, udp:ADDR, unix:/PATH, unix:@NAME, seqpacket:..., unixgram:.... Repeatable; each FDNAME \
                gets its own .socket unit"
    )]
    pub listen: Vec<ListenSpec>,
    /// Run as this existing user (default: DynamicUser=yes, a transient user
    /// per start).
    #[arg(long)]
    pub user: Option<String>,
    /// Fd-store size (FileDescriptorStoreMax=, and Baton's --fdstore-max):
    /// one entry per connection the app hands over.
    #[arg(long, default_value_t = DEFAULT_FDSTORE_MAX)]
    pub fdstore_max: u32,
    /// When systemd empties the fd store (FileDescriptorStorePreserve=,
    /// systemd 254 and later): restart (systemd's default) keeps it across
    /// restarts and crashes, not across `systemctl stop`; yes keeps it across
    /// stop and start too; no empties it at every stop, restarts included.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub fdstore_preserve: Option<FdStorePreserve>,
    /// Watchdog interval (e.g. 10s): WatchdogSec= in direct mode; in
    /// supervised mode Baton enforces it on each generation.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub watchdog: Option<Duration>,
    /// How long a stopping app may drain (Baton's --stop-timeout; the app's
    /// own drain deadline should be a few seconds shorter, as baton-httpd's
    /// 25 s is below the default 30 s). TimeoutStopSec= is this plus 15 s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// Baton is the main process and `systemctl reload` is an overlapped
    /// restart (the default).
    #[arg(long, conflicts_with = "direct")]
    pub supervised: bool,
    /// systemd socket-activates the app itself; `systemctl restart` restarts
    /// it while the .socket unit keeps listening.
    #[arg(long)]
    pub direct: bool,
    /// The systemd the units are for (default: the local `systemctl
    /// --version`, else 252). It decides which directives the units may use
    /// (--fdstore-preserve needs 254).
    #[arg(long, value_name = "N")]
    pub systemd_version: Option<u32>,
    /// Write the units into this directory (created if missing) instead of
    /// printing them.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Where `baton` is installed on the target machine.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BATON)]
    pub baton: PathBuf,
    /// The app and its arguments; the program must be an absolute path.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl UnitsArgs {
    /// The topology these options ask for.
    pub fn topology(&self) -> Topology {
        if self.direct { Topology::Direct } else { Topology::Supervised }
    }

    /// The command line that reproduces these units on any machine: every
    /// option that is not at its default, `--systemd-version` always (its
    /// default depends on the machine), never `--output`. Shell-quoted.
    pub fn command_line(&self, systemd_version: u32) -> String {
        let mut words: Vec<String> = vec!["baton".into(), "units".into(), "--name".into(), self.name.clone()];
        for spec in &self.listen {
            words.push("--listen".into());
            words.push(spec_text(spec));
        }
        if let Some(u) = &self.user {
            words.extend(["--user".into(), u.clone()]);
        }
        if self.fdstore_max != DEFAULT_FDSTORE_MAX {
            words.extend(["--fdstore-max".into(), self.fdstore_max.to_string()]);
        }
        if let Some(p) = self.fdstore_preserve {
            words.extend(["--fdstore-preserve".into(), p.as_str().into()]);
        }
        if let Some(w) = self.watchdog {
            words.extend(["--watchdog".into(), format_duration(w)]);
        }
        if self.stop_timeout != Duration::from_secs(30) {
            words.extend(["--stop-timeout".into(), format_duration(self.stop_timeout)]);
        }
        if self.direct {
            words.push("--direct".into());
        }
        words.extend(["--systemd-version".into(), systemd_version.to_string()]);
        if self.baton != Path::new(DEFAULT_BATON) {
            words.extend(["--baton".into(), self.baton.to_string_lossy().into_owned()]);
        }
        words.push("--".into());
        words.extend(self.command.iter().map(|a| a.to_string_lossy().into_owned()));
        words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
    }
}

/// `--fdstore-preserve`: systemd's `FileDescriptorStorePreserve=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FdStorePreserve {
    /// Empty the store whenever the service stops, a restart's stop included.
    No,
    /// Keep the store across `systemctl stop` and start, until the unit is
    /// unloaded or `systemctl clean --what=fdstore`.
    Yes,
    /// Keep the store across restarts (systemd's default), empty it at
    /// `systemctl stop`.
    Restart,
}

impl FdStorePreserve {
    /// The value as `FileDescriptorStorePreserve=` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            FdStorePreserve::No => "no",
            FdStorePreserve::Yes => "yes",
            FdStorePreserve::Restart => "restart",
        }
    }
}

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
}

/// Generates the `.socket` unit(s) and then the `.service` for `args`, for
/// systemd `systemd_version` (which overrides `args.systemd_version`).
pub fn generate(args: &UnitsArgs, systemd_version: u32) -> Result<Vec<UnitFile>, UnitsError> {
    let plan = plan(args, systemd_version)?;
    let mut files: Vec<UnitFile> = plan.groups.iter().map(|g| socket_unit(&plan, g)).collect();
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
    let groups = group_sockets(args)?;
    let app_exec = exec_command(&args.command)?;
    let baton_exec = exec_quote(args.baton.to_str().unwrap_or_default());
    Ok(Plan { args, header: args.command_line(version), groups, app_exec, baton_exec })
}

fn check_name(name: &str) -> Result<(), UnitsError> {
    let fail = |reason: &str| Err(UnitsError::Name { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return fail("it is empty");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return fail("use only ASCII letters, digits, '.', '_' and '-' (it names units, a directory and sockets)");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return fail("it must start with a letter or a digit");
    }
    if name.ends_with(".service") || name.ends_with(".socket") {
        return fail("give the name without a unit suffix (web, not web.service)");
    }
    // Baton's notify socket, /run/NAME/NAME.notify, is the longest path.
    let longest = runtime_dir(name).len() + 1 + name.len() + ".notify".len();
    if longest > UNIX_PATH_MAX {
        return fail(&format!(
            "it is too long: Baton's socket {}/{name}.notify would exceed the {UNIX_PATH_MAX}-byte limit of socket paths",
            runtime_dir(name)
        ));
    }
    Ok(())
}

/// `RuntimeDirectory=NAME` of a system service.
fn runtime_dir(name: &str) -> String {
    format!("/run/{name}")
}

/// systemd's rules for `User=` (relaxed: dots allowed), or a numeric uid
/// other than the invalid 4294967295 and the overflow uid 65535.
fn valid_user(user: &str) -> bool {
    if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
        return user.parse::<u32>().is_ok_and(|uid| uid != u32::MAX && uid != 65535);
    }
    let mut bytes = user.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && user.len() <= 31
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
        groups.push(SocketGroup { unit, fdname, specs: vec![spec] });
    }
    Ok(groups)
}

/// Refuses addresses a `.socket` unit cannot hold or that would break.
fn check_addr(args: &UnitsArgs, spec: &ListenSpec) -> Result<(), String> {
    match &spec.addr {
        ListenAddr::Tcp(a) | ListenAddr::Udp(a) if a.port() == 0 => {
            Err("port 0 would be a different random port at every start of the socket; give a fixed port".into())
        }
        ListenAddr::Tcp(_) | ListenAddr::Udp(_) => Ok(()),
        ListenAddr::Unix { path, .. } => {
            let text = path.to_str().ok_or("the path is not UTF-8, which a unit file cannot hold")?;
            check_unit_value("path", text)?;
            let dir = runtime_dir(&args.name);
            if path.starts_with(&dir) {
                return Err(format!(
                    "{dir} is the service's RuntimeDirectory=, which systemd deletes whenever the service stops, \
                     socket file included; put the socket elsewhere, such as /run/{}.sock",
                    args.name
                ));
            }
            Ok(())
        }
        ListenAddr::UnixAbstract { name, .. } => check_unit_value("abstract name", name),
    }
}

/// A value taken verbatim by a unit file directive: no control characters
/// (a line ends there), no backslash (it would continue the line or
/// escape), no surrounding blanks (systemd strips them).
fn check_unit_value(what: &str, value: &str) -> Result<(), String> {
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("the {what} contains a control character, which a unit file cannot hold"));
    }
    if value.contains('\\') {
        return Err(format!("the {what} contains a backslash, which a unit file would read as an escape"));
    }
    if value.trim() != value {
        return Err(format!("the {what} starts or ends with a blank, which systemd would strip"));
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

/// One word for a POSIX shell: plain, `'single-quoted'`, or `$'…'` when it
/// holds control characters.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_owned();
    }
    if word.chars().any(|c| c.is_control()) {
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' => out.push_str("\\'"),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut buf = [0; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('\'');
        return out;
    }
    format!("'{}'", word.replace('\'', "'\\''"))
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

/// Parses a duration: a number with an optional unit (`ms`, `s`/`sec`,
/// `m`/`min`, `h`; none means seconds), in whole milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2min)"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" | "sec" => n * 1e3,
        "m" | "min" => n * 60e3,
        "h" => n * 3600e3,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s, min or h")),
    };
    if ms.fract() != 0.0 || !(0.0..=1e15).contains(&ms) {
        return Err(format!("{s:?}: give a whole number of milliseconds, at most about 30,000 years"));
    }
    Ok(Duration::from_millis(ms as u64))
}

/// A duration both systemd and Baton read: `30s`, `1500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

/// The file header: how to regenerate, and not to edit.
fn header(plan: &Plan<'_>, unit: &str) -> String {
    format!(
        "# Generated by: {}\n\
         # Regenerate rather than edit: put local changes in a drop-in (systemctl edit {unit}).\n",
        plan.header
    )
}

fn socket_unit(plan: &Plan<'_>, g: &SocketGroup<'_>) -> UnitFile {
    let name = &plan.args.name;
    let mut s = header(plan, &g.unit);
    let fdname = match g.fdname {
        Some(n) => format!("{n:?} (FileDescriptorName=, in the app's LISTEN_FDNAMES)"),
        None => format!("none given, so systemd names the fds {:?}", g.unit),
    };
    let _ = write!(
        s,
        "#\n\
         # Listening socket(s) of {name}.service.\n\
         # Fd name: {fdname}.\n\
         # systemd binds them and keeps them open across every restart and crash of the service:\n\
         # connections that arrive meanwhile wait in the kernel's backlog. Hence no PartOf= here,\n\
         # and package upgrades should restart the service only, never this unit (that would\n\
         # close the listener).\n"
    );
    if plan.args.topology() == Topology::Supervised {
        s.push_str(
            "# Baton is socket-activated: it takes these sockets by name and passes them on to\n\
             # every generation of the app (so `baton run` gets no -l).\n",
        );
    }
    let label = g.fdname.map_or_else(String::new, |n| format!(" {n:?}"));
    let _ = write!(s, "\n[Unit]\nDescription={name}: listening socket{label}\n\n[Socket]\n");
    let mut dual = false;
    let mut unix_path = false;
    for spec in &g.specs {
        let (key, value) = listen_directive(&spec.addr);
        let _ = writeln!(s, "{key}={value}");
        dual |= matches!(&spec.addr, ListenAddr::Tcp(a) | ListenAddr::Udp(a) if is_dual_wildcard(a));
        unix_path |= matches!(&spec.addr, ListenAddr::Unix { .. });
    }
    if dual {
        s.push_str(
            "# A bare port serves IPv4 too, whatever net.ipv6.bindv6only says (as with `baton run`).\n\
             BindIPv6Only=both\n",
        );
    }
    if unix_path {
        s.push_str(
            "# Any local user may connect (SocketMode=0666, systemd's default). To restrict it:\n\
             # SocketMode=0660 and SocketGroup= a group of the clients.\n",
        );
    }
    if let Some(n) = g.fdname {
        let _ = writeln!(s, "FileDescriptorName={n}");
    }
    let _ = write!(s, "Service={name}.service\n\n[Install]\nWantedBy=sockets.target\n");
    UnitFile { name: g.unit.clone(), contents: s }
}

fn service_unit(plan: &Plan<'_>) -> UnitFile {
    let args = plan.args;
    let name = &args.name;
    let unit = format!("{name}.service");
    let supervised = args.topology() == Topology::Supervised;
    let sockets: Vec<&str> = plan.groups.iter().map(|g| g.unit.as_str()).collect();
    let sockets = sockets.join(" ");
    let program = args.command.first().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let stop = format_duration(args.stop_timeout);
    let timeout_stop = format_duration(args.stop_timeout + STOP_MARGIN);
    let fdstore = args.fdstore_max;
    let nofile = (u64::from(fdstore) * 2 + 1024).max(65536);

    let mut s = header(plan, &unit);
    s.push_str("#\n");
    if supervised {
        let _ = write!(
            s,
            "# Topology: supervised. Baton is the main process for the life of the service and runs\n\
             # {program} as generations.\n\
             # `systemctl reload {name}` (ExecReload=, that is `baton restart`) starts a new\n\
             # generation, waits for its READY=1 and only then retires the old one, which drains:\n\
             # an overlapped, zero-downtime restart. `systemctl restart` restarts Baton too; the\n\
             # sockets stay open in the .socket unit(s) meanwhile.\n"
        );
    } else {
        let _ = write!(
            s,
            "# Topology: direct. systemd socket-activates {program} itself.\n\
             # `systemctl restart {name}` stops it (it drains, and may hand idle connections over\n\
             # through the fd store) and then starts the next one; the sockets stay open in the\n\
             # .socket unit(s), so new connections wait in the backlog instead of being refused.\n\
             # The two never overlap: for that, generate the supervised topology.\n"
        );
    }

    let _ = write!(
        s,
        "\n[Unit]\n\
         Description={name}{}\n\
         # The sockets come from the .socket unit(s) only; never run without them.\n\
         Requires={sockets}\n\
         After={sockets}\n\
         # Every start counts here, `systemctl restart` and automatic restarts included. The\n\
         # default (5 starts in 10 s) is easily hit by scripted restarts; once hit, the service\n\
         # fails and its sockets stop listening until `systemctl reset-failed {name}`.\n\
         StartLimitIntervalSec=60s\n\
         StartLimitBurst=20\n\
         \n[Service]\n",
        if supervised { " (supervised by Baton)" } else { "" },
    );

    if supervised {
        // Why not Type=notify-reload on systemd >= 253 (as until issue 14): systemd ends such a
        // reload with its READY=1 as a success, whatever Baton says (`ERRNO=`, `STATUS=` do not
        // change the result, src/core/service.c), so a refused restart made `systemctl reload`
        // succeed while the old generation kept serving. Only a timeout or a failing ExecReload=
        // command fails a reload, on every version up to 262 at least. Of the two ways to get one:
        // - notify-reload's SIGHUP *and* an ExecReload= that only waits for the verdict of the
        //   restart the signal started: the restart begins before the helper is forked, but the
        //   helper must be matched to "its" signal (which may be handled before or after it
        //   connects, coalesce with another SIGHUP, or come from someone else's `kill -HUP`);
        //   that matching is a protocol of its own to get right and to test;
        // - Type=notify and ExecReload=+baton restart --wait everywhere (252's unit, already
        //   proven there): the helper's own request starts the restart and gets exactly its
        //   outcome, so there is nothing to match, and every version behaves the same.
        // The second costs the spawn of `+baton restart` before the restart begins, which 257
        // does through systemd-executor: measured with benches/restarts.rs setup 4b (systemd 257,
        // 2-core box, under load, 50 restarts, quiet machine), restart -> new generation serving
        // went from 18 ms median (p90 22; notify-reload, SIGHUP) to 46 ms (p90 53), still with 0
        // failed requests and 0 closed connections; 252 (setup 4) is unchanged. A correct
        // `systemctl reload` result is worth ~30 ms on an operation that drops nothing.
        let _ = write!(
            s,
            "# `systemctl reload` runs ExecReload=, which asks Baton for an overlapped restart and waits:\n\
             # it exits 0 once the new generation is ready, and fails with the reason (in the journal\n\
             # and, as Status:, in `systemctl status {name}`) when it is not, so `systemctl reload`\n\
             # fails too while the old generation keeps serving. Type=notify, not notify-reload, on\n\
             # every systemd: a notify-reload reload ends with READY=1 and cannot fail (253 to 262).\n\
             Type=notify\n"
        );
        let watchdog = args.watchdog.map(|w| format!(" --watchdog {}", format_duration(w))).unwrap_or_default();
        let _ = writeln!(
            s,
            "ExecStart={} run --name {name} --fdstore-max {fdstore} --stop-timeout {stop}{watchdog} -- {}",
            plan.baton_exec, plan.app_exec
        );
        // `+`: systemd forks ExecReload= without the sandbox (no DynamicUser=, namespaces, mounts
        // or seccomp to set up), and that setup is most of what `systemctl reload` costs on 252.
        // Measured in the testbed (systemd 252, 2-core box, 30 reloads each, medians):
        // `systemctl reload` takes 65–81 ms hardened, 30–37 ms with `+`, 25–35 ms with no
        // hardening at all and 25–27 ms for a unit whose ExecReload= is /bin/true (systemctl's
        // own floor); from systemd's "Reloading" to "Reloaded" 40–48 ms hardened, 9–10 ms with
        // `+`; `baton restart` run directly 6–8 ms. In benches/restarts.rs (setup 4, under
        // load) restart → new generation serving went from ~67 ms to ~35 ms median.
        // Safe: the command is Baton's own short-lived CLI, which sends one request on the
        // control socket, waits for the answer and exits; no app code runs there. Root reaches
        // the DynamicUser='s 0600 socket and passes Baton's peer-credential check (root or
        // Baton's own uid); $RUNTIME_DIRECTORY, where `--name` looks for the socket, is set
        // with or without `+`. Baton and the app themselves stay fully sandboxed.
        let _ = write!(
            s,
            "# `+`: without the sandbox, which would cost more to set up than the restart itself; this\n\
             # only asks Baton, over its control socket, to restart. Baton and the app stay sandboxed.\n\
             ExecReload=+{} restart --name {name} --wait\n",
            plan.baton_exec
        );
        s.push_str("# Only Baton notifies systemd; the generations notify Baton.\nNotifyAccess=main\n");
    } else {
        let _ = writeln!(s, "Type=notify\nExecStart={}", plan.app_exec);
        s.push_str(
            "# No ExecReload=: `systemctl reload` is refused; use `systemctl restart`.\n\
             # Only the main process may send READY=1, FDSTORE=1 and the like.\n\
             NotifyAccess=main\n",
        );
    }
    let _ = writeln!(s, "Sockets={sockets}");

    if supervised {
        let _ = write!(
            s,
            "# What the app hands over (FDSTORE=1 to Baton) Baton also keeps in systemd's store, so it\n\
             # survives a restart or crash of Baton itself.\n\
             FileDescriptorStoreMax={fdstore}\n"
        );
    } else {
        let _ = write!(
            s,
            "# What the app hands over (FDSTORE=1) is passed to its next start: systemd keeps it\n\
             # across `systemctl restart` and automatic restarts{}.\n\
             FileDescriptorStoreMax={fdstore}\n",
            if args.fdstore_preserve == Some(FdStorePreserve::Yes) { "" } else { ", not across stop and start" }
        );
    }
    if let Some(preserve) = args.fdstore_preserve {
        s.push_str(&fdstore_preserve_text(preserve, supervised, name));
    }
    if let Some(w) = args.watchdog {
        let w = format_duration(w);
        if supervised {
            let _ = write!(
                s,
                "# Watchdog: Baton gives each generation WATCHDOG_USEC={w} and replaces one that misses it.\n\
                 # No WatchdogSec= here: Baton itself does not ping systemd.\n"
            );
        } else {
            let _ = write!(
                s,
                "# The app must send WATCHDOG=1 within this interval, or systemd aborts and restarts it.\n\
                 WatchdogSec={w}\n"
            );
        }
    }

    if supervised {
        let _ = write!(
            s,
            "# control-group (the default): should Baton itself die, systemd SIGTERMs the generations\n\
             # and restarts Baton once they have drained: requests in flight finish while new\n\
             # connections wait in the socket's backlog. mixed would SIGKILL them, cutting every\n\
             # request in flight; process would leave them running unsupervised, even past `systemctl\n\
             # stop`. Measured with Baton SIGKILLed during 4 downloads, on systemd 252 and 257: 4 of 4\n\
             # completed (mixed: 0 of 4); idle keep-alive connections closed with a FIN and no new\n\
             # connection refused or failed under either. The generations write straight to the journal\n\
             # (Baton's default when its stderr is the journal), so their logging survives Baton. On\n\
             # `systemctl stop` the generations get systemd's SIGTERM as well as Baton's stop signal;\n\
             # Baton still SIGKILLs one left after --stop-timeout {stop}.\n\
             KillMode=control-group\n\
             # Longer than Baton's --stop-timeout, so that Baton, not systemd, ends the drain. Also\n\
             # the longest a crashed Baton's generations may drain before Baton is restarted.\n\
             TimeoutStopSec={timeout_stop}\n"
        );
    } else {
        let _ = write!(
            s,
            "# control-group (the default): SIGTERM to every process of the app at once, and SIGKILL\n\
             # to what is left after TimeoutStopSec=.\n\
             KillMode=control-group\n\
             # The app's own drain deadline should be a few seconds shorter than {stop} (baton-httpd's\n\
             # default is 25s); this leaves it room to finish.\n\
             TimeoutStopSec={timeout_stop}\n"
        );
    }
    let _ = write!(
        s,
        "Restart=on-failure\n\
         RestartSec=1s\n\
         # /run/{name}: writable, removed whenever the service stops (so never a .socket's path).\n"
    );
    if supervised {
        let _ = write!(
            s,
            "# Baton's control socket is /run/{name}/{name}.sock; from a shell:\n\
             #   baton status --name {name} --control /run/{name}/{name}.sock\n"
        );
    }
    let _ = write!(
        s,
        "RuntimeDirectory={name}\n\
         # Only the service's user may enter it: Baton's notify and handoff sockets are there.\n\
         RuntimeDirectoryMode=0700\n\
         # Up to {fdstore} stored fds are passed in at every start, on top of live connections.\n\
         LimitNOFILE={nofile}\n"
    );

    s.push_str(
        "\n# Hardening: each of these is safe for Baton and its reference server. An app that\n\
         # needs more relaxes the one setting in a drop-in.\n",
    );
    match &args.user {
        Some(u) => {
            let _ = writeln!(s, "User={u}");
        }
        None => s.push_str(
            "# A transient user for each start: the app owns no file outside RuntimeDirectory= (add\n\
             # StateDirectory= for persistent data, or generate with --user).\n\
             DynamicUser=yes\n",
        ),
    }
    s.push_str(
        "NoNewPrivileges=yes\n\
         # No capabilities: systemd binds the sockets, privileged ports included.\n\
         CapabilityBoundingSet=\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectProc=invisible\n\
         # AF_UNIX is needed for sd_notify and the journal.\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         # Remove for JIT runtimes (Java, Node.js, LuaJIT, PCRE2 JIT).\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         # Baton needs @process (pidfd_open, pidfd_send_signal, waitid, PR_SET_CHILD_SUBREAPER),\n\
         # which @system-service includes. Refused calls fail with EPERM instead of killing.\n\
         SystemCallFilter=@system-service\n\
         SystemCallFilter=~@privileged @resources\n\
         SystemCallErrorNumber=EPERM\n\
         UMask=0077\n",
    );
    let _ = write!(
        s,
        "\n[Install]\n\
         # Start at boot (drop this to start on the first connection only).\n\
         WantedBy=multi-user.target\n\
         Also={sockets}\n"
    );
    UnitFile { name: unit, contents: s }
}

/// `FileDescriptorStorePreserve=` with what it means for the stored fds:
/// in the supervised topology Baton's store mirrors the app's entries as
/// `app/NAME` (and Baton's own `-l` listeners as `listen/NAME`, which
/// generated units never have: their sockets belong to the .socket units).
fn fdstore_preserve_text(preserve: FdStorePreserve, supervised: bool, name: &str) -> String {
    let entries = if supervised {
        "# (In systemd's store the app's entries are app/NAME; Baton passes them to its first\n\
         # generation at every start. The listening sockets are not in it: they stay in the\n\
         # .socket unit(s) whatever this says.)\n"
    } else {
        "# (The listening sockets are not in it: they stay in the .socket unit(s) whatever this\n\
         # says.)\n"
    };
    let meaning = match preserve {
        FdStorePreserve::Yes => format!(
            "# FileDescriptorStorePreserve=yes (systemd >= 254): the fd store also survives `systemctl\n\
             # stop`, until the unit is unloaded or `systemctl clean --what=fdstore {name}`, and the\n\
             # next start gets what the app stored. Connections the app handed over as it stopped\n\
             # stay open, unanswered, while the service is stopped.\n"
        ),
        FdStorePreserve::Restart => {
            "# FileDescriptorStorePreserve=restart (systemd's default, >= 254): the fd store survives\n\
             # restarts and crashes, and `systemctl stop` empties it.\n"
                .to_owned()
        }
        FdStorePreserve::No => {
            "# FileDescriptorStorePreserve=no (systemd >= 254): the fd store is emptied whenever the\n\
             # service stops, even for `systemctl restart` or an automatic restart after a crash.\n"
                .to_owned()
        }
    };
    format!("{meaning}{entries}FileDescriptorStorePreserve={}\n", preserve.as_str())
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
    fn shell_quoting() {
        assert_eq!(shell_quote("--listen"), "--listen");
        assert_eq!(shell_quote("http=[::1]:80"), "'http=[::1]:80'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a\nb'"), "$'a\\nb\\''");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0.5ms").unwrap_err().contains("whole number of milliseconds"));
        assert!(parse_duration("3 days").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
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
