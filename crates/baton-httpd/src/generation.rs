//! Which generation of the service this process is.
//!
//! 1. `BATON_GENERATION`, when set: Baton numbers the generations it starts.
//! 2. Otherwise a counter kept in the fd store, so that `systemctl restart`
//!    counts too: a small memfd named [`GENERATION_FDNAME`] holding the
//!    last generation in decimal. Each start reads it, adds one and writes
//!    the result back into the same memfd (the store holds the same open
//!    file, so it keeps the new value); the first start creates and stores
//!    it (`FDPOLL=0`: a memfd never hangs up, and must never be dropped).
//! 3. Otherwise (no service manager, or no fd store: systemd closes what it
//!    cannot store) 1.
//!
//! A start that fails before reaching this point (`--fail-startup`) does
//! not count.

use std::os::fd::{AsFd, OwnedFd};

use baton_sd::{FdPoll, ListenFds, Notifier};
use rustix::fs::MemfdFlags;

/// Environment variable Baton sets to the generation number.
pub const GENERATION_ENV: &str = "BATON_GENERATION";

/// fd-store name of the generation counter.
pub const GENERATION_FDNAME: &str = "baton-httpd.generation";

/// The generation could not be determined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerationError {
    /// `BATON_GENERATION` is not a positive integer.
    #[error("{GENERATION_ENV}={value:?} is not a positive integer; unset it or fix the supervisor")]
    InvalidEnv {
        /// What was found.
        value: String,
    },
}

/// Determines this process's generation (see the [module docs](self)).
/// Problems with the stored counter are logged and do not stop the start.
pub fn determine(fds: &mut ListenFds, notifier: Option<&Notifier>) -> Result<u64, GenerationError> {
    let stored = fds.take_fd(GENERATION_FDNAME).ok().flatten();
    if let Some(value) = std::env::var_os(GENERATION_ENV) {
        let value = value.to_string_lossy().into_owned();
        return match value.parse::<u64>() {
            Ok(g) if g > 0 => Ok(g),
            _ => Err(GenerationError::InvalidEnv { value }),
        };
    }
    match stored {
        Some(fd) => match bump(&fd) {
            Ok(g) => Ok(g),
            Err(e) => {
                tracing::warn!(error = %e, "the stored generation counter is unreadable; starting again from 1");
                let _ = write_counter(&fd, 1);
                Ok(1)
            }
        },
        None => {
            if let Some(n) = notifier
                && let Err(e) = create_and_store(n)
            {
                tracing::warn!(error = %e, "cannot keep a generation counter in the fd store");
            }
            Ok(1)
        }
    }
}

fn bump(fd: &OwnedFd) -> std::io::Result<u64> {
    let mut buf = [0u8; 32];
    let n = rustix::io::pread(fd, &mut buf, 0)?;
    let text = std::str::from_utf8(&buf[..n]).map_err(std::io::Error::other)?;
    let previous: u64 = text.trim().parse().map_err(std::io::Error::other)?;
    let next = previous.saturating_add(1);
    write_counter(fd, next)?;
    Ok(next)
}

fn write_counter(fd: &OwnedFd, value: u64) -> std::io::Result<()> {
    let text = value.to_string();
    rustix::fs::ftruncate(fd, 0)?;
    let n = rustix::io::pwrite(fd, text.as_bytes(), 0)?;
    if n != text.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "short write to the generation counter"));
    }
    Ok(())
}

fn create_and_store(notifier: &Notifier) -> std::io::Result<()> {
    let fd = rustix::fs::memfd_create(GENERATION_FDNAME, MemfdFlags::CLOEXEC)?;
    write_counter(&fd, 1)?;
    notifier.store_fds(GENERATION_FDNAME, &[fd.as_fd()], FdPoll::NoPoll).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_round_trips_in_a_memfd() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        write_counter(&fd, 41).unwrap();
        assert_eq!(bump(&fd).unwrap(), 42);
        assert_eq!(bump(&fd).unwrap(), 43);
        write_counter(&fd, 9).unwrap();
        assert_eq!(bump(&fd).unwrap(), 10, "a shorter number replaces a longer one entirely");
        rustix::io::pwrite(&fd, b"x", 0).unwrap();
        assert!(bump(&fd).is_err());
    }
}
