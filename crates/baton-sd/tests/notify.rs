//! `Notifier` against real notify sockets: a bound `AF_UNIX` datagram socket
//! with `SO_PASSCRED`, at a filesystem path and at an abstract name, read
//! with `recvmsg`.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::sync::mpsc;
use std::time::Duration;

use baton_sd::notify::NotifyError;
use baton_sd::wire::{self, NotifyState, WireError};
use baton_sd::{FdPoll, Notifier, StoredName};
use common::{Receiver, own_pid};

fn memfd(content: &[u8]) -> File {
    let fd = rustix::fs::memfd_create("baton-sd-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    let file = File::from(fd);
    file.write_all_at(content, 0).expect("write memfd");
    file
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (a, b) = (rustix::fs::fstat(a).expect("fstat"), rustix::fs::fstat(b).expect("fstat"));
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

#[test]
fn ready_and_status_arrive_verbatim_with_our_credentials() {
    for rx in Receiver::both("ready") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        assert_eq!(n.address(), rx.addr);
        n.notify(&[NotifyState::Ready, NotifyState::Status("serving on 127.0.0.1:8080")]).expect("notify");
        let d = rx.recv();
        assert_eq!(d.text(), "READY=1\nSTATUS=serving on 127.0.0.1:8080\n", "{}", rx.addr);
        assert_eq!(d.pid, Some(own_pid()), "SCM_CREDENTIALS pid on {}", rx.addr);
        assert!(d.fds.is_empty());
        rx.assert_empty();
    }
}

#[test]
fn every_assignment_is_sent_as_encoded_and_parses_back() {
    let states = [
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now(),
        NotifyState::Stopping,
        NotifyState::Errno(4095),
        NotifyState::BusError("org.freedesktop.DBus.Error.Failed"),
        NotifyState::MainPid(std::process::id()),
        NotifyState::Watchdog,
        NotifyState::WatchdogTrigger,
        NotifyState::WatchdogUsec(0),
        NotifyState::ExtendTimeoutUsec(u64::MAX),
        NotifyState::Other("X_BATON_GENERATION=7"),
    ];
    for rx in Receiver::both("every") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        n.notify(&states).expect("notify");
        let d = rx.recv();
        assert_eq!(d.text(), wire::encode(&states).unwrap());
        let msg = wire::parse(&d.payload).expect("parse");
        assert_eq!(msg.fields, states);
        assert!(msg.invalid.is_empty());
        // Each notify is one datagram, even when they follow each other.
        n.notify(&[NotifyState::Watchdog]).unwrap();
        n.notify(&[NotifyState::Ready]).unwrap();
        assert_eq!(rx.recv().text(), "WATCHDOG=1\n");
        assert_eq!(rx.recv().text(), "READY=1\n");
        rx.assert_empty();
    }
}

#[test]
fn a_memfd_sent_with_a_message_arrives_as_the_same_file() {
    for rx in Receiver::both("memfd") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        let state = memfd(b"generation 1");
        n.notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName("state")], &[state.as_fd()]).expect("send");
        let d = rx.recv();
        assert_eq!(d.text(), "FDSTORE=1\nFDNAME=state\n");
        assert_eq!(d.pid, Some(own_pid()));
        assert_eq!(d.fds.len(), 1);
        assert!(same_file(d.fds[0].as_fd(), state.as_fd()));
        // Writes through either fd are seen through the other: one file.
        let received = File::from(d.fds.into_iter().next().unwrap());
        let mut buf = [0u8; 12];
        received.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"generation 1");
        received.write_all_at(b"2", 11).unwrap();
        state.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"generation 2");
        assert_eq!(received.metadata().unwrap().ino(), state.metadata().unwrap().ino());
        // We keep our own copy.
        assert!(common::is_cloexec(state.as_fd()));
    }
}

#[test]
fn several_fds_arrive_in_order_and_253_is_the_limit() {
    let rx = Receiver::abstract_name("fds");
    let n = Notifier::new(&rx.addr).expect("notifier");
    let files: Vec<File> = (0..3).map(|i| memfd(format!("file {i}").as_bytes())).collect();
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
    n.store_fds("trio", &fds, FdPoll::Poll).expect("send 3 fds");
    let d = rx.recv();
    assert_eq!(d.fds.len(), 3);
    for (got, sent) in d.fds.iter().zip(&files) {
        assert!(same_file(got.as_fd(), sent.as_fd()));
    }

    // The kernel's SCM_MAX_FD: 253 fds pass in one message...
    let one = &files[0];
    let many = vec![one.as_fd(); wire::SCM_MAX_FD];
    n.notify_with_fds(&[NotifyState::FdStore], &many).expect("253 fds");
    let d = rx.recv();
    assert_eq!(d.fds.len(), wire::SCM_MAX_FD);
    assert!(d.fds.iter().all(|fd| same_file(fd.as_fd(), one.as_fd())));
    drop(d);
    // ...254 are refused before anything is sent.
    let too_many = vec![one.as_fd(); wire::SCM_MAX_FD + 1];
    let err = n.notify_with_fds(&[NotifyState::FdStore], &too_many).unwrap_err();
    assert!(matches!(err, NotifyError::TooManyFds { count: 254 }), "{err}");
    rx.assert_empty();
}

