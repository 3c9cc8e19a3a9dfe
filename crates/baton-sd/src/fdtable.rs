//! Growing the fd table before threads start.
//!
//! A process's fd table grows by doubling as fds are installed. In a process
//! with more than one thread, every growth waits for an RCU grace period
//! (`expand_fdtable()` in the kernel's `fs/file.c` calls `synchronize_rcu()`
//! when the table is shared), which took 10–20 ms each on a 2-core machine.
//! Receiving 10,000 handed-over connections grows the table from 64 to
//! 16,384 entries: eight growths, over 100 ms spent waiting before the last
//! connection could be served. Growing it once, before the runtime's threads
//! exist, costs no grace period, and the table never shrinks.

use std::os::fd::AsFd;

/// Grows this process's fd table to hold fds up to `fds` (capped by the soft
/// `RLIMIT_NOFILE`), so that installing that many later needs no growth.
/// Call it before starting threads (before the tokio runtime); afterwards
/// it still works, but pays the wait it exists to avoid. Returns the size
/// reserved. Costs about 8 bytes of kernel memory per fd.
pub fn reserve_fds(fds: usize) -> std::io::Result<usize> {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    let target = fds.min(usize::try_from(soft).unwrap_or(usize::MAX)).saturating_sub(1);
    if target < 64 {
        return Ok(target + 1);
    }
    let any = rustix::fs::open("/", rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())?;
    // The lowest free fd at or above `target`: the table grows to hold it.
    let high = rustix::io::fcntl_dupfd_cloexec(any.as_fd(), i32::try_from(target).unwrap_or(i32::MAX))?;
    drop(high);
    Ok(target + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FDSize:` of /proc/self/status: the fd table's size.
    fn table_size() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("FDSize:")).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn grows_the_table_and_leaves_no_fd_open() {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        let want = 4096usize.min(usize::try_from(soft).unwrap_or(usize::MAX));
        let reserved = reserve_fds(4096).unwrap();
        assert_eq!(reserved, want);
        assert!(table_size() >= want, "FDSize {} after reserving {want}", table_size());
        // The fd that grew it is closed again (other tests' fds are low).
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
            .max()
            .unwrap();
        assert!(highest < want / 2, "fd {highest} is still open");
        // The soft limit caps it.
        assert!(reserve_fds(usize::MAX).unwrap() as u64 <= soft);
    }
}
