//! A minimal HTTP/1.1 client over one tokio [`TcpStream`], written by hand
//! (not hyper) so that every way a request can fail maps onto exactly one
//! [`FailureKind`], and so that nothing is retried behind our back.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::FailureKind;

/// Longest status line + header block accepted; a larger one is malformed.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why one request failed.
#[derive(Debug)]
pub(super) struct Failure {
    pub kind: FailureKind,
    /// For [`FailureKind::Other`]: what happened, for the report.
    pub detail: Option<String>,
    /// For [`FailureKind::BadStatus`]: the status code.
    pub status: Option<u16>,
    /// The failure came from the server ending the connection (EOF or RST)
    /// before a single byte of the response arrived: on a connection that
    /// had already served a request, the server closed it under us.
    pub nothing_received: bool,
}

impl Failure {
    fn new(kind: FailureKind) -> Failure {
        Failure { kind, detail: None, status: None, nothing_received: false }
    }

    /// A failure of an I/O call, classified by its error kind.
    pub fn io(e: &io::Error, during: &str) -> Failure {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
                FailureKind::Reset
            }
            io::ErrorKind::TimedOut => FailureKind::Timeout,
            io::ErrorKind::UnexpectedEof => FailureKind::ServerClosed,
            _ => FailureKind::Other,
        };
        let mut f = Failure::new(kind);
        if kind == FailureKind::Other {
            f.detail = Some(format!("{during}: {:?}", e.kind()));
        }
        f
    }

    /// The request's deadline passed.
    pub fn timeout() -> Failure {
        Failure::new(FailureKind::Timeout)
    }

    fn malformed(what: &str) -> Failure {
        Failure { detail: Some(format!("malformed response: {what}")), ..Failure::new(FailureKind::Other) }
    }
}

/// A complete response.
#[derive(Debug)]
pub(super) struct Response {
    pub status: u16,
    /// `baton-generation` header, trimmed.
    pub generation: Option<String>,
    /// `baton-pid` header, trimmed.
    pub pid: Option<String>,
    /// The connection cannot carry another request (`Connection: close`,
    /// HTTP/1.0, a body delimited by EOF, or stray bytes after the body).
    pub close: bool,
}

/// State of an idle pooled connection, seen without blocking.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum IdleState {
    /// Nothing to read: still usable.
    Open,
    /// EOF, RST or bytes nobody asked for: the server is done with it.
    Closed,
}

