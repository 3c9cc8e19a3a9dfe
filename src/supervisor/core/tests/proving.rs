//! The proving lifecycle, step by step: readiness, the quiet period with
//! its probes, the steering flip, probation, the old generation retired
//! only once its queue is empty, and handing the traffic back.

use super::*;
use crate::supervisor::failure::ProbationFailure;
use crate::supervisor::policy::{HealthProbe, Proving, Readiness, SteeringMode};

const QUIET: Duration = Duration::from_secs(2);
const PROBATION: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(200);

fn proving(ready: Readiness) -> Policy {
    Policy {
        ready_timeout: READY_TIMEOUT,
        stop_timeout: Duration::from_secs(3),
        proving: Proving {
            ready,
            probe: Some(HealthProbe::Http { path: "/healthz".into() }),
            interval: INTERVAL,
            passes: 3,
            quiet_period: QUIET,
            probation: PROBATION,
            steering: SteeringMode::Auto,
            ..Proving::by_ready_alone()
        },
        ..Policy::default()
    }
}

/// Generation 1 serving on slot A, generation 2 spawned on slot B for the
/// waiting caller 1.
fn candidate() -> Bench {
    let mut b = Bench::with_policy(proving(Readiness::Notify), false);
    let actions = b.said(1, Said::Ready);
    // Nothing serves yet: the first generation takes over at READY=1.
    assert!(actions.contains(&Action::Steer { to: Slot::A }) || b.core.steered() == Slot::A, "{actions:?}");
    assert_eq!(b.core.active().map(|g| g.number), Some(1));
    let actions = b.restart(1, 2);
    assert!(actions.iter().any(|a| matches!(a, Action::Spawn { generation: 2, slot: Slot::B, .. })), "{actions:?}");
    b
}

/// Answers every probe the actions ask for with `result`; the actions of
/// those answers.
fn answer_probes(b: &mut Bench, actions: &[Action], result: Result<(), String>) -> Vec<Action> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Probe { generation } = a {
            out.extend(b.input(Input::Probed { generation: *generation, result: result.clone() }));
        }
    }
    out
}

/// Time passes in probe intervals, every probe passing, until `until`.
fn pass_probes_for(b: &mut Bench, d: Duration) -> Vec<Action> {
    let mut all = Vec::new();
    let end = b.now + d;
    while b.now < end {
        let actions = b.after(INTERVAL);
        let more = answer_probes(b, &actions, Ok(()));
        all.extend(actions);
        all.extend(more);
    }
    all
}

fn signalled(actions: &[Action], generation: u64) -> bool {
    actions.iter().any(|a| matches!(a, Action::Signal { generation: g, .. } if *g == generation))
}

#[test]
fn a_candidate_gets_traffic_only_after_its_quiet_period_and_the_old_one_stays_for_probation() {
    let mut b = candidate();
    let actions = b.said(2, Said::Ready);
    assert!(!actions.iter().any(|a| matches!(a, Action::Steer { .. })), "no traffic at READY=1: {actions:?}");
    assert_eq!(b.core.generation(2).unwrap().state_name(), "proving");
    // Probes pass, but the quiet period is not over yet.
    let actions = pass_probes_for(&mut b, QUIET - INTERVAL);
    assert!(!actions.iter().any(|a| matches!(a, Action::Steer { .. })), "{actions:?}");
    let actions = pass_probes_for(&mut b, INTERVAL);
    assert!(actions.contains(&Action::Steer { to: Slot::B }), "flipped at the end of the quiet period: {actions:?}");
    assert!(!signalled(&actions, 1), "the old one is not signalled at the flip: {actions:?}");
    assert_eq!(b.core.generation(2).unwrap().state_name(), "probation");
    assert_eq!(b.core.active().map(|g| g.number), Some(1), "the old one serves what it has");
    // Probation: the old one still unsignalled; then its queue is watched.
    let actions = pass_probes_for(&mut b, PROBATION - INTERVAL);
    assert!(!signalled(&actions, 1) && answers(&actions) == 0, "{actions:?}");
    let actions = pass_probes_for(&mut b, INTERVAL);
    assert!(actions.contains(&Action::AwaitQueueDrained { slot: Slot::A }), "{actions:?}");
    assert!(!signalled(&actions, 1), "not before its queue is empty: {actions:?}");
    // Its queue is empty: now it drains, and the caller hears.
    let actions = b.input(Input::QueueDrained { slot: Slot::A });
    let stop = position(&actions, |a| *a == Action::Signal { generation: 1, signal: Sig::Stop });
    let answered = position(&actions, |a| matches!(a, Action::Answer { .. }));
    assert!(stop < answered, "{actions:?}");
    assert!(matches!(answer(&actions, 1), Outcome::Restarted { generation: 2, replaced: Some(1), .. }));
    assert_eq!(b.core.active().map(|g| g.number), Some(2));
    // No more probes once it serves.
    let actions = b.after(INTERVAL * 3);
    let actions = answer_probes(&mut b, &actions, Ok(()));
    assert!(!b.after(INTERVAL * 3).iter().chain(&actions).any(|a| matches!(a, Action::Probe { .. })));
}

