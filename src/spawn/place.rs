//! Placing the passed fds at 3, 4, … in the child, in place.
//!
//! The obvious way — duplicate every source above the target range, then
//! each duplicate onto its target — needs 2n fds open, and fd numbers up to
//! about 2n, in the child: the first generation after Baton itself
//! restarted with 10,000 connections taken back from its vault needs
//! 20,000, past the usual `RLIMIT_NOFILE`. Placing them in place, as
//! systemd's `shift_fds()` (`src/basic/fd-util.c`) aims to, keeps the count
//! where Baton's is: every duplication is followed by closing what it
//! copied. The parent precomputes which source sits at which target number
//! ([`Placement::new`]); the child follows it with system calls only
//! ([`place`]).

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};

/// What the child needs to place `sources` at 3..3+n, computed before the
/// fork (the child only reads and updates its own copy-on-write copy).
pub(super) struct Placement {
    /// The fds to pass, in order; every number distinct.
    sources: Vec<c_int>,
    /// Where source i is now (starts as `sources`).
    current: Vec<c_int>,
    /// For each number 3..=3+n, the index of the source now there, or -1.
    owner: Vec<c_int>,
    /// Parent-side duplicates that made repeated sources distinct, open
    /// until the fork is over.
    _distinct_copies: Vec<OwnedFd>,
}

/// The raw view the child gets.
pub(super) struct RawPlacement {
    current: *mut c_int,
    owner: *mut c_int,
    count: usize,
}

impl Placement {
    /// Plans passing `sources` (an fd may appear twice: it is then
    /// duplicated here, close-on-exec, so each number is one source).
    pub(super) fn new(sources: Vec<c_int>) -> std::io::Result<Placement> {
        let mut seen = std::collections::HashSet::with_capacity(sources.len());
        let mut copies = Vec::new();
        let mut distinct = Vec::with_capacity(sources.len());
        for fd in sources {
            if seen.insert(fd) {
                distinct.push(fd);
            } else {
                // SAFETY: `fd` is open for the duration of the spawn (the
                // caller borrows it); the duplicate is owned here.
                let copy = rustix::io::fcntl_dupfd_cloexec(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, 3)?;
                distinct.push(copy.as_raw_fd());
                copies.push(copy);
            }
        }
        let n = distinct.len();
        let mut owner = vec![-1; n + 1];
        for (i, &fd) in distinct.iter().enumerate() {
            if let Some(slot) = slot_of(fd, n) {
                owner[slot] = i as c_int;
            }
        }
        Ok(Placement { current: distinct.clone(), sources: distinct, owner, _distinct_copies: copies })
    }

    /// How many fds are passed.
    pub(super) fn len(&self) -> usize {
        self.sources.len()
    }

    /// The child's view (pointers into these vectors, valid while `self`
    /// lives and is not moved from).
    pub(super) fn raw(&mut self) -> RawPlacement {
        RawPlacement { current: self.current.as_mut_ptr(), owner: self.owner.as_mut_ptr(), count: self.sources.len() }
    }
}

/// The index in `owner` of fd number `fd` when it is in 3..=3+n.
fn slot_of(fd: c_int, n: usize) -> Option<usize> {
    let slot = usize::try_from(fd).ok()?.checked_sub(3)?;
    (slot <= n).then_some(slot)
}

/// Which step failed, for the child's report.
pub(super) enum Failed {
    /// Moving a source out of the way (`F_DUPFD_CLOEXEC`).
    Dup,
    /// Placing one at its target (`dup3`, `F_SETFD`).
    Place,
}

