//! Property tests of the wire formats: what `encode` accepts, `parse` reads
//! back unchanged; `parse` survives any input; `ListenEnv` round-trips.

use baton_sd::wire::{self, ListenEnv, ListenOutcome, NOTIFY_BUFFER_MAX, NotifyState, WireError};
use proptest::prelude::*;

/// An owned description of a [`NotifyState`], so that strategies can produce
/// the strings the borrowed enum points into.
#[derive(Debug, Clone)]
enum Owned {
    Ready,
    Reloading,
    Stopping,
    Status(String),
    Errno(u32),
    BusError(String),
    MainPid(u32),
    Watchdog,
    WatchdogTrigger,
    WatchdogUsec(u64),
    ExtendTimeoutUsec(u64),
    MonotonicUsec(u64),
    FdStore,
    FdStoreRemove,
    FdName(String),
    FdPollDisable,
    Barrier,
    Other(String),
}

impl Owned {
    fn state(&self) -> NotifyState<'_> {
        match self {
            Owned::Ready => NotifyState::Ready,
            Owned::Reloading => NotifyState::Reloading,
            Owned::Stopping => NotifyState::Stopping,
            Owned::Status(s) => NotifyState::Status(s),
            Owned::Errno(e) => NotifyState::Errno(*e),
            Owned::BusError(s) => NotifyState::BusError(s),
            Owned::MainPid(p) => NotifyState::MainPid(*p),
            Owned::Watchdog => NotifyState::Watchdog,
            Owned::WatchdogTrigger => NotifyState::WatchdogTrigger,
            Owned::WatchdogUsec(u) => NotifyState::WatchdogUsec(*u),
            Owned::ExtendTimeoutUsec(u) => NotifyState::ExtendTimeoutUsec(*u),
            Owned::MonotonicUsec(u) => NotifyState::MonotonicUsec(*u),
            Owned::FdStore => NotifyState::FdStore,
            Owned::FdStoreRemove => NotifyState::FdStoreRemove,
            Owned::FdName(n) => NotifyState::FdName(n),
            Owned::FdPollDisable => NotifyState::FdPollDisable,
            Owned::Barrier => NotifyState::Barrier,
            Owned::Other(l) => NotifyState::Other(l),
        }
    }
}

/// One line of free text: anything but `\n`, `\r` and NUL.
fn line_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>().prop_filter("single line", |c| !matches!(c, '\n' | '\r' | '\0')), 0..=max)
        .prop_map(|cs| cs.into_iter().collect())
}

/// A name systemd's `fdname_is_valid()` accepts: printable ASCII but `:`,
/// at most 255 bytes.
fn fdname(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[ -9;-~]{{0,{max}}}")).unwrap()
}

fn owned_state() -> impl Strategy<Value = Owned> {
    prop_oneof![
        Just(Owned::Ready),
        Just(Owned::Reloading),
        Just(Owned::Stopping),
        line_text(200).prop_map(Owned::Status),
        (0..=wire::ERRNO_MAX).prop_map(Owned::Errno),
        line_text(100).prop_map(Owned::BusError),
        (1..=i32::MAX as u32).prop_map(Owned::MainPid),
        Just(Owned::Watchdog),
        Just(Owned::WatchdogTrigger),
        any::<u64>().prop_map(Owned::WatchdogUsec),
        any::<u64>().prop_map(Owned::ExtendTimeoutUsec),
        any::<u64>().prop_map(Owned::MonotonicUsec),
        Just(Owned::FdStore),
        Just(Owned::FdStoreRemove),
        fdname(255).prop_map(Owned::FdName),
        Just(Owned::FdPollDisable),
        Just(Owned::Barrier),
        ("X_[A-Z_]{1,20}", line_text(100)).prop_map(|(k, v)| Owned::Other(format!("{k}={v}"))),
    ]
}

