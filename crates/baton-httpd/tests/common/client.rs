//! A small HTTP/1.1 client over `std::net::TcpStream`, so tests control each
//! connection exactly: when it is opened, what bytes go out in which write,
//! and how much of a response is read.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// Generous: the test machine is small and noisy.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A response, or its head when the body is read separately.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// `baton-pid`, which every response of baton-httpd carries.
    pub fn pid(&self) -> u32 {
        self.header("baton-pid").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no baton-pid in {self:?}"))
    }

    /// `baton-generation`.
    pub fn generation(&self) -> u64 {
        self.header("baton-generation")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no baton-generation in {self:?}"))
    }

    /// `Content-Length`, if any.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    /// Bytes received but not yet consumed.
    buf: Vec<u8>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl HttpConn {
    pub fn connect(port: u16) -> io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::new() })
    }

    /// The client side's port: the same TCP connection keeps it.
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Writes raw bytes in one `write` call (as far as the kernel allows).
    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.stream.write_all(raw)
    }

    /// A `GET` request's bytes.
    pub fn get_request(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
    }

    /// `GET path` and its whole response.
    pub fn get(&mut self, path: &str) -> io::Result<HttpResponse> {
        self.send(&Self::get_request(path))?;
        self.read_response(false)
    }

    /// Any request with extra header lines (`Name: value`), and its response.
    pub fn request(&mut self, method: &str, path: &str, headers: &[&str]) -> io::Result<HttpResponse> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        self.send(req.as_bytes())?;
        self.read_response(method == "HEAD")
    }

    /// Reads one response; `head_only` for the answer to `HEAD` (no body
    /// whatever Content-Length says).
    pub fn read_response(&mut self, head_only: bool) -> io::Result<HttpResponse> {
        let mut r = self.read_head()?;
        let no_body = head_only || r.status == 304 || r.status == 204 || (100..200).contains(&r.status);
        if !no_body {
            if r.header("transfer-encoding").is_some() {
                return Err(invalid(format!("chunked responses are not expected here: {r:?}")));
            }
            let len = r.content_length().ok_or_else(|| invalid(format!("no content-length: {r:?}")))?;
            r.body = self.read_body(len)?;
        }
        Ok(r)
    }

    /// Reads a response's status line and headers only.
    pub fn read_head(&mut self) -> io::Result<HttpResponse> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let text = String::from_utf8(head).map_err(|e| invalid(format!("response head not UTF-8: {e}")))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(HttpResponse { status, headers, body: Vec::new() })
    }

    /// Reads exactly `len` body bytes.
    pub fn read_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            self.fill()?;
        }
        Ok(self.buf.drain(..len).collect())
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Whether the server closed the connection (EOF or reset) within
    /// `wait`, reading nothing else.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let _ = self.stream.set_read_timeout(Some(wait));
        let mut b = [0u8; 1];
        let closed = match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => {
                self.buf.push(b[0]);
                false
            }
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        };
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        closed
    }

    /// Nothing has arrived unasked (no stray bytes, no close), checked
    /// without blocking.
    pub fn is_quiet(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let _ = self.stream.set_nonblocking(true);
        let mut b = [0u8; 1];
        let quiet = matches!(self.stream.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        let _ = self.stream.set_nonblocking(false);
        quiet
    }

    /// Closes with a reset (`SO_LINGER` 0) instead of a FIN: the server's
    /// socket then reports a hang-up.
    pub fn reset(self) {
        let _ = rustix::net::sockopt::set_socket_linger(&self.stream, Some(Duration::ZERO));
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (up to the
/// hard limit, raising that too when privileged); returns the new soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
    // SAFETY: plain syscall on a valid struct; failure is reported below.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    let capped = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } == 0 { lim.rlim_max } else { lim.rlim_cur }
}
