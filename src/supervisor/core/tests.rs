//! Focused tests of the core's decisions, asserting the actions' variants
//! (text is rendered in the shell). The simulation (`simulation`) covers
//! the interleavings; these pin the transaction's steps one by one.

use std::time::{Duration, Instant};

use super::eligibility::Busy;
use super::*;
use crate::supervisor::Failure;
use crate::supervisor::policy::{Backoff, Policy};

const READY_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF: Duration = Duration::from_millis(100);

/// A core and its clock.
struct Bench {
    core: Core,
    now: Instant,
}

impl Bench {
    /// Generation 1 spawned as pid 101 (and, if `serving`, active).
    fn new(health_check: bool, burst: u32, serving: bool) -> Bench {
        let policy = Policy {
            ready_timeout: READY_TIMEOUT,
            stop_timeout: Duration::from_secs(3),
            health_cmd: health_check.then(|| "true".into()),
            max_draining: 2,
            backoff: Backoff {
                initial: BACKOFF,
                max: Duration::from_secs(2),
                burst,
                interval: Duration::from_secs(60),
            },
            ..Policy::default()
        };
        Bench::with_policy(policy, serving)
    }

    /// Generation 1 spawned as pid 101 under `policy` (and, if `serving`,
    /// active).
    fn with_policy(policy: Policy, serving: bool) -> Bench {
        let mut b =
            Bench { core: Core::new(policy, Counters { next_number: 1, ..Counters::default() }), now: Instant::now() };
        let actions = b.core.start();
        assert!(
            actions.iter().any(|a| matches!(a, Action::Spawn { generation: 1, trigger: Trigger::Initial, .. })),
            "{actions:?}"
        );
        b.input(Input::Spawned { generation: 1, leader: 101, slot: Slot::A });
        if serving {
            b.take_over(1);
        }
        b
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        self.core.handle(self.now, input)
    }

    fn after(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.input(Input::Tick)
    }

    fn notice(&mut self, generation: u64, notice: Notice) -> Vec<Action> {
        self.input(Input::Notified { generation, notice })
    }

    fn said(&mut self, generation: u64, said: Said) -> Vec<Action> {
        self.notice(generation, Notice { lifecycle: Some(said), ..Notice::default() })
    }

    /// READY=1 (and a passing health check, if there is one).
    fn take_over(&mut self, generation: u64) -> Vec<Action> {
        let mut actions = self.said(generation, Said::Ready);
        if actions.contains(&Action::RunHealthCheck { generation }) {
            let pid = 900 + generation as u32;
            self.input(Input::HealthCheckStarted { generation, pid });
            actions = self.input(Input::Exited { pid, exit: Exit::Code(0) });
        }
        assert_eq!(self.core.active().map(|g| g.number), Some(generation), "{actions:?}");
        actions
    }

    /// A waiting `baton restart`: generation `generation` spawned as pid
    /// `100 + generation`.
    fn restart(&mut self, token: u64, generation: u64) -> Vec<Action> {
        let actions = self.input(Input::RestartRequested { waiter: Some(Token(token)) });
        assert!(
            actions.iter().any(
                |a| matches!(a, Action::Spawn { generation: g, trigger: Trigger::Requested, .. } if *g == generation)
            ),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::Upstream(Upstream::Reloading { generation })), "{actions:?}");
        let slot = actions
            .iter()
            .find_map(|a| match a {
                Action::Spawn { slot, .. } => Some(*slot),
                _ => None,
            })
            .unwrap();
        self.input(Input::Spawned { generation, leader: 100 + generation as u32, slot });
        actions
    }
}

/// Where the first action `want` accepts is.
fn position(actions: &[Action], want: impl Fn(&Action) -> bool) -> usize {
    actions.iter().position(want).unwrap_or_else(|| panic!("not in {actions:?}"))
}

fn answer(actions: &[Action], token: u64) -> &Outcome {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Answer { waiters, outcome } if waiters.contains(&Token(token)) => Some(outcome),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no answer to {token} in {actions:?}"))
}

fn answers(actions: &[Action]) -> usize {
    actions.iter().filter(|a| matches!(a, Action::Answer { .. })).count()
}