/// Places source i at 3+i (not close-on-exec) and `status_fd` at 3+n
/// (close-on-exec); every other fd in 3..=3+n is closed, and every source
/// placed from elsewhere is closed where it was (numbers below 3 are never
/// closed). Each source is duplicated once; only two numbers above 3+n are
/// used (the status pipe and one temporary to break a cycle), so the fd
/// numbers stay below Baton's own highest plus two.
///
/// "Who sits on my target" is a one-to-one map, so starting from an
/// unplaced source it leads either to a free target (a chain: placed from
/// its end back) or back to the start (a cycle: the start steps aside to
/// the temporary first). Walking back needs no memory: the one sitting on
/// target 3+k came from source k.
///
/// # Safety
///
/// Only in the child of `fork()`, with `p` from [`Placement::raw`] of a
/// placement made in the parent for this child, and every source open.
pub(super) unsafe fn place(p: &RawPlacement, status_fd: &mut c_int) -> Result<(), Failed> {
    // SAFETY: `current` has `count` and `owner` `count + 1` elements (see
    // `Placement::new`), indexed below only within those bounds (`k < n`
    // wherever `owner[k]` is read for a source k, `slot <= n` from
    // `slot_of`); fcntl, dup3 and close are async-signal-safe.
    unsafe {
        let n = p.count;
        let above = (3 + n + 1) as c_int;
        let status = libc::fcntl(*status_fd, libc::F_DUPFD_CLOEXEC, above);
        if status < 0 {
            return Err(Failed::Dup);
        }
        *status_fd = status;
        // Free the target range of everything that is no source (Baton's
        // own fds, all close-on-exec: the exec would close them anyway).
        for slot in 0..=n {
            if *p.owner.add(slot) < 0 {
                libc::close((3 + slot) as c_int);
            }
        }
        for i in 0..n {
            let target = (3 + i) as c_int;
            if *p.current.add(i) == target {
                // In place already: only its close-on-exec flag goes.
                if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    return Err(Failed::Place);
                }
            }
        }
        for i in 0..n {
            if *p.current.add(i) == (3 + i) as c_int {
                continue;
            }
            // Forward: who sits on the target of the last one seen.
            let mut last = i;
            loop {
                let next = *p.owner.add(last);
                if next < 0 {
                    break;
                }
                let next = next as usize;
                if next == i {
                    // A cycle: i steps aside, which frees the target of
                    // `last`; what remains is a chain.
                    let from = *p.current.add(i);
                    let aside = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, above);
                    if aside < 0 {
                        return Err(Failed::Dup);
                    }
                    libc::close(from);
                    if let Some(slot) = slot_of(from, n) {
                        *p.owner.add(slot) = -1;
                    }
                    *p.current.add(i) = aside;
                    break;
                }
                last = next;
            }
            // Back: place `last` on its free target; where it came from is
            // the target of the one before it, now free in turn.
            let mut k = last;
            loop {
                let from = *p.current.add(k);
                let target = (3 + k) as c_int;
                if libc::dup3(from, target, 0) < 0 {
                    return Err(Failed::Place);
                }
                *p.current.add(k) = target;
                *p.owner.add(k) = k as c_int;
                if from > 2 {
                    libc::close(from);
                }
                let came_from = slot_of(from, n);
                if let Some(slot) = came_from {
                    *p.owner.add(slot) = -1;
                }
                if k == i {
                    break;
                }
                match came_from {
                    Some(slot) if slot < n => k = slot,
                    // Cannot happen (every one but `i` on the way sat on a
                    // target); stop rather than loop.
                    _ => break,
                }
            }
        }
        // The status pipe at 3+n: free now (no source is placed there).
        let status_target = (3 + n) as c_int;
        if libc::dup3(*status_fd, status_target, libc::O_CLOEXEC) < 0 {
            return Err(Failed::Place);
        }
        libc::close(*status_fd);
        *status_fd = status_target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_the_sources_in_the_target_range() {
        let p = Placement::new(vec![5, 3, 100, 6]).unwrap();
        // Numbers 3..=7: 3 is source 1, 5 source 0, 6 source 3.
        assert_eq!(p.owner, vec![1, -1, 0, 3, -1]);
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn a_repeated_source_becomes_a_distinct_copy() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        let raw = fd.as_raw_fd();
        let p = Placement::new(vec![raw, raw]).unwrap();
        assert_eq!(p.sources[0], raw);
        assert_ne!(p.sources[1], raw);
    }
}
