//! What the supervisor is doing besides serving: its phase, one enum (kept
//! by the [`Core`](super::core::Core)), and the reply channels of the
//! callers waiting for an outcome (kept by the shell).
//!
//! ```text
//!   Steady ──restart/crash──► Restarting ──done──► Steady
//!     │  ▲                        │  └─failed, nothing serving─► BackingOff ──due──► Restarting
//!     │  └───────────────── (requests meanwhile: `queued`, served by the next one)
//!     └──stop (from any phase)──► Stopping ──all gone──► Ended
//!                           crash loop (from any phase) ──► Ended
//! ```
//!
//! A `baton upgrade` is not a phase: its probe runs beside whatever phase
//! there is (a restart may begin meanwhile, and the upgrade is then refused
//! as busy), and it executes only from `Steady`.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::oneshot;

use super::Ended;
use super::core::Token;
use crate::control::Response;

/// The reply channels of callers waiting for an outcome (`baton restart`,
/// `baton stop`), by the [`Token`] the core knows them by. Each is answered
/// once, when the core says so; those left when the run ends are dropped,
/// which their clients read as "stopping". Bounded by the control socket's
/// client limit: only a connected client waits.
#[derive(Default)]
pub(super) struct Waiters {
    next: u64,
    replies: HashMap<Token, oneshot::Sender<Response>>,
}

impl Waiters {
    /// A token for `reply`, if there is one.
    pub(super) fn register(&mut self, reply: Option<oneshot::Sender<Response>>) -> Option<Token> {
        let reply = reply?;
        let token = Token(self.next);
        self.next += 1;
        self.replies.insert(token, reply);
        Some(token)
    }

    /// Answers each of `tokens` with `response` (callers that hung up are
    /// skipped).
    pub(super) fn answer(&mut self, tokens: &[Token], response: &Response) {
        for token in tokens {
            if let Some(reply) = self.replies.remove(token) {
                let _ = reply.send(response.clone());
            }
        }
    }
}

/// Why a restart is happening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The first generation.
    Initial,
    /// `baton restart` or SIGHUP.
    Requested,
    /// The active generation died or asked to be replaced.
    Replace,
}

/// The restart under way.
pub(super) struct Restart {
    /// The generation it started.
    pub(super) generation: u64,
    pub(super) trigger: Trigger,
    /// Who gets its outcome.
    pub(super) waiters: Vec<Token>,
}

/// The supervisor's phase.
pub(super) enum Phase {
    /// Nothing under way.
    Steady,
    /// Nothing serves after a crash or a failed start: a replacement starts
    /// at `at` (the backoff).
    BackingOff { at: Instant },
    /// One generation is starting. `queued` is set when more restarts were
    /// requested meanwhile (with their callers): one more restart runs
    /// right after, so that changes made before those requests are picked
    /// up.
    Restarting { restart: Restart, queued: Option<Vec<Token>> },
    /// Every generation was asked to stop; `waiters` hear "stopped" once
    /// all are gone.
    Stopping { waiters: Vec<Token> },
    /// The run is over: [`Supervisor::run`](super::Supervisor::run)
    /// returns this at its next turn.
    Ended(Ended),
}

impl Phase {
    /// Whether Baton is stopping or stopped: nothing may be spawned.
    pub(super) fn is_stopping(&self) -> bool {
        matches!(self, Phase::Stopping { .. } | Phase::Ended(_))
    }

    /// How the run ended, once it has (the phase is then `Steady`: the
    /// run loop returns).
    pub(super) fn take_ended(&mut self) -> Option<Ended> {
        match std::mem::replace(self, Phase::Steady) {
            Phase::Ended(ended) => Some(ended),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Ends the restart under way (the phase becomes `Steady`): it, and the
    /// callers queued for the next one.
    pub(super) fn take_restart(&mut self) -> Option<(Restart, Option<Vec<Token>>)> {
        match std::mem::replace(self, Phase::Steady) {
            Phase::Restarting { restart, queued } => Some((restart, queued)),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The restart under way, if any.
    pub(super) fn restart(&self) -> Option<&Restart> {
        match self {
            Phase::Restarting { restart, .. } => Some(restart),
            _ => None,
        }
    }
}