#[test]
fn ready_without_a_health_check_stops_the_old_before_the_answer() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    let actions = b.take_over(2);
    let stop = position(&actions, |a| *a == Action::Signal { generation: 1, signal: Sig::Stop });
    let answered = position(&actions, |a| matches!(a, Action::Answer { .. }));
    assert!(stop < answered, "{actions:?}");
    assert_eq!(
        *answer(&actions, 1),
        Outcome::Restarted { generation: 2, ready_ms: 0, replaced: Some(1), proven: None }
    );
    assert!(actions.contains(&Action::Upstream(Upstream::Serving { generation: 2 })));
    assert_eq!(b.core.counters().restarts, 1);
}

#[test]
fn a_passing_health_check_cuts_over() {
    let mut b = Bench::new(true, 10, true);
    b.restart(1, 2);
    assert_eq!(b.said(2, Said::Ready), [Action::RunHealthCheck { generation: 2 }]);
    assert!(b.core.active().is_some_and(|g| g.number == 1), "no cutover before the check passes");
    b.input(Input::HealthCheckStarted { generation: 2, pid: 500 });
    assert_eq!(b.core.generation(2).unwrap().health_check(), Some(500));
    let actions = b.input(Input::Exited { pid: 500, exit: Exit::Code(0) });
    assert!(actions.contains(&Action::Log(Event::HealthCheckPassed { generation: 2 })));
    assert!(matches!(answer(&actions, 1), Outcome::Restarted { generation: 2, .. }));
}

#[test]
fn a_failing_health_check_fails_the_start_and_keeps_the_old() {
    let mut b = Bench::new(true, 10, true);
    b.restart(1, 2);
    b.said(2, Said::Ready);
    b.input(Input::HealthCheckStarted { generation: 2, pid: 500 });
    let actions = b.input(Input::Exited { pid: 500, exit: Exit::Code(1) });
    let kept = position(&actions, |a| matches!(a, Action::KeepFailedOutput { generation: 2, .. }));
    assert!(kept < position(&actions, |a| matches!(a, Action::Answer { .. })));
    assert!(actions.contains(&Action::Signal { generation: 2, signal: Sig::Stop }));
    let why = StartFailure::HealthCheckFailed { exit: Exit::Code(1) };
    assert_eq!(*answer(&actions, 1), Outcome::RestartFailed { generation: 2, why, serving: Some(1) });
    assert_eq!(b.core.active().map(|g| g.number), Some(1));
}

#[test]
fn a_hanging_health_check_times_out_and_is_killed() {
    let mut b = Bench::new(true, 10, true);
    b.restart(1, 2);
    b.said(2, Said::Ready);
    b.input(Input::HealthCheckStarted { generation: 2, pid: 500 });
    assert_eq!(b.after(READY_TIMEOUT - Duration::from_millis(1)), []);
    let actions = b.after(Duration::from_millis(1));
    assert!(actions.contains(&Action::KillHealthCheck { generation: 2 }), "{actions:?}");
    let why = StartFailure::HealthCheckTimedOut { timeout: READY_TIMEOUT };
    assert_eq!(*answer(&actions, 1), Outcome::RestartFailed { generation: 2, why, serving: Some(1) });
}

#[test]
fn an_exit_before_ready_waits_for_the_output_then_fails_the_start() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    let actions = b.input(Input::Exited { pid: 102, exit: Exit::Code(3) });
    assert!(actions.contains(&Action::AwaitOutput { generation: 2 }), "{actions:?}");
    assert!(actions.contains(&Action::Signal { generation: 2, signal: Sig::Kill }));
    assert_eq!(answers(&actions), 0, "reported once the output is complete");
    assert_eq!(b.core.busy(), Some(Busy::Restarting { generation: 2 }));
    let actions = b.input(Input::OutputComplete { generation: 2 });
    let kept = position(&actions, |a| matches!(a, Action::KeepFailedOutput { generation: 2, .. }));
    assert!(kept < position(&actions, |a| matches!(a, Action::Answer { .. })));
    let why = StartFailure::ExitedBeforeReady { exit: Exit::Code(3), last_status: None };
    assert_eq!(*answer(&actions, 1), Outcome::RestartFailed { generation: 2, why, serving: Some(1) });
    assert!(actions.contains(&Action::Forget { generation: 2 }));
    assert_eq!(b.core.busy(), None);
}

