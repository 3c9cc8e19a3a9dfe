//! The probes' pure parts exhaustively, then each probe against real
//! loopback listeners served by tasks of the test's own (current-thread)
//! runtime, as the supervisor runs them.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::AsFd;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn judge(bytes: &[u8]) -> Head {
    judge_head(bytes, MAX_HEAD)
}

fn fin(code: u16, reason: &str) -> Head {
    Head::Final { code, reason: reason.into() }
}

#[test]
fn the_request_is_a_plain_http11_get_that_closes() {
    let addr: SocketAddr = "127.0.0.1:4321".parse().unwrap();
    assert_eq!(
        http_request("/healthz?x=1", addr),
        b"GET /healthz?x=1 HTTP/1.1\r\nHost: 127.0.0.1:4321\r\nUser-Agent: baton-probe\r\nConnection: close\r\n\r\n"
    );
    let v6: SocketAddr = "[::1]:80".parse().unwrap();
    assert!(String::from_utf8(http_request("/", v6)).unwrap().contains("\r\nHost: [::1]:80\r\n"));
}

#[test]
fn final_heads_decide_with_their_status() {
    assert_eq!(judge(b"HTTP/1.1 200 OK\r\n\r\n"), fin(200, "OK"));
    assert_eq!(judge(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"), fin(204, "No Content"));
    assert_eq!(judge(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"), fin(200, "OK"));
    assert_eq!(judge(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\n\r\n"), fin(301, "Moved Permanently"));
    assert_eq!(judge(b"HTTP/1.1 500 Internal Server Error\r\n\r\n"), fin(500, "Internal Server Error"));
    assert_eq!(judge(b"HTTP/1.1 503 \r\n\r\n"), fin(503, ""));
    // A bare LF line end, which httparse accepts as servers send it.
    assert_eq!(judge(b"HTTP/1.1 200 OK\n\n"), fin(200, "OK"));
}

#[test]
fn every_prefix_of_a_head_is_incomplete() {
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
    let end = head.len() - 2;
    for cut in 0..end {
        assert_eq!(judge(&head[..cut]), Head::Incomplete, "cut at {cut}: {:?}", &head[..cut]);
    }
    assert_eq!(judge(&head[..end]), fin(200, "OK"));
}

#[test]
fn interim_answers_are_skipped_and_the_final_one_decides() {
    assert_eq!(judge(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"), fin(200, "OK"));
    assert_eq!(judge(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n"), fin(500, "Oops"));
    assert_eq!(
        judge(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
        fin(204, "No Content")
    );
    // An interim head alone: the final one is still to come.
    assert_eq!(judge(b"HTTP/1.1 100 Continue\r\n\r\n"), Head::Incomplete);
    assert_eq!(judge(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"), Head::Incomplete);
    // 101 is final: the probe asked for no upgrade, and it fails as non-2xx.
    assert_eq!(judge(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), fin(101, "Switching Protocols"));
}

#[test]
fn garbage_is_not_http_and_says_what_came() {
    for garbage in [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b"\x16\x03\x01\x00\xa5", b"HTTP/2 200\r\n\r\n", b"hello"] {
        let Head::NotHttp(detail) = judge(garbage) else { panic!("{garbage:?} judged {:?}", judge(garbage)) };
        assert!(detail.contains("it began \""), "{detail}");
    }
    let Head::NotHttp(detail) = judge(b"HTTP/1.1 abc OK\r\n\r\n") else { panic!() };
    assert!(detail.starts_with("invalid response status"), "{detail}");
    let Head::NotHttp(detail) = judge(&[b'x'; 100]) else { panic!() };
    assert!(detail.ends_with("\"..."), "the excerpt is cut: {detail}");
    let Head::NotHttp(detail) = judge(b"\x16\x03\x01\x00\xa5") else { panic!() };
    assert!(detail.contains(r"\x16\x03\x01\x00\xa5"), "bytes are escaped: {detail}");
}

#[test]
fn too_many_headers_are_not_http() {
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(matches!(judge(&head), Head::NotHttp(d) if d.starts_with("too many headers")));
}

#[test]
fn a_head_past_the_limit_is_too_large() {
    let mut head = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    head.resize(MAX_HEAD, b'a');
    assert_eq!(judge(&head), Head::TooLarge, "limit reached, head unfinished");
    assert_eq!(judge(&head[..MAX_HEAD - 1]), Head::Incomplete);
    // Interim heads count towards the limit.
    assert_eq!(judge_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", 30), Head::TooLarge);
    assert_eq!(judge_head(b"HTTP/1.1 200 OK\r\n\r\n", 19), fin(200, "OK"));
}

#[test]
fn failures_read_as_users_see_them() {
    let path = || "/healthz".to_owned();
    let cases = [
        (
            ProbeFailure::Status { path: path(), code: 500, reason: "Internal Server Error".into() },
            "GET /healthz answered 500 Internal Server Error",
        ),
        (ProbeFailure::Status { path: path(), code: 503, reason: String::new() }, "GET /healthz answered 503"),
        (ProbeFailure::NoAnswer { path: path(), within: Duration::from_secs(2) }, "GET /healthz: no answer within 2s"),
        (ProbeFailure::NotAccepted { within: Duration::from_millis(1500) }, "TCP probe: not accepted within 1500ms"),
        (ProbeFailure::Closed { path: path(), partial: false }, "GET /healthz: connection closed before an answer"),
        (
            ProbeFailure::Closed { path: path(), partial: true },
            "GET /healthz: connection closed before the end of the answer's head",
        ),
        (
            ProbeFailure::NotHttp { path: path(), detail: "invalid HTTP version".into() },
            "GET /healthz: not an HTTP answer (invalid HTTP version)",
        ),
        (ProbeFailure::HeadTooLarge { path: path() }, "GET /healthz: the answer's head is larger than 16 KiB"),
    ];
    for (failure, text) in cases {
        assert_eq!(failure.to_string(), text);
    }
}

// --- Real listeners ---

const TIMEOUT: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(300);

fn http_probe(path: &str) -> HealthProbe {
    HealthProbe::Http { path: path.into() }
}

/// A listener whose every connection gets `answer` once its request head
/// arrived (then closed), on a task of this runtime.
async fn serve(answer: &'static [u8]) -> (StdListener, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Baton's copy, as the supervisor holds one.
    let held = StdListener::from(listener.as_fd().try_clone_to_owned().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                assert!(request.starts_with(b"GET /healthz HTTP/1.1\r\n"), "{request:?}");
                let _ = conn.write_all(answer).await;
            });
        }
    });
    (held, addr)
}

/// A listener nobody accepts from: Baton's copy only.
fn held_only() -> (StdListener, SocketAddr) {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test]
async fn http_2xx_passes() {
    for answer in [&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], b"HTTP/1.1 204 No Content\r\n\r\n"] {
        let (held, addr) = serve(answer).await;
        let passed = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap();
        assert!(matches!(passed.status, Some(200 | 204)), "{passed:?}");
    }
}

#[tokio::test]
async fn http_500_and_301_fail_with_their_status() {
    let (held, addr) = serve(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
    let e = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap_err();
    assert_eq!(e.to_string(), "GET /healthz answered 500 Internal Server Error");
    let (held, addr) = serve(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /\r\n\r\n").await;
    let e = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap_err();
    assert_eq!(e.to_string(), "GET /healthz answered 301 Moved Permanently");
}

#[tokio::test]
async fn http_garbage_fails_as_not_http() {
    let (held, addr) = serve(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let e = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap_err();
    assert!(e.to_string().starts_with("GET /healthz: not an HTTP answer ("), "{e}");
}

#[tokio::test]
async fn http_close_before_an_answer_fails() {
    let (held, addr) = serve(b"").await;
    let e = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap_err();
    assert_eq!(e.to_string(), "GET /healthz: connection closed before an answer");
    let (held, addr) = serve(b"HTTP/1.1 200 OK\r\nX: ").await;
    let e = probe(&http_probe("/healthz"), &held, addr, TIMEOUT).await.unwrap_err();
    assert_eq!(e.to_string(), "GET /healthz: connection closed before the end of the answer's head");
}

#[tokio::test]
async fn http_hang_and_no_accept_fail_by_timeout() {
    // Accepted, request read, never answered.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = StdListener::from(listener.as_fd().try_clone_to_owned().unwrap());
    let hung = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(conn);
    });
    let e = probe(&http_probe("/healthz"), &held, addr, SHORT).await.unwrap_err();
    assert_eq!(e, ProbeFailure::NoAnswer { path: "/healthz".into(), within: SHORT });
    assert_eq!(e.to_string(), "GET /healthz: no answer within 300ms");
    hung.abort();
    // Never accepted at all: the connect completes in the backlog, and no
    // answer comes.
    let (held, addr) = held_only();
    let e = probe(&http_probe("/healthz"), &held, addr, SHORT).await.unwrap_err();
    assert_eq!(e.to_string(), "GET /healthz: no answer within 300ms");
}

#[tokio::test]
async fn tcp_passes_once_accepted() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = StdListener::from(listener.as_fd().try_clone_to_owned().unwrap());
    // Accepts and keeps every connection open, writing nothing: only the
    // accept itself can be seen.
    let server = tokio::spawn(async move {
        let mut kept = Vec::new();
        loop {
            kept.push(listener.accept().await.unwrap());
        }
    });
    for _ in 0..3 {
        let passed = probe(&HealthProbe::Tcp, held.as_fd(), addr, TIMEOUT).await.unwrap();
        assert_eq!(passed.status, None);
    }
    server.abort();
}

#[tokio::test]
async fn tcp_passes_when_the_app_accepts_and_closes_at_once() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = StdListener::from(listener.as_fd().try_clone_to_owned().unwrap());
    let server = tokio::spawn(async move {
        loop {
            drop(listener.accept().await.unwrap());
        }
    });
    probe(&HealthProbe::Tcp, &held, addr, TIMEOUT).await.unwrap();
    server.abort();
}

#[tokio::test]
async fn tcp_fails_by_timeout_when_nothing_accepts() {
    let (held, addr) = held_only();
    let e = probe(&HealthProbe::Tcp, &held, addr, SHORT).await.unwrap_err();
    assert_eq!(e.to_string(), "TCP probe: not accepted within 300ms");
    // Its connection is still queued, unaccepted: the probe saw the truth.
    assert_eq!(accept_queue_len(held.as_fd()).unwrap(), 1);
}

#[tokio::test]
async fn tcp_fails_while_an_older_connection_still_waits() {
    // An app that accepted once, long ago, and stopped: the queue holds an
    // earlier connection, and the probe's own is not accepted either.
    let (held, addr) = held_only();
    let _waiting = std::net::TcpStream::connect(addr).unwrap();
    let e = probe(&HealthProbe::Tcp, &held, addr, SHORT).await.unwrap_err();
    assert!(matches!(e, ProbeFailure::NotAccepted { .. }), "{e}");
}

#[tokio::test]
async fn a_refused_connect_names_the_address() {
    let (held, addr) = held_only();
    drop(held);
    for kind in [http_probe("/healthz"), HealthProbe::Tcp] {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = probe(&kind, &listener, addr, TIMEOUT).await.unwrap_err();
        assert!(matches!(e, ProbeFailure::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&format!("cannot connect to {addr}")), "{e}");
    }
}

#[tokio::test]
async fn tcp_over_ipv6_sees_the_accept_too() {
    // The probe listener takes the first socket's family: ::1 as well.
    let Ok(listener) = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).await else {
        return; // no IPv6 on this host
    };
    let addr = listener.local_addr().unwrap();
    let held = StdListener::from(listener.as_fd().try_clone_to_owned().unwrap());
    let e = probe(&HealthProbe::Tcp, &held, addr, SHORT).await.unwrap_err();
    assert!(matches!(e, ProbeFailure::NotAccepted { .. }), "not accepted yet: {e}");
    let server = tokio::spawn(async move {
        let mut kept = Vec::new();
        loop {
            kept.push(listener.accept().await.unwrap());
        }
    });
    probe(&HealthProbe::Tcp, &held, addr, TIMEOUT).await.unwrap();
    server.abort();
}
