//! Deterministic simulation of the [`Core`](super::core::Core): a seeded
//! driver feeds it random but legal inputs and checks invariants after
//! every one.
//!
//! The core keeps the generation table and makes every decision; the
//! [`World`] plays only the shell and the outside world. It carries out the
//! core's actions the way [`Supervisor`](super::Supervisor) does
//! ([`shell`]): a spawn runs (its leader's pid fed back as `Spawned`) or
//! fails; a health check runs as its own process or cannot be started;
//! SIGKILL kills a generation's whole process group (reaped soon after,
//! orphans too), `--stop-signal` and SIGABRT are honoured whenever the app
//! likes (or never); awaited output completes at once, later or never (the
//! core's deadline); fds are stored, pushed or closed; the upgrade's probe
//! ends later, and an executed upgrade is either abandoned or carried out:
//! a new core adopts the state ([`Core::adopt`](super::core::Core::adopt)).
//! And it makes things happen in any order ([`Move`]): restart and stop
//! requests (waiting or not, many at once); READY=1, STOPPING=1, STATUS=,
//! WATCHDOG=1, WATCHDOG=trigger, WATCHDOG_USEC=, EXTEND_TIMEOUT_USEC=,
//! FDSTORE=1 (connections and other names) and FDSTORE_REMOVE=1 from any
//! generation's processes and from strangers; exits at any moment
//! (leaders, health checks, orphans); handoff connections and a full
//! handoff socket; `baton upgrade`; late news of gone generations; and
//! time passing (`Tick` at the core's next deadline, or at random times).
//!
//! Notify datagrams ([`senders`], [`datagrams`]): the world keeps a process
//! table — each generation's leader, its other descendants (they fork and
//! exit), the one its `MAINPID=` names, its health check — and pids of
//! processes that exited, which strangers may reuse. Datagrams are
//! attributed by the shell's own pure `notify::attribute()` over the
//! candidates the shell takes from the core's table (the leader as main
//! process unless `MAINPID=` pinned another; `Gen::health_check`) under
//! `--notify-access` `main`, `exec` or `all` (by seed), with the model's
//! tree as the lineage check; only attributed ones reach the core.
//!
//! Invariants, checked after every turn (an input, and those the shell
//! feeds while carrying out its actions: a spawn's or a health check's
//! outcome, complete output), some as each action is carried out:
//!
//! 1. **Someone serves or is on the way.** Until a stop, a generation is
//!    active, or a restart is under way, or a replacement is scheduled.
//!    The phase never wedges: a restart under way has its generation
//!    starting (or its failure report waiting for output, with a
//!    deadline), and a deadline that falls due clears when ticked.
//! 2. **Exactly one answer per caller**, never two, none to a caller that
//!    never asked; a stop's caller hears `Stopping`; at the end of a
//!    stopped run none is left waiting.
//! 3. **Within its deadline**, checked at the answer and after every turn
//!    (with time advancing, every pending request progresses): a restart's
//!    caller within its own restart and the one it queued behind (each a
//!    ready timeout, extended once by at most as much, plus the output
//!    grace); a stop's within the stop timeout (plus one extension) from
//!    when the stop began.
//! 4. **Nothing spawned once stopping**, at most one generation starting
//!    and only the restart's, generation numbers strictly increasing.
//! 5. **Only its own generations.** Every `Signal`, `KillHealthCheck`,
//!    `RunHealthCheck`, `AwaitOutput`, `Forget`, `PushConnections` and
//!    `FlushConnections` names a generation the core spawned, that ran,
//!    and that the shell has not been told to forget; `Forget` comes only
//!    once its leader was reaped. The core's table is the world's live
//!    leaders, with their pids and running health checks; every main
//!    process is a live process of its own generation's tree.
//! 6. **systemd never waits forever.** Every `Upstream::Reloading` is
//!    followed by `Serving` or `StartFailed` of that generation, or by
//!    `EndReload` at a stop, before the next `Reloading` and before
//!    `Stopping`; `Stopping` at most once, and no reload after it;
//!    `RESTART_RESET=1` at most once per image.
//! 7. **Every fd handle consumed exactly once**: stored, pushed or closed
//!    within the input that brought it, never twice; connections are
//!    pushed only to the active generation, and only once it connected to
//!    the handoff socket.
//! 8. **Strangers change nothing.** `attribute()` gives every datagram the
//!    generation the model says its sender may notify for (its main
//!    process always, its health check with `exec`/`all`, any process of
//!    its tree with `all`), or none; a datagram from a stranger or from a
//!    process that exited (its pid reused or not) is refused and never
//!    reaches the core.
//! 9. **Everything is reaped.** A leader's exit is followed, in the same
//!    turn, by SIGKILL to what is left of its group (and its health check,
//!    which runs in a group of its own, is killed). At the end of a run
//!    every generation that ran was reaped and forgotten (or killed by the
//!    crash-loop verdict), and no health check or process of it is left.
//! 10. **`baton upgrade` only from a stable state**: `ExecuteUpgrade` only
//!     when `Core::busy()` is `None` and no caller waits; one probe at a
//!     time, cancelled only while it runs.
//! 11. **Limits.** At most `--max-draining` draining (not yet killed)
//!     outside a stop; backoff never beyond its maximum; the crash-loop
//!     verdict only after more than `burst` failures within `interval`.
//!
//! `cargo test -p baton --lib simulation` runs [`CI_EVENTS`] inputs across
//! seeds and prints the count and inputs per second. A long campaign:
//! `BATON_SIM_EVENTS=100000000 cargo test --release -p baton --lib
//! simulation -- --nocapture`; `BATON_SIM_SEED=N` runs one seed. A failing
//! seed prints its shrunk trace of moves, which [`replay`] runs again: it
//! becomes a regression test ([`tests`]).

