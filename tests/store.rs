//! Baton's fd store on real fds: systemd 252's add/de-duplicate/full/remove
//! rules, and hang-up detection that neither spins on readable entries nor
//! misses a peer that is gone.
//!
//! Closed-ness is checked through the kernel, not through the store's word:
//! a stored pipe end is closed once its counterpart reports `POLLHUP`/`POLLERR`,
//! and the process's fd count (`/proc/self/fd`) must come back to where it
//! was. The tests of this binary run one at a time so those counts are
//! exact.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use baton::store::{Added, FdStore, Hangup, StoreError};
use rustix::event::{PollFd, PollFlags};

/// Generous: the machine is a noisy 2-core box.
const WAIT: Duration = Duration::from_secs(20);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(700);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Fds an earlier test dropped may still wait for Baton's closer thread:
    // closed now, so that they do not change this test's fd count.
    baton::closer::flush();
    guard
}

/// Runs `test` on its own runtime while holding [`SERIAL`]: the runtime's
/// fds are created and closed within the lock too.
fn serially<F: std::future::Future>(test: F) -> F::Output {
    let _s = serial();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(test)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
}

/// `revents` of a zero-timeout poll for `events`.
fn poll_now(fd: BorrowedFd<'_>, events: PollFlags) -> PollFlags {
    let mut pfd = [PollFd::new(&fd, events)];
    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut pfd, Some(&zero)).expect("poll");
    pfd[0].revents()
}

/// Whether every copy of a pipe's write end is closed, seen from its read end.
fn writers_gone(read_end: &OwnedFd) -> bool {
    poll_now(read_end.as_fd(), PollFlags::IN).contains(PollFlags::HUP)
}

fn dup(fd: &impl AsFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().expect("dup")
}

fn names(store: &FdStore) -> Vec<String> {
    store.entries().map(|(n, _)| n.to_owned()).collect()
}

