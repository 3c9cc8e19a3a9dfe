//! How a refused `baton notify` learns that Baton refused it.
//!
//! `sd_notify()` is fire-and-forget: a manager that refuses a datagram (its
//! sender is not a process the service's `NotifyAccess=` admits) only logs
//! it — systemd's `manager_invoke_notify_message()` logs "Got notification
//! message from PID …, but reception only permitted for main PID …" — and
//! the sender never hears of it. The protocol's one round trip is
//! `BARRIER=1`: the sender passes the write end of a pipe and waits until
//! the manager closes it. systemd's `sd_pid_notify_barrier()` waits for
//! `POLLHUP` alone and [`baton_sd::Notifier::barrier`] discards whatever is
//! in the pipe, so bytes written into it change nothing for them.
//!
//! Baton uses that pipe to answer: when it refuses a sender's `BARRIER=1`
//! (for the reason it refuses that sender's other datagrams: no generation
//! it belongs to), it writes one line, [`REFUSED_PREFIX`] and the reason,
//! into the pipe before closing it ([`answer_refused_barrier`]).
//! `baton notify` ends with such a barrier and reads the pipe to its end
//! ([`barrier_with_reply`]): a refusal line makes it fail, naming the fix.
//! Under systemd the pipe stays empty, so a refusal there stays invisible,
//! as it is for `systemd-notify`; and `baton notify --no-block` sends no
//! barrier, so it cannot learn of a refusal either.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use baton_sd::wire::{self, BarrierUse};
use baton_sd::{Notifier, NotifyState};

use crate::supervisor::NotifyAccess;

/// How a refusal line in a barrier's pipe starts.
pub const REFUSED_PREFIX: &str = "baton refused: ";

/// At most this much of a barrier's pipe is kept by [`barrier_with_reply`]
/// (a refusal line is far shorter; the rest is read and dropped).
const REPLY_MAX: usize = 1024;

/// Why Baton refuses every datagram from `pid`, with the fix, for the
/// `--notify-access` in force.
pub fn refusal_reason(pid: u32, access: NotifyAccess) -> String {
    match access {
        NotifyAccess::Main => format!(
            "pid {pid} is not the main process of a generation (baton runs with --notify-access main); \
             notify from the main process itself (e.g. `exec baton notify ...` as the script's last step), \
             or run baton with --notify-access all"
        ),
        NotifyAccess::Exec => format!(
            "pid {pid} is neither the main process of a generation nor its health check \
             (baton runs with --notify-access exec); notify from the main process, \
             or run baton with --notify-access all"
        ),
        NotifyAccess::All => format!(
            "pid {pid} is in no generation's process group (baton runs with --notify-access all); \
             notify from a process of the app"
        ),
    }
}

/// For a datagram refused because no generation admits its sender `pid`:
/// if it is a well-formed `BARRIER=1` whose one fd is a pipe, writes
/// [`REFUSED_PREFIX`] and the [`refusal_reason`] into it. Cheap for every
/// other datagram (a flood of refused ones costs a length check each).
/// Never blocks (the pipe is made non-blocking; a full one gets nothing)
/// and writes into nothing but a pipe, whose write end the sender already
/// held: it can make Baton write nothing it could not write itself. The
/// caller closes the fds afterwards, as for any refused datagram.
pub fn answer_refused_barrier(payload: &[u8], fds: &[impl AsFd], pid: u32, access: NotifyAccess) {
    let [fd] = fds else { return };
    let Ok(message) = wire::parse(payload) else { return };
    if message.barrier() != BarrierUse::Valid {
        return;
    }
    let is_pipe = rustix::fs::fstat(fd).is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_fifo());
    if !is_pipe {
        return;
    }
    let Ok(flags) = rustix::fs::fcntl_getfl(fd) else { return };
    if rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK).is_err() {
        return;
    }
    let mut line = format!("{REFUSED_PREFIX}{}", refusal_reason(pid, access));
    // One write of at most PIPE_BUF bytes is atomic: all of it or nothing.
    line.truncate(floor_char_boundary(&line, 511));
    line.push('\n');
    let _ = rustix::io::write(fd, line.as_bytes());
}

