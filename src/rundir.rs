//! Baton's runtime directory: where its control, notify and handoff sockets
//! live, created and checked so that no other local user can replace them.
//!
//! Whoever can write to the directory holding the sockets can unlink one and
//! bind their own in its place: the app sends `FDSTORE=1` (live client
//! connections) to whatever socket is at `$NOTIFY_SOCKET`'s path *at send
//! time*. So before binding, [`prepare`] makes sure that:
//!
//! - Baton's own default directory (`/run/baton` for root,
//!   `$XDG_RUNTIME_DIR/baton`, `/tmp/baton-UID`) and systemd's
//!   `$RUNTIME_DIRECTORY` are real directories (never followed through a
//!   symbolic link at their own name), owned by Baton's effective uid and
//!   not writable by group or others ([`Role::SocketDir`]). Baton's own is
//!   also narrowed to 0700 if an older Baton left it wider; systemd's is
//!   never changed (it comes with the unit's `RuntimeDirectoryMode=`, which
//!   `baton units` sets to 0700);
//! - the directory of an explicit `--control` path is owned by root or
//!   Baton's uid and writable by group or others only with the sticky bit,
//!   like `/tmp`, where no other user can remove or rename Baton's sockets
//!   ([`Role::ChosenDir`]); it is never changed;
//! - the parent of the socket directory (of where it really is), which
//!   could otherwise rename it away and put another in its place, passes the
//!   same rule ([`Role::Parent`]). Directories further up are not checked: a
//!   path under a directory another user controls is never safe, for Baton
//!   or any other program, and `--control` must not point there;
//! - a symbolic link is followed only where a path was named (a `--control`
//!   directory, the directory Baton creates its own in, such as a
//!   `$XDG_RUNTIME_DIR` or `/var/run`), and only if no other user can
//!   change it: owned by root or Baton's uid ([`Role::Link`]) in a directory
//!   passing [`Role::Parent`];
//! - every directory it creates is created mode 0700 (`mkdirat` relative to
//!   the already checked parent, then opened with `O_NOFOLLOW` and checked by
//!   `fstat` on the opened fd: no window in which a checked path could be
//!   swapped for another), and must then pass [`Role::SocketDir`].
//!
//! This follows the idea of systemd's `CHASE_SAFE` path resolution
//! (`unsafe_transition()` in `src/basic/chase.c`: stepping from a directory
//! not owned by root to an entry owned by another user is refused, as its
//! owner could swap the entry), made stricter for the directories Baton
//! owns.
//!
//! Socket modes are set on the socket's fd before `bind` (the kernel creates
//! the socket file with the fd's mode minus the umask, `unix_bind()` in
//! `net/unix/af_unix.c`), with the umask cleared on a short-lived thread of
//! its own ([`bind_with_mode`]): never by `chmod` on the path after `bind`,
//! which would follow a symbolic link planted there in between. The control
//! socket is 0600. The notify and handoff sockets are 0666, like systemd's
//! `/run/systemd/notify` (senders are identified by kernel-attested
//! credentials, not by file permissions): inside Baton's 0700 directory
//! only Baton's user and root reach them. An app that runs as another user
//! than Baton (under `baton units` it never does: `User=` and
//! `DynamicUser=` apply to Baton and the app alike) must be able to search
//! the socket directory: pass `--control DIR/NAME.sock` with a `DIR` owned
//! by Baton's user, not writable by others and searchable by the app's user
//! (e.g. `install -d -m 0711 DIR`, or 0750 with the app's group). With
//! `--control` in a shared sticky directory such as `/tmp`, every local
//! user can reach (but not replace) the notify and handoff sockets.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use rustix::net::SocketAddrUnix;

/// The mode of every directory Baton creates for its sockets.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Group- and other-write bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// `S_ISVTX`: in a directory, only an entry's owner may unlink or rename it.
const STICKY: u32 = 0o1000;

/// What kind of file a path turned out to be, from `fstat` on an `O_PATH |
/// O_NOFOLLOW` fd (so a symbolic link is seen as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// Anything else (regular file, socket, FIFO, device).
    Other,
}

/// The facts about one directory that decide whether Baton may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirFacts {
    /// Its file type.
    pub kind: Kind,
    /// Its owner's uid.
    pub owner: u32,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl DirFacts {
    fn of(stat: &Stat) -> DirFacts {
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => Kind::Directory,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        DirFacts { kind, owner: stat.st_uid, mode: stat.st_mode & 0o7777 }
    }
}

