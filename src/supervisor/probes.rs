//! The built-in probes (`--health-http PATH`, `--health-tcp`): one probe of
//! one generation through its private probe listener ([`super::probe`]).
//!
//! The core decides when to probe and what a result means; this module only
//! runs one probe, bounded in time (the whole probe, connect included, is
//! under one `timeout`) and memory (an answer's head is read into at most
//! [`MAX_HEAD`] bytes, its body never), and never blocks the thread: it is
//! plain tokio I/O plus, for the TCP probe, non-blocking kernel queries.
//!
//! - **HTTP**: `GET PATH HTTP/1.1` with `Connection: close`; the answer's
//!   head is parsed with `httparse`. A final 2xx answer passes; any other
//!   status fails, naming it. Interim 1xx answers (RFC 9110 §15.2: 100
//!   Continue, 102, 103 Early Hints) are skipped, as every HTTP/1.1 client
//!   must, and the final answer after them decides; the probe sends no
//!   `Expect: 100-continue`, so a 100 is unusual but harmless. 101
//!   Switching Protocols, which the probe never asked for, fails.
//! - **TCP**: Baton holds the listener, so the connect always completes
//!   (the kernel queues it) even when the app never accepts: the probe
//!   passes only once the app has `accept()`ed this very connection, as
//!   seen by [`accepted`] (sock_diag, or the listener's accept queue through
//!   `TCP_INFO`), polled every 1 ms doubling to 10 ms until the timeout, or
//!   at once when the app writes or closes its end (which it can only do
//!   after accepting).

mod accepted;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use self::accepted::{Observer, Seen};
use super::HealthProbe;
use crate::units::format_duration;

/// A TCP listener's accept-queue length, for whoever must see a queue drain
/// (for instance before a generation is asked to stop).
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use self::accepted::accept_queue_len;

/// The most of an answer's head the HTTP probe reads: a larger head fails
/// the probe ([`ProbeFailure::HeadTooLarge`]).
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// Headers one head may have (`httparse` parses into a fixed array); more
/// fails as not HTTP, which no health endpoint comes near.
const MAX_HEADERS: usize = 128;

/// The TCP probe's first and longest pause between two looks at whether
/// its connection was accepted.
const FIRST_LOOK_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_LOOK_PAUSE: Duration = Duration::from_millis(10);

/// A probe that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Passed {
    /// From the start of the probe to its verdict.
    pub(crate) took: Duration,
    /// The HTTP status of the final answer (`None` for the TCP probe).
    pub(crate) status: Option<u16>,
}

/// Why a probe failed. Its `Display` is the text users see, in `baton
/// restart`'s failure and in `status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProbeFailure {
    /// The connect itself failed (the listener is Baton's, so this is rare:
    /// a full backlog, or no memory).
    #[error("{probe}: cannot connect to {addr}: {reason}")]
    Connect {
        /// `GET /path` or `TCP probe`.
        probe: String,
        /// The probe listener.
        addr: SocketAddr,
        /// The error.
        reason: String,
    },
    /// No complete answer head within the timeout.
    #[error("GET {path}: no answer within {}", format_duration(*.within))]
    NoAnswer {
        /// The request target.
        path: String,
        /// The timeout.
        within: Duration,
    },
    /// The app did not accept the TCP probe within the timeout.
    #[error("TCP probe: not accepted within {}", format_duration(*.within))]
    NotAccepted {
        /// The timeout.
        within: Duration,
    },
    /// A final answer other than 2xx.
    #[error("GET {path} answered {code}{}", reason_suffix(.reason))]
    Status {
        /// The request target.
        path: String,
        /// The status code.
        code: u16,
        /// Its reason phrase, as sent (may be empty).
        reason: String,
    },
    /// The app closed the connection before a complete answer head.
    #[error("GET {path}: connection closed before {}", if *.partial { "the end of the answer's head" } else { "an answer" })]
    Closed {
        /// The request target.
        path: String,
        /// Whether part of a head had arrived.
        partial: bool,
    },
    /// What came back is not an HTTP/1.x answer.
    #[error("GET {path}: not an HTTP answer ({detail})")]
    NotHttp {
        /// The request target.
        path: String,
        /// The parser's complaint and the start of what came.
        detail: String,
    },
    /// The answer's head is larger than [`MAX_HEAD`].
    #[error("GET {path}: the answer's head is larger than {} KiB", MAX_HEAD / 1024)]
    HeadTooLarge {
        /// The request target.
        path: String,
    },
    /// Sending or receiving failed (a reset, for instance).
    #[error("{probe}: {during}: {reason}")]
    Io {
        /// `GET /path` or `TCP probe`.
        probe: String,
        /// What the probe was doing.
        during: &'static str,
        /// The error.
        reason: String,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(" {reason}") }
}