#[test]
fn store_and_remove_send_exact_datagrams() {
    for rx in Receiver::both("store") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        let f = memfd(b"x");

        n.store_fds("x", &[f.as_fd()], FdPoll::Poll).unwrap();
        let d = rx.recv();
        assert_eq!(d.text(), "FDSTORE=1\nFDNAME=x\n");
        assert_eq!(d.fds.len(), 1);

        n.store_fds("x", &[f.as_fd()], FdPoll::NoPoll).unwrap();
        let d = rx.recv();
        assert_eq!(d.text(), "FDSTORE=1\nFDNAME=x\nFDPOLL=0\n");
        assert_eq!(d.fds.len(), 1);

        n.remove_fds("x").unwrap();
        let d = rx.recv();
        assert_eq!(d.text(), "FDSTOREREMOVE=1\nFDNAME=x\n");
        assert!(d.fds.is_empty());

        let conn = StoredName::Connection.to_fdname().unwrap();
        n.store_fds(&conn, &[f.as_fd()], FdPoll::default()).unwrap();
        let d = rx.recv();
        assert_eq!(d.text(), "FDSTORE=1\nFDNAME=conn\n");
        let msg = wire::parse(&d.payload).unwrap();
        assert_eq!(msg.fdname().map(StoredName::parse), Some(StoredName::Connection));
        rx.assert_empty();
    }
}

#[test]
fn refused_messages_send_nothing() {
    for rx in Receiver::both("refuse") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        let f = memfd(b"x");
        let fd = [f.as_fd()];

        let err = n.notify(&[NotifyState::Ready, NotifyState::Status("one\nREADY=1")]).unwrap_err();
        assert!(matches!(&err, NotifyError::Wire(WireError::NewlineInValue { key }) if key == "STATUS"), "{err}");
        rx.assert_empty();
        let err = n.notify(&[NotifyState::Status("one\rtwo")]).unwrap_err();
        assert!(matches!(err, NotifyError::Wire(WireError::NewlineInValue { .. })), "{err}");
        rx.assert_empty();
        let err = n.notify(&[NotifyState::Status("nul\0")]).unwrap_err();
        assert!(matches!(err, NotifyError::Wire(WireError::Nul)), "{err}");
        rx.assert_empty();

        // More than 4096 bytes: refused; exactly 4096: sent whole (systemd
        // receives into 4096 + 1 bytes and drops only longer messages).
        let long = "x".repeat(wire::NOTIFY_BUFFER_MAX + 1 - "STATUS=\n".len());
        let err = n.notify(&[NotifyState::Status(&long)]).unwrap_err();
        assert!(matches!(err, NotifyError::Wire(WireError::TooLarge { len: 4097 })), "{err}");
        rx.assert_empty();
        n.notify(&[NotifyState::Status(&long[1..])]).expect("4096 bytes");
        assert_eq!(rx.recv().payload.len(), wire::NOTIFY_BUFFER_MAX);

        for bad in ["a:b", "tab\there", "é", &"n".repeat(256)] {
            let err = n.store_fds(bad, &fd, FdPoll::Poll).unwrap_err();
            assert!(matches!(err, NotifyError::Wire(WireError::FdName(_))), "{bad:?}: {err}");
            let err = n.remove_fds(bad).unwrap_err();
            assert!(matches!(err, NotifyError::Wire(WireError::FdName(_))), "{bad:?}: {err}");
        }
        rx.assert_empty();

        for bad in [NotifyState::Errno(4096), NotifyState::MainPid(0), NotifyState::Other("NO_EQUALS_SIGN")] {
            let err = n.notify_with_fds(std::slice::from_ref(&bad), &fd).unwrap_err();
            assert!(matches!(err, NotifyError::Wire(_)), "{bad:?}: {err}");
        }
        rx.assert_empty();
    }
}

/// Receives one `BARRIER=1` datagram as a service manager would: exactly one
/// fd, nothing else in the message. Returns the fd.
fn expect_barrier(rx: &Receiver) -> OwnedFd {
    let d = rx.recv();
    assert_eq!(d.text(), "BARRIER=1\n");
    assert_eq!(wire::parse(&d.payload).unwrap().barrier(), wire::BarrierUse::Valid);
    assert_eq!(d.pid, Some(own_pid()));
    assert_eq!(d.fds.len(), 1, "BARRIER=1 carries exactly one fd");
    d.fds.into_iter().next().unwrap()
}