fn memfd() -> OwnedFd {
    rustix::fs::memfd_create("baton-store-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create")
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

async fn no_hangup_within(store: &mut FdStore, quiet: Duration) {
    if let Ok(h) = tokio::time::timeout(quiet, store.hangup()).await {
        panic!("unexpected hang-up {h:?}");
    }
}

async fn hangup_within(store: &mut FdStore) -> Hangup {
    tokio::time::timeout(WAIT, store.hangup()).await.expect("no hang-up reported within 20 s")
}

#[test]
fn add_stores_and_dedupes_same_description() {
    let _s = serial();
    let mut store = FdStore::new(10);
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(store.add("conn", vec![dup(&a)], true).unwrap(), [Added::Stored]);
    // Another fd (a dup) of the same open file description: closed silently.
    assert_eq!(store.add("again", vec![dup(&a), dup(&a)], true).unwrap(), [Added::Duplicate, Added::Duplicate]);
    // Within one message too.
    let (r, w) = pipe();
    assert_eq!(store.add("pipe", vec![dup(&w), dup(&w)], false).unwrap(), [Added::Stored, Added::Duplicate]);
    // The other end of the pipe is another description.
    assert_eq!(store.add("pipe-r", vec![dup(&r)], false).unwrap(), [Added::Stored]);
    // Two opens of one file are two descriptions (kcmp, not just the inode).
    let f1 = std::fs::File::open("/proc/self/exe").unwrap();
    let f2 = std::fs::File::open("/proc/self/exe").unwrap();
    assert_eq!(store.add("file", vec![f1.into(), f2.into()], true).unwrap(), [Added::Stored, Added::Stored]);
    assert_eq!(store.len(), 5);
    assert_eq!(names(&store), ["conn", "pipe", "pipe-r", "file", "file"]);
    // The duplicate copies of the write end were closed: only the stored one
    // and ours remain.
    drop(w);
    assert!(!writers_gone(&r), "the stored write end is open");
    store.remove("pipe");
    baton::closer::flush(); // the store closes fds on its closer thread
    assert!(writers_gone(&r), "the duplicates were closed when refused");
}

/// Only entries of a new fd's own inode are compared with it: the count
/// per inode follows every way an entry leaves (remove by name, by number,
/// hang-up), so a copy of a removed entry is stored again while a copy of
/// one still stored is not; and thousands of sockets, each its own inode,
/// are all stored.
#[test]
fn dedupe_by_inode_follows_removals() {
    serially(async {
        let mut store = FdStore::new(4096);
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let (c, c_peer) = UnixStream::pair().unwrap();
        store.add("a", vec![dup(&a)], true).unwrap();
        store.add("b", vec![dup(&b)], true).unwrap();
        store.add("c", vec![dup(&c)], true).unwrap();
        store.remove("a");
        assert_eq!(store.add("a", vec![dup(&a)], true).unwrap(), [Added::Stored], "removed by name");
        let raw_b = store.entries().find(|(n, _)| *n == "b").map(|(_, fd)| fd.as_raw_fd()).unwrap();
        assert_eq!(store.remove_raw(&[raw_b]), 1);
        assert_eq!(store.add("b", vec![dup(&b)], true).unwrap(), [Added::Stored], "removed by number");
        drop(c_peer);
        drop(c);
        assert_eq!(hangup_within(&mut store).await, Hangup { name: "c".into() });
        assert_eq!(store.add("a", vec![dup(&a)], true).unwrap(), [Added::Duplicate], "still stored");

        let pairs: Vec<(UnixStream, UnixStream)> = (0..1000).map(|_| UnixStream::pair().unwrap()).collect();
        let outcome = store.add("many", pairs.iter().map(|(x, _)| dup(x)).collect(), true).unwrap();
        assert!(outcome.iter().all(|o| *o == Added::Stored), "{outcome:?}");
        assert_eq!(store.len(), 1002);
        store.clear();
        assert_eq!(store.add("b", vec![dup(&b)], true).unwrap(), [Added::Stored], "cleared");
    });
}

#[test]
fn full_store_closes_the_rest_and_reports_how_many() {
    let _s = serial();
    let mut store = FdStore::new(2);
    let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
    let err = store.add("x", pipes.iter().map(|(_, w)| dup(w)).collect(), true).unwrap_err();
    assert!(matches!(err, StoreError::Full { max: 2, closed: 2 }), "{err:?}");
    assert!(err.to_string().contains("--fdstore-max"), "{err}");
    assert_eq!(store.len(), 2);
    // Ours are the only other copies: drop them and look at the read ends.
    let reads: Vec<OwnedFd> = pipes.into_iter().map(|(r, _w)| r).collect();
    baton::closer::flush(); // the store closes fds on its closer thread
    let gone: Vec<bool> = reads.iter().map(writers_gone).collect();
    assert_eq!(gone, [false, false, true, true], "the first two are stored, the rest closed");

    // systemd checks "full" before "duplicate": a duplicate sent to a full
    // store counts as one more closed fd, not as a silent duplicate.
    let stored = store.entries().next().unwrap().1.try_clone_to_owned().unwrap();
    let err = store.add("x", vec![stored], true).unwrap_err();
    assert!(matches!(err, StoreError::Full { max: 2, closed: 1 }), "{err:?}");
    assert_eq!(store.max(), 2);
}

#[test]
fn disabled_store_closes_everything() {
    let _s = serial();
    let mut store = FdStore::new(0);
    let (r, w) = pipe();
    let err = store.add("x", vec![dup(&w), memfd()], true).unwrap_err();
    assert!(matches!(err, StoreError::Disabled { closed: 2 }), "{err:?}");
    assert!(err.to_string().contains("disabled"), "{err}");
    drop(w);
    baton::closer::flush(); // the store closes fds on its closer thread
    assert!(writers_gone(&r));
    assert!(store.is_empty());
    // FDSTORE=1 without fds is no error, even when disabled.
    assert_eq!(store.add("x", vec![], true).unwrap(), []);
}

#[test]
fn remove_by_name_and_insertion_order() {
    let _s = serial();
    let mut store = FdStore::new(10);
    let (ra, wa) = pipe();
    let (_rb, wb) = pipe();
    let (ra2, wa2) = pipe();
    store.add("a", vec![dup(&wa)], true).unwrap();
    store.add("b", vec![dup(&wb)], true).unwrap();
    store.add("a", vec![dup(&wa2), memfd()], true).unwrap();
    store.add("", vec![memfd()], false).unwrap();
    assert_eq!(names(&store), ["a", "b", "a", "a", ""]);
    // entries() lends the stored fds themselves.
    let first = store.entries().next().unwrap().1;
    assert_ne!(first.as_raw_fd(), wa.as_raw_fd());
    assert_eq!(store.remove("a"), 3);
    assert_eq!(names(&store), ["b", ""]);
    assert_eq!(store.remove("a"), 0);
    assert_eq!(store.remove("nope"), 0);
    drop((wa, wa2));
    baton::closer::flush(); // the store closes fds on its closer thread
    assert!(writers_gone(&ra) && writers_gone(&ra2), "removed entries are closed");
    assert_eq!(store.remove(""), 1);
    assert_eq!(names(&store), ["b"]);
}

#[test]
fn hangup_reports_a_closed_peer_and_removes_it() {
    serially(async {
        let mut store = FdStore::new(10);
        let (ours, peer) = UnixStream::pair().unwrap();
        let (keep, _keep_peer) = UnixStream::pair().unwrap();
        store.add("keep", vec![keep.into()], true).unwrap();
        store.add("conn/1/1", vec![ours.into()], true).unwrap();
        no_hangup_within(&mut store, Duration::from_millis(200)).await;
        drop(peer);
        assert_eq!(hangup_within(&mut store).await, Hangup { name: "conn/1/1".into() });
        assert_eq!(names(&store), ["keep"]);
        no_hangup_within(&mut store, QUIET).await;
        assert_eq!(store.spurious_wakeups(), 0);
    });
}

#[test]
fn fdpoll_0_entry_is_kept_after_its_peer_closes() {
    serially(async {
        let mut store = FdStore::new(10);
        let (unpolled, unpolled_peer) = UnixStream::pair().unwrap();
        let (polled, polled_peer) = UnixStream::pair().unwrap();
        store.add("unpolled", vec![unpolled.into()], false).unwrap();
        store.add("polled", vec![polled.into()], true).unwrap();
        drop(unpolled_peer);
        drop(polled_peer);
        assert_eq!(hangup_within(&mut store).await.name, "polled");
        no_hangup_within(&mut store, QUIET).await;
        assert_eq!(names(&store), ["unpolled"]);
        // It really is hung up: the store just does not watch it.
        let (_, fd) = store.entries().next().unwrap();
        assert!(poll_now(fd, PollFlags::empty()).contains(PollFlags::HUP));
    });
}

#[test]
fn readable_or_half_closed_entry_neither_spins_nor_is_removed() {
    serially(async {
        let mut store = FdStore::new(10);
        let (ours, mut peer) = UnixStream::pair().unwrap();
        store.add("busy", vec![ours.into()], true).unwrap();
        // The client pipelines data we do not read, then shuts down its writing
        // side (EPOLLRDHUP: a half-close, not a hang-up for systemd).
        peer.write_all(&[b'x'; 64 * 1024]).unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let (_, fd) = store.entries().next().unwrap();
        assert!(poll_now(fd, PollFlags::IN | PollFlags::RDHUP).contains(PollFlags::IN | PollFlags::RDHUP));

        let cpu0 = cpu_time();
        no_hangup_within(&mut store, Duration::from_secs(1)).await;
        let used = cpu_time() - cpu0;
        assert!(used < Duration::from_millis(500), "waiting 1 s for a hang-up used {used:?} of CPU: a busy loop");
        assert_eq!(store.spurious_wakeups(), 0, "readable data must not even wake the store");
        assert_eq!(names(&store), ["busy"]);

        // Still watched: a real hang-up is reported.
        drop(peer);
        assert_eq!(hangup_within(&mut store).await.name, "busy");
        assert!(store.is_empty());
    });
}

#[test]
fn unpollable_entries_are_never_reported() {
    serially(async {
        let mut store = FdStore::new(10);
        // epoll refuses memfds and regular files (EPERM): kept, never polled.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(store.add("state", vec![memfd(), file.into()], true).unwrap(), [Added::Stored, Added::Stored]);
        no_hangup_within(&mut store, QUIET).await;
        assert_eq!(names(&store), ["state", "state"]);
    });
}

#[test]
fn pipe_write_end_without_reader_is_reported() {
    serially(async {
        // A pipe's write end whose readers are gone reports EPOLLERR only (no
        // EPOLLHUP): systemd removes it, so does the store.
        let mut store = FdStore::new(10);
        let (r, w) = pipe();
        store.add("w", vec![w], true).unwrap();
        drop(r);
        assert_eq!(hangup_within(&mut store).await.name, "w");
    });
}

#[test]
fn removed_entry_is_no_longer_watched_even_if_its_description_lives_on() {
    serially(async {
        let mut store = FdStore::new(10);
        let (ours, peer) = UnixStream::pair().unwrap();
        // We keep a copy of the description (as a child process would).
        store.add("gone", vec![dup(&ours)], true).unwrap();
        assert_eq!(store.remove("gone"), 1);
        drop(peer);
        assert!(poll_now(ours.as_fd(), PollFlags::empty()).contains(PollFlags::HUP));
        let cpu0 = cpu_time();
        no_hangup_within(&mut store, QUIET).await;
        assert!(cpu_time() - cpu0 < Duration::from_millis(350), "a stale registration spins");
        assert_eq!(store.spurious_wakeups(), 0);
    });
}

#[test]
fn hangup_is_cancel_safe_in_a_select_loop() {
    serially(async {
        let mut store = FdStore::new(10);
        let (ours, peer) = UnixStream::pair().unwrap();
        let (ours2, peer2) = UnixStream::pair().unwrap();
        store.add("one", vec![ours.into()], true).unwrap();
        store.add("two", vec![ours2.into()], true).unwrap();
        let mut peers = vec![peer, peer2];
        let mut ticks = 0;
        let mut reported = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while reported.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "reported only {reported:?}");
            tokio::select! {
                h = store.hangup() => reported.push(h.name),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    ticks += 1;
                    // Both peers go at once, while hangup() futures keep being
                    // dropped and recreated.
                    if ticks == 10 {
                        peers.clear();
                    }
                }
            }
        }
        reported.sort();
        assert_eq!(reported, ["one", "two"]);
        assert!(store.is_empty());
        no_hangup_within(&mut store, Duration::from_millis(200)).await;
    });
}

