//! Passing a generation's stdout and stderr through Baton while keeping its
//! last lines, so a failed restart can say what the app printed last.
//!
//! Each generation writes into its own pipe; one task per generation copies
//! the bytes unchanged to Baton's stderr and remembers the last
//! [`TAIL_LINES`] lines (each cut at [`LINE_MAX`] bytes). Memory per
//! generation is therefore bounded whatever the app prints.
//!
//! The read end is shared between the copying task and the [`Tail`] until
//! the output ends, so that `baton upgrade` can hand it, with the lines
//! kept, to the next program image ([`Tail::pipe_fd`], [`adopt`]): the app
//! never notices, its pipe stays open and unread bytes wait in it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};

/// Lines kept per generation.
pub const TAIL_LINES: usize = 20;
/// Longest line kept (longer lines are cut, not dropped).
pub const LINE_MAX: usize = 1024;

/// The last lines a generation printed.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<Lines>>);

#[derive(Debug, Default)]
struct Lines {
    done: VecDeque<String>,
    partial: Vec<u8>,
    closed: bool,
    /// The pipe's read end while the output has not ended (shared with the
    /// copying task; dropped at end-of-file so the fd closes then, as
    /// before it was shared).
    pipe: Option<Arc<OwnedFd>>,
}

impl Tail {
    /// The last complete lines, oldest first, plus an unterminated last line.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = lines.done.iter().cloned().collect();
        if !lines.partial.is_empty() {
            out.push(String::from_utf8_lossy(&lines.partial).into_owned());
        }
        out
    }

    /// A tail whose output already ended, with `lines` kept (a generation
    /// handed over by `baton upgrade` after its output closed).
    pub fn finished(lines: Vec<String>) -> Tail {
        let mut done: VecDeque<String> = lines.into_iter().collect();
        while done.len() > TAIL_LINES {
            done.pop_front();
        }
        Tail(Arc::new(Mutex::new(Lines { done, partial: Vec::new(), closed: true, pipe: None })))
    }

    /// Whether every writer is gone and all output has been read.
    pub fn is_closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// The read end of the generation's output pipe, while its output has
    /// not ended: valid as long as this `Tail` lives.
    pub fn pipe_fd(&self) -> Option<RawFd> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.pipe.as_ref().map(|p| p.as_raw_fd())
    }

    fn close(&self) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.closed = true;
        lines.pipe = None;
    }

    fn push(&self, bytes: &[u8]) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&lines.partial).into_owned();
                lines.partial.clear();
                if lines.done.len() == TAIL_LINES {
                    lines.done.pop_front();
                }
                lines.done.push_back(line);
            } else if lines.partial.len() < LINE_MAX {
                lines.partial.push(b);
            }
        }
    }
}

/// Creates the pipe for one generation. Returns the write end to hand to the
/// child (blocking, close-on-exec: the spawn dups it onto 1 and 2) and the
/// tail, and starts the task that copies the output; `closed` is notified
/// when the output ends. Must run inside a tokio runtime.
pub fn capture(closed: Arc<tokio::sync::Notify>) -> std::io::Result<(OwnedFd, Tail)> {
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // Only our end is non-blocking: the app's writes must block, not fail,
    // when the pipe is full.
    let flags = rustix::fs::fcntl_getfl(&read_end)?;
    rustix::fs::fcntl_setfl(&read_end, flags | rustix::fs::OFlags::NONBLOCK)?;
    let tail = start(read_end, closed, Vec::new())?;
    Ok((write_end, tail))
}

/// Resumes copying a generation's output from a pipe read end handed over
/// by the previous program image (`baton upgrade`), keeping the `lines` it
/// had already collected. The fd must be close-on-exec already. Must run
/// inside a tokio runtime.
pub fn adopt(read_end: OwnedFd, closed: Arc<tokio::sync::Notify>, lines: Vec<String>) -> std::io::Result<Tail> {
    let flags = rustix::fs::fcntl_getfl(&read_end)?;
    rustix::fs::fcntl_setfl(&read_end, flags | rustix::fs::OFlags::NONBLOCK)?;
    start(read_end, closed, lines)
}

fn start(read_end: OwnedFd, closed: Arc<tokio::sync::Notify>, lines: Vec<String>) -> std::io::Result<Tail> {
    let read_end = Arc::new(read_end);
    // SAFETY: the AsyncFd holds one clone of the Arc, so the fd stays open
    // and keeps its number while it is registered; nothing closes or
    // replaces an fd owned by an `OwnedFd`.
    let receiver = unsafe { AsyncFd::register_with_interest(Arc::clone(&read_end), Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut done: VecDeque<String> = lines.into_iter().collect();
    while done.len() > TAIL_LINES {
        done.pop_front();
    }
    let tail = Tail(Arc::new(Mutex::new(Lines { done, partial: Vec::new(), closed: false, pipe: Some(read_end) })));
    let kept = tail.clone();
    tokio::spawn(async move {
        let mut stderr = tokio::io::stderr();
        let mut buf = vec![0u8; 16 * 1024];
        // Ends at EOF: when the generation and everything it started have
        // closed their copies of the write end.
        loop {
            let Ok(mut guard) = receiver.readable().await else { break };
            let n = match guard.try_io(|fd| rustix::io::read(fd.get_ref().as_fd(), &mut buf).map_err(Into::into)) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            };
            kept.push(&buf[..n]);
            // Losing Baton's stderr must not stop the tail.
            let _ = stderr.write_all(&buf[..n]).await;
        }
        // Deregister before the tail lets go of the fd.
        drop(receiver);
        kept.close();
        closed.notify_one();
    });
    Ok(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_bounded() {
        let t = Tail::default();
        for i in 0..50 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(&[b'x'; 5000]);
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES + 1);
        assert_eq!(lines[0], "line 30");
        assert_eq!(lines[TAIL_LINES - 1], "line 49");
        assert_eq!(lines[TAIL_LINES].len(), LINE_MAX);
    }

    #[tokio::test]
    async fn capture_passes_output_through_and_keeps_the_tail() {
        let closed = Arc::new(tokio::sync::Notify::new());
        let (write_end, tail) = capture(Arc::clone(&closed)).unwrap();
        let mut w = std::fs::File::from(write_end);
        std::io::Write::write_all(&mut w, b"hello\nworld\n").unwrap();
        drop(w);
        closed.notified().await;
        assert!(tail.is_closed());
        assert!(tail.pipe_fd().is_none(), "the read end is closed at end-of-file");
        assert_eq!(tail.lines(), ["hello", "world"]);
    }

    #[tokio::test]
    async fn adopted_pipe_keeps_the_lines_and_reads_on() {
        let closed = Arc::new(tokio::sync::Notify::new());
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let mut w = std::fs::File::from(write_end);
        std::io::Write::write_all(&mut w, b"queued\n").unwrap();
        let tail = adopt(read_end, Arc::clone(&closed), vec!["before".into()]).unwrap();
        assert!(tail.pipe_fd().is_some());
        drop(w);
        closed.notified().await;
        assert_eq!(tail.lines(), ["before", "queued"]);
    }
}