use std::time::Instant;

use self::senders::{Claim, Msg, Sender};
use self::world::{Violation, World};
use super::policy::NotifyAccess;

mod datagrams;
mod invariants;
mod senders;
mod shell;
#[cfg(test)]
mod tests;
mod world;

/// Inputs a plain `cargo test` feeds across seeds.
pub(super) const CI_EVENTS: u64 = 1_000_000;
/// Moves per seed.
const MOVES_PER_SEED: usize = 2_000;
/// Whether the random moves include [`Choice::SigtermInTurn`] (it found
/// the stop that ended with a spawn in flight: see
/// `a_spawn_in_flight_when_the_stop_ends_the_run_is_never_reaped`).
const SIGTERM_IN_TURN: bool = true;

/// splitmix64: small, seedable, good enough to pick moves.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whose leader exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    Starting,
    Active,
    OldestDraining,
    /// Any live generation (picked oldest first, modulo their number).
    Any(u8),
}

/// How the world will carry out the next actions of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Choice {
    SpawnFails,
    CheckNotRun,
    OutputNow,
    OutputLater,
    OutputNever,
    UpgradeAbandoned(bool),
    /// SIGTERM while the shell carries out the next actions that feed an
    /// input of their own (a spawn's outcome: the restart has ended by
    /// the time `Spawned` comes).
    SigtermInTurn,
}

/// One thing the world does; a move that does not apply now (a crash with
/// nothing serving) does nothing, so any list of moves is a legal run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Move {
    Restart {
        wait: bool,
    },
    Stop {
        wait: bool,
    },
    /// The starting generation's main process sends READY=1 (and, with a
    /// health check, the check passes).
    TakeOver,
    /// The starting generation's main process sends READY=1 (a health
    /// check, if any, starts and runs on).
    Ready,
    /// The starting generation's leader exits (status 1).
    FailStart,
    /// The active generation's leader exits (status 1).
    Crash,
    /// The active generation's main process sends `WATCHDOG=trigger`.
    Hang,
    /// The active generation's main process sends `STOPPING=1`.
    SelfStop,
    /// The oldest draining generation's leader exits (status 0).
    DrainExit,
    /// A generation's leader exits (status 143).
    LeaderExits(u8),
    /// The active generation's main process sends `WATCHDOG=1`.
    Ping,
    /// The starting generation's main process sends
    /// `EXTEND_TIMEOUT_USEC=` (ms).
    Extend(u16),
    /// A datagram from anyone, attributed as the shell does.
    Notify(Sender, Msg),
    /// A generation (picked oldest first) forks a process.
    Fork(u8),
    /// A generation's oldest descendant exits (reaped by its parent).
    ChildExit(u8),
    /// A running health check exits.
    HealthCheckExits {
        passed: bool,
    },
    /// An orphan Baton adopted as subreaper exits.
    Orphan,
    /// A generation connects to the handoff socket.
    Handoff(u8),
    /// Moving connections blocked: the handoff socket is full.
    Blocked,
    /// The handoff socket that was full has room again.
    Writable,
    /// The oldest process sent SIGKILL dies and is reaped.
    Reap,
    /// The awaited output is complete.
    Output,
    /// `OutputComplete` for a generation whose output is not awaited, or
    /// `HandoffConnected` for one that is gone.
    Stale(u8),
    /// `baton upgrade`.
    Upgrade,
    /// The upgrade's probe ends.
    Probed {
        ok: bool,
    },
    Next(Choice),
    /// The oldest built-in probe out ends: passed, or failed.
    ProbeAnswer {
        ok: bool,
    },
    /// The listeners whose queue the shell watches are empty.
    QueueDrains,
    /// `Tick` now, whether or not a deadline is due.
    Tick,
    /// Time passes, in ms (ticking at every deadline on the way).
    Advance(u64),
}

