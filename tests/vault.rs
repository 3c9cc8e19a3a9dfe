//! The connection vault (`baton::vault`) against a stand-in for systemd:
//! Baton runs with `NOTIFY_SOCKET` pointing at a datagram socket this test
//! reads, as a service manager would. Connections the generation stores
//! when Baton stops must reach the manager in one entry, and stay alive in
//! it after Baton and its generation are gone: what the next Baton would
//! take back after a crash or restart of its own. (Real systemd 252 and 257
//! carry them across `systemctl restart` in tests/idle_handover.rs.)

use std::collections::BTreeSet;
use std::io::{BufReader, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use baton_testbed::baton::BatonBuilder;
use baton_testbed::{cargo_bin, httpd, unique_temp_dir};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

const CONNECTIONS: usize = 300;
const WAIT: Duration = Duration::from_secs(60);

/// One datagram to the stand-in manager: its text and fds.
fn receive(manager: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 8192];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(768))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = rustix::net::recvmsg(manager.as_fd(), &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC).ok()?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Some((String::from_utf8_lossy(&buf[..msg.bytes]).into_owned(), fds))
}

#[test]
fn stored_connections_outlive_baton_in_one_entry_of_the_managers_store() {
    let dir = unique_temp_dir("baton-test", "vault");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let manager_path = dir.join("manager.sock");
    let manager = UnixDatagram::bind(&manager_path).unwrap();
    manager.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut baton = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), &dir)
        .args(["--fdstore-max", "4096"])
        .app([cargo_bin("baton-httpd", "baton-httpd").into_os_string(), "--root".into(), dir.join("www").into()])
        .env("NOTIFY_SOCKET", &manager_path)
        .start();
    let mut clients: Vec<BufReader<TcpStream>> = (0..CONNECTIONS)
        .map(|i| {
            let mut c = httpd::connect(baton.port(), WAIT).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(httpd::get(&mut c, "/healthz", false).unwrap().status, 200, "connection {i}");
            c
        })
        .collect();
    let client_ports: BTreeSet<u16> = clients.iter().map(|c| c.get_ref().local_addr().unwrap().port()).collect();

    // Baton stops: the generation stores its idle connections with Baton,
    // which keeps them for the manager in a vault, then exits.
    baton.stop();
    let deadline = Instant::now() + WAIT;
    let mut vaults: Vec<(String, OwnedFd)> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    let mut entries = 0;
    while Instant::now() < deadline {
        let Some((text, mut fds)) = receive(&manager) else {
            if !vaults.is_empty() {
                break;
            }
            continue;
        };
        let name = text.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("").to_owned();
        if text.lines().any(|l| l == "FDSTORE=1") {
            entries += fds.len();
            if name.starts_with("vault/") {
                assert_eq!(fds.len(), 1, "a vault is one fd: {text}");
                vaults.push((name, fds.remove(0)));
            }
        } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            removed.push(name);
        }
    }
    vaults.retain(|(name, _)| !removed.contains(name));
    assert_eq!(vaults.len(), 1, "one vault left in the manager's store (removed: {removed:?})");
    assert!(entries < 10, "{entries} fds stored with the manager: connections went one by one");

    // Baton and its generation are gone; the connections live in the vault.
    let recovered = baton::vault::recover(&vaults[0].1).unwrap();
    assert_eq!(recovered.len(), CONNECTIONS, "every stored connection is in the vault");
    let mut peers = BTreeSet::new();
    for fd in recovered {
        let mut server = TcpStream::from(fd);
        peers.insert(server.peer_addr().unwrap().port());
        server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nvault").unwrap();
    }
    assert_eq!(peers, client_ports, "the vault holds exactly the clients' connections");
    for (i, c) in clients.iter_mut().enumerate() {
        c.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        let r = httpd::read_response(c).unwrap_or_else(|e| panic!("connection {i} was closed: {e}"));
        assert_eq!(r.body, b"vault", "connection {i}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
