//! The wire formats of systemd's service protocols, for both sides.
//!
//! One module serves the application that *sends* notifications and reads
//! `LISTEN_*`, and the supervisor that *receives* notifications and sets
//! `LISTEN_*`, so the two can never disagree on the format:
//!
//! - [`NotifyState`] is one `KEY=VALUE` assignment of an `sd_notify(3)`
//!   datagram; its [`Display`](std::fmt::Display) is the wire form.
//! - [`encode`] joins assignments into a datagram and refuses anything
//!   systemd would drop or misread (too long, NUL, newline inside a value,
//!   invalid `FDNAME`), so nothing is lost silently.
//! - [`parse`] reads a datagram the way systemd 252's PID 1 does
//!   (`manager_dispatch_notify_fd` and `service_notify_message`), never
//!   panicking on any input.
//! - [`ListenEnv`] encodes and parses `LISTEN_PID`/`LISTEN_FDS`/
//!   `LISTEN_FDNAMES` with `sd_listen_fds_with_names(3)`'s validation, and
//!   `LISTEN_PIDFDID` (systemd ≥ 259) as libsystemd 259's `sd_listen_fds()`
//!   (`src/libsystemd/sd-daemon/sd-daemon.c`) checks it.

use std::fmt;

/// The longest notify payload systemd accepts (`NOTIFY_BUFFER_MAX`, equal
/// to `PIPE_BUF`, in 252–257): PID 1 receives into a buffer one byte larger
/// and drops anything longer or truncated.
pub const NOTIFY_BUFFER_MAX: usize = 4096;

/// The most fds systemd 252–257 accepts in one notify datagram
/// (`NOTIFY_FD_MAX`); more truncates the control data and everything is
/// closed. The kernel itself allows only 253 per `SCM_RIGHTS` message.
pub const NOTIFY_FD_MAX: usize = 768;

/// The kernel's limit of fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// The longest name systemd accepts in `FDNAME=` and `FileDescriptorName=`.
pub const FDNAME_MAX: usize = 255;

/// The first fd number of passed file descriptors (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// The largest `errno` systemd's `parse_errno()` accepts (`ERRNO_MAX`).
pub const ERRNO_MAX: u32 = 4095;

/// One assignment of a notify datagram, as understood by systemd 252–257.
///
/// `Display` writes the exact wire form (`READY=1`, `STATUS=…`).
/// Borrowed so that parsing a received datagram allocates nothing per field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotifyState<'a> {
    /// `READY=1`: start-up (or a reload) has finished.
    Ready,
    /// `RELOADING=1`: a reload has begun; follow with [`Ready`](Self::Ready).
    /// On systemd ≥ 253 `Type=notify-reload` also wants
    /// [`MonotonicUsec`](Self::MonotonicUsec) in the same datagram.
    Reloading,
    /// `STOPPING=1`: shutdown has begun.
    Stopping,
    /// `STATUS=…`: one line of free text for `systemctl status`.
    /// Must not contain a newline (it would start a new assignment).
    Status(&'a str),
    /// `ERRNO=…`: the errno of a failure, `0..=4095`.
    Errno(u32),
    /// `BUSERROR=…`: a D-Bus error name (documented; not consumed by 252–256).
    BusError(&'a str),
    /// `MAINPID=…`: the service's main pid changed to this one.
    MainPid(u32),
    /// `MAINPIDFDID=…` (systemd ≥ 257): the pidfd id
    /// ([`crate::pidfs::pidfd_inode_id`]) of the process `MAINPID=` names,
    /// so the receiver can tell it from a later process with the same pid.
    MainPidFdId(u64),
    /// `MAINPIDFD=1` (systemd ≥ 257): the new main process is the one of
    /// the pidfd attached to this datagram (exactly one fd).
    MainPidFd,
    /// `WATCHDOG=1`: the keep-alive ping.
    Watchdog,
    /// `WATCHDOG=trigger`: act as if the watchdog had expired (systemd ≥ 243).
    WatchdogTrigger,
    /// `WATCHDOG_USEC=…`: a new watchdog timeout, in µs (0 turns it off).
    WatchdogUsec(u64),
    /// `EXTEND_TIMEOUT_USEC=…`: extend the running start/stop timeout to
    /// now + this many µs.
    ExtendTimeoutUsec(u64),
    /// `MONOTONIC_USEC=…`: `CLOCK_MONOTONIC` in µs, sent with
    /// [`Reloading`](Self::Reloading) (systemd ≥ 253).
    MonotonicUsec(u64),
    /// `FDSTORE=1`: store the fds attached to this datagram.
    FdStore,
    /// `FDSTOREREMOVE=1`: remove the stored fds named by [`FdName`](Self::FdName).
    FdStoreRemove,
    /// `FDNAME=…`: the name of the stored or removed fds.
    FdName(&'a str),
    /// `FDPOLL=0`: do not poll the stored fds for hang-up (keep them even
    /// when the peer closes).
    FdPollDisable,
    /// `BARRIER=1`: synchronisation point; must be the only assignment and
    /// carry exactly one fd, which the manager closes once it has processed
    /// everything sent before.
    Barrier,
    /// `RESTART_RESET=1` (systemd ≥ 258): reset the unit's restart counter
    /// (`NRestarts`, which `RestartSteps=` grows the delay by). Older
    /// versions ignore it like any unknown assignment.
    RestartReset,
    /// Any other line, kept verbatim (`X_MY_KEY=…`, or assignments of newer
    /// systemd versions such as `NOTIFYACCESS=`).
    Other(&'a str),
}

impl fmt::Display for NotifyState<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready => f.write_str("READY=1"),
            Self::Reloading => f.write_str("RELOADING=1"),
            Self::Stopping => f.write_str("STOPPING=1"),
            Self::Status(s) => write!(f, "STATUS={s}"),
            Self::Errno(e) => write!(f, "ERRNO={e}"),
            Self::BusError(s) => write!(f, "BUSERROR={s}"),
            Self::MainPid(p) => write!(f, "MAINPID={p}"),
            Self::MainPidFdId(id) => write!(f, "MAINPIDFDID={id}"),
            Self::MainPidFd => f.write_str("MAINPIDFD=1"),
            Self::Watchdog => f.write_str("WATCHDOG=1"),
            Self::WatchdogTrigger => f.write_str("WATCHDOG=trigger"),
            Self::WatchdogUsec(u) => write!(f, "WATCHDOG_USEC={u}"),
            Self::ExtendTimeoutUsec(u) => write!(f, "EXTEND_TIMEOUT_USEC={u}"),
            Self::MonotonicUsec(u) => write!(f, "MONOTONIC_USEC={u}"),
            Self::FdStore => f.write_str("FDSTORE=1"),
            Self::FdStoreRemove => f.write_str("FDSTOREREMOVE=1"),
            Self::FdName(n) => write!(f, "FDNAME={n}"),
            Self::FdPollDisable => f.write_str("FDPOLL=0"),
            Self::Barrier => f.write_str("BARRIER=1"),
            Self::RestartReset => f.write_str("RESTART_RESET=1"),
            Self::Other(line) => f.write_str(line),
        }
    }
}

