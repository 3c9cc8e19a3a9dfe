//! Parses arbitrary bytes as a notify datagram. Whatever parses must never
//! panic any accessor, hold no line separator or NUL in a field, and — for
//! every field a sender may send — survive `encode` and `parse` unchanged.
#![no_main]

use baton_sd::wire::{self, NOTIFY_BUFFER_MAX, NotifyState, WireError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = wire::parse(data) else { return };
    assert!(data.len() <= NOTIFY_BUFFER_MAX);
    let _ = (msg.lifecycle(), msg.status(), msg.fdname(), msg.barrier());
    for field in &msg.fields {
        assert!(!field.to_string().contains(['\n', '\r', '\0']), "{field:?}");
    }
    for bad in &msg.invalid {
        assert!(!bad.line.contains(['\n', '\r', '\0']), "{bad:?}");
    }

    // `parse` keeps every well-formed line; `encode` refuses one kind of
    // them on purpose: a line that is not KEY=VALUE (no '=', or an empty
    // key), which systemd ignores. Everything else must be sendable.
    let mut sendable = Vec::with_capacity(msg.fields.len());
    for field in &msg.fields {
        match wire::encode(std::slice::from_ref(field)) {
            Ok(_) => sendable.push(field.clone()),
            Err(WireError::NotAnAssignment { .. }) => {
                let NotifyState::Other(line) = field else { panic!("{field:?} refused as not an assignment") };
                assert!(line.split_once('=').is_none_or(|(key, _)| key.is_empty()), "{line:?}");
            }
            Err(e) => panic!("{field:?} was parsed but cannot be sent: {e}"),
        }
    }
    match wire::encode(&sendable) {
        Ok(payload) => {
            let again = wire::parse(payload.as_bytes()).expect("an encoded payload parses");
            assert_eq!(again.fields, sendable);
            assert!(again.invalid.is_empty(), "{:?}", again.invalid);
            // Encoding is canonical: a second round changes nothing.
            assert_eq!(wire::encode(&again.fields).as_deref(), Ok(payload.as_str()));
        }
        // Every line gains a '\n', so a datagram whose last line had none
        // can grow by one byte, past the limit.
        Err(WireError::TooLarge { len }) => assert!(len <= data.len() + 1, "{len} > {} + 1", data.len()),
        Err(e) => panic!("sendable fields refused together: {e}"),
    }
});
