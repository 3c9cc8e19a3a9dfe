//! The HTTP side on real sockets: static files, `HEAD`, conditional
//! requests, safe paths, `/healthz`, `/.well-known/baton` and the identity
//! headers. The server runs under the mini manager (socket passed by
//! `LISTEN_FDS`, as in production).

mod common;

use std::os::unix::fs::symlink;

use common::Mini;
use common::client::HttpConn;

fn server() -> (Mini, HttpConn) {
    let d = Mini::start(&[]);
    let c = HttpConn::connect(d.m.port()).unwrap();
    (d, c)
}

#[test]
fn serves_files_with_types_lengths_and_identity() {
    let (d, mut c) = server();
    let pid = d.m.pid().unwrap();
    for (path, ty, body) in [
        ("/hello.txt", "text/plain; charset=utf-8", "hello, world\n"),
        ("/sub/data.json", "application/json", "{\"a\":1}\n"),
        ("/", "text/html; charset=utf-8", "<h1>baton</h1>\n"),
        ("/index.html?x=1", "text/html; charset=utf-8", "<h1>baton</h1>\n"),
    ] {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some(ty), "{path}");
        assert_eq!(r.body_text(), body, "{path}");
        assert_eq!(r.content_length(), Some(body.len()));
        assert!(r.header("last-modified").is_some(), "{path}");
        assert_eq!(r.pid(), pid, "{path}");
        assert_eq!(r.generation(), 1, "{path}");
    }
    let r = c.get("/big.bin").unwrap();
    assert_eq!((r.status, r.body.len()), (200, common::scenarios::BIG_LEN));
    assert!(r.body.iter().enumerate().all(|(i, b)| *b == common::scenarios::big_byte(i)), "big.bin corrupted");
}

#[test]
fn head_has_the_headers_and_no_body() {
    let (_d, mut c) = server();
    for path in ["/hello.txt", "/big.bin", "/healthz", "/.well-known/baton"] {
        let get = c.get(path).unwrap();
        let head = c.request("HEAD", path, &[]).unwrap();
        assert_eq!(head.status, 200, "{path}");
        assert_eq!(head.content_length(), get.content_length(), "{path}");
        assert_eq!(head.header("content-type"), get.header("content-type"), "{path}");
        // No body bytes followed: the next response parses cleanly.
        assert!(c.is_quiet(), "{path}: bytes after a HEAD response");
    }
}

#[test]
fn if_modified_since_gives_304() {
    let (_d, mut c) = server();
    let r = c.get("/hello.txt").unwrap();
    let lm = r.header("last-modified").unwrap().to_owned();
    let r = c.request("GET", "/hello.txt", &[&format!("If-Modified-Since: {lm}")]).unwrap();
    assert_eq!(r.status, 304, "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(r.header("last-modified"), Some(lm.as_str()));
    let r = c.request("GET", "/hello.txt", &["If-Modified-Since: Thu, 01 Jan 1998 00:00:00 GMT"]).unwrap();
    assert_eq!(r.status, 200);
    let r = c.request("GET", "/hello.txt", &["If-Modified-Since: not a date"]).unwrap();
    assert_eq!(r.status, 200);
    let r = c.request("HEAD", "/hello.txt", &[&format!("If-Modified-Since: {lm}")]).unwrap();
    assert_eq!(r.status, 304);
    assert!(c.is_quiet());
}

#[test]
fn path_traversal_is_refused() {
    let (d, mut c) = server();
    // Symlinks: one leaving the root (to a directory and to a file), one
    // staying inside.
    symlink("/etc", d.root.join("escape")).unwrap();
    symlink("/etc/passwd", d.root.join("passwd")).unwrap();
    symlink("../hello.txt", d.root.join("sub/up.txt")).unwrap();
    for path in [
        "/../etc/passwd",
        "/../../../../etc/passwd",
        "/sub/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E/etc/passwd",
        "/.%2e/etc/passwd",
        "/sub/..%2f..%2fetc%2fpasswd",
        "/sub/%2e%2e%2f%2e%2e%2fetc/passwd",
        "/%00",
        "/bad%zzescape",
    ] {
        let r = c.get(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(!r.body_text().contains("root:"), "{path}");
    }
    for path in ["/escape/passwd", "/escape/", "/passwd"] {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    let r = c.get("/sub/up.txt").unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "hello, world\n"), "a symlink inside the root is fine");
}

#[test]
fn special_files_directories_and_methods() {
    let (d, mut c) = server();
    // A FIFO would block a reader forever: refused, and nothing hangs.
    let fifo = d.root.join("fifo");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::RUSR, 0).unwrap();
    let r = c.get("/fifo").unwrap();
    assert_eq!(r.status, 403, "{r:?}");

    let r = c.get("/sub?q=1").unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("/sub/?q=1"));
    let r = c.get("/sub/").unwrap();
    assert_eq!(r.status, 404, "no directory listings");
    std::fs::write(d.root.join("sub/index.html"), "sub index\n").unwrap();
    let r = c.get("/sub/").unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "sub index\n"));
    assert_eq!(c.get("/hello.txt/").unwrap().status, 404);
    assert_eq!(c.get("/missing").unwrap().status, 404);

    let r = c.request("DELETE", "/hello.txt", &[]).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // hyper closes a connection whose request body was not read; a request
    // without one keeps it open.
    assert_eq!(c.get("/hello.txt").unwrap().status, 200);
}

#[test]
fn healthz_and_well_known() {
    let (d, mut c) = server();
    let pid = d.m.pid().unwrap();
    let r = c.get("/healthz").unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "ok\n"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = c.get("/.well-known/baton").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc["pid"], pid);
    assert_eq!(doc["generation"], 1);
    assert_eq!(doc["adopted_connections"], 0);
    assert!(doc["started_at_unix_ms"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000), "{doc}");
    assert!(doc["started_at"].as_str().is_some_and(|s| s.ends_with("GMT")), "{doc}");
    assert_eq!(r.pid(), pid);
}
