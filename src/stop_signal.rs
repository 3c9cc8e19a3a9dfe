//! Whether a stop signal (`SIGTERM`, `SIGINT`) has reached Baton, known the
//! moment its handler runs.
//!
//! tokio's signal streams only report a signal after the runtime's driver
//! has read its self-pipe, which happens on the driver's next turn. A notify
//! datagram received in between — typically a generation's own `STOPPING=1`
//! under `KillMode=control-group`, where systemd's SIGTERM reaches Baton and
//! the generations at once — would be handled as if no stop had begun, and
//! Baton would spawn a replacement only to stop it again. A second action in
//! the same handler chain (`signal-hook-registry`, which tokio itself
//! registers through) sets a flag that the supervisor consults before it
//! spawns anything.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static ARRIVED: AtomicBool = AtomicBool::new(false);
static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Adds the flag-setting action for `SIGTERM` and `SIGINT` (once per
/// process; later calls return the first outcome). Call it before tokio's
/// handlers are installed, so a signal left pending by `baton upgrade`
/// cannot slip past it.
pub fn watch() -> io::Result<()> {
    let outcome = REGISTERED.get_or_init(|| {
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the action only stores to an atomic, which is
            // async-signal-safe; it never panics or allocates.
            let registered =
                unsafe { signal_hook_registry::register(signal, || ARRIVED.store(true, Ordering::SeqCst)) };
            registered.map_err(|e| format!("installing the stop signal flag for signal {signal}: {e}"))?;
        }
        Ok(())
    });
    outcome.clone().map_err(io::Error::other)
}

/// Whether SIGTERM or SIGINT has arrived since [`watch`] (possibly not yet
/// seen through tokio's stream).
pub fn arrived() -> bool {
    ARRIVED.load(Ordering::SeqCst)
}