/// `CLOCK_MONOTONIC` now, in microseconds: the clock of `MONOTONIC_USEC=`,
/// the same in every process of the machine (so one process can compare
/// another's timestamps with its own, and a re-executed image can convert
/// a deadline back).
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // CLOCK_MONOTONIC is never negative.
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

impl NotifyState<'_> {
    /// `MONOTONIC_USEC=` for the current `CLOCK_MONOTONIC`, as systemd ≥ 253
    /// wants next to `RELOADING=1`.
    pub fn monotonic_usec_now() -> NotifyState<'static> {
        NotifyState::MonotonicUsec(monotonic_usec())
    }

    /// Checks that this assignment survives the trip through systemd intact.
    fn validate(&self) -> Result<(), WireError> {
        match self {
            Self::Status(v) => check_value("STATUS", v),
            Self::BusError(v) => check_value("BUSERROR", v),
            Self::Errno(e) if *e > ERRNO_MAX => Err(WireError::InvalidValue {
                key: "ERRNO",
                value: e.to_string(),
                reason: "systemd accepts errno values 0..=4095",
            }),
            Self::MainPid(p) if !pid_is_valid(u64::from(*p)) => Err(WireError::InvalidValue {
                key: "MAINPID",
                value: p.to_string(),
                reason: "a pid must be in 1..=2147483647 (a positive pid_t)",
            }),
            Self::FdName(n) => validate_fdname(n).map_err(WireError::from),
            Self::Other(line) => {
                if line.contains('\0') {
                    return Err(WireError::Nul);
                }
                if line.contains(['\n', '\r']) {
                    return Err(WireError::NewlineInValue { key: key_of(line).to_owned() });
                }
                match line.split_once('=') {
                    Some((key, _)) if !key.is_empty() => Ok(()),
                    _ => Err(WireError::NotAnAssignment { line: (*line).to_owned() }),
                }
            }
            _ => Ok(()),
        }
    }
}

fn key_of(line: &str) -> &str {
    line.split_once('=').map_or(line, |(k, _)| k)
}

fn check_value(key: &'static str, value: &str) -> Result<(), WireError> {
    if value.contains('\0') {
        Err(WireError::Nul)
    } else if value.contains(['\n', '\r']) {
        // systemd splits datagrams on both, so either would start a new,
        // attacker-chosen assignment.
        Err(WireError::NewlineInValue { key: key.to_owned() })
    } else {
        Ok(())
    }
}

