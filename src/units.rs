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

mod render;
use render::{service_unit, sibling_unit, socket_unit};

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
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_ms_duration)]
    pub watchdog: Option<Duration>,
    /// How long a stopping app may drain (Baton's --stop-timeout; the app's
    /// own drain deadline should be a few seconds shorter, as baton-httpd's
    /// 25 s is below the default 30 s). TimeoutStopSec= is this plus 15 s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_whole_ms_duration)]
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
    /// auto: every fd name with TCP or UDP sockets also gets a sibling
    /// .socket unit (NAME-b.socket, NAME-FDNAME-b.socket) listening on the
    /// same addresses, both with ReusePort=yes, so that Baton holds two
    /// sockets per address and steers new connections to the proven
    /// generation only. Supervised topology only.
    #[arg(long, value_enum, value_name = "MODE", default_value = "off")]
    pub steering: SteeringMode,
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
        if self.steering == SteeringMode::Auto {
            words.extend(["--steering".into(), "auto".into()]);
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

/// `--steering`: whether the units provide the socket pairs steering needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SteeringMode {
    /// A sibling `.socket` unit for every fd name with IP sockets.
    Auto,
    /// One socket per address: Baton falls back to shared accept.
    Off,
}

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
    if args.steering == SteeringMode::Auto {
        add_siblings(args, &mut groups)?;
    }
    let app_exec = exec_command(&args.command)?;
    let baton_exec = exec_quote(args.baton.to_str().unwrap_or_default());
    let syslog_identifier = syslog_identifier(&args.command);
    Ok(Plan { args, header: args.command_line(version), groups, app_exec, baton_exec, syslog_identifier })
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

/// What systemd would name the app's lines if it ran the program itself
/// (`SyslogIdentifier=`'s default: the file name of the command's path, as
/// `src/core/exec-invoke.c` passes it to `connect_logger_as()`), escaped
/// for the unit file; `None` for a name a unit file cannot hold verbatim.
fn syslog_identifier(command: &[OsString]) -> Option<String> {
    let name = Path::new(command.first()?).file_name()?.to_str()?;
    check_unit_value("program's file name", name).ok()?;
    Some(escape_specifiers(name))
}

/// Parses a duration as `baton run` does ([`crate::cli::parse_duration`]:
/// the unit passes it on to `baton run`, which must accept it), in whole
/// milliseconds: [`format_duration`] writes no finer unit.
pub fn parse_whole_ms_duration(s: &str) -> Result<Duration, String> {
    let d = crate::cli::parse_duration(s)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?}: give a whole number of milliseconds"));
    }
    Ok(d)
}

/// A duration both systemd and Baton read: `30s`, `1500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
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
        assert_eq!(parse_whole_ms_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_whole_ms_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_whole_ms_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_whole_ms_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_whole_ms_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_whole_ms_duration("0.5ms").unwrap_err().contains("whole number of milliseconds"));
        assert!(parse_whole_ms_duration("3 days").unwrap_err().contains("unknown unit"));
        assert!(parse_whole_ms_duration("soon").is_err());
        // `baton run`'s limit: a unit must not carry what it would refuse.
        assert!(parse_whole_ms_duration("8761h").unwrap_err().contains("the maximum is 8760h"));
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