/// Which check a directory gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The directory holding the sockets: a directory of Baton's own uid,
    /// writable by no one else.
    SocketDir,
    /// The directory of an explicit `--control` path: owned by root or
    /// Baton's uid, and writable by group or others only if sticky (`/tmp`,
    /// where no other user can remove or rename Baton's sockets).
    ChosenDir,
    /// The socket directory's parent, or the directory Baton creates it in:
    /// the same rule as [`Role::ChosenDir`].
    Parent,
    /// A symbolic link Baton follows on the way (`/var/run`): owned by root
    /// or Baton's uid, or its owner could point it elsewhere later.
    Link,
}

/// Why a directory is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsafe {
    /// A symbolic link where the socket directory should be.
    Symlink,
    /// Not a directory at all.
    NotADirectory,
    /// Owned by another uid than allowed.
    ForeignOwner {
        /// The owner found.
        owner: u32,
    },
    /// Writable by group or others (without the sticky bit, for a parent).
    WritableByOthers {
        /// The permission bits found.
        mode: u32,
    },
}

/// The pure decision: may Baton, running with effective uid `euid`, use a
/// directory (or, for [`Role::Link`], follow a symbolic link) with these
/// `facts` in this `role`?
pub fn judge(facts: DirFacts, role: Role, euid: u32) -> Result<(), Unsafe> {
    match (facts.kind, role) {
        (Kind::Symlink, Role::Link) => {
            // A link's own mode is always 0777 and means nothing.
            return if facts.owner == euid || facts.owner == 0 {
                Ok(())
            } else {
                Err(Unsafe::ForeignOwner { owner: facts.owner })
            };
        }
        (Kind::Directory, Role::SocketDir | Role::ChosenDir | Role::Parent) => {}
        (Kind::Symlink, _) => return Err(Unsafe::Symlink),
        _ => return Err(Unsafe::NotADirectory),
    }
    let owner_ok = match role {
        Role::SocketDir => facts.owner == euid,
        _ => facts.owner == euid || facts.owner == 0,
    };
    if !owner_ok {
        return Err(Unsafe::ForeignOwner { owner: facts.owner });
    }
    let writable = facts.mode & WRITABLE_BY_OTHERS != 0;
    let tolerated = role != Role::SocketDir && facts.mode & STICKY != 0;
    if writable && !tolerated {
        return Err(Unsafe::WritableByOthers { mode: facts.mode });
    }
    Ok(())
}

/// A runtime directory Baton cannot use, or could not create.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RundirError {
    /// The directory exists but another user could replace Baton's sockets
    /// in it.
    #[error("{}", unsafe_message(.dir, *.role, *.problem, *.euid))]
    Unsafe {
        /// The directory refused.
        dir: PathBuf,
        /// Which check it failed.
        role: Role,
        /// Why.
        problem: Unsafe,
        /// Baton's effective uid.
        euid: u32,
    },
    /// A system call on the directory failed.
    #[error("cannot {what} {}: {source}", .dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What Baton was doing ("create", "open", …).
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

