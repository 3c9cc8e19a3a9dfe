//! Requests to the reference server, `baton-httpd`, that say who served
//! them: every response carries `baton-pid` and `baton-generation`:
//! [`healthz`] on a new connection, [`get`] on a kept-alive one. (Load
//! comes from [`crate::load`].)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::baton::WAIT;

/// Who answered a request: `baton-httpd`'s `baton-pid` and
/// `baton-generation` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// `baton-pid`: the serving process.
    pub pid: u32,
    /// `baton-generation`: the serving generation.
    pub generation: String,
}

/// `GET /healthz` on a new connection (`Connection: close`), expecting 200
/// from `baton-httpd`.
pub fn healthz(port: u16) -> Result<Served, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(WAIT)).map_err(|e| format!("timeout: {e}"))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200 from baton-httpd: {out:?}"));
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let pid = header("baton-pid").and_then(|p| p.parse().ok()).ok_or_else(|| format!("no baton-pid: {head:?}"))?;
    let generation = header("baton-generation").ok_or_else(|| format!("no baton-generation: {head:?}"))?;
    Ok(Served { pid, generation })
}

/// A connection to 127.0.0.1:`port` for [`get`]: reads and writes time out
/// after `timeout`, no Nagle delay.
pub fn connect(port: u16, timeout: Duration) -> Result<BufReader<TcpStream>, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| format!("timeout: {e}"))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| format!("timeout: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(BufReader::new(s))
}

/// One whole response read by [`get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Response {
    /// The header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// `baton-pid`: the process that served.
    pub fn pid(&self) -> Result<u32, String> {
        self.number("baton-pid")
    }

    /// `baton-generation`: the generation that served.
    pub fn generation(&self) -> Result<u64, String> {
        self.number("baton-generation")
    }

    /// Whether the server said it closes the connection after this
    /// response (`Connection: close`).
    pub fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        self.header(name).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {name}: {:?}", self.headers))
    }
}

/// `GET <path>` on `conn` (HTTP/1.1, no pipelining), reading exactly one
/// response, whose body is delimited by `Content-Length` (all `baton-httpd`
/// sends). With `close`, asks the server to close the connection afterwards
/// (`Connection: close`), else to keep it alive for the next request.
///
/// Any status is returned; a connection closed before the status line, a
/// malformed head or one without `Content-Length` is an error.
pub fn get(conn: &mut BufReader<TcpStream>, path: &str, close: bool) -> Result<Response, String> {
    let connection = if close { "close" } else { "keep-alive" };
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    read_response(conn)
}

/// Reads exactly one response from `conn` (see [`get`]), e.g. to a request
/// written earlier.
pub fn read_response(conn: &mut BufReader<TcpStream>) -> Result<Response, String> {
    let mut line = String::new();
    if conn.read_line(&mut line).map_err(|e| format!("read status line: {e}"))? == 0 {
        return Err("closed by the server without a response".into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        conn.read_line(&mut line).map_err(|e| format!("read headers: {e}"))?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Content-Length in {headers:?}"))?;
    let mut body = vec![0; len];
    conn.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    Ok(Response { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Answers one connection with `response` after reading the request.
    fn serve_once(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            conn.write_all(response.as_bytes()).unwrap();
        });
        port
    }

    #[test]
    fn healthz_names_who_served_and_refuses_other_answers() {
        let ok = "HTTP/1.1 200 OK\r\nBaton-Pid: 42\r\nbaton-generation: 3\r\ncontent-length: 3\r\n\r\nok\n";
        assert_eq!(healthz(serve_once(ok)), Ok(Served { pid: 42, generation: "3".into() }));
        let down = healthz(serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n")).unwrap_err();
        assert!(down.starts_with("not a 200"), "{down}");
        let anonymous = healthz(serve_once("HTTP/1.1 200 OK\r\nbaton-generation: 3\r\n\r\n")).unwrap_err();
        assert!(anonymous.starts_with("no baton-pid"), "{anonymous}");
    }

    #[test]
    fn get_reads_one_response_per_request_on_a_kept_alive_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut conn = conn;
            for (i, answer) in
                ["baton-pid: 7\r\nbaton-generation: 2", "Connection: close\r\nbaton-pid: 8"].iter().enumerate()
            {
                let mut request = String::new();
                while reader.read_line(&mut request).unwrap() > 2 {}
                let body = format!("body {i}");
                let head = format!("HTTP/1.1 200 OK\r\n{answer}\r\nContent-Length: {}\r\n\r\n", body.len());
                conn.write_all(format!("{head}{body}").as_bytes()).unwrap();
            }
        });
        let mut conn = connect(port, Duration::from_secs(10)).unwrap();
        let first = get(&mut conn, "/", false).unwrap();
        assert_eq!((first.status, first.pid(), first.generation(), first.closes()), (200, Ok(7), Ok(2), false));
        assert_eq!(first.body, b"body 0");
        let second = get(&mut conn, "/", true).unwrap();
        assert_eq!((second.pid(), second.closes(), second.body.as_slice()), (Ok(8), true, &b"body 1"[..]));
        assert!(second.generation().unwrap_err().starts_with("no baton-generation"));
        server.join().unwrap();
    }

    #[test]
    fn get_says_when_the_server_closed_without_answering() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut request = String::new();
            let mut reader = BufReader::new(conn);
            while reader.read_line(&mut request).unwrap() > 2 {}
        });
        let mut conn = connect(port, Duration::from_secs(10)).unwrap();
        assert_eq!(get(&mut conn, "/", false).unwrap_err(), "closed by the server without a response");
        server.join().unwrap();
    }
}