#[test]
fn output_that_never_completes_is_given_up_at_the_grace_deadline() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    b.input(Input::Exited { pid: 102, exit: Exit::Code(3) });
    assert_eq!(b.core.next_deadline(), Some(b.now + OUTPUT_GRACE));
    let actions = b.after(OUTPUT_GRACE);
    assert!(matches!(answer(&actions, 1), Outcome::RestartFailed { generation: 2, .. }));
    assert!(actions.contains(&Action::Forget { generation: 2 }));
}

#[test]
fn a_crash_while_serving_backs_off_then_spawns_at_the_deadline() {
    let mut b = Bench::new(false, 10, true);
    let actions = b.input(Input::Exited { pid: 101, exit: Exit::Code(1) });
    assert!(actions.contains(&Action::Log(Event::Crashed { generation: 1, pid: 101, exit: Exit::Code(1) })));
    assert!(actions.contains(&Action::Forget { generation: 1 }));
    assert!(actions.contains(&Action::Log(Event::BackOff { delay: BACKOFF })), "{actions:?}");
    assert_eq!(b.core.busy(), Some(Busy::Replacing));
    assert_eq!(b.core.next_deadline(), Some(b.now + BACKOFF));
    assert_eq!(b.after(BACKOFF - Duration::from_millis(1)), []);
    let actions = b.after(Duration::from_millis(1));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Spawn { generation: 2, trigger: Trigger::Replace, .. })),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::Upstream(Upstream::Reloading { generation: 2 })));
}

#[test]
fn a_crash_loop_gives_up_and_waiters_hear_stopping() {
    // Two hangs (WATCHDOG=trigger) are beyond a burst of 1; the second
    // comes while a requested restart is under way.
    let trigger = Notice { watchdog_trigger: true, ..Notice::default() };
    let mut b = Bench::new(false, 1, true);
    let actions = b.notice(1, trigger.clone());
    assert!(actions.contains(&Action::Signal { generation: 1, signal: Sig::Abort }));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Spawn { generation: 2, trigger: Trigger::Replace, .. })),
        "{actions:?}"
    );
    b.input(Input::Spawned { generation: 2, leader: 102, slot: Slot::A });
    assert_eq!(b.input(Input::RestartRequested { waiter: Some(Token(1)) }), [], "queued");
    let actions = b.take_over(2);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Spawn { generation: 3, trigger: Trigger::Requested, .. })),
        "{actions:?}"
    );
    b.input(Input::Spawned { generation: 3, leader: 103, slot: Slot::A });
    let actions = b.notice(2, trigger);
    assert_eq!(*answer(&actions, 1), Outcome::Stopping);
    assert!(matches!(actions.last(), Some(Action::GiveUp(Failure::CrashLoop { failures: 2, .. }))), "{actions:?}");
    assert!(b.core.take_ended().is_some());
}

#[test]
fn stopping_1_starts_a_replacement_without_a_signal() {
    let mut b = Bench::new(false, 10, true);
    let actions = b.said(1, Said::Stopping);
    assert!(actions.contains(&Action::Log(Event::StoppingOnItsOwn { generation: 1, replaced: true })));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Spawn { generation: 2, trigger: Trigger::Replace, .. })),
        "{actions:?}"
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Signal { .. })), "{actions:?}");
}

#[test]
fn a_watchdog_trigger_while_starting_fails_the_start() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    let actions = b.notice(2, Notice { watchdog_trigger: true, ..Notice::default() });
    assert!(actions.contains(&Action::Signal { generation: 2, signal: Sig::Abort }), "{actions:?}");
    let why = StartFailure::WatchdogTriggered;
    assert_eq!(*answer(&actions, 1), Outcome::RestartFailed { generation: 2, why: why.clone(), serving: Some(1) });
    let failed = Upstream::StartFailed { generation: 2, why, serving: Some(1) };
    assert!(actions.contains(&Action::Upstream(failed)));
    assert_eq!(b.core.restart(), None);
}

/// A draining generation's `WATCHDOG=trigger` hurries it (SIGABRT) and
/// nothing else: the serving one goes on, no failure is counted, nothing
/// is spawned. Found while moving the generation table into the core: the
/// shell used to count it as the serving generation hanging and start a
/// replacement of a healthy generation.
#[test]
fn a_watchdog_trigger_while_draining_only_hurries_it() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    b.take_over(2);
    let actions = b.notice(1, Notice { watchdog_trigger: true, ..Notice::default() });
    assert!(actions.contains(&Action::Signal { generation: 1, signal: Sig::Abort }), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Spawn { .. })), "{actions:?}");
    assert_eq!(b.core.active().map(|g| g.number), Some(2));
    assert_eq!((b.core.counters().crash_restarts, b.core.counters().crashes.len()), (0, 0));
    assert_eq!(b.core.restart(), None);
}

