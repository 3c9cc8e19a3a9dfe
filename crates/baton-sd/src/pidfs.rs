//! Naming a process by its pidfd inode id, which — unlike a pid — is never
//! reused while the system runs.
//!
//! On kernels with pidfs (Linux 6.9+), every pidfd of a process is a file of
//! the `pidfs` filesystem whose inode number is that process's unique 64-bit
//! id; systemd ≥ 257 calls it the pidfd id (`MAINPIDFDID=`, `$MAINPIDFDID`,
//! `LISTEN_PIDFDID`). Before pidfs, pidfds were anonymous inodes that all
//! share one inode number, so there is no id: the functions here say `None`,
//! as systemd's `pidfd_get_inode_id()` (`src/basic/pidfd-util.c`) fails with
//! `EOPNOTSUPP` after the same `fstatfs()` check.

use std::os::fd::BorrowedFd;

use rustix::process::{PidfdFlags, getpid, pidfd_open};

/// `PID_FS_MAGIC` from `<linux/magic.h>` ("PIDF").
pub const PID_FS_MAGIC: i64 = 0x5049_4446;

/// The pidfd id of the process `pidfd` refers to, or `None` when the kernel
/// has no pidfs (or `pidfd` is no pidfd).
pub fn pidfd_inode_id(pidfd: BorrowedFd<'_>) -> Option<u64> {
    let fs = rustix::fs::fstatfs(pidfd).ok()?;
    if fs.f_type as i64 != PID_FS_MAGIC {
        return None;
    }
    Some(rustix::fs::fstat(pidfd).ok()?.st_ino as u64)
}

/// This process's own pidfd id (a pidfd is opened and closed for it), or
/// `None` without pidfs.
pub fn own_pidfd_id() -> Option<u64> {
    let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).ok()?;
    pidfd_inode_id(std::os::fd::AsFd::as_fd(&pidfd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this kernel has pidfs: the release is at least 6.9.
    fn kernel_has_pidfs() -> bool {
        let release = rustix::system::uname().release().to_string_lossy().into_owned();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (6, 9)
    }

    #[test]
    fn own_id_is_stable_and_names_only_this_process() {
        let Some(id) = own_pidfd_id() else {
            assert!(!kernel_has_pidfs(), "a kernel with pidfs must give an id");
            return;
        };
        assert_eq!(own_pidfd_id(), Some(id), "every pidfd of a process has the same id");
        let parent = rustix::process::getppid().expect("a parent");
        let theirs = pidfd_open(parent, PidfdFlags::empty()).unwrap();
        let theirs = pidfd_inode_id(std::os::fd::AsFd::as_fd(&theirs)).unwrap();
        assert_ne!(theirs, id, "another process has another id");
    }

    #[test]
    fn no_id_for_a_file_that_is_no_pidfd() {
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(pidfd_inode_id(std::os::fd::AsFd::as_fd(&file)), None);
    }
}