fn unsafe_message(dir: &Path, role: Role, problem: Unsafe, euid: u32) -> String {
    let dir = dir.display();
    let elsewhere = "or pass --control PATH with a directory of your own that no other user can write";
    let whose = match role {
        Role::SocketDir => "the directory for baton's sockets",
        Role::ChosenDir => "the --control directory",
        Role::Parent => "the parent of the directory for baton's sockets",
        Role::Link => "the symbolic link",
    };
    match (role, problem) {
        (_, Unsafe::Symlink) => format!(
            "{whose} {dir} is a symbolic link, not a directory: baton refuses to follow it (another user may have \
             planted it to receive the app's connections); remove it (rm {dir}) and start baton again, {elsewhere}"
        ),
        (_, Unsafe::NotADirectory) => {
            format!("{whose} {dir} exists and is not a directory; remove it and start baton again, {elsewhere}")
        }
        (Role::SocketDir, Unsafe::ForeignOwner { owner }) => format!(
            "{whose} {dir} is owned by uid {owner}, not by baton's user (uid {euid}): its owner could replace \
             baton's sockets and take over the app's connections; remove it (as root or uid {owner}: rm -r {dir}) \
             and start baton again, {elsewhere}"
        ),
        (Role::ChosenDir, Unsafe::ForeignOwner { owner }) => format!(
            "{whose} {dir} is owned by uid {owner}, neither root nor baton's user (uid {euid}): its owner could \
             replace baton's sockets and take over the app's connections; pass --control PATH with a directory of \
             your own that no other user can write"
        ),
        (Role::Parent, Unsafe::ForeignOwner { owner }) => format!(
            "{whose} {dir} is owned by uid {owner}, neither root nor baton's user (uid {euid}): its owner could \
             swap baton's directory for another and take over the app's connections; set XDG_RUNTIME_DIR to a \
             directory of your own, {elsewhere}"
        ),
        (Role::Link, Unsafe::ForeignOwner { owner }) => format!(
            "{whose} {dir} on the way to baton's sockets is owned by uid {owner}, neither root nor baton's user \
             (uid {euid}): its owner could point it elsewhere and take over the app's connections; use the real \
             path, {elsewhere}"
        ),
        (Role::SocketDir, Unsafe::WritableByOthers { mode }) => format!(
            "{whose} {dir} is writable by group or others (mode {mode:04o}): another user could replace baton's \
             sockets and take over the app's connections; make it private (chmod 0700 {dir}) and start baton \
             again, {elsewhere}"
        ),
        (Role::ChosenDir, Unsafe::WritableByOthers { mode }) => format!(
            "{whose} {dir} is writable by group or others without the sticky bit (mode {mode:04o}): another user \
             could replace baton's sockets and take over the app's connections; remove the write permission \
             (chmod go-w {dir}), {elsewhere}"
        ),
        (_, Unsafe::WritableByOthers { mode }) => format!(
            "{whose} {dir} is writable by group or others without the sticky bit (mode {mode:04o}): another user \
             could swap baton's directory for another and take over the app's connections; remove the write \
             permission (chmod go-w {dir}) or set the sticky bit (chmod +t {dir}), {elsewhere}"
        ),
    }
}

/// Who chose the directory for Baton's sockets, which decides how it is
/// checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Baton's own default (`/run/baton`, `$XDG_RUNTIME_DIR/baton`,
    /// `/tmp/baton-UID`): private to Baton's uid, kept at 0700.
    Batons,
    /// systemd's `$RUNTIME_DIRECTORY`: private to Baton's uid, never changed.
    Systemd,
    /// The directory of an explicit `--control` path: [`Role::ChosenDir`],
    /// never changed; a symbolic link at its name is followed if no other
    /// user can change it.
    Chosen,
}

/// The directory where Baton puts its sockets when `--control` is not
/// given, and whose it is: `$RUNTIME_DIRECTORY` under systemd, else
/// `/run/baton` for root, else `$XDG_RUNTIME_DIR/baton`, else
/// `/tmp/baton-UID`.
pub fn default_dir() -> (PathBuf, Origin) {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return (PathBuf::from(first), Origin::Systemd);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return (PathBuf::from("/run/baton"), Origin::Batons);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => (Path::new(&dir).join("baton"), Origin::Batons),
        None => (PathBuf::from(format!("/tmp/baton-{}", uid.as_raw())), Origin::Batons),
    }
}

/// The [`Origin`] of the directory `dir` of a control socket path.
pub fn origin_of(dir: &Path) -> Origin {
    match default_dir() {
        (default, origin) if default == dir => origin,
        _ => Origin::Chosen,
    }
}

