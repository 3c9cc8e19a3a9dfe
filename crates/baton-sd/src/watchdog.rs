//! The service watchdog: `WatchdogSec=` asks for periodic `WATCHDOG=1`.

use std::time::Duration;

use crate::wire::{EnvError, parse_decimal};

/// Reads `WATCHDOG_USEC` and `WATCHDOG_PID` like `sd_watchdog_enabled(3)`:
/// `Ok(None)` when no watchdog is configured or it is meant for another
/// process; otherwise the timeout within which a `WATCHDOG=1` must arrive.
pub fn watchdog_timeout() -> Result<Option<Duration>, EnvError> {
    let invalid = |var: &'static str, value: String, expected| EnvError::InvalidVar { var, value, expected };
    let Some(usec) = std::env::var_os("WATCHDOG_USEC") else { return Ok(None) };
    let usec = usec.to_string_lossy().into_owned();
    let usec = parse_decimal(&usec)
        .filter(|u| *u > 0)
        .ok_or_else(|| invalid("WATCHDOG_USEC", usec, "a positive number of microseconds"))?;
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        let pid = pid.to_string_lossy().into_owned();
        let p = parse_decimal(&pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid("WATCHDOG_PID", pid, "a positive decimal pid"))?;
        if p != u64::from(std::process::id()) {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(usec)))
}

/// Spawns a task that sends `WATCHDOG=1` every half `timeout`, as
/// `sd_watchdog_enabled(3)` recommends. It proves only that the runtime still
/// schedules tasks; ping from your own health loop instead if a wedged
/// request handler should count as a failure.
///
/// The task ends (with the error) only if sending fails.
#[cfg(feature = "tokio")]
pub fn spawn_watchdog(
    notifier: std::sync::Arc<crate::Notifier>,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<(), crate::NotifyError>> {
    let period = (timeout / 2).max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        // After a stall, ping once, not a burst of catch-up pings.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notifier.notify(&[crate::NotifyState::Watchdog])?;
        }
    })
}
