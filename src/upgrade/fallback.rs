//! The way back: when the new image of a `baton upgrade` cannot adopt the
//! state (the probe passed, but reading or taking over the state failed),
//! it re-executes the *previous* image, which takes its own state back and
//! answers the `baton upgrade` client with the reason. The generations never
//! notice: same pid, same sockets, same children.
//!
//! - Each image opens its own executable at start ([`open_own_exe`],
//!   `/proc/self/exe`, `O_RDONLY|O_CLOEXEC`): that fd stays valid when a
//!   package upgrade deletes or replaces the file.
//! - Before the exec, the old image names that fd and the state memfd in
//!   [`RETURN_ENV`] (`EXE_FD,STATE_FD`), separately from [`STATE_ENV`], so
//!   the way back holds even if the new image cannot read the state, or was
//!   handed another one.
//! - The new image duplicates every fd the state names before adopting it
//!   ([`Fallback::keep_copies`]): adoption takes ownership and closes what
//!   it took when it fails. On failure, [`Fallback::give_back`] puts each
//!   copy back at its number (without `FD_CLOEXEC`), then
//!   `execveat(exe, "", AT_EMPTY_PATH)` with the original memfd in
//!   [`STATE_ENV`] and the reason in [`FAILED_ENV`]. Handled signals stay
//!   blocked across it, so none is lost.
//! - An image started with [`FAILED_ENV`] gets no way back of its own: if
//!   the previous image cannot take its own state back either, nothing is
//!   left to try (no loop).
//!
//! What this cannot cover: a binary that passes the probe and then never
//! runs Baton's adoption at all (exits, crashes before `main`) cannot hand
//! anything back; the probe is the guard against that.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::{STATE_ENV, block_handled_signals, cstring, environment_without_upgrade_variables};

/// Environment variable naming the previous image's executable and state
/// memfd, `EXE_FD,STATE_FD`, set by the image that exec's the next one.
pub const RETURN_ENV: &str = "BATON_UPGRADE_RETURN";
/// Environment variable carrying why the next image handed control back;
/// set only on that re-execution.
pub const FAILED_ENV: &str = "BATON_UPGRADE_FAILED";

/// Opens this image's own executable, close-on-exec, for a later
/// [`Fallback`]; `None` if `/proc` is not mounted.
pub fn open_own_exe() -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open("/proc/self/exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// The previous image, kept by the new one until it has adopted the state.
#[derive(Debug)]
pub struct Fallback {
    exe: OwnedFd,
    state: OwnedFd,
    /// `(number named in the state, a copy of it)`.
    copies: Vec<(RawFd, OwnedFd)>,
}

impl Fallback {
    /// Takes the fds named by a [`RETURN_ENV`] value (each marked
    /// close-on-exec again).
    pub(super) fn from_env_value(value: &OsStr, adopter: &mut super::Adopter) -> Result<Fallback, String> {
        let text = value.to_str().unwrap_or_default();
        let (exe, state) = text
            .split_once(',')
            .and_then(|(e, s)| Some((e.parse::<RawFd>().ok()?, s.parse::<RawFd>().ok()?)))
            .ok_or_else(|| format!("{RETURN_ENV}={value:?} is not EXE_FD,STATE_FD"))?;
        let exe = adopter.take(exe, "the previous image's executable").map_err(|e| e.to_string())?;
        let state = adopter.take(state, "the previous image's state").map_err(|e| e.to_string())?;
        Ok(Fallback { exe, state, copies: Vec::new() })
    }

    /// The state memfd the previous image wrote.
    pub(super) fn state(&self) -> BorrowedFd<'_> {
        self.state.as_fd()
    }

    /// Duplicates each of `fds` (close-on-exec copies), so a failed
    /// adoption that closed them can put them back. Fds that are not open
    /// are skipped: the adoption refuses those anyway.
    pub fn keep_copies(&mut self, fds: &[RawFd]) {
        for &fd in fds {
            if self.copies.iter().any(|(n, _)| *n == fd) {
                continue;
            }
            // SAFETY: F_DUPFD_CLOEXEC on any number is harmless: a closed
            // one fails with EBADF; a new fd is returned otherwise.
            let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if copy >= 0 {
                // SAFETY: `copy` was just created and is owned by nobody else.
                self.copies.push((fd, unsafe { OwnedFd::from_raw_fd(copy) }));
            }
        }
    }

    /// Re-executes the previous image with its own state and `reason`.
    /// Returns only if that failed.
    pub fn give_back(self, reason: &str) -> std::io::Error {
        match self.reexec(reason) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn reexec(self, reason: &str) -> Result<std::convert::Infallible, std::io::Error> {
        let io = |e: super::UpgradeError| std::io::Error::other(e.to_string());
        // Everything allocated first.
        let args: Vec<CString> =
            std::env::args_os().map(|a| cstring(a.as_bytes(), "an argument")).collect::<Result<_, _>>().map_err(io)?;
        let mut env = environment_without_upgrade_variables().map_err(io)?;
        let state = self.state.as_raw_fd();
        env.push(cstring(format!("{STATE_ENV}={state}").as_bytes(), "the state variable").map_err(io)?);
        let reason: Vec<u8> = reason.bytes().filter(|&b| b != 0).collect();
        env.push(cstring(&[FAILED_ENV.as_bytes(), b"=", &reason].concat(), "the failure").map_err(io)?);
        let mut argv_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());

        for (number, copy) in &self.copies {
            // SAFETY: dup2 onto the number the state names: whatever this
            // image put there since (the adoption closed it, so the number
            // may have been reused) is replaced; this image never runs
            // again past the exec below, except to report its failure.
            if unsafe { libc::dup2(copy.as_raw_fd(), *number) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        rustix::io::fcntl_setfd(&self.state, rustix::io::FdFlags::empty())?;
        block_handled_signals();
        // SAFETY: exe is an open fd of an executable (ELF: a close-on-exec
        // fd is fine, the kernel opens it before closing fds); "" with
        // AT_EMPTY_PATH means that fd itself; argv and envp are
        // NUL-terminated arrays of valid C strings that outlive the call.
        unsafe {
            libc::execveat(
                self.exe.as_raw_fd(),
                c"".as_ptr(),
                // libc declares the arrays `*mut`; execveat never writes them.
                argv_ptrs.as_ptr().cast::<*mut libc::c_char>(),
                env_ptrs.as_ptr().cast::<*mut libc::c_char>(),
                libc::AT_EMPTY_PATH,
            )
        };
        Err(std::io::Error::last_os_error())
    }
}