/// Makes `dir` ready to hold Baton's sockets: creates what is missing (mode
/// 0700, each component checked as it is made) and checks the socket
/// directory and its parent (see the module documentation). Of an existing
/// directory, only Baton's own ([`Origin::Batons`]) is narrowed to 0700 if
/// wider (an older Baton created its directories with the umask's mode).
///
/// Returns the socket directory, opened.
pub fn prepare(dir: &Path, origin: Origin) -> Result<OwnedFd, RundirError> {
    let euid = rustix::process::geteuid().as_raw();
    let dir =
        std::path::absolute(dir).map_err(|source| RundirError::Io { dir: dir.to_owned(), what: "resolve", source })?;
    // The missing tail of `dir`, nearest-to-root last.
    let mut missing = Vec::new();
    let mut existing = dir.as_path();
    while let Some(parent) = existing.parent() {
        match rustix::fs::statat(rustix::fs::CWD, existing, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => {
                missing.push(existing);
                existing = parent;
            }
            _ => break,
        }
    }

    if missing.is_empty() {
        let (role, follow) = match origin {
            Origin::Batons | Origin::Systemd => (Role::SocketDir, false),
            Origin::Chosen => (Role::ChosenDir, true),
        };
        let fd = open_dir(&dir, role, follow, euid)?;
        // Whoever may write to its parent could rename it away and put
        // another in its place: check the parent of where it really is.
        let real = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))
            .unwrap_or_else(|_| dir.clone());
        if let Some(parent) = real.parent() {
            open_dir(parent, Role::Parent, false, euid)?;
        }
        if origin == Origin::Batons {
            narrow(&fd, &dir)?;
        }
        return Ok(fd);
    }

    // The nearest existing ancestor (followed if a symbolic link no one
    // else can change: `/var/run` is one), checked as the parent of what
    // Baton creates in it.
    let mut parent = open_dir(existing, Role::Parent, true, euid)?;
    for path in missing.into_iter().rev() {
        let name = path.file_name().unwrap_or_default();
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(PRIVATE_DIR_MODE)) {
            // Someone (a Baton starting at the same time?) was quicker: what
            // is there now is checked like any existing directory.
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_err(path, "create", e)),
        }
        let fd = open_checked(parent.as_fd(), Path::new(name), path, Role::SocketDir, euid)?;
        // The umask may have taken bits off 0700.
        narrow(&fd, path)?;
        parent = fd;
    }
    Ok(parent)
}

fn io_err(dir: &Path, what: &'static str, e: Errno) -> RundirError {
    RundirError::Io { dir: dir.to_owned(), what, source: e.into() }
}

/// Opens the directory `path` and checks it in `role`. With `follow`, a
/// symbolic link at its name is followed only if no other user can change
/// it: the link owned by root or Baton's uid ([`Role::Link`]), in a
/// directory passing [`Role::Parent`]; the directory it leads to is then
/// checked in `role`.
fn open_dir(path: &Path, role: Role, follow: bool, euid: u32) -> Result<OwnedFd, RundirError> {
    // O_PATH | O_NOFOLLOW opens a symbolic link itself, so `fstat` tells
    // what is really there; nothing is read through it.
    let link = rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err(path, "open", e))?;
    let stat = rustix::fs::fstat(&link).map_err(|e| io_err(path, "inspect", e))?;
    if !follow || FileType::from_raw_mode(stat.st_mode) != FileType::Symlink {
        judge(DirFacts::of(&stat), role, euid).map_err(|problem| unsafe_err(path, role, problem, euid))?;
        return reopen_readable(&link, path);
    }
    judge(DirFacts::of(&stat), Role::Link, euid).map_err(|problem| unsafe_err(path, Role::Link, problem, euid))?;
    if let Some(holder) = path.parent() {
        open_dir(holder, Role::Parent, false, euid)?;
    }
    let target = rustix::fs::open(path, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err(path, "open", e))?;
    check(target.as_fd(), path, role, euid)?;
    reopen_readable(&target, path)
}

/// The checked directory behind an `O_PATH` fd, opened for reading (so its
/// mode can be set by fd): `.` relative to it, the very same inode.
fn reopen_readable(checked: &OwnedFd, shown: &Path) -> Result<OwnedFd, RundirError> {
    rustix::fs::openat(checked, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err(shown, "open", e))
}

fn unsafe_err(dir: &Path, role: Role, problem: Unsafe, euid: u32) -> RundirError {
    RundirError::Unsafe { dir: dir.to_owned(), role, problem, euid }
}

/// Opens `name` relative to `at` without following a symbolic link, checks
/// it in `role` and returns it opened for reading (so its mode can be set
/// by fd).
fn open_checked(at: BorrowedFd<'_>, name: &Path, shown: &Path, role: Role, euid: u32) -> Result<OwnedFd, RundirError> {
    // O_PATH | O_NOFOLLOW opens a symbolic link itself, so `fstat` tells
    // what is really there; nothing is read through it.
    let path_fd = rustix::fs::openat(at, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err(shown, "open", e))?;
    check(path_fd.as_fd(), shown, role, euid)?;
    reopen_readable(&path_fd, shown)
}

