//! One worker = one client connection slot: it paces itself, sends, and
//! records every outcome in the shared [`Shared`] accounting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::http::{Conn, Failure, IdleState};
use super::{Mode, Shared};

/// Pause after a failed attempt in closed-loop mode that took less than
/// this, so a refused port is not hammered in a busy loop.
const MIN_FAILURE_PAUSE: Duration = Duration::from_millis(1);

/// What every worker needs, shared.
pub(super) struct Plan {
    pub addr: SocketAddr,
    /// The complete request bytes.
    pub request: Vec<u8>,
    /// Keep connections across requests (KeepAlive, Idle).
    pub reuse: bool,
    /// Time between this worker's sends (None = closed loop).
    pub interval: Option<Duration>,
    /// Spacing between workers' first sends, so paced workers do not fire
    /// in lockstep.
    pub stagger: Duration,
    pub request_timeout: Duration,
    /// When the load started (schedules count from it).
    pub started: Instant,
}

impl Plan {
    pub fn new(config: &super::LoadConfig, started: Instant) -> Plan {
        let host = config.addr;
        let close = if matches!(config.mode, Mode::NewConnection) { "Connection: close\r\n" } else { "" };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-testbed-load\r\nAccept: */*\r\n{close}\r\n",
            config.path
        )
        .into_bytes();
        let n = config.connections.max(1) as u32;
        let interval = match (&config.mode, config.rate) {
            (Mode::Idle { interval }, _) => Some(*interval),
            (_, Some(rate)) => Some(Duration::from_secs_f64(f64::from(n) / f64::from(rate.max(1)))),
            (_, None) => None,
        };
        Plan {
            addr: config.addr,
            request,
            reuse: !matches!(config.mode, Mode::NewConnection),
            interval,
            stagger: interval.map(|i| i / n).unwrap_or_default(),
            request_timeout: config.request_timeout,
            started,
        }
    }
}

/// Runs worker `index` until the request budget is spent; the load's main
/// task aborts it at stop or at `max_duration` (an in-flight request is then
/// not counted).
pub(super) async fn run(plan: Arc<Plan>, shared: Arc<Shared>, index: u32) {
    let mut conn: Option<Conn> = None;
    let mut next_slot = plan.interval.map(|_| plan.started + plan.stagger * index);
    loop {
        // 1. Wait for this worker's slot (paced) - watching the idle
        //    connection, so a close by the server is seen when it happens.
        let at = match (next_slot, plan.interval) {
            (Some(slot), Some(interval)) => {
                let free_at = Instant::now();
                wait_until(slot, &mut conn, &shared).await;
                let now = Instant::now();
                // Late (the previous request overran its slot): send now,
                // measured from the missed slot so the stall shows in the
                // latency, but schedule the next one from now instead of
                // bursting to catch up.
                next_slot = Some(slot.max(now) + interval);
                // On time (the worker was idle at its slot): measured from
                // the actual send, because the timer wakes up to a
                // millisecond late and that is the generator's delay, not
                // the server's.
                if free_at > slot { slot } else { now }
            }
            _ => Instant::now(),
        };
        if !shared.claim() {
            return;
        }
        // 2. A pooled connection the server closed since its last response
        //    is dropped before use: nothing was sent on it, so no failure.
        if let Some(c) = &conn
            && c.idle_state() == IdleState::Closed
        {
            shared.server_closed_connection();
            conn = None;
        }
        // 3. Send and read, all within request_timeout.
        let reused = conn.is_some();
        let send_start = Instant::now();
        let result = match tokio::time::timeout_at(send_start + plan.request_timeout, exchange(&plan, &mut conn)).await
        {
            Ok(r) => r,
            Err(_) => Err(Failure::timeout()),
        };
        let done = Instant::now();
        let latency = done.saturating_duration_since(at);
        match result {
            Ok(response) => {
                if !plan.reuse || response.close {
                    conn = None;
                }
                shared.record_ok(at.into_std(), latency, response);
            }
            Err(failure) => {
                // A failed connection is in an unknown state: never reuse it.
                conn = None;
                if reused && failure.nothing_received {
                    shared.server_closed_connection();
                }
                shared.record_failure(at.into_std(), latency, failure);
                if plan.interval.is_none() && done < send_start + MIN_FAILURE_PAUSE {
                    tokio::time::sleep_until(send_start + MIN_FAILURE_PAUSE).await;
                }
            }
        }
    }
}

/// Connects if needed, then one request/response.
async fn exchange(plan: &Plan, conn: &mut Option<Conn>) -> Result<super::http::Response, Failure> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::connect(plan.addr).await?),
    };
    c.request(&plan.request).await
}

/// Sleeps until `slot`; meanwhile, if the server closes the pooled
/// connection, counts it and drops it (a new one is opened at send time).
async fn wait_until(slot: Instant, conn: &mut Option<Conn>, shared: &Shared) {
    if let Some(c) = conn {
        tokio::select! {
            () = tokio::time::sleep_until(slot) => return,
            () = c.closed() => {}
        }
        shared.server_closed_connection();
        *conn = None;
    }
    tokio::time::sleep_until(slot).await;
}