#[test]
fn barrier_returns_once_the_receiver_closes_the_fd() {
    for rx in Receiver::both("barrier") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        n.notify(&[NotifyState::Ready]).unwrap();
        std::thread::scope(|s| {
            let manager = s.spawn(|| {
                // Everything sent before the barrier is read before it.
                assert_eq!(rx.recv().text(), "READY=1\n");
                drop(expect_barrier(&rx));
            });
            n.barrier(common::PATIENCE).expect("barrier acknowledged");
            manager.join().unwrap();
        });
        rx.assert_empty();
    }
}

#[test]
fn barrier_times_out_while_the_receiver_holds_the_fd() {
    let rx = Receiver::path("barrier-hold");
    let n = Notifier::new(&rx.addr).expect("notifier");
    let (release, released) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let rx = &rx;
        let manager = s.spawn(move || {
            let fd = expect_barrier(rx);
            // Hold the fd until the barrier has given up.
            let _ = released.recv();
            drop(fd);
        });
        let timeout = Duration::from_millis(200);
        let err = n.barrier(timeout).unwrap_err();
        match &err {
            NotifyError::BarrierTimeout { socket, timeout: t } => {
                assert_eq!(socket, &rx.addr);
                assert_eq!(*t, timeout);
            }
            other => panic!("expected BarrierTimeout, got {other}"),
        }
        assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        release.send(()).unwrap();
        manager.join().unwrap();
    });
}

#[test]
fn barrier_to_a_missing_socket_fails_without_waiting() {
    let dir = common::TempDir::new("barrier-missing");
    let addr = dir.path().join("nobody-here");
    let n = Notifier::new(addr.to_str().unwrap()).expect("notifier");
    let err = n.barrier(common::PATIENCE).unwrap_err();
    assert!(matches!(err, NotifyError::Io { .. }), "{err}");
    let err = n.notify(&[NotifyState::Ready]).unwrap_err();
    assert!(matches!(err, NotifyError::Io { .. }), "{err}");
    assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn barrier_async_returns_once_the_receiver_closes_the_fd() {
    for rx in Receiver::both("barrier-async") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        let rx = std::sync::Arc::new(rx);
        let manager = std::thread::spawn({
            let rx = std::sync::Arc::clone(&rx);
            move || drop(expect_barrier(&rx))
        });
        n.barrier_async(common::PATIENCE).await.expect("barrier acknowledged");
        manager.join().unwrap();
    }
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn barrier_async_times_out_while_the_receiver_holds_the_fd() {
    let rx = std::sync::Arc::new(Receiver::abstract_name("barrier-async-hold"));
    let n = Notifier::new(&rx.addr).expect("notifier");
    let (release, released) = mpsc::channel::<()>();
    let manager = std::thread::spawn({
        let rx = std::sync::Arc::clone(&rx);
        move || {
            let fd = expect_barrier(&rx);
            let _ = released.recv();
            drop(fd);
        }
    });
    let err = n.barrier_async(Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, NotifyError::BarrierTimeout { .. }), "{err}");
    release.send(()).unwrap();
    manager.join().unwrap();
}

#[test]
fn bad_addresses_are_refused_naming_notify_socket() {
    let long_path = format!("/{}", "p".repeat(120));
    let long_abstract = format!("@{}", "a".repeat(120));
    for bad in ["relative/sock", "sock", "", "vsock:1:2", "vsock-mux:/x", &long_path, &long_abstract] {
        let err = Notifier::new(bad).unwrap_err();
        match &err {
            NotifyError::InvalidSocket { value, .. } => assert_eq!(value, bad),
            other => panic!("{bad:?}: expected InvalidSocket, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("NOTIFY_SOCKET"), "{msg}");
    }
    // The longest names that fit are accepted.
    assert!(Notifier::new(&format!("@{}", "a".repeat(107))).is_ok());
    assert!(Notifier::new(&format!("/{}", "p".repeat(106))).is_ok());
}

#[test]
fn main_pid_goes_with_its_pidfd() {
    for rx in Receiver::both("mainpid") {
        let n = Notifier::new(&rx.addr).expect("notifier");
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        n.notify_main_pid(child.id(), &[NotifyState::Ready]).expect("notify_main_pid");
        let d = rx.recv();
        assert_eq!(d.text(), format!("MAINPID={}\nMAINPIDFD=1\nREADY=1\n", child.id()));
        assert_eq!(d.fds.len(), 1, "exactly one fd: the pidfd");
        // The kernel names the pidfd's process in its fdinfo.
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&d.fds[0])))
            .expect("fdinfo");
        assert!(info.lines().any(|l| l == format!("Pid:\t{}", child.id())), "{info}");
        child.kill().unwrap();
        child.wait().unwrap();
        rx.assert_empty();
    }
    let n = Notifier::new("/nonexistent/notify").expect("notifier");
    let err = n.notify_main_pid(i32::MAX as u32, &[]).unwrap_err();
    assert!(matches!(err, NotifyError::MainPid { .. }), "{err}");
    assert!(err.to_string().contains("is it running?"), "{err}");
}