fn check(fd: BorrowedFd<'_>, shown: &Path, role: Role, euid: u32) -> Result<(), RundirError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| io_err(shown, "inspect", e))?;
    judge(DirFacts::of(&stat), role, euid).map_err(|problem| unsafe_err(shown, role, problem, euid))
}

/// Sets a checked directory (ours, so `fchmod` is allowed) to 0700 unless it
/// already is.
fn narrow(fd: &OwnedFd, shown: &Path) -> Result<(), RundirError> {
    let mode = rustix::fs::fstat(fd).map_err(|e| io_err(shown, "inspect", e))?.st_mode & 0o7777;
    if mode != PRIVATE_DIR_MODE {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(PRIVATE_DIR_MODE))
            .map_err(|e| io_err(shown, "set the mode of", e))?;
        tracing::debug!(event = "rundir-mode", "{}: mode {mode:04o} set to 0700", shown.display());
    }
    Ok(())
}

/// Binds `socket` to the filesystem address `addr` so that the socket file
/// is created with exactly `mode`, atomically: there is no moment in which
/// the file exists with another mode, and no path is `chmod`ed afterwards
/// (which a symbolic link planted in between would redirect).
///
/// The mode is set on the fd first: the kernel creates the file with the
/// socket inode's mode minus the umask. The umask is per process, and other
/// threads (tokio's, a test harness's) may create files meanwhile, so it is
/// cleared only on a short-lived thread that first gives itself its own
/// filesystem context with `unshare(CLONE_FS)` (cwd, root and umask; the fd
/// table stays shared). Should `unshare` be refused (a seccomp filter) or no
/// thread be available, the bind goes ahead under the process umask: the
/// mode can then only be narrower than asked, never wider.
pub fn bind_with_mode(socket: BorrowedFd<'_>, addr: &SocketAddrUnix, mode: u32) -> io::Result<()> {
    rustix::fs::fchmod(socket, Mode::from_raw_mode(mode))?;
    let bind = || rustix::net::bind(socket, addr).map_err(io::Error::from);
    std::thread::scope(|scope| {
        let binder = std::thread::Builder::new().name("baton-bind".into()).spawn_scoped(scope, || {
            // SAFETY: CLONE_FS only unshares this thread's cwd, root and
            // umask, which no other thread observes; the fd table
            // (CLONE_FILES) stays shared, so `socket` remains valid here.
            if unsafe { libc::unshare(libc::CLONE_FS) } == 0 {
                rustix::process::umask(Mode::empty());
            } else {
                tracing::debug!(
                    "unshare(CLONE_FS) refused ({}): binding under the process umask",
                    io::Error::last_os_error()
                );
            }
            bind()
        });
        match binder {
            Ok(binder) => {
                binder.join().unwrap_or_else(|_| Err(io::Error::other("the thread binding the socket panicked")))
            }
            // No thread to be had (RLIMIT_NPROC, TasksMax=): bind here,
            // under the process umask.
            Err(e) => {
                tracing::debug!("cannot start a thread to bind with mode {mode:04o} ({e}): binding under the umask");
                bind()
            }
        }
    })
}