/// Why a notify datagram cannot be sent or was refused on receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The datagram is longer than [`NOTIFY_BUFFER_MAX`] bytes; systemd drops it.
    #[error(
        "notify message is {len} bytes; systemd drops messages over 4096 bytes: shorten STATUS= or split the message"
    )]
    TooLarge {
        /// Length of the payload in bytes.
        len: usize,
    },
    /// A NUL byte anywhere but at the very end; systemd drops the datagram.
    #[error("notify message contains a NUL byte; systemd drops such messages: remove it")]
    Nul,
    /// A newline inside a value would split it into two assignments.
    #[error("{key}= value contains a newline, which would start a new assignment: pass a single line")]
    NewlineInValue {
        /// The key whose value held the newline.
        key: String,
    },
    /// A value systemd would reject.
    #[error("{key}={value:?} is invalid: {reason}")]
    InvalidValue {
        /// The assignment's key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What systemd expects.
        reason: &'static str,
    },
    /// An `FDNAME=` systemd would replace by `stored`.
    #[error(transparent)]
    FdName(#[from] FdNameError),
    /// A custom line that is not `KEY=VALUE`.
    #[error("{line:?} is not a KEY=VALUE assignment")]
    NotAnAssignment {
        /// The offending line.
        line: String,
    },
}

/// Why a file descriptor name is invalid (systemd's `fdname_is_valid()`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fd name {name:?} is invalid: {reason} (names are at most 255 printable ASCII characters without ':')")]
pub struct FdNameError {
    /// The rejected name.
    pub name: String,
    /// Which rule it broke.
    pub reason: &'static str,
}

/// Checks a name for `FDNAME=` / `FileDescriptorName=` as systemd does:
/// printable ASCII (0x20..=0x7e) except `:`, at most 255 bytes; empty is
/// allowed.
pub fn validate_fdname(name: &str) -> Result<(), FdNameError> {
    let fail = |reason| Err(FdNameError { name: name.to_owned(), reason });
    if name.len() > FDNAME_MAX {
        return fail("longer than 255 characters");
    }
    if name.contains(':') {
        return fail("contains ':', the LISTEN_FDNAMES separator");
    }
    if !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return fail("contains a control or non-ASCII character");
    }
    Ok(())
}

/// Encodes assignments into one datagram payload (newline-separated), or
/// says why systemd would not receive it intact.
pub fn encode(states: &[NotifyState<'_>]) -> Result<String, WireError> {
    use fmt::Write as _;
    let mut out = String::with_capacity(64);
    for state in states {
        state.validate()?;
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{state}");
    }
    if out.len() > NOTIFY_BUFFER_MAX {
        return Err(WireError::TooLarge { len: out.len() });
    }
    Ok(out)
}

/// A received notify datagram, parsed like systemd 252 does.
///
/// Fields are kept in the order they were sent; the accessors apply 252's
/// precedence rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message<'a> {
    /// Every well-formed assignment, known or not, in datagram order.
    pub fields: Vec<NotifyState<'a>>,
    /// Assignments with a known key but a value systemd rejects (logged and
    /// ignored by systemd, like `MAINPID=abc`); the rest still applies.
    pub invalid: Vec<InvalidField<'a>>,
}

/// A known key with a value systemd would ignore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField<'a> {
    /// The whole line as received (lossy if it was not UTF-8).
    pub line: std::borrow::Cow<'a, str>,
    /// Why it is ignored.
    pub reason: &'static str,
}

/// Service lifecycle change announced by a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// `READY=1`.
    Ready,
    /// `RELOADING=1`.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
}

/// What a datagram means for `BARRIER=1` handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierUse {
    /// No `BARRIER=1` in the datagram.
    None,
    /// `BARRIER=1` alone, as required: close its single fd once every earlier
    /// datagram has been processed.
    Valid,
    /// `BARRIER=1` with other assignments: systemd ignores the whole datagram.
    WithOtherFields,
}

impl<'a> Message<'a> {
    /// The lifecycle change, if any: in 252 the *last* of `READY=1`,
    /// `RELOADING=1` and `STOPPING=1` in one datagram wins.
    pub fn lifecycle(&self) -> Option<Lifecycle> {
        self.fields.iter().rev().find_map(|f| match f {
            NotifyState::Ready => Some(Lifecycle::Ready),
            NotifyState::Reloading => Some(Lifecycle::Reloading),
            NotifyState::Stopping => Some(Lifecycle::Stopping),
            _ => None,
        })
    }

    /// `STATUS=`: systemd takes the first occurrence.
    pub fn status(&self) -> Option<&'a str> {
        self.fields.iter().find_map(|f| match f {
            NotifyState::Status(s) => Some(*s),
            _ => None,
        })
    }

    /// `FDNAME=`: the first occurrence, as systemd takes it.
    pub fn fdname(&self) -> Option<&'a str> {
        self.fields.iter().find_map(|f| match f {
            NotifyState::FdName(s) => Some(*s),
            _ => None,
        })
    }

    /// Whether the datagram contains exactly this assignment.
    pub fn has(&self, state: &NotifyState<'_>) -> bool {
        self.fields.iter().any(|f| f == state)
    }

    /// The first value of a `u64`/`u32` assignment selected by `pick`.
    pub fn find<T>(&self, pick: impl Fn(&NotifyState<'a>) -> Option<T>) -> Option<T> {
        self.fields.iter().find_map(pick)
    }

    /// How this datagram uses `BARRIER=1`.
    pub fn barrier(&self) -> BarrierUse {
        if !self.has(&NotifyState::Barrier) {
            BarrierUse::None
        } else if self.fields.len() == 1 && self.invalid.is_empty() {
            BarrierUse::Valid
        } else {
            BarrierUse::WithOtherFields
        }
    }
}