#[test]
fn connections_from_a_draining_generation_are_pushed_to_the_active_one() {
    let store = |fds, name: &str| Notice {
        fdstore: Some(FdStore::Store { name: name.into(), fds: FdsHandle(fds), poll: true }),
        ..Notice::default()
    };
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    b.take_over(2);
    // Before generation 2 connected to the handoff socket: stored.
    let actions = b.notice(1, store(1, "conn"));
    assert_eq!(actions, [Action::StoreFds { fds: FdsHandle(1), name: "conn".into(), poll: true }]);
    assert_eq!(b.input(Input::HandoffConnected { generation: 2 }), [Action::FlushConnections { to: 2 }]);
    let actions = b.notice(1, store(2, "conn"));
    assert_eq!(actions, [Action::PushConnections { fds: FdsHandle(2), name: "conn".into(), poll: true, to: 2 }]);
    // Other names, and the active generation's own connections: stored.
    let actions = b.notice(1, store(3, "cache"));
    assert_eq!(actions, [Action::StoreFds { fds: FdsHandle(3), name: "cache".into(), poll: true }]);
    let actions = b.notice(2, store(4, "conn"));
    assert_eq!(actions, [Action::StoreFds { fds: FdsHandle(4), name: "conn".into(), poll: true }]);
    // A full handoff socket: flushed again soon, or as soon as it has room.
    b.input(Input::HandoffBlocked);
    assert_eq!(b.after(FLUSH_RETRY), [Action::FlushConnections { to: 2 }]);
    b.input(Input::HandoffBlocked);
    assert_eq!(b.input(Input::HandoffWritable), [Action::FlushConnections { to: 2 }]);
    assert_eq!(b.after(FLUSH_RETRY), [], "the retry was done already");
    assert_eq!(b.input(Input::HandoffWritable), [], "nothing was blocked");
    // From a generation that is gone: closed, never leaked.
    assert_eq!(b.notice(7, store(5, "conn")), [Action::CloseFds { fds: FdsHandle(5) }]);
}

#[test]
fn an_upgrade_is_refused_while_busy() {
    let mut b = Bench::new(false, 10, false);
    assert_eq!(b.input(Input::UpgradeRequested), [Action::RefuseUpgrade(Busy::Restarting { generation: 1 })]);
    b.take_over(1);
    // Backing off after a crash.
    b.input(Input::Exited { pid: 101, exit: Exit::Code(1) });
    assert_eq!(b.input(Input::UpgradeRequested), [Action::RefuseUpgrade(Busy::Replacing)]);
    b.after(BACKOFF);
    b.input(Input::Spawned { generation: 2, leader: 102, slot: Slot::A });
    assert_eq!(b.input(Input::UpgradeRequested), [Action::RefuseUpgrade(Busy::Restarting { generation: 2 })]);
    // A starting generation's exit waiting for its output.
    b.input(Input::Exited { pid: 102, exit: Exit::Code(1) });
    assert_eq!(b.core.awaiting_output(), Some(2));
    assert!(b.core.busy().is_some());
    b.input(Input::OutputComplete { generation: 2 });
    assert_eq!(b.input(Input::UpgradeRequested), [Action::RefuseUpgrade(Busy::Replacing)]);
}

#[test]
fn an_upgrade_is_refused_after_a_restart_began_during_its_probe() {
    let mut b = Bench::new(false, 10, true);
    assert_eq!(b.input(Input::UpgradeRequested), [Action::ProbeUpgrade]);
    assert_eq!(b.input(Input::UpgradeRequested), [Action::RefuseUpgrade(Busy::AnotherUpgrade)]);
    b.restart(1, 2);
    let actions = b.input(Input::UpgradeProbed { ok: true });
    assert_eq!(actions, [Action::RefuseUpgrade(Busy::Restarting { generation: 2 })]);
    b.take_over(2);
    // Once stable, a passing probe executes; a failed exec goes on.
    assert_eq!(b.input(Input::UpgradeRequested), [Action::ProbeUpgrade]);
    assert_eq!(b.input(Input::UpgradeProbed { ok: true }), [Action::ExecuteUpgrade]);
    b.input(Input::UpgradeAbandoned);
    assert_eq!(b.input(Input::UpgradeRequested), [Action::ProbeUpgrade]);
    assert_eq!(b.input(Input::UpgradeProbed { ok: false }), []);
}