/// One client connection and its unread bytes.
pub(super) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `addr` (tokio creates the socket with `SOCK_CLOEXEC`).
    pub async fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream = TcpStream::connect(addr).await.map_err(|e| Failure::io(&e, "connect"))?;
        // Requests are single small writes: never wait for Nagle.
        stream.set_nodelay(true).map_err(|e| Failure::io(&e, "TCP_NODELAY"))?;
        Ok(Conn { stream, buf: Vec::with_capacity(READ_CHUNK) })
    }

    /// Without blocking, whether the server has closed this idle connection
    /// (used right before reusing it). A raw `recv(MSG_PEEK|MSG_DONTWAIT)`
    /// rather than tokio's `try_read`, which answers `WouldBlock` from its
    /// cached readiness until the reactor has run.
    pub fn idle_state(&self) -> IdleState {
        if !self.buf.is_empty() {
            return IdleState::Closed;
        }
        let mut byte = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        match rustix::net::recv(self.stream.as_fd(), &mut byte[..], flags) {
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => IdleState::Open,
            // 0 = EOF; >0 = unsolicited bytes (e.g. a 408 before closing); Err = RST.
            _ => IdleState::Closed,
        }
    }

    /// Resolves when the server closes this idle connection (or sends
    /// something unasked, which means the same). Cancel-safe: used in a
    /// `select!` against the next send time.
    pub async fn closed(&mut self) {
        if !self.buf.is_empty() {
            return;
        }
        loop {
            if self.stream.readable().await.is_err() {
                return;
            }
            // `try_io` clears tokio's cached readiness when the peek says
            // WouldBlock (a spurious wakeup), so `readable` waits again.
            let peek = self.stream.try_io(tokio::io::Interest::READABLE, || {
                let mut byte = [0u8; 1];
                let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                rustix::net::recv(self.stream.as_fd(), &mut byte[..], flags).map_err(io::Error::from)
            });
            match peek {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                // EOF, unsolicited bytes, or an error (RST).
                _ => return,
            }
        }
    }

    /// Sends `request` and reads one complete response.
    pub async fn request(&mut self, request: &[u8]) -> Result<Response, Failure> {
        self.stream.write_all(request).await.map_err(|e| {
            let mut f = Failure::io(&e, "write");
            // Nothing was read, and a write error here means the peer is gone.
            f.nothing_received = true;
            f
        })?;
        self.read_response().await
    }

    /// Reads more bytes into `buf`; `Ok(0)` at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads more, turning EOF and errors into failures. `received` says
    /// whether any byte of this response arrived before.
    async fn fill_or_fail(&mut self, received: bool) -> Result<(), Failure> {
        match self.fill().await {
            Ok(0) => Err(Failure { nothing_received: !received, ..Failure::new(FailureKind::ServerClosed) }),
            Ok(_) => Ok(()),
            Err(e) => {
                let mut f = Failure::io(&e, "read");
                f.nothing_received = !received && f.kind == FailureKind::Reset;
                Err(f)
            }
        }
    }

    async fn read_response(&mut self) -> Result<Response, Failure> {
        let mut received = false;
        loop {
            // Status line and headers.
            let head_len = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i + 4;
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(Failure::malformed("header block too large"));
                }
                self.fill_or_fail(received).await?;
                received = true;
            };
            let head = parse_head(&self.buf[..head_len])?;
            self.buf.drain(..head_len);
            // Interim 1xx responses (100 Continue...) precede the real one.
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            let mut close = head.close;
            if head.status == 204 || head.status == 304 || (100..200).contains(&head.status) {
                // No body.
            } else if head.chunked {
                self.skip_chunked().await?;
            } else if let Some(len) = head.content_length {
                self.skip(len).await?;
            } else {
                // Delimited by EOF: read (and discard) until the server closes.
                loop {
                    self.buf.clear();
                    match self.fill().await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(Failure::io(&e, "read")),
                    }
                }
                close = true;
            }
            // Bytes after the response were never asked for: the connection
            // is out of step, do not reuse it.
            if !self.buf.is_empty() {
                close = true;
            }
            let status = head.status;
            if !(200..400).contains(&status) {
                return Err(Failure { status: Some(status), ..Failure::new(FailureKind::BadStatus) });
            }
            return Ok(Response { status, generation: head.generation, pid: head.pid, close });
        }
    }

    /// Consumes `len` body bytes.
    async fn skip(&mut self, mut len: u64) -> Result<(), Failure> {
        loop {
            let take = usize::try_from(len).unwrap_or(usize::MAX).min(self.buf.len());
            self.buf.drain(..take);
            len -= take as u64;
            if len == 0 {
                return Ok(());
            }
            self.fill_or_fail(true).await?;
        }
    }

    /// Reads one CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> Result<String, Failure> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(Failure::malformed("chunk line too long"));
            }
            self.fill_or_fail(true).await?;
        }
    }

    async fn skip_chunked(&mut self) -> Result<(), Failure> {
        loop {
            let line = self.line().await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| Failure::malformed("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.skip(size).await?;
            if !self.line().await?.is_empty() {
                return Err(Failure::malformed("chunk not followed by CRLF"));
            }
        }
    }
}

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
    generation: Option<String>,
    pid: Option<String>,
}

fn parse_head(head: &[u8]) -> Result<Head, Failure> {
    let text = std::str::from_utf8(head).map_err(|_| Failure::malformed("header block is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(Failure::malformed("status line is not HTTP/1.x")),
    };
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| Failure::malformed("bad status code"))?;
    let mut h = Head { status, content_length: None, chunked: false, close: http10, generation: None, pid: None };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Failure::malformed("header line without ':'"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let len = value.parse::<u64>().map_err(|_| Failure::malformed("bad Content-Length"))?;
            if h.content_length.is_some_and(|l| l != len) {
                return Err(Failure::malformed("conflicting Content-Length"));
            }
            h.content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            h.chunked = value.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    h.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    h.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("baton-generation") {
            h.generation = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("baton-pid") {
            h.pid = Some(value.to_owned());
        }
    }
    Ok(h)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers_case_insensitively() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nBaton-Generation: 7\r\nbaton-PID: 42\r\nContent-Length: 3\r\n\r\n")
            .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.generation.as_deref(), Some("7"));
        assert_eq!(h.pid.as_deref(), Some("42"));
        assert_eq!(h.content_length, Some(3));
        assert!(!h.close);
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        assert!(parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().close);
        assert!(!parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").unwrap().close);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").unwrap().close);
    }

    #[test]
    fn rejects_garbage() {
        for head in [&b"SSH-2.0 hi\r\n\r\n"[..], b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n"] {
            let f = parse_head(head).err().unwrap();
            assert_eq!(f.kind, FailureKind::Other, "{head:?}");
        }
    }
}