/// Parses a received notify datagram with systemd 252's rules: at most
/// 4096 bytes, no NUL except one trailing byte, lines split on `\n` or `\r`
/// with empty lines skipped, unknown keys kept, invalid values of known keys
/// set aside in [`Message::invalid`]. Never panics.
pub fn parse(datagram: &[u8]) -> Result<Message<'_>, WireError> {
    if datagram.len() > NOTIFY_BUFFER_MAX {
        return Err(WireError::TooLarge { len: datagram.len() });
    }
    let body = datagram.strip_suffix(b"\0").unwrap_or(datagram);
    if body.contains(&0) {
        return Err(WireError::Nul);
    }
    let mut msg = Message::default();
    for line in body.split(|b| *b == b'\n' || *b == b'\r') {
        if line.is_empty() {
            continue;
        }
        match std::str::from_utf8(line) {
            Ok(line) => match parse_line(line) {
                Ok(state) => msg.fields.push(state),
                Err(reason) => msg.invalid.push(InvalidField { line: line.into(), reason }),
            },
            Err(_) => msg.invalid.push(InvalidField { line: String::from_utf8_lossy(line), reason: "not UTF-8" }),
        }
    }
    Ok(msg)
}

fn parse_line(line: &str) -> Result<NotifyState<'_>, &'static str> {
    let Some((key, value)) = line.split_once('=') else {
        return Ok(NotifyState::Other(line));
    };
    // 252 matches the flag assignments as whole lines (`strv_find(tags,
    // "READY=1")`); any other value is just an unknown line.
    Ok(match (key, value) {
        ("READY", "1") => NotifyState::Ready,
        ("RELOADING", "1") => NotifyState::Reloading,
        ("STOPPING", "1") => NotifyState::Stopping,
        ("FDSTORE", "1") => NotifyState::FdStore,
        ("FDSTOREREMOVE", "1") => NotifyState::FdStoreRemove,
        ("FDPOLL", "0") => NotifyState::FdPollDisable,
        ("BARRIER", "1") => NotifyState::Barrier,
        ("RESTART_RESET", "1") => NotifyState::RestartReset,
        ("MAINPIDFD", "1") => NotifyState::MainPidFd,
        ("WATCHDOG", "1") => NotifyState::Watchdog,
        ("WATCHDOG", "trigger") => NotifyState::WatchdogTrigger,
        ("WATCHDOG", _) => return Err("WATCHDOG= must be 1 or trigger"),
        ("STATUS", v) => NotifyState::Status(v),
        ("BUSERROR", v) => NotifyState::BusError(v),
        ("FDNAME", v) => {
            validate_fdname(v).map_err(|e| e.reason)?;
            NotifyState::FdName(v)
        }
        ("ERRNO", v) => match parse_decimal(v).and_then(|n| u32::try_from(n).ok()) {
            Some(e) if e <= ERRNO_MAX => NotifyState::Errno(e),
            _ => return Err("ERRNO= must be a decimal errno 0..=4095"),
        },
        ("MAINPID", v) => match parse_pid(v) {
            Some(p) => NotifyState::MainPid(p),
            None => return Err("MAINPID= must be a positive pid"),
        },
        ("MAINPIDFDID", v) => match parse_decimal(v) {
            Some(id) if id > 0 => NotifyState::MainPidFdId(id),
            _ => return Err("MAINPIDFDID= must be a positive decimal pidfd id"),
        },
        ("WATCHDOG_USEC", v) => {
            NotifyState::WatchdogUsec(parse_decimal(v).ok_or("WATCHDOG_USEC= must be a decimal u64")?)
        }
        ("EXTEND_TIMEOUT_USEC", v) => {
            NotifyState::ExtendTimeoutUsec(parse_decimal(v).ok_or("EXTEND_TIMEOUT_USEC= must be a decimal u64")?)
        }
        ("MONOTONIC_USEC", v) => {
            NotifyState::MonotonicUsec(parse_decimal(v).ok_or("MONOTONIC_USEC= must be a decimal u64")?)
        }
        _ => NotifyState::Other(line),
    })
}

/// Whether `p` is a pid systemd's `parse_pid()` accepts: positive and
/// representable as `pid_t`.
fn pid_is_valid(p: u64) -> bool {
    (1..=i32::MAX as u64).contains(&p)
}