#[test]
fn nothing_polled_means_pending_forever() {
    serially(async {
        let mut store = FdStore::new(10);
        no_hangup_within(&mut store, Duration::from_millis(200)).await;
        let (ours, peer) = UnixStream::pair().unwrap();
        store.add("late", vec![ours.into()], true).unwrap();
        drop(peer);
        // A store that had nothing polled at the previous call sees new entries.
        assert_eq!(hangup_within(&mut store).await.name, "late");
    });
}

#[test]
fn clear_closes_everything() {
    serially(async {
        let before = fd_count();
        let mut store = FdStore::new(100);
        let mut keep = Vec::new();
        for i in 0..10 {
            let (ours, peer) = UnixStream::pair().unwrap();
            store.add(&format!("conn/{i}"), vec![ours.into()], i % 2 == 0).unwrap();
            keep.push(OwnedFd::from(peer));
            let (r, w) = pipe();
            store.add("pipe", vec![w], true).unwrap();
            keep.push(r);
        }
        store.add("state", vec![memfd()], true).unwrap();
        // Register the epoll instance with tokio too.
        no_hangup_within(&mut store, Duration::from_millis(50)).await;
        assert_eq!(store.len(), 21);
        store.clear();
        assert!(store.is_empty());
        drop(keep);
        // What is left is the store's epoll instance.
        baton::closer::flush(); // the store closes fds on its closer thread
        assert_eq!(fd_count(), before + 1, "fds leaked by clear()");
        no_hangup_within(&mut store, Duration::from_millis(100)).await;
        drop(store);
        baton::closer::flush(); // the store closes fds on its closer thread
        assert_eq!(fd_count(), before, "fds leaked by the store");
    });
}

#[test]
fn dropping_a_store_closes_its_fds() {
    let _s = serial();
    let before = fd_count();
    let (r, w) = pipe();
    let mut store = FdStore::new(4);
    store.add("w", vec![dup(&w)], true).unwrap();
    drop(w);
    assert!(!writers_gone(&r));
    drop(store);
    baton::closer::flush(); // the store closes fds on its closer thread
    assert!(writers_gone(&r));
    drop(r);
    assert_eq!(fd_count(), before);
}