/// The largest index `<= max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    (0..=max.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// What the manager did with a barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarrierReply {
    /// The manager processed everything sent before (the pipe closed
    /// empty, or with bytes that are not a refusal).
    Processed,
    /// Baton refused this process's notifications, for this reason.
    Refused(String),
}

/// Sends `BARRIER=1` and waits (at most `timeout`) until the manager closes
/// the pipe, reading what it wrote into it; like
/// [`Notifier::barrier`], but telling a Baton refusal apart.
pub fn barrier_with_reply(notifier: &Notifier, timeout: Duration) -> Result<BarrierReply, String> {
    use rustix::pipe::{PipeFlags, pipe_with};
    let (read_end, write_end) =
        pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).map_err(|e| format!("cannot create a pipe: {e}"))?;
    notifier.notify_with_fds(&[NotifyState::Barrier], &[write_end.as_fd()]).map_err(|e| e.to_string())?;
    drop(write_end);
    let deadline = Instant::now() + timeout;
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match rustix::io::read(&read_end, &mut buf) {
            // End of file: the manager closed its copy.
            Ok(0) => break,
            Ok(n) => {
                let room = REPLY_MAX.saturating_sub(reply.len());
                reply.extend_from_slice(&buf[..n.min(room)]);
                continue;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(format!("reading the barrier's pipe: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the manager did not confirm BARRIER=1 within {} s (is it processing notifications?)",
                timeout.as_secs()
            ));
        }
        let ts = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 });
        let mut pfd = [rustix::event::PollFd::new(&read_end, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("waiting for the barrier: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&reply);
    Ok(match text.lines().find_map(|l| l.strip_prefix(REFUSED_PREFIX)) {
        Some(reason) => BarrierReply::Refused(reason.to_owned()),
        None => BarrierReply::Processed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK).unwrap()
    }

    fn read_all(fd: &OwnedFd) -> String {
        let mut buf = [0u8; 2048];
        let n = rustix::io::read(fd, &mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_refused_barrier_gets_the_reason_in_its_pipe() {
        let (r, w) = pipe();
        answer_refused_barrier(b"BARRIER=1", &[w], 7, NotifyAccess::Main);
        let expected = format!("baton refused: {}\n", refusal_reason(7, NotifyAccess::Main));
        assert_eq!(read_all(&r), expected);
        assert!(expected.contains("pid 7 is not the main process") && expected.contains("--notify-access all"));
    }

    #[test]
    fn nothing_is_written_but_into_the_pipe_of_a_well_formed_barrier() {
        // Not a barrier, a barrier with other fields, two fds: nothing.
        for payload in [&b"READY=1"[..], b"BARRIER=1\nREADY=1"] {
            let (r, w) = pipe();
            answer_refused_barrier(payload, &[w], 7, NotifyAccess::Main);
            assert_eq!(read_all(&r), "", "{payload:?}");
        }
        let ((r1, w1), (_r2, w2)) = (pipe(), pipe());
        answer_refused_barrier(b"BARRIER=1", &[w1, w2], 7, NotifyAccess::Main);
        assert_eq!(read_all(&r1), "");
        // Not a pipe: a socket stays untouched.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        answer_refused_barrier(b"BARRIER=1", &[OwnedFd::from(a)], 7, NotifyAccess::Main);
        let b = OwnedFd::from(b);
        assert_eq!(read_all(&b), "");
    }

    #[test]
    fn a_full_pipe_does_not_block_and_a_long_line_is_cut_at_a_char_boundary() {
        let (r, w) = pipe();
        let filler = vec![b'x'; 1 << 16];
        while rustix::io::write(&w, &filler).is_ok() {}
        let t0 = Instant::now();
        answer_refused_barrier(b"BARRIER=1", &[w], 7, NotifyAccess::All);
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(r);

        let long = "é".repeat(600);
        let cut = &long[..floor_char_boundary(&long, 511)];
        assert!(cut.len() == 510 && cut.chars().all(|c| c == 'é'), "{}", cut.len());
    }
}