/// A strict decimal pid in `1..=i32::MAX` (systemd's `parse_pid()` refuses
/// what does not fit `pid_t`).
fn parse_pid(s: &str) -> Option<u32> {
    parse_decimal(s).filter(|p| pid_is_valid(*p)).map(|p| p as u32)
}

/// Strict unsigned decimal: digits only, no sign, no spaces, no overflow.
pub(crate) fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The socket-activation environment: `LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    /// The pid the fds are meant for.
    pub pid: u32,
    /// One name per passed fd, in fd order (fd 3 first). Unnamed fds are
    /// `unknown`, as in `sd_listen_fds_with_names(3)`.
    pub names: Vec<String>,
}

/// The result of reading the `LISTEN_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOutcome {
    /// `LISTEN_PID` or `LISTEN_FDS` is not set: nothing was passed.
    NotActivated,
    /// `LISTEN_PID` names another process: the fds are not ours to take
    /// (a parent passed its environment on without clearing it).
    OtherPid {
        /// The pid in `LISTEN_PID`.
        listen_pid: u32,
        /// Our own pid.
        own_pid: u32,
    },
    /// `LISTEN_PID` is our pid but `LISTEN_PIDFDID` (systemd ≥ 259) names
    /// another process: the pid was reused since the fds were passed, so
    /// they are not ours either.
    OtherProcess {
        /// The id in `LISTEN_PIDFDID`.
        listen_pidfd_id: u64,
        /// The pidfd inode id of this process.
        own_pidfd_id: u64,
    },
    /// Fds were passed to us.
    Activated(ListenEnv),
}