/// A datagram from a random sender.
fn random_datagram(rng: &mut Rng) -> Move {
    let k = rng.below(4) as u8;
    let sender = match rng.below(6) {
        0 => Sender::Leader(k),
        1 => Sender::Main(k),
        2 => Sender::HealthCheck(k),
        3 => Sender::Descendant(k),
        4 => Sender::Exited(k),
        _ => Sender::Stranger { reuse: rng.below(2) == 0 },
    };
    let msg = match rng.below(40) {
        0..6 => Msg::Ready,
        6..10 => Msg::Stopping,
        10..14 => Msg::Status,
        14..20 => Msg::Watchdog,
        20 => Msg::Trigger,
        21 => Msg::WatchdogUsec([0, 2_000, 10_000, 30_000][rng.below(4) as usize]),
        22..24 => Msg::Extend(rng.below(6_000) as u16),
        24..30 => Msg::Store { conn: rng.below(3) != 0, poll: rng.below(2) == 0 },
        30..32 => Msg::Remove { conn: rng.below(2) == 0 },
        _ => Msg::MainPid(match rng.below(3) {
            0 => Claim::Leader,
            1 => Claim::Descendant,
            _ => Claim::Stranger,
        }),
    };
    Move::Notify(sender, msg)
}

/// A move that applies to `w` as it is (mostly: a few are left to do
/// nothing, which is legal too). Stops and crashes are rare enough that a
/// run goes through many restarts before it ends.
fn random_move(rng: &mut Rng, w: &World) -> Move {
    // An outage (nothing serving) mostly ends soon: otherwise most runs
    // would end in the crash-loop verdict, their failed starts in a row.
    if w.active().is_none() && w.starting().is_some() && rng.below(3) == 0 {
        return Move::TakeOver;
    }
    loop {
        let m = match rng.below(1000) {
            0..150 => Move::Restart { wait: rng.below(3) != 0 },
            150..151 => Move::Stop { wait: rng.below(2) == 0 },
            151..300 => Move::TakeOver,
            300..320 => Move::Ready,
            320..330 => Move::Notify(
                Sender::Leader(rng.below(4) as u8),
                Msg::Store { conn: rng.below(4) != 0, poll: rng.below(2) == 0 },
            ),
            330..370 => Move::FailStart,
            370..380 => Move::Crash,
            380..385 => Move::Hang,
            385..400 => Move::SelfStop,
            400..520 => Move::DrainExit,
            520..527 => Move::LeaderExits(rng.below(4) as u8),
            527..580 => Move::Ping,
            580..595 => Move::Extend(rng.below(8_000) as u16),
            595..725 => random_datagram(rng),
            725..740 => Move::Fork(rng.below(4) as u8),
            740..750 => Move::ChildExit(rng.below(4) as u8),
            750..780 => Move::HealthCheckExits { passed: rng.below(3) != 0 },
            780..785 => Move::Orphan,
            785..800 => Move::Handoff(rng.below(4) as u8),
            800..803 => Move::Blocked,
            803..805 => Move::Writable,
            805..825 => Move::Reap,
            825..835 => Move::Output,
            835..838 => Move::Stale(rng.below(6) as u8),
            838..848 => Move::Upgrade,
            848..858 => Move::Probed { ok: rng.below(4) != 0 },
            858..878 => Move::Next(match rng.below(8) {
                0 => Choice::SpawnFails,
                1 => Choice::CheckNotRun,
                2 => Choice::OutputNow,
                3 => Choice::OutputLater,
                4 => Choice::OutputNever,
                // Rare (it ends the run), and off until the core stops
                // leaving a spawn in flight unreaped (see
                // `tests::a_spawn_in_flight_when_the_stop_ends_the_run_is_never_reaped`).
                5 if SIGTERM_IN_TURN && rng.below(4) == 0 => Choice::SigtermInTurn,
                k => Choice::UpgradeAbandoned(k == 5),
            }),
            878..888 => Move::Tick,
            888..930 => Move::ProbeAnswer { ok: rng.below(12) != 0 },
            930..940 => Move::QueueDrains,
            _ => Move::Advance(match rng.below(4) {
                0 => rng.below(10),
                1 => rng.below(500),
                2 => rng.below(3_000),
                _ => rng.below(12_000),
            }),
        };
        if w.applies(&m) || rng.below(20) == 0 {
            return m;
        }
    }
}

/// The world's settings: `--notify-access`, whether a health check runs
/// after READY=1, whether `--watchdog` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Config {
    access: NotifyAccess,
    health_check: bool,
    watchdog: bool,
    /// Proving as `baton run`'s defaults do: a built-in probe, a quiet
    /// period, steering and a probation (else: by READY=1 alone).
    proving: bool,
}