/// The payload length `encode` would produce: one line per state.
fn wire_len(states: &[NotifyState<'_>]) -> usize {
    states.iter().map(|s| s.to_string().len() + 1).sum()
}

fn assert_round_trip(owned: &[Owned]) -> Result<(), TestCaseError> {
    let states: Vec<NotifyState<'_>> = owned.iter().map(Owned::state).collect();
    let expected_len = wire_len(&states);
    match wire::encode(&states) {
        Ok(payload) => {
            prop_assert!(expected_len <= NOTIFY_BUFFER_MAX, "{expected_len} bytes accepted");
            prop_assert_eq!(payload.len(), expected_len);
            let msg = wire::parse(payload.as_bytes()).expect("an encoded payload parses");
            prop_assert_eq!(&msg.fields, &states);
            prop_assert!(msg.invalid.is_empty(), "{:?}", msg.invalid);
        }
        Err(WireError::TooLarge { len }) => {
            prop_assert!(expected_len > NOTIFY_BUFFER_MAX, "{expected_len} bytes refused");
            prop_assert_eq!(len, expected_len);
        }
        Err(e) => prop_assert!(false, "valid states refused: {e}"),
    }
    Ok(())
}

/// Bytes that look like notify datagrams often enough to reach every branch
/// of `parse`: known keys with odd values, separators, NULs, non-UTF-8.
fn datagram_like() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just("READY"),
        Just("RELOADING"),
        Just("STOPPING"),
        Just("STATUS"),
        Just("ERRNO"),
        Just("BUSERROR"),
        Just("MAINPID"),
        Just("WATCHDOG"),
        Just("WATCHDOG_USEC"),
        Just("EXTEND_TIMEOUT_USEC"),
        Just("MONOTONIC_USEC"),
        Just("FDSTORE"),
        Just("FDSTOREREMOVE"),
        Just("FDNAME"),
        Just("FDPOLL"),
        Just("BARRIER"),
        Just("X_CUSTOM"),
        Just(""),
    ];
    let value = prop_oneof![
        Just(b"1".to_vec()),
        Just(b"0".to_vec()),
        Just(b"trigger".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"2147483648".to_vec()),
        "[0-9]{0,21}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    let sep = prop_oneof![Just(&b"\n"[..]), Just(&b"\r"[..]), Just(&b"\r\n"[..]), Just(&b"\n\n"[..]), Just(&b""[..])];
    let line = (key, any::<bool>(), value, sep).prop_map(|(k, eq, v, s)| {
        let mut l = k.as_bytes().to_vec();
        if eq {
            l.push(b'=');
        }
        l.extend_from_slice(&v);
        l.extend_from_slice(s);
        l
    });
    (proptest::collection::vec(line, 0..60), proptest::option::of(Just(0u8)))
        .prop_map(|(lines, nul)| lines.into_iter().flatten().chain(nul).collect())
}

