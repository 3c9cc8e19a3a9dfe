//! Feeds arbitrary strings to `ListenEnv::parse_with_pidfd_id` as
//! `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PIDFDID`. It
//! must never panic, and whatever it accepts must round-trip through
//! `to_vars`.
//!
//! Input layout: the first byte's bits 0–2 say which of the first three
//! variables are set, bit 3 makes our own pid equal to `LISTEN_PID` (to
//! reach the activated branch), bit 4 sets `LISTEN_PIDFDID`, bit 5 gives
//! us a pidfd id (equal to `LISTEN_PIDFDID` when bit 6 is set too, else
//! 4243; without bit 5 the kernel "has no pidfs"); the rest is split on NUL
//! bytes into the four values.
#![no_main]

use baton_sd::wire::{self, ListenEnv, ListenOutcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    // Environment variables are C strings; ListenFds::from_env refuses
    // non-UTF-8 before parsing, so parse only ever sees UTF-8.
    let Ok(rest) = std::str::from_utf8(rest) else { return };
    let mut parts = rest.splitn(4, '\0');
    let mut next = |bit: u8| {
        let part = parts.next().unwrap_or("");
        (flags & (1 << bit) != 0).then_some(part)
    };
    let (pid, fds, names, pidfd_id) = (next(0), next(1), next(2), next(4));
    let own_pidfd_id = match pidfd_id.and_then(|i| i.parse().ok()) {
        Some(i) if flags & 0x60 == 0x60 => Some(i),
        _ if flags & 0x20 != 0 => Some(4243),
        _ => None,
    };
    let own_pid = match pid.and_then(|p| p.parse().ok()) {
        Some(p) if flags & 8 != 0 => p,
        _ => 4242,
    };
    // Without LISTEN_FDNAMES, parse returns one "unknown" per promised fd,
    // up to INT_MAX - 3 of them: that memory is the documented cost of the
    // API (ListenFds::from_env checks the fds are open first). Keep it small.
    let promised = fds.and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    if names.is_none() && promised > 4096 {
        return;
    }

    let outcome = ListenEnv::parse_with_pidfd_id(pid, pidfd_id, fds, names, own_pid, own_pidfd_id);
    if let Ok(ListenOutcome::OtherProcess { listen_pidfd_id, own_pidfd_id: own }) = outcome {
        assert_eq!(Some(own), own_pidfd_id);
        assert_ne!(listen_pidfd_id, own);
        return;
    }
    let Ok(ListenOutcome::Activated(env)) = outcome else { return };
    assert_eq!(env.pid, own_pid);
    assert_eq!(Some(env.count() as u64), fds.and_then(|f| f.parse().ok()));
    match names {
        Some(list) => assert_eq!(env.names.join(":"), list),
        None => assert!(env.names.iter().all(|n| n == "unknown")),
    }
    match env.to_vars() {
        Ok([(_, p), (_, n), (_, l)]) => {
            let again = ListenEnv::parse(Some(&p), Some(&n), Some(&l), own_pid);
            assert_eq!(again, Ok(ListenOutcome::Activated(env)));
        }
        // parse takes names as given; to_vars refuses what it could not
        // have produced, which must be an invalid name.
        Err(e) => assert!(env.names.iter().any(|n| wire::validate_fdname(n).is_err()), "{e}"),
    }
});