#[test]
fn a_failing_probe_before_the_flip_fails_the_start_with_no_traffic_moved() {
    let mut b = candidate();
    b.said(2, Said::Ready);
    let actions = b.after(INTERVAL);
    let actions = answer_probes(&mut b, &actions, Err("GET /healthz answered 500 Internal Server Error".into()));
    assert!(!actions.iter().any(|a| matches!(a, Action::Steer { .. } | Action::RescueQueued { .. })), "{actions:?}");
    assert!(!signalled(&actions, 1), "{actions:?}");
    assert!(actions.contains(&Action::Signal { generation: 2, signal: Sig::Stop }), "{actions:?}");
    match answer(&actions, 1) {
        Outcome::RestartFailed { generation: 2, why: StartFailure::ProbeFailed { detail }, serving: Some(1) } => {
            assert!(detail.contains("500"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.core.steered(), Slot::A);
}

#[test]
fn an_exit_on_probation_hands_the_traffic_back_and_starts_no_crash_restart() {
    let mut b = candidate();
    b.said(2, Said::Ready);
    pass_probes_for(&mut b, QUIET);
    assert_eq!(b.core.steered(), Slot::B);
    let actions = b.input(Input::Exited { pid: 102, exit: Exit::Code(1) });
    let back = position(&actions, |a| *a == Action::Steer { to: Slot::A });
    let rescue = position(&actions, |a| *a == Action::RescueQueued { from: Slot::B, to: 1 });
    assert!(back < rescue, "{actions:?}");
    assert!(!signalled(&actions[..back], 1));
    let actions = b.input(Input::OutputComplete { generation: 2 });
    match answer(&actions, 1) {
        Outcome::RestartFailed {
            generation: 2,
            why: StartFailure::OnProbation(ProbationFailure::Exited { exit: Exit::Code(1), .. }),
            serving: Some(1),
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(!actions.iter().any(|a| matches!(a, Action::Log(Event::BackOff { .. }) | Action::Spawn { .. })));
    assert_eq!(b.core.active().map(|g| g.number), Some(1));
    assert_eq!(b.core.steered(), Slot::A);
}

#[test]
fn a_failing_probe_on_probation_hands_back_and_stops_the_candidate() {
    let mut b = candidate();
    b.said(2, Said::Ready);
    pass_probes_for(&mut b, QUIET);
    let actions = b.after(INTERVAL);
    let actions = answer_probes(&mut b, &actions, Err("GET /healthz: connection closed before an answer".into()));
    assert!(actions.contains(&Action::Steer { to: Slot::A }), "{actions:?}");
    assert!(actions.contains(&Action::RescueQueued { from: Slot::B, to: 1 }), "{actions:?}");
    assert!(actions.contains(&Action::Signal { generation: 2, signal: Sig::Stop }), "{actions:?}");
    assert!(matches!(
        answer(&actions, 1),
        Outcome::RestartFailed { why: StartFailure::OnProbation(ProbationFailure::ProbeFailed { .. }), .. }
    ));
}

#[test]
fn the_old_generation_crashing_on_probation_makes_the_candidate_take_over_at_once() {
    let mut b = candidate();
    b.said(2, Said::Ready);
    pass_probes_for(&mut b, QUIET);
    let actions = b.input(Input::Exited { pid: 101, exit: Exit::Code(1) });
    assert!(matches!(answer(&actions, 1), Outcome::Restarted { generation: 2, .. }), "{actions:?}");
    assert_eq!(b.core.active().map(|g| g.number), Some(2));
}

#[test]
fn ready_by_probe_ignores_failures_until_the_first_pass() {
    let mut b = Bench::with_policy(proving(Readiness::Probe), false);
    let actions = b.input(Input::Tick);
    let actions = answer_probes(&mut b, &actions, Err("GET /healthz: connection refused".into()));
    assert!(answers(&actions) == 0 && b.core.active().is_none(), "{actions:?}");
    let actions = b.after(INTERVAL);
    let actions = answer_probes(&mut b, &actions, Ok(()));
    assert_eq!(b.core.active().map(|g| g.number), Some(1), "the first pass is ready: {actions:?}");
}

#[test]
fn ready_after_a_timer_and_a_timeout_without_a_passing_probe_names_the_last_failure() {
    let timer = Proving { probe: None, ..proving(Readiness::After(QUIET)).proving };
    let mut b = Bench::with_policy(Policy { proving: timer, ..proving(Readiness::Notify) }, false);
    b.after(QUIET - INTERVAL);
    assert!(b.core.active().is_none());
    b.after(INTERVAL);
    assert_eq!(b.core.active().map(|g| g.number), Some(1));

    let mut b = Bench::with_policy(proving(Readiness::Probe), false);
    let mut last = Vec::new();
    while b.core.restart().is_some() && b.now < Instant::now() + READY_TIMEOUT * 2 {
        let actions = b.after(INTERVAL);
        last = answer_probes(&mut b, &actions, Err("GET /healthz answered 503 Service Unavailable".into()));
        last.extend(actions);
    }
    let failed = last.iter().find_map(|a| match a {
        Action::Log(Event::RestartFailed { why, .. }) => Some(why.clone()),
        _ => None,
    });
    match failed {
        Some(StartFailure::NoPassingProbe { last: Some(l), .. }) => assert!(l.contains("503"), "{l}"),
        other => panic!("{other:?}"),
    }
}

/// With nothing serving before it, the generation that takes over gets
/// what waits on the other slot's sockets (clients that came before Baton
/// steered, as systemd's pair takes them); with steering off, nothing.
#[test]
fn the_first_generation_takes_what_waits_on_the_other_slot() {
    let mut b = Bench::with_policy(proving(Readiness::Notify), false);
    let actions = b.said(1, Said::Ready);
    assert!(actions.contains(&Action::RescueQueued { from: Slot::B, to: 1 }), "{actions:?}");
    // A restart that replaces it does not (its old slot is the server's).
    let actions = b.restart(1, 2);
    assert!(!actions.iter().any(|a| matches!(a, Action::RescueQueued { .. })), "{actions:?}");

    let mut off = proving(Readiness::Notify);
    off.proving.steering = SteeringMode::Off;
    let mut b = Bench::with_policy(off, false);
    let actions = b.said(1, Said::Ready);
    assert!(!actions.iter().any(|a| matches!(a, Action::RescueQueued { .. })), "{actions:?}");
}