#[test]
fn a_stop_cancels_the_probe() {
    let mut b = Bench::new(false, 10, true);
    b.input(Input::UpgradeRequested);
    let actions = b.input(Input::StopRequested { waiter: None });
    assert!(actions.contains(&Action::CancelUpgrade), "{actions:?}");
    assert_eq!(b.input(Input::UpgradeProbed { ok: true }), []);
}

#[test]
fn a_stop_during_a_restart_answers_stopping_and_ends_the_reload_first() {
    let mut b = Bench::new(false, 10, true);
    b.restart(1, 2);
    let actions = b.input(Input::StopRequested { waiter: Some(Token(2)) });
    assert_eq!(*answer(&actions, 1), Outcome::Stopping);
    let end = position(&actions, |a| *a == Action::Upstream(Upstream::EndReload));
    assert!(end < position(&actions, |a| *a == Action::Upstream(Upstream::Stopping)), "{actions:?}");
    for generation in [1, 2] {
        assert!(actions.contains(&Action::Signal { generation, signal: Sig::Stop }), "{actions:?}");
    }
    assert!(!actions.iter().any(|a| matches!(a, Action::Answer { waiters, .. } if waiters.contains(&Token(2)))));
    assert_eq!(
        b.input(Input::RestartRequested { waiter: Some(Token(3)) }),
        [Action::Answer { waiters: vec![Token(3)], outcome: Outcome::Stopping }]
    );
    b.input(Input::Exited { pid: 101, exit: Exit::Code(0) });
    let actions = b.input(Input::Exited { pid: 102, exit: Exit::Code(0) });
    assert_eq!(*answer(&actions, 2), Outcome::Stopping);
    assert!(b.core.take_ended().is_some());
}

#[test]
fn a_stop_outside_a_reload_sends_no_end_reload() {
    let mut b = Bench::new(false, 10, true);
    let actions = b.input(Input::StopRequested { waiter: None });
    assert!(actions.contains(&Action::Upstream(Upstream::Stopping)));
    assert!(!actions.contains(&Action::Upstream(Upstream::EndReload)), "{actions:?}");
    // SIGKILL at the stop deadline.
    let actions = b.after(Duration::from_secs(3));
    assert!(actions.contains(&Action::Signal { generation: 1, signal: Sig::Kill }), "{actions:?}");
}

#[test]
fn a_generation_spawned_after_its_restart_ended_only_drains() {
    let mut b = Bench::new(false, 10, true);
    b.input(Input::RestartRequested { waiter: Some(Token(1)) });
    // The stop comes before the shell reports the spawn.
    let actions = b.input(Input::StopRequested { waiter: None });
    assert_eq!(*answer(&actions, 1), Outcome::Stopping);
    let actions = b.input(Input::Spawned { generation: 2, leader: 102, slot: Slot::A });
    assert_eq!(actions, [Action::Signal { generation: 2, signal: Sig::Stop }]);
    assert!(matches!(b.core.generation(2).unwrap().life.state, State::Draining { .. }));
}

#[test]
fn the_draining_limit_holds_after_a_failed_start() {
    // Two restarts drain 1 and 2 (the limit); 4's failed start (its
    // WATCHDOG=trigger) drains it too: the oldest draining, 1, is killed.
    let mut b = Bench::new(false, 10, true);
    for (token, generation) in [(1, 2), (2, 3)] {
        b.restart(token, generation);
        b.take_over(generation);
    }
    b.restart(3, 4);
    let actions = b.notice(4, Notice { watchdog_trigger: true, ..Notice::default() });
    assert!(actions.contains(&Action::Log(Event::DrainLimit { generation: 1 })), "{actions:?}");
    assert!(actions.contains(&Action::Signal { generation: 1, signal: Sig::Kill }));
    assert!(!actions.iter().any(|a| matches!(a, Action::Signal { generation: 2, signal: Sig::Kill })));
    let why = StartFailure::WatchdogTriggered;
    assert_eq!(*answer(&actions, 3), Outcome::RestartFailed { generation: 4, why, serving: Some(3) });
}

/// Proving: quiet period, probes, steering, probation, hand-back.
mod proving;