/// A `LISTEN_*` variable that systemd's client would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvError {
    /// A variable that is not a number in range.
    #[error("{var}={value:?} is invalid: {expected}; fix or unset {var} in the service's environment")]
    InvalidVar {
        /// `LISTEN_PID`, `LISTEN_FDS` or `LISTEN_PIDFDID`.
        var: &'static str,
        /// The value found.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// `LISTEN_FDNAMES` lists more or fewer names than `LISTEN_FDS` fds.
    #[error("LISTEN_FDNAMES={names:?} has {count} names but LISTEN_FDS={fds}; they must match one name per fd")]
    NameCount {
        /// The value of `LISTEN_FDNAMES`.
        names: String,
        /// How many names it holds.
        count: usize,
        /// The value of `LISTEN_FDS`.
        fds: usize,
    },
    /// A name the sender should never have produced.
    #[error(transparent)]
    FdName(#[from] FdNameError),
}

impl ListenEnv {
    /// Variable names, in the order [`to_vars`](Self::to_vars) returns them.
    pub const VARS: [&'static str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

    /// `LISTEN_PIDFDID` (systemd ≥ 259): the pidfd inode id of the process
    /// the fds are for, which, unlike a pid, is never reused. Set by the
    /// sender only where the kernel has pidfs (Linux 6.9+), so it is not in
    /// [`VARS`](Self::VARS).
    pub const PIDFD_ID_VAR: &'static str = "LISTEN_PIDFDID";

    /// Number of passed fds.
    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// Parses the three variables (`None` = unset) following
    /// `sd_listen_fds_with_names(3)`: unset `LISTEN_PID` or `LISTEN_FDS` →
    /// not activated; unparsable → error naming the variable; another pid →
    /// not ours; `LISTEN_FDS` must be `1..=INT_MAX-3`; without
    /// `LISTEN_FDNAMES` every fd is `unknown`; otherwise the `:`-separated
    /// names must match the fd count.
    ///
    /// One deliberate leniency: with exactly one fd, `LISTEN_FDNAMES=` (empty)
    /// means one empty name. systemd itself produces that when a single fd
    /// was stored with an empty `FDNAME=`, and libsystemd 252 would then
    /// reject its own environment.
    ///
    /// Without `LISTEN_FDNAMES` the result holds one `unknown` per fd, so
    /// memory grows with `LISTEN_FDS` (up to `INT_MAX - 3` names): code
    /// reading an untrusted environment should first check that the fds
    /// exist, as [`ListenFds::from_env`](crate::ListenFds::from_env) does.
    pub fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
        own_pid: u32,
    ) -> Result<ListenOutcome, EnvError> {
        Self::parse_checked(pid, None, fds, names, own_pid, || None, |_| Ok(()))
    }

    /// [`parse`](Self::parse) with `LISTEN_PIDFDID` as well, the way
    /// libsystemd 259's `sd_listen_fds()` reads it: only once `LISTEN_PID`
    /// matched, an unparsable id is an error, and an id other than
    /// `own_pidfd_id` means the fds are for another process
    /// ([`ListenOutcome::OtherProcess`]). `own_pidfd_id` is `None` when the
    /// kernel cannot name processes by pidfd inode id (no pidfs, before
    /// Linux 6.9): then `LISTEN_PID` alone decides, as in libsystemd.
    pub fn parse_with_pidfd_id(
        pid: Option<&str>,
        pidfd_id: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
        own_pid: u32,
        own_pidfd_id: Option<u64>,
    ) -> Result<ListenOutcome, EnvError> {
        Self::parse_checked(pid, pidfd_id, fds, names, own_pid, || own_pidfd_id, |_| Ok(()))
    }

    /// [`parse`](Self::parse), calling `check` with the validated fd count
    /// before one name per fd is allocated, so that a huge `LISTEN_FDS`
    /// can be refused before it costs memory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn parse_checked<E: From<EnvError>>(
        pid: Option<&str>,
        pidfd_id: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
        own_pid: u32,
        own_pidfd_id: impl FnOnce() -> Option<u64>,
        check: impl FnOnce(usize) -> Result<(), E>,
    ) -> Result<ListenOutcome, E> {
        let Some(pid_str) = pid else {
            return Ok(ListenOutcome::NotActivated);
        };
        let listen_pid = parse_pid(pid_str).ok_or_else(|| EnvError::InvalidVar {
            var: "LISTEN_PID",
            value: pid_str.to_owned(),
            expected: "a positive decimal pid",
        })?;
        if listen_pid != own_pid {
            return Ok(ListenOutcome::OtherPid { listen_pid, own_pid });
        }
        if let Some(id_str) = pidfd_id {
            let listen_pidfd_id = parse_decimal(id_str).ok_or_else(|| EnvError::InvalidVar {
                var: "LISTEN_PIDFDID",
                value: id_str.to_owned(),
                expected: "a decimal pidfd inode id",
            })?;
            // Asked only now: finding our own id costs two system calls.
            if let Some(own_pidfd_id) = own_pidfd_id()
                && own_pidfd_id != listen_pidfd_id
            {
                return Ok(ListenOutcome::OtherProcess { listen_pidfd_id, own_pidfd_id });
            }
        }
        let Some(fds_str) = fds else {
            return Ok(ListenOutcome::NotActivated);
        };
        let max = (i32::MAX - LISTEN_FDS_START) as u64;
        let count = parse_decimal(fds_str).filter(|n| (1..=max).contains(n)).ok_or_else(|| EnvError::InvalidVar {
            var: "LISTEN_FDS",
            value: fds_str.to_owned(),
            expected: "a decimal fd count of at least 1",
        })? as usize;
        if let Some(list) = names {
            // Counting first keeps a mismatch from allocating anything.
            let n = list.split(':').count();
            if n != count {
                return Err(EnvError::NameCount {
                    names: list.to_owned(),
                    count: if list.is_empty() { 0 } else { n },
                    fds: count,
                }
                .into());
            }
        }
        check(count)?;
        let names = match names {
            None => vec!["unknown".to_owned(); count],
            Some(list) => list.split(':').map(str::to_owned).collect(),
        };
        Ok(ListenOutcome::Activated(ListenEnv { pid: listen_pid, names }))
    }

    /// The variables to set for the receiving process, in [`Self::VARS`]
    /// order. `LISTEN_FDNAMES` is always set, as systemd does. Fails if a
    /// name could not be read back (contains `:` or is otherwise invalid).
    pub fn to_vars(&self) -> Result<[(&'static str, String); 3], EnvError> {
        for name in &self.names {
            validate_fdname(name)?;
        }
        Ok([
            ("LISTEN_PID", self.pid.to_string()),
            ("LISTEN_FDS", self.names.len().to_string()),
            ("LISTEN_FDNAMES", self.names.join(":")),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_wire_format() {
        let s = encode(&[
            NotifyState::Ready,
            NotifyState::Status("serving on 127.0.0.1:8080"),
            NotifyState::ExtendTimeoutUsec(u64::MAX),
        ])
        .unwrap();
        assert_eq!(s, "READY=1\nSTATUS=serving on 127.0.0.1:8080\nEXTEND_TIMEOUT_USEC=18446744073709551615\n");
    }

    #[test]
    fn encode_refuses_what_systemd_would_drop_or_misread() {
        assert!(matches!(encode(&[NotifyState::Status("a\nREADY=1")]), Err(WireError::NewlineInValue { .. })));
        assert!(matches!(encode(&[NotifyState::Status("a\rb")]), Err(WireError::NewlineInValue { .. })));
        assert_eq!(encode(&[NotifyState::Status("a\0b")]), Err(WireError::Nul));
        let long = "x".repeat(4090);
        assert!(matches!(encode(&[NotifyState::Status(&long)]), Err(WireError::TooLarge { len: 4098 })));
        let fits = "x".repeat(4096 - "STATUS=\n".len());
        assert_eq!(encode(&[NotifyState::Status(&fits)]).unwrap().len(), 4096);
        assert!(matches!(encode(&[NotifyState::FdName("a:b")]), Err(WireError::FdName(_))));
        assert!(matches!(encode(&[NotifyState::FdName(&"n".repeat(256))]), Err(WireError::FdName(_))));
        assert!(encode(&[NotifyState::FdName(&"n".repeat(255))]).is_ok());
        assert!(encode(&[NotifyState::FdName("")]).is_ok());
        assert!(matches!(encode(&[NotifyState::Errno(4096)]), Err(WireError::InvalidValue { .. })));
        assert!(matches!(encode(&[NotifyState::MainPid(0)]), Err(WireError::InvalidValue { .. })));
        assert!(matches!(encode(&[NotifyState::Other("NOEQUALS")]), Err(WireError::NotAnAssignment { .. })));
    }

    #[test]
    fn parse_follows_252() {
        let m = parse(b"STATUS=one\nREADY=1\nSTOPPING=1\nX_FOO=bar\nMAINPID=abc\nSTATUS=two\n\n").unwrap();
        assert_eq!(m.lifecycle(), Some(Lifecycle::Stopping));
        assert_eq!(m.status(), Some("one"));
        assert!(m.has(&NotifyState::Other("X_FOO=bar")));
        assert_eq!(m.invalid.len(), 1);
        assert_eq!(m.invalid[0].line, "MAINPID=abc");
        assert_eq!(parse(b"READY=1\0").unwrap().lifecycle(), Some(Lifecycle::Ready));
        assert_eq!(parse(b"READY=1\0\0"), Err(WireError::Nul));
        assert_eq!(parse(b"REA\0DY=1"), Err(WireError::Nul));
        assert!(matches!(parse(&[b'x'; 4097]), Err(WireError::TooLarge { .. })));
        assert!(parse(&[b'x'; 4096]).is_ok());
        assert_eq!(parse(b"READY=0").unwrap().lifecycle(), None);
        assert_eq!(parse(b"READY=1\r\nWATCHDOG=1").unwrap().fields, vec![NotifyState::Ready, NotifyState::Watchdog]);
        assert_eq!(parse(b"BARRIER=1").unwrap().barrier(), BarrierUse::Valid);
        assert_eq!(parse(b"BARRIER=1\nREADY=1").unwrap().barrier(), BarrierUse::WithOtherFields);
        assert_eq!(parse(b"FDNAME=a:b").unwrap().invalid.len(), 1);
        assert_eq!(parse(b"ERRNO=4096").unwrap().invalid.len(), 1);
        assert_eq!(parse(b"\xff\xfe=1").unwrap().invalid[0].reason, "not UTF-8");
    }

    #[test]
    fn listen_env_validation() {
        use ListenOutcome::*;
        assert_eq!(ListenEnv::parse(None, Some("1"), None, 7), Ok(NotActivated));
        assert_eq!(ListenEnv::parse(Some("8"), Some("1"), None, 7), Ok(OtherPid { listen_pid: 8, own_pid: 7 }));
        let err = ListenEnv::parse(Some("x7"), Some("1"), None, 7).unwrap_err();
        assert!(err.to_string().contains("LISTEN_PID=\"x7\""), "{err}");
        assert!(ListenEnv::parse(Some("7"), Some("0"), None, 7).is_err());
        assert!(ListenEnv::parse(Some("7"), Some("-1"), None, 7).is_err());
        assert!(ListenEnv::parse(Some("7"), Some("2147483645"), None, 7).is_err());
        assert_eq!(ListenEnv::parse(Some("7"), None, None, 7), Ok(NotActivated));
        assert_eq!(
            ListenEnv::parse(Some("7"), Some("2"), None, 7),
            Ok(Activated(ListenEnv { pid: 7, names: vec!["unknown".into(), "unknown".into()] }))
        );
        let err = ListenEnv::parse(Some("7"), Some("2"), Some("http"), 7).unwrap_err();
        assert!(matches!(err, EnvError::NameCount { count: 1, fds: 2, .. }), "{err}");
        assert_eq!(
            ListenEnv::parse(Some("7"), Some("2"), Some("http:"), 7),
            Ok(Activated(ListenEnv { pid: 7, names: vec!["http".into(), "".into()] }))
        );
        assert_eq!(
            ListenEnv::parse(Some("7"), Some("1"), Some(""), 7),
            Ok(Activated(ListenEnv { pid: 7, names: vec!["".into()] }))
        );
        let env = ListenEnv { pid: 42, names: vec!["http".into(), "stored".into()] };
        let [(_, p), (_, n), (_, names)] = env.to_vars().unwrap();
        assert_eq!(ListenEnv::parse(Some(&p), Some(&n), Some(&names), 42), Ok(Activated(env)));
        assert!(ListenEnv { pid: 1, names: vec!["a:b".into()] }.to_vars().is_err());
    }

    #[test]
    fn pids_must_fit_pid_t() {
        // systemd's parse_pid() refuses what does not fit pid_t.
        assert!(encode(&[NotifyState::MainPid(i32::MAX as u32)]).is_ok());
        let err = encode(&[NotifyState::MainPid(i32::MAX as u32 + 1)]).unwrap_err();
        assert!(matches!(err, WireError::InvalidValue { key: "MAINPID", .. }), "{err}");
        assert!(encode(&[NotifyState::MainPid(u32::MAX)]).is_err());
        assert_eq!(parse(b"MAINPID=2147483647").unwrap().fields, vec![NotifyState::MainPid(i32::MAX as u32)]);
        let m = parse(b"MAINPID=2147483648").unwrap();
        assert!(m.fields.is_empty());
        assert_eq!(m.invalid.len(), 1);
        let err = ListenEnv::parse(Some("2147483648"), Some("1"), None, 7).unwrap_err();
        assert!(matches!(err, EnvError::InvalidVar { var: "LISTEN_PID", .. }), "{err}");
    }

    #[test]
    fn nul_in_other_line_is_reported_as_nul() {
        assert_eq!(encode(&[NotifyState::Other("X_A=b\0c")]), Err(WireError::Nul));
        assert!(matches!(encode(&[NotifyState::Other("X_A=b\nc")]), Err(WireError::NewlineInValue { .. })));
    }

    #[test]
    fn check_runs_before_names_are_allocated() {
        // Without LISTEN_FDNAMES, a huge LISTEN_FDS would otherwise cost one
        // String per promised fd before anything could refuse it.
        let mut seen = None;
        let out = ListenEnv::parse_checked(
            Some("7"),
            None,
            Some("2147483644"),
            None,
            7,
            || None,
            |count| {
                seen = Some(count);
                Err(EnvError::InvalidVar { var: "LISTEN_FDS", value: count.to_string(), expected: "open fds" })
            },
        );
        assert!(out.is_err());
        assert_eq!(seen, Some(2147483644));
        // A name-count mismatch is reported before the check runs.
        let out = ListenEnv::parse_checked(
            Some("7"),
            None,
            Some("3"),
            Some("a:b"),
            7,
            || None,
            |_| -> Result<(), EnvError> { panic!("check must not run") },
        );
        assert!(matches!(out, Err(EnvError::NameCount { count: 2, fds: 3, .. })));
    }

    #[test]
    fn listen_pidfd_id_is_checked_only_for_our_pid_and_only_with_pidfs() {
        let ours = |pidfd_id, own| ListenEnv::parse_with_pidfd_id(Some("7"), pidfd_id, Some("1"), None, 7, own);
        let activated = |r: Result<ListenOutcome, EnvError>| matches!(r, Ok(ListenOutcome::Activated(_)));
        assert!(activated(ours(Some("42"), Some(42))));
        assert!(activated(ours(None, Some(42))), "without LISTEN_PIDFDID, LISTEN_PID decides");
        assert!(activated(ours(Some("41"), None)), "without pidfs, LISTEN_PID decides");
        assert_eq!(
            ours(Some("41"), Some(42)),
            Ok(ListenOutcome::OtherProcess { listen_pidfd_id: 41, own_pidfd_id: 42 })
        );
        let err = ours(Some("x1"), Some(42)).unwrap_err();
        assert!(err.to_string().contains("LISTEN_PIDFDID=\"x1\" is invalid"), "{err}");
        // Another pid: the id is not even looked at, garbage included.
        let other = ListenEnv::parse_with_pidfd_id(Some("8"), Some("x1"), Some("1"), None, 7, Some(42));
        assert_eq!(other, Ok(ListenOutcome::OtherPid { listen_pid: 8, own_pid: 7 }));
        // Our own id is asked for only when LISTEN_PIDFDID is set.
        let out =
            ListenEnv::parse_checked::<EnvError>(Some("7"), None, Some("1"), None, 7, || panic!("asked"), |_| Ok(()));
        assert!(matches!(out, Ok(ListenOutcome::Activated(_))));
    }

    #[test]
    fn restart_reset_round_trips() {
        assert_eq!(NotifyState::RestartReset.to_string(), "RESTART_RESET=1");
        assert_eq!(NotifyState::MainPidFd.to_string(), "MAINPIDFD=1");
        assert_eq!(NotifyState::MainPidFdId(77).to_string(), "MAINPIDFDID=77");
        assert_eq!(
            parse(b"MAINPID=9\nMAINPIDFDID=77\nMAINPIDFD=1").unwrap().fields,
            vec![NotifyState::MainPid(9), NotifyState::MainPidFdId(77), NotifyState::MainPidFd]
        );
        for bad in ["MAINPIDFDID=0", "MAINPIDFDID=-1", "MAINPIDFDID=x"] {
            let msg = parse(bad.as_bytes()).unwrap();
            assert!(msg.fields.is_empty() && msg.invalid.len() == 1, "{bad}: {msg:?}");
        }
        assert_eq!(
            parse(b"MAINPIDFD=0").unwrap().fields,
            vec![NotifyState::Other("MAINPIDFD=0")],
            "only =1 is the flag"
        );
        assert_eq!(parse(b"RESTART_RESET=1").unwrap().fields, vec![NotifyState::RestartReset]);
        assert_eq!(parse(b"RESTART_RESET=0").unwrap().fields, vec![NotifyState::Other("RESTART_RESET=0")]);
    }
}