/// The notify and handoff socket paths Baton derives from the control
/// socket path `control` (its extension replaced by `notify` and
/// `handoff`). Refuses a control path that would be one of them itself:
/// `X.notify` would make the notify socket fail to bind over the control
/// socket, and `X.handoff` would silently replace the control socket.
pub fn derived_paths(control: &Path) -> Result<(PathBuf, PathBuf), String> {
    let ext = control.extension().and_then(|e| e.to_str());
    if let Some(ext @ ("notify" | "handoff")) = ext {
        let suggestion = control.with_extension("sock");
        return Err(format!(
            "--control {}: baton derives its notify and handoff sockets from the control path by replacing its \
             extension (.notify, .handoff), so the control socket must not end in .{ext}; use e.g. --control {}",
            control.display(),
            suggestion.display()
        ));
    }
    if control.file_name().is_none() {
        return Err(format!("--control {}: the control socket path must name a file", control.display()));
    }
    Ok((control.with_extension("notify"), control.with_extension("handoff")))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const ME: u32 = 1000;
    const ROOT: u32 = 0;
    const STRANGER: u32 = 1001;

    fn dir(owner: u32, mode: u32) -> DirFacts {
        DirFacts { kind: Kind::Directory, owner, mode }
    }

    const DIR_ROLES: [Role; 3] = [Role::SocketDir, Role::ChosenDir, Role::Parent];

    #[test]
    fn file_types_other_than_directories_are_refused_in_every_directory_role() {
        for role in DIR_ROLES {
            for owner in [ME, ROOT, STRANGER] {
                for mode in [0o700, 0o777, 0o1777] {
                    let facts = |kind| DirFacts { kind, owner, mode };
                    assert_eq!(judge(facts(Kind::Symlink), role, ME), Err(Unsafe::Symlink));
                    assert_eq!(judge(facts(Kind::Other), role, ME), Err(Unsafe::NotADirectory));
                }
            }
        }
    }

    /// A symbolic link on the way is followed only if no one but root or
    /// Baton's user can change it; its mode means nothing.
    #[test]
    fn links_are_judged_by_their_owner_alone() {
        for mode in [0o777, 0o700, 0o1777] {
            let link = |owner| DirFacts { kind: Kind::Symlink, owner, mode };
            assert_eq!(judge(link(ME), Role::Link, ME), Ok(()));
            assert_eq!(judge(link(ROOT), Role::Link, ME), Ok(()));
            assert_eq!(judge(link(STRANGER), Role::Link, ME), Err(Unsafe::ForeignOwner { owner: STRANGER }));
            assert_eq!(judge(link(STRANGER), Role::Link, STRANGER), Ok(()));
        }
        for kind in [Kind::Directory, Kind::Other] {
            assert_eq!(judge(DirFacts { kind, owner: ME, mode: 0o700 }, Role::Link, ME), Err(Unsafe::NotADirectory));
        }
    }

    /// Every permission bit alone, for every owner and role: only the
    /// group- and other-write bits matter, and for a parent the sticky bit
    /// tolerates them.
    #[test]
    fn owner_and_every_mode_bit_decide() {
        for bit in (0..12).map(|b| 1u32 << b) {
            for mode in [bit, bit | 0o700] {
                let writable = mode & 0o022 != 0;
                // The socket directory: ours and writable by no one else.
                let want = if writable { Err(Unsafe::WritableByOthers { mode }) } else { Ok(()) };
                assert_eq!(judge(dir(ME, mode), Role::SocketDir, ME), want, "{mode:04o}");
                for other in [ROOT, STRANGER] {
                    let want = Err(Unsafe::ForeignOwner { owner: other });
                    assert_eq!(judge(dir(other, mode), Role::SocketDir, ME), want, "{mode:04o}");
                }
                // A parent or a --control directory: root's or ours,
                // writable by others only if sticky.
                for role in [Role::ChosenDir, Role::Parent] {
                    let want = if writable { Err(Unsafe::WritableByOthers { mode }) } else { Ok(()) };
                    for owner in [ME, ROOT] {
                        assert_eq!(judge(dir(owner, mode), role, ME), want, "{role:?} {mode:04o}");
                        let sticky = mode | STICKY;
                        assert_eq!(judge(dir(owner, sticky), role, ME), Ok(()), "{role:?} {sticky:04o}");
                    }
                    let want = Err(Unsafe::ForeignOwner { owner: STRANGER });
                    assert_eq!(judge(dir(STRANGER, mode), role, ME), want, "{role:?} {mode:04o}");
                    assert_eq!(judge(dir(STRANGER, mode | STICKY), role, ME), want, "{role:?} {mode:04o}");
                }
            }
        }
    }

    #[test]
    fn the_places_baton_meets_in_practice() {
        let cases = [
            // (what, facts, role, euid, allowed)
            ("/tmp", dir(ROOT, 0o1777), Role::Parent, ME, true),
            ("/run", dir(ROOT, 0o755), Role::Parent, ME, true),
            ("/run/user/1000", dir(ME, 0o700), Role::Parent, ME, true),
            ("another user's XDG_RUNTIME_DIR", dir(STRANGER, 0o700), Role::Parent, ME, false),
            ("a shared 0777 parent", dir(ROOT, 0o777), Role::Parent, ME, false),
            ("/tmp/baton-1000 made by Baton", dir(ME, 0o700), Role::SocketDir, ME, true),
            ("/tmp/baton-1000 made by an older Baton", dir(ME, 0o755), Role::SocketDir, ME, true),
            ("/tmp/baton-1000 planted 0777 by a stranger", dir(STRANGER, 0o777), Role::SocketDir, ME, false),
            ("/tmp/baton-1000 planted 0700 by a stranger", dir(STRANGER, 0o700), Role::SocketDir, ME, false),
            ("/tmp/baton-1000 ours but 0777", dir(ME, 0o777), Role::SocketDir, ME, false),
            ("/tmp/baton-1000 ours, 1777", dir(ME, 0o1777), Role::SocketDir, ME, false),
            ("/tmp/baton-1000 ours, group-writable", dir(ME, 0o770), Role::SocketDir, ME, false),
            ("/run/baton for root", dir(ROOT, 0o700), Role::SocketDir, ROOT, true),
            ("systemd's RuntimeDirectory=, DynamicUser", dir(61234, 0o700), Role::SocketDir, 61234, true),
            ("systemd's RuntimeDirectory= at the old default", dir(61234, 0o755), Role::SocketDir, 61234, true),
            ("/tmp as Baton's own directory (never)", dir(ROOT, 0o1777), Role::SocketDir, ROOT, false),
            ("--control /tmp/x.sock as root", dir(ROOT, 0o1777), Role::ChosenDir, ROOT, true),
            ("--control /tmp/x.sock as a user", dir(ROOT, 0o1777), Role::ChosenDir, ME, true),
            ("--control in a shared 0775 directory", dir(ROOT, 0o775), Role::ChosenDir, ME, false),
            ("--control in another user's home", dir(STRANGER, 0o755), Role::ChosenDir, ME, false),
            ("--control in one's own home", dir(ME, 0o755), Role::ChosenDir, ME, true),
        ];
        for (what, facts, role, euid, allowed) in cases {
            assert_eq!(judge(facts, role, euid).is_ok(), allowed, "{what}");
        }
    }

    #[test]
    fn messages_name_the_directory_and_the_fix() {
        let dir = Path::new("/tmp/baton-1000");
        let msg = |role, problem| unsafe_message(dir, role, problem, ME);
        let m = msg(Role::SocketDir, Unsafe::ForeignOwner { owner: STRANGER });
        assert!(m.contains("/tmp/baton-1000 is owned by uid 1001") && m.contains("rm -r /tmp/baton-1000"), "{m}");
        assert!(m.contains("--control"), "{m}");
        let m = msg(Role::SocketDir, Unsafe::WritableByOthers { mode: 0o770 });
        assert!(m.contains("mode 0770") && m.contains("chmod 0700 /tmp/baton-1000"), "{m}");
        let m = msg(Role::SocketDir, Unsafe::Symlink);
        assert!(m.contains("symbolic link") && m.contains("rm /tmp/baton-1000"), "{m}");
        let m = msg(Role::Parent, Unsafe::WritableByOthers { mode: 0o777 });
        assert!(m.contains("sticky") && m.contains("chmod +t"), "{m}");
        let m = msg(Role::Parent, Unsafe::ForeignOwner { owner: STRANGER });
        assert!(m.contains("XDG_RUNTIME_DIR"), "{m}");
        let m = msg(Role::ChosenDir, Unsafe::WritableByOthers { mode: 0o775 });
        assert!(m.contains("--control directory") && m.contains("chmod go-w"), "{m}");
        let m = msg(Role::Link, Unsafe::ForeignOwner { owner: STRANGER });
        assert!(m.contains("symbolic link /tmp/baton-1000") && m.contains("real path"), "{m}");
    }

    #[test]
    fn derived_paths_never_collide_with_the_control_socket() {
        let ok = |c: &str| derived_paths(Path::new(c)).unwrap();
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(ok("/run/x/app.sock"), (p("/run/x/app.notify"), p("/run/x/app.handoff")));
        assert_eq!(ok("/run/x/app"), (p("/run/x/app.notify"), p("/run/x/app.handoff")));
        assert_eq!(ok("/run/x/app.notify.sock"), (p("/run/x/app.notify.notify"), p("/run/x/app.notify.handoff")));
        for bad in ["/run/x/app.notify", "/run/x/app.handoff", "app.handoff"] {
            let e = derived_paths(Path::new(bad)).unwrap_err();
            assert!(e.contains(bad) && e.contains("must not end in") && e.contains(".sock"), "{e}");
        }
        assert!(derived_paths(Path::new("/")).is_err());
    }

    /// A fresh directory under the temp dir, private to this test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("baton-rundir-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn missing_components_are_created_0700_and_existing_ones_kept() {
        let s = Scratch::new("create");
        let deep = s.0.join("a/b/c");
        prepare(&deep, Origin::Chosen).unwrap();
        for p in [s.0.join("a"), s.0.join("a/b"), deep.clone()] {
            assert_eq!(mode_of(&p), 0o700, "{}", p.display());
        }
        // Existing and acceptable: left as it is unless it is Baton's own.
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&deep, Origin::Chosen).unwrap();
        assert_eq!(mode_of(&deep), 0o755, "a --control directory is not changed");
        prepare(&deep, Origin::Systemd).unwrap();
        assert_eq!(mode_of(&deep), 0o755, "systemd's directory is not changed");
        prepare(&deep, Origin::Batons).unwrap();
        assert_eq!(mode_of(&deep), 0o700, "Baton's own directory is narrowed");
    }

    #[test]
    fn symlinks_files_and_writable_directories_are_refused() {
        let s = Scratch::new("refuse");
        let target = s.0.join("target");
        std::fs::create_dir(&target).unwrap();
        let link = s.0.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for origin in [Origin::Batons, Origin::Systemd] {
            let e = prepare(&link, origin).unwrap_err();
            assert!(matches!(e, RundirError::Unsafe { problem: Unsafe::Symlink, .. }), "{e}");
        }
        assert_eq!(mode_of(&target), 0o755, "nothing changed through the link");
        // Named by --control, a link of one's own is followed (`/var/run`).
        prepare(&link, Origin::Chosen).unwrap();
        if rustix::process::geteuid().is_root() {
            // Not one a stranger could re-point later.
            std::os::unix::fs::lchown(&link, Some(STRANGER), None).unwrap();
            let e = prepare(&link, Origin::Chosen).unwrap_err();
            let want = Unsafe::ForeignOwner { owner: STRANGER };
            assert!(matches!(e, RundirError::Unsafe { role: Role::Link, problem, .. } if problem == want), "{e}");
            // Nor below it.
            let e = prepare(&link.join("sub"), Origin::Chosen).unwrap_err();
            assert!(matches!(e, RundirError::Unsafe { role: Role::Link, .. }), "{e}");
            assert!(!target.join("sub").exists());
        }

        let file = s.0.join("file");
        std::fs::write(&file, "").unwrap();
        let e = prepare(&file, Origin::Batons).unwrap_err();
        assert!(matches!(e, RundirError::Unsafe { problem: Unsafe::NotADirectory, .. }), "{e}");

        let open = s.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = prepare(&open, Origin::Batons).unwrap_err();
        assert!(matches!(e, RundirError::Unsafe { problem: Unsafe::WritableByOthers { mode: 0o770 }, .. }), "{e}");
        assert_eq!(mode_of(&open), 0o770, "a refused directory is not touched");
        // Creating below a parent that others may write (no sticky bit).
        let e = prepare(&open.join("mine"), Origin::Batons).unwrap_err();
        assert!(matches!(e, RundirError::Unsafe { role: Role::Parent, .. }), "{e}");
        assert!(!open.join("mine").exists());
    }

    #[test]
    fn sockets_are_bound_with_exactly_the_mode_asked() {
        let s = Scratch::new("bind");
        for mode in [0o600, 0o666] {
            let path = s.0.join(format!("s{mode:o}"));
            let fd = rustix::net::socket_with(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::DGRAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .unwrap();
            bind_with_mode(fd.as_fd(), &SocketAddrUnix::new(&path).unwrap(), mode).unwrap();
            assert_eq!(mode_of(&path), mode, "whatever the test's umask");
        }
        // A symlink in the way is not followed: bind refuses.
        let link = s.0.join("link");
        std::os::unix::fs::symlink(s.0.join("elsewhere"), &link).unwrap();
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(bind_with_mode(fd.as_fd(), &SocketAddrUnix::new(&link).unwrap(), 0o600).is_err());
        assert!(!s.0.join("elsewhere").exists());
    }
}
