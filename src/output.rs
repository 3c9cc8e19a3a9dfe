//! Passing a generation's stdout and stderr through Baton while keeping its
//! last lines, so a failed restart can say what the app printed last.
//!
//! Each generation writes into its own pipe; one task per generation copies
//! the bytes unchanged to Baton's stderr and remembers the last
//! [`TAIL_LINES`] lines (each cut at [`LINE_MAX`] bytes). Memory per
//! generation is therefore bounded whatever the app prints.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// Whether every writer is gone and all output has been read.
    pub fn is_closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
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
    let mut receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let tail = Tail::default();
    let kept = tail.clone();
    tokio::spawn(async move {
        let mut stderr = tokio::io::stderr();
        let mut buf = vec![0u8; 16 * 1024];
        // Ends at EOF: when the generation and everything it started have
        // closed their copies of the write end.
        while let Ok(n) = receiver.read(&mut buf).await {
            if n == 0 {
                break;
            }
            kept.push(&buf[..n]);
            // Losing Baton's stderr must not stop the tail.
            let _ = stderr.write_all(&buf[..n]).await;
        }
        kept.close();
        closed.notify_one();
    });
    Ok((write_end, tail))
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
        assert_eq!(tail.lines(), ["hello", "world"]);
    }
}