impl Config {
    /// What [`replay`] runs: the defaults (no health check, no watchdog).
    const DEFAULT: Config = Config { access: NotifyAccess::Main, health_check: false, watchdog: false, proving: false };

    /// Seeds go through every combination.
    fn of_seed(seed: u64) -> Config {
        let access = [NotifyAccess::Main, NotifyAccess::Exec, NotifyAccess::All][(seed % 3) as usize];
        Config {
            access,
            health_check: (seed / 3) % 2 == 1,
            watchdog: (seed / 6) % 2 == 1,
            proving: (seed / 12) % 2 == 1,
        }
    }

    fn world(self) -> World {
        World::new(self.access, self.health_check, self.watchdog, self.proving)
    }
}

/// Runs `moves` from a fresh start with the defaults; `Err` names the
/// violated invariant.
pub(super) fn replay(moves: &[Move]) -> Result<u64, Violation> {
    replay_with(Config::DEFAULT, moves)
}

/// Runs `moves` from a fresh start with `config`.
pub(super) fn replay_with(config: Config, moves: &[Move]) -> Result<u64, Violation> {
    let mut w = config.world();
    w.start().map_err(|e| format!("at the start: {e}"))?;
    for (i, m) in moves.iter().enumerate() {
        w.step(*m).map_err(|e| format!("move {i} ({m:?}): {e}"))?;
    }
    w.finish().map_err(|e| format!("at the end: {e}"))?;
    Ok(w.events)
}

/// A run's core inputs, datagrams, datagrams attributed, upgrades.
type Tally = (u64, u64, u64, u64);

/// Runs seed `seed`, choosing each move for the world as it is; returns
/// the moves made (for [`replay`] and shrinking) and the outcome.
fn run_seed(seed: u64) -> (Vec<Move>, Result<Tally, Violation>) {
    let mut rng = Rng(seed);
    let mut w = Config::of_seed(seed).world();
    let mut moves = Vec::with_capacity(MOVES_PER_SEED);
    if let Err(e) = w.start() {
        return (moves, Err(format!("at the start: {e}")));
    }
    for i in 0..MOVES_PER_SEED {
        if w.has_ended() {
            break;
        }
        let m = random_move(&mut rng, &w);
        moves.push(m);
        if let Err(e) = w.step(m) {
            return (moves, Err(format!("move {i} ({m:?}): {e}")));
        }
    }
    let outcome =
        w.finish().map(|()| (w.events, w.datagrams, w.attributed, w.upgrades)).map_err(|e| format!("at the end: {e}"));
    (moves, outcome)
}

/// The moves of `seed` (for the shrinking test).
fn moves_of(seed: u64) -> Vec<Move> {
    run_seed(seed).0
}

/// The shortest sub-list of `moves` that still fails (greedy: drop chunks,
/// then single moves, while it still fails).
fn shrink(config: Config, moves: Vec<Move>) -> Vec<Move> {
    shrink_by(moves, &|m: &[Move]| replay_with(config, m).is_err())
}

fn shrink_by(mut moves: Vec<Move>, fails: &dyn Fn(&[Move]) -> bool) -> Vec<Move> {
    let mut chunk = moves.len() / 2;
    while chunk >= 1 {
        let mut i = 0;
        while i < moves.len() {
            let mut candidate = moves.clone();
            candidate.drain(i..(i + chunk).min(moves.len()));
            if fails(&candidate) {
                moves = candidate;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    moves
}

fn campaign(seeds: impl Iterator<Item = u64>, budget: u64) {
    let started = Instant::now();
    let (mut events, mut datagrams, mut attributed, mut upgrades) = (0, 0, 0, 0);
    let mut ran = 0;
    for seed in seeds {
        if events >= budget {
            break;
        }
        let (moves, outcome) = run_seed(seed);
        match outcome {
            Ok((n, d, a, u)) => {
                events += n;
                datagrams += d;
                attributed += a;
                upgrades += u;
            }
            Err(e) => {
                let config = Config::of_seed(seed);
                let trace = shrink(config, moves);
                panic!(
                    "seed {seed} ({config:?}): {e}\nshrunk to {} moves: {trace:?}\nreplayed: {:?}",
                    trace.len(),
                    replay_with(config, &trace).err()
                );
            }
        }
        ran += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulation: {events} core inputs over {ran} seeds in {secs:.2} s ({:.0} inputs/s); \
         {datagrams} notify datagrams, {attributed} attributed; {upgrades} upgrades executed",
        events as f64 / secs.max(1e-9)
    );
}

#[test]
fn simulation_keeps_every_invariant() {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match var("BATON_SIM_SEED") {
        Some(seed) => campaign(std::iter::once(seed), u64::MAX),
        None => campaign(0.., var("BATON_SIM_EVENTS").unwrap_or(CI_EVENTS)),
    }
}
