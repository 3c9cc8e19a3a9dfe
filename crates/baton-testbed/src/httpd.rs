//! Requests to the reference server, `baton-httpd`, that say who served
//! them: every response carries `baton-pid` and `baton-generation`. (Load
//! comes from [`crate::load`].)

use std::io::{Read, Write};
use std::net::TcpStream;

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
}