/// `LISTEN_*` values that are sometimes valid.
fn env_value() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        ".{0,20}",
        "[0-9]{1,4}",
        "[0-9]{9,12}",
        "[-+ ]?[0-9]{1,3}",
        "[a-z:]{0,20}",
        Just(String::new()),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// (a) What `encode` accepts, `parse` reads back as the same fields; it
    /// refuses exactly the payloads over 4096 bytes.
    #[test]
    fn encode_then_parse_round_trips(owned in proptest::collection::vec(owned_state(), 0..40)) {
        assert_round_trip(&owned)?;
    }

    /// (a) The size limit, probed right at the boundary.
    #[test]
    fn encode_size_limit_is_exact(
        prefix in proptest::collection::vec(owned_state(), 0..3),
        fill in 4000usize..4200,
    ) {
        let mut owned = prefix;
        owned.push(Owned::Status("s".repeat(fill)));
        assert_round_trip(&owned)?;
    }

    /// (b) `parse` never panics and never yields a field holding a line
    /// separator or NUL.
    #[test]
    fn parse_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        check_parse(&bytes)?;
    }

    /// (b) Same, with inputs close to real datagrams.
    #[test]
    fn parse_datagram_like(bytes in datagram_like()) {
        check_parse(&bytes)?;
    }

    /// (c) A valid activation environment survives `to_vars` and `parse`.
    #[test]
    fn listen_env_round_trips(pid in 1..=i32::MAX as u32, names in proptest::collection::vec(fdname(40), 1..50)) {
        let env = ListenEnv { pid, names };
        let [(k0, p), (k1, n), (k2, names)] = env.to_vars().expect("valid names encode");
        prop_assert_eq!([k0, k1, k2], ListenEnv::VARS);
        let parsed = ListenEnv::parse(Some(&p), Some(&n), Some(&names), pid);
        prop_assert_eq!(parsed, Ok(ListenOutcome::Activated(env)));
    }

    /// (c) Any strings in the three variables: no panic, and whatever is
    /// accepted is consistent with the input.
    #[test]
    fn listen_env_parse_any(
        pid in env_value(),
        fds in env_value(),
        names in env_value(),
        own_pid in prop_oneof![any::<u32>(), 1..10u32],
        use_listen_pid in any::<bool>(),
    ) {
        let parsed_pid = pid.as_deref().and_then(|p| p.parse::<u32>().ok());
        let own_pid = match (use_listen_pid, parsed_pid) {
            (true, Some(p)) => p,
            _ => own_pid,
        };
        // Without LISTEN_FDNAMES the result holds one name per promised fd;
        // keep that allocation small (see ListenEnv::parse's docs).
        let promised = fds.as_deref().and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        if names.is_none() && promised > 100_000 {
            return Ok(());
        }
        match ListenEnv::parse(pid.as_deref(), fds.as_deref(), names.as_deref(), own_pid) {
            Ok(ListenOutcome::Activated(env)) => {
                prop_assert_eq!(env.pid, own_pid);
                prop_assert_eq!(Some(env.count() as u64), fds.as_deref().and_then(|f| f.parse().ok()));
                match &names {
                    Some(list) => prop_assert_eq!(&env.names.join(":"), list),
                    None => prop_assert!(env.names.iter().all(|n| n == "unknown")),
                }
            }
            Ok(ListenOutcome::OtherPid { listen_pid, own_pid: own }) => {
                prop_assert_eq!(own, own_pid);
                prop_assert_ne!(listen_pid, own_pid);
            }
            Ok(ListenOutcome::OtherProcess { .. }) => prop_assert!(false, "no LISTEN_PIDFDID was given"),
            Ok(ListenOutcome::NotActivated) => prop_assert!(pid.is_none() || fds.is_none()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// (c) `LISTEN_PIDFDID` next to a matching `LISTEN_PID`: the fds are
    /// ours exactly when the id is ours or our id is unknown (no pidfs),
    /// another id is another process, and an id that is no u64 is an error
    /// naming the variable.
    #[test]
    fn listen_pidfd_id_decides_next_to_listen_pid(
        pid in 1..=i32::MAX as u32,
        listen_id in prop_oneof![any::<u64>().prop_map(|i| i.to_string()), env_value().prop_map(Option::unwrap_or_default)],
        own_id in proptest::option::of(any::<u64>()),
        same in any::<bool>(),
    ) {
        // Half the time the id given is our own.
        let listen_id = match (same, own_id) {
            (true, Some(own)) => own.to_string(),
            _ => listen_id,
        };
        let parsed = listen_id.parse::<u64>().ok().filter(|_| listen_id.bytes().all(|b| b.is_ascii_digit()));
        let got = ListenEnv::parse_with_pidfd_id(Some(&pid.to_string()), Some(&listen_id), Some("1"), Some("x"), pid, own_id);
        match (parsed, own_id) {
            (None, _) => {
                let e = got.expect_err("an unparsable LISTEN_PIDFDID is an error");
                prop_assert!(e.to_string().contains("LISTEN_PIDFDID="), "{}", e);
            }
            (Some(_), None) => prop_assert!(matches!(got, Ok(ListenOutcome::Activated(_)))),
            (Some(l), Some(o)) if l == o => prop_assert!(matches!(got, Ok(ListenOutcome::Activated(_)))),
            (Some(l), Some(o)) => prop_assert_eq!(got, Ok(ListenOutcome::OtherProcess { listen_pidfd_id: l, own_pidfd_id: o })),
        }
        // Another pid is decided before LISTEN_PIDFDID is even read.
        let own_pid = if pid == 1 { 2 } else { pid - 1 };
        let other = ListenEnv::parse_with_pidfd_id(Some(&pid.to_string()), Some(&listen_id), Some("1"), None, own_pid, own_id);
        prop_assert_eq!(other, Ok(ListenOutcome::OtherPid { listen_pid: pid, own_pid }));
    }

    /// (d) A STATUS= with a line break is always refused, wherever it sits.
    #[test]
    fn status_with_newline_is_refused(
        before in proptest::collection::vec(owned_state(), 0..5),
        after in proptest::collection::vec(owned_state(), 0..5),
        head in line_text(50),
        brk in prop_oneof![Just("\n"), Just("\r"), Just("\r\n")],
        tail in line_text(50),
        huge in any::<bool>(),
    ) {
        let status = format!("{head}{brk}{tail}{}", if huge { "x".repeat(5000) } else { String::new() });
        let mut owned = before;
        owned.push(Owned::Status(status));
        owned.extend(after);
        let states: Vec<NotifyState<'_>> = owned.iter().map(Owned::state).collect();
        match wire::encode(&states) {
            Err(WireError::NewlineInValue { key }) => prop_assert_eq!(key, "STATUS"),
            other => prop_assert!(false, "not refused for the newline: {other:?}"),
        }
    }
}

fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
    match wire::parse(bytes) {
        Ok(msg) => {
            prop_assert!(bytes.len() <= NOTIFY_BUFFER_MAX);
            for field in &msg.fields {
                let text = field.to_string();
                prop_assert!(!text.contains(['\n', '\r', '\0']), "{text:?}");
            }
            for bad in &msg.invalid {
                prop_assert!(!bad.line.contains(['\n', '\r', '\0']), "{:?}", bad.line);
            }
        }
        Err(WireError::TooLarge { len }) => {
            prop_assert!(len > NOTIFY_BUFFER_MAX);
            prop_assert_eq!(len, bytes.len());
        }
        Err(WireError::Nul) => {
            let body = bytes.strip_suffix(b"\0").unwrap_or(bytes);
            prop_assert!(body.contains(&0));
        }
        Err(e) => prop_assert!(false, "unexpected parse error {e}"),
    }
    Ok(())
}
