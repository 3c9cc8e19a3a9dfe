//! The edge where the core's typed decisions become text: log lines
//! ([`Event`]), upstream notifications ([`Upstream`]) and control answers
//! ([`Outcome`]), with what only the shell knows (main pids, output, where
//! inherited output went). The words are exactly Baton's of old: scripts
//! parse them.

use super::core::{Event, Outcome, Upstream};
use super::*;

impl Supervisor {
    pub(super) fn render_event(&mut self, event: Event) {
        match event {
            Event::Draining { generation } => {
                let pid = self.main_pid(generation);
                tracing::info!(event = "draining", generation, pid, "generation {generation} draining");
            }
            Event::DrainLimit { generation } => {
                tracing::warn!(event = "drain-limit", generation, "too many draining generations; killing {generation}")
            }
            Event::ForcedKill { generation } => tracing::warn!(
                event = "forced-kill",
                generation,
                "generation {generation} still running at the stop deadline; SIGKILL"
            ),
            Event::Watchdog { generation, cause } => {
                let failure = Failure::Watchdog { generation, cause };
                let pid = self.main_pid(generation);
                tracing::error!(event = "watchdog", generation, pid, "{failure}");
                self.last_failure = Some(failure);
            }
            Event::ExitedStarting { generation, pid, why } => {
                tracing::warn!(event = "exited", generation, pid, "generation {generation} {why}");
            }
            Event::Crashed { generation, pid, exit } => {
                tracing::error!(event = "crashed", generation, pid, "generation {generation} {exit} while serving");
                let hint = self.hint_for(generation);
                self.last_failure = Some(Failure::CrashedWhileServing { generation, exit, hint });
            }
            Event::Retired { generation, pid, exit } => {
                tracing::info!(event = "retired", generation, pid, "generation {generation} {exit}");
            }
            Event::Reaped { pid, exit } => tracing::debug!(event = "reaped", pid, "reaped pid {pid} ({exit})"),
            Event::HealthCheckPassed { generation } => {
                tracing::info!(event = "health-ok", generation, "health check passed");
            }
            Event::Ready { generation, ready_ms } => {
                let pid = self.main_pid(generation);
                tracing::info!(
                    event = "ready",
                    generation,
                    pid,
                    ready_ms,
                    "generation {generation} ready after {ready_ms} ms"
                );
            }
            Event::Proving { generation, ready_ms } => {
                let pid = self.main_pid(generation);
                let quiet = self.cfg.policy.proving.quiet_period;
                tracing::info!(
                    event = "proving",
                    generation,
                    pid,
                    ready_ms,
                    "generation {generation} ready after {ready_ms} ms; proving it (quiet period {quiet:?})"
                );
            }
            Event::Flipped { generation, replaced, probation } => {
                let replaced = replaced.map_or(String::new(), |r| {
                    format!("; generation {r} keeps running for its probation of {probation:?}")
                });
                tracing::info!(event = "flipped", generation, "generation {generation} takes the traffic{replaced}");
            }
            Event::HandedBack { generation, to } => {
                tracing::warn!(
                    event = "handed-back",
                    generation,
                    to,
                    "generation {generation} failed; traffic handed back to generation {to}"
                );
            }
            Event::RestartFailed { generation, why } => {
                let failure = self.start_failure(generation, why);
                tracing::error!(event = "restart-failed", generation, "{failure}");
                self.last_failure = Some(failure);
            }
            Event::StoppingOnItsOwn { generation, replaced: false } => tracing::info!(
                event = "stopping",
                generation,
                "generation {generation} is stopping with baton; no replacement"
            ),
            Event::StoppingOnItsOwn { generation, replaced: true } => tracing::info!(
                event = "stopping",
                generation,
                "generation {generation} is stopping on its own; starting a replacement"
            ),
            Event::RestartReset { generation } => tracing::info!(
                event = "restart-reset",
                generation,
                "generation {generation} has served for {:?}: RESTART_RESET=1 (earlier restarts of baton stop \
                 counting)",
                core::PROVEN_HEALTHY_AFTER
            ),
            Event::BackOff { delay } => {
                tracing::info!(event = "backoff", delay_ms = delay.as_millis() as u64, "next start in {delay:?}");
            }
            Event::StoppingAll => tracing::info!(event = "stopping", "stopping all generations"),
        }
    }

    /// A failed start as a [`Failure`], with where its output is (kept by
    /// the `KeepFailedOutput` before it).
    fn start_failure(&self, generation: u64, why: StartFailure) -> Failure {
        let hint = self.failed_output.as_ref().filter(|f| f.number == generation).and_then(|f| f.hint.clone());
        Failure::Start { generation, why, hint }
    }

    pub(super) fn render_upstream(&mut self, up: Upstream) {
        match up {
            Upstream::Reloading { generation } => self.upstream_notify(&[
                NotifyState::Reloading,
                NotifyState::monotonic_usec_now(),
                NotifyState::Status(&format!("starting generation {generation}")),
            ]),
            Upstream::ExtendTimeout { usec } => self.upstream_notify(&[NotifyState::ExtendTimeoutUsec(usec)]),
            Upstream::Serving { generation } => {
                let status = format!("generation {generation} serving as pid {}", self.main_pid(generation));
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            Upstream::StartFailed { generation, why, serving } => {
                let message = self.start_failure(generation, why).to_string();
                let status = match serving {
                    Some(s) => format!("{message}; generation {s} keeps serving"),
                    None => message,
                };
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            Upstream::EndReload => self.upstream_notify(&[NotifyState::Ready]),
            Upstream::Stopping => self.upstream_notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]),
            Upstream::RestartReset => self.upstream_notify(&[NotifyState::RestartReset]),
            Upstream::FdStoreRemove { name } => {
                let upstream_name = format!("app/{name}");
                self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&upstream_name)]);
            }
        }
    }

    pub(super) fn render_outcome(&mut self, outcome: Outcome) -> Response {
        match outcome {
            Outcome::Restarted { generation, ready_ms, replaced, proven } => Response::Restarted(RestartDone {
                generation,
                pid: self.main_pid(generation),
                ready_ms,
                replaced,
                took_traffic_ms: proven.map(|p| p.flip_ms),
                probation_ms: proven.map(|p| p.probation_ms),
            }),
            Outcome::RestartFailed { generation, why, serving } => {
                let failed = self.failed_output.take().filter(|f| f.number == generation);
                let (status_text, log_tail, hint) =
                    failed.map(|f| (f.status_text, f.lines, f.hint)).unwrap_or_default();
                // Inherited output: not in the report, so say where it is.
                let reason = failure::with_hint(&why, &hint);
                Response::RestartFailed(RestartFailure { generation, reason, status_text, log_tail, serving })
            }
            Outcome::Stopping => Response::Stopping,
        }
    }
}