/// One probe of one generation's private probe listener.
///
/// `listener` is Baton's own copy of that listener (see
/// [`super::probe::ProbeSocket`]; a `BorrowedFd`, an `Arc<OwnedFd>` or a
/// dup all do), `addr` its address. Everything, connect included, is
/// bounded by `timeout`. Never blocks the thread.
pub(crate) async fn probe(
    kind: &HealthProbe,
    listener: impl AsFd,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Passed, ProbeFailure> {
    let started = Instant::now();
    let run = async {
        match kind {
            HealthProbe::Http { path } => http(path, addr).await.map(Some),
            HealthProbe::Tcp => tcp(listener.as_fd(), addr).await.map(|()| None),
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(status)) => Ok(Passed { took: started.elapsed(), status }),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(match kind {
            HealthProbe::Http { path } => ProbeFailure::NoAnswer { path: path.clone(), within: timeout },
            HealthProbe::Tcp => ProbeFailure::NotAccepted { within: timeout },
        }),
    }
}

async fn http(path: &str, addr: SocketAddr) -> Result<u16, ProbeFailure> {
    let label = || format!("GET {path}");
    let io = |during, e: std::io::Error| ProbeFailure::Io { probe: label(), during, reason: e.to_string() };
    let mut stream = TcpStream::connect(addr).await.map_err(|e| ProbeFailure::Connect {
        probe: label(),
        addr,
        reason: e.to_string(),
    })?;
    stream.write_all(&http_request(path, addr)).await.map_err(|e| io("sending the request", e))?;
    let mut head = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let n = stream.read(&mut head[len..]).await.map_err(|e| io("reading the answer", e))?;
        if n == 0 {
            return Err(ProbeFailure::Closed { path: path.to_owned(), partial: len > 0 });
        }
        len += n;
        match judge_head(&head[..len], MAX_HEAD) {
            Head::Incomplete => continue,
            Head::Final { code, reason } => {
                return if (200..300).contains(&code) {
                    Ok(code)
                } else {
                    Err(ProbeFailure::Status { path: path.to_owned(), code, reason })
                };
            }
            Head::NotHttp(detail) => return Err(ProbeFailure::NotHttp { path: path.to_owned(), detail }),
            Head::TooLarge => return Err(ProbeFailure::HeadTooLarge { path: path.to_owned() }),
        }
    }
}

async fn tcp(listener: std::os::fd::BorrowedFd<'_>, addr: SocketAddr) -> Result<(), ProbeFailure> {
    let label = || "TCP probe".to_owned();
    let stream = TcpStream::connect(addr).await.map_err(|e| ProbeFailure::Connect {
        probe: label(),
        addr,
        reason: e.to_string(),
    })?;
    let observe = |e: std::io::Error| ProbeFailure::Io {
        probe: label(),
        during: "seeing whether the app accepted it",
        reason: e.to_string(),
    };
    let client = stream.local_addr().map_err(observe)?;
    let observer = Observer::new();
    let mut pause = FIRST_LOOK_PAUSE;
    loop {
        if observer.look(listener, client, addr).map_err(observe)? == Seen::Accepted {
            return Ok(());
        }
        tokio::select! {
            // Data, end of file or a reset on our end: only an app that
            // accepted can cause them (Baton's copy keeps the listener open).
            ready = stream.readable() => {
                ready.map_err(observe)?;
                match stream.try_read(&mut [0u8; 64]) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => return Ok(()),
                }
            }
            () = tokio::time::sleep(pause) => pause = (pause * 2).min(LONGEST_LOOK_PAUSE),
        }
    }
}

/// The HTTP probe's request: `GET PATH HTTP/1.1` to the probe listener's
/// address. `path` is checked by the command line (`/` first, no space or
/// control character).
pub(crate) fn http_request(path: &str, addr: SocketAddr) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-probe\r\nConnection: close\r\n\r\n").into_bytes()
}

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Head {
    /// Not a complete final head yet: read more.
    Incomplete,
    /// The final answer's status.
    Final {
        /// Its status code.
        code: u16,
        /// Its reason phrase (may be empty).
        reason: String,
    },
    /// Not HTTP/1.x (the parser's complaint and the start of the bytes).
    NotHttp(String),
    /// `limit` bytes and still no complete final head.
    TooLarge,
}

/// Judges the start of an answer: interim 1xx heads (other than 101) are
/// skipped, the first final head decides. Pure: called again with more
/// bytes after [`Head::Incomplete`].
pub(crate) fn judge_head(bytes: &[u8], limit: usize) -> Head {
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(&bytes[at..]) {
            Ok(httparse::Status::Partial) => {
                return if bytes.len() >= limit { Head::TooLarge } else { Head::Incomplete };
            }
            Ok(httparse::Status::Complete(len)) => {
                // Complete implies a code.
                let code = answer.code.unwrap_or(0);
                if (100..200).contains(&code) && code != 101 {
                    at += len;
                    continue;
                }
                if at + len > limit {
                    return Head::TooLarge;
                }
                return Head::Final { code, reason: answer.reason.unwrap_or("").to_owned() };
            }
            Err(e) => return Head::NotHttp(format!("{e}; it began {}", excerpt(bytes))),
        }
    }
}

/// The first bytes of an answer, quoted and escaped, for error messages.
fn excerpt(bytes: &[u8]) -> String {
    const SHOWN: usize = 32;
    let mut s = String::from("\"");
    s.extend(bytes.iter().take(SHOWN).flat_map(|b| std::ascii::escape_default(*b)).map(char::from));
    s.push('"');
    if bytes.len() > SHOWN {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests;
