//! Rate-limited, summarised logging of refused traffic.
//!
//! Anyone who can reach the notify or handoff socket can make Baton refuse
//! things as fast as the kernel delivers them: 671,714 refused datagrams in
//! 10 s once produced as many WARN lines (128 MB of log, 3.8 s of Baton's
//! CPU), and under journald the unit's rate limit would then have dropped
//! the app's own lines too (issue 10, finding 5). The log must still say
//! that it happens and who does it.
//!
//! [`RateLimiter`] decides, per key (for Baton: the kind of refusal and the
//! sender's pid), which events are logged: the first `burst` of each key in
//! an interval, and no more than `burst_total` over all keys, like
//! journald's `RateLimitIntervalSec=`/`RateLimitBurst=` per unit. The rest
//! are counted, and when a key's interval ends the caller gets a
//! [`Summary`] ("N refused from pid P in the last T s") to log instead.
//! Memory is bounded: at most `capacity` keys are tracked; events of further
//! keys are counted together (a [`Summary`] without a key) and never logged
//! one by one.
//!
//! Pure logic: the time is an argument of every call, nothing reads a clock,
//! so the tests below are exact.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Whether to log one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it as usual.
    Log,
    /// Do not log it; it is counted for the key's [`Summary`].
    Quiet,
}

/// What happened to one key over an interval in which some of its events
/// were not logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    /// The key, or `None` for the keys that found the table full, counted
    /// together.
    pub key: Option<K>,
    /// Every event of the interval, logged or not.
    pub events: u64,
    /// Of those, how many were not logged.
    pub quiet: u64,
    /// From the interval's first event to the summary.
    pub over: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    events: u64,
    logged: u64,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window { started: now, events: 0, logged: 0 }
    }
}

/// Per-key rate limiting with summaries; see the [module docs](self).
#[derive(Debug)]
pub struct RateLimiter<K> {
    interval: Duration,
    burst: u64,
    burst_total: u64,
    capacity: usize,
    windows: HashMap<K, Window>,
    /// Events of keys that found `windows` full.
    others: Option<Window>,
    /// Lines logged over all keys since `total_started`.
    total: Option<(Instant, u64)>,
}

impl<K: Copy + Eq + Hash> RateLimiter<K> {
    /// Logs at most `burst` events per key and `burst_total` over all keys
    /// per `interval`, tracking at most `capacity` keys.
    pub fn new(interval: Duration, burst: u64, burst_total: u64, capacity: usize) -> RateLimiter<K> {
        RateLimiter {
            interval,
            burst,
            burst_total,
            capacity,
            windows: HashMap::with_capacity(capacity),
            others: None,
            total: None,
        }
    }

    /// Counts one event of `key` at `now` and says whether to log it.
    pub fn record(&mut self, key: K, now: Instant) -> Verdict {
        if !self.windows.contains_key(&key) && self.windows.len() >= self.capacity {
            self.others.get_or_insert_with(|| Window::new(now)).events += 1;
            return Verdict::Quiet;
        }
        let window = self.windows.entry(key).or_insert_with(|| Window::new(now));
        window.events += 1;
        let total = match &mut self.total {
            Some((started, _)) if now.saturating_duration_since(*started) >= self.interval => {
                self.total.insert((now, 0))
            }
            Some(total) => total,
            None => self.total.insert((now, 0)),
        };
        if window.logged < self.burst && total.1 < self.burst_total {
            window.logged += 1;
            total.1 += 1;
            Verdict::Log
        } else {
            Verdict::Quiet
        }
    }

    /// When [`summarise`](Self::summarise) has something to do: the end of
    /// the earliest open interval. `None` while nothing was recorded.
    pub fn next_due(&self) -> Option<Instant> {
        self.windows.values().chain(&self.others).map(|w| w.started + self.interval).min()
    }

    /// Ends every interval that has lasted its length by `now`, which frees
    /// its key's slot, and returns a [`Summary`] for each of them in which
    /// some events were not logged (ordered by the interval's start, then by
    /// count).
    pub fn summarise(&mut self, now: Instant) -> Vec<Summary<K>> {
        let interval = self.interval;
        let ended = |w: &Window| now.saturating_duration_since(w.started) >= interval;
        let mut summaries: Vec<(Instant, Summary<K>)> = Vec::new();
        let summary = |key: Option<K>, w: &Window| {
            (w.events > w.logged).then(|| {
                let s = Summary {
                    key,
                    events: w.events,
                    quiet: w.events - w.logged,
                    over: now.saturating_duration_since(w.started),
                };
                (w.started, s)
            })
        };
        self.windows.retain(|key, w| {
            if !ended(w) {
                return true;
            }
            summaries.extend(summary(Some(*key), w));
            false
        });
        if let Some(w) = self.others.take_if(|w| ended(w)) {
            summaries.extend(summary(None, &w));
        }
        summaries.sort_by(|(a, sa), (b, sb)| a.cmp(b).then(sb.events.cmp(&sa.events)));
        summaries.into_iter().map(|(_, s)| s).collect()
    }
}

/// What Baton refused, for [`RefusalLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// A notify datagram.
    Notify,
    /// A connection to the handoff socket.
    Handoff,
}

/// Baton's log of refused notify datagrams and handoff connections: per
/// sender pid, the first [`RefusalLog::BURST`] refusals of each
/// [`RefusalLog::INTERVAL`] are logged one by one, then one summary line;
/// at most [`RefusalLog::SENDERS`] senders are told apart.
#[derive(Debug)]
pub struct RefusalLog {
    limiter: RateLimiter<(Refused, Option<u32>)>,
}

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog::new()
    }
}

impl RefusalLog {
    /// The length of one interval.
    pub const INTERVAL: Duration = Duration::from_secs(10);
    /// Refusals logged one by one per sender and interval.
    pub const BURST: u64 = 5;
    /// Refusals logged one by one per interval over all senders.
    pub const BURST_TOTAL: u64 = 30;
    /// Senders told apart at once; the others are summarised together.
    pub const SENDERS: usize = 64;

    /// An empty log.
    pub fn new() -> RefusalLog {
        RefusalLog { limiter: RateLimiter::new(Self::INTERVAL, Self::BURST, Self::BURST_TOTAL, Self::SENDERS) }
    }

    /// Counts one refusal from `pid` (`None`: not visible to Baton) and says
    /// whether to log it now.
    pub fn allow(&mut self, what: Refused, pid: Option<u32>) -> bool {
        self.limiter.record((what, pid), Instant::now()) == Verdict::Log
    }

    /// When [`log_summaries`](Self::log_summaries) is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.limiter.next_due()
    }

    /// Logs a summary for every sender whose interval ended with refusals
    /// that were not logged.
    pub fn log_summaries(&mut self) {
        for s in self.limiter.summarise(Instant::now()) {
            let secs = s.over.as_secs_f64().round();
            let (what, from, pid) = match s.key {
                Some((what, Some(pid))) => (what.plural(), format!("pid {pid}"), Some(pid)),
                Some((what, None)) => (what.plural(), "senders whose pid is not visible to Baton".to_owned(), None),
                None => (
                    "notify datagrams or handoff connections",
                    format!("other senders (more than {} at once)", Self::SENDERS),
                    None,
                ),
            };
            tracing::warn!(
                event = "refused-summary",
                sender = pid,
                count = s.events,
                "{} {what} refused from {from} in the last {secs} s ({} of them not logged one by one)",
                s.events,
                s.quiet
            );
        }
    }
}

impl Refused {
    fn plural(self) -> &'static str {
        match self {
            Refused::Notify => "notify datagrams",
            Refused::Handoff => "handoff connections",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limiter() -> RateLimiter<u32> {
        // 10 s intervals, 3 lines per key, 5 in all, 2 keys tracked.
        RateLimiter::new(10 * SEC, 3, 5, 2)
    }

    fn verdicts(l: &mut RateLimiter<u32>, key: u32, n: usize, at: Instant) -> Vec<Verdict> {
        (0..n).map(|_| l.record(key, at)).collect()
    }

    #[test]
    fn the_first_burst_is_logged_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut l = limiter();
        assert_eq!(
            verdicts(&mut l, 7, 5, t0),
            [Verdict::Log, Verdict::Log, Verdict::Log, Verdict::Quiet, Verdict::Quiet]
        );
        assert_eq!(l.summarise(t0 + 9 * SEC), [], "the interval has not ended");
        let s = l.summarise(t0 + 10 * SEC);
        assert_eq!(s, [Summary { key: Some(7), events: 5, quiet: 2, over: 10 * SEC }]);
        assert_eq!(l.summarise(t0 + 20 * SEC), [], "summarised once");
    }

    #[test]
    fn an_interval_without_quiet_events_ends_silently_and_the_next_logs_again() {
        let t0 = Instant::now();
        let mut l = limiter();
        assert_eq!(verdicts(&mut l, 7, 3, t0), [Verdict::Log; 3]);
        assert_eq!(l.summarise(t0 + 10 * SEC), []);
        assert_eq!(l.next_due(), None, "nothing left open");
        assert_eq!(verdicts(&mut l, 7, 4, t0 + 11 * SEC), [Verdict::Log, Verdict::Log, Verdict::Log, Verdict::Quiet]);
    }

    #[test]
    fn events_after_the_interval_but_before_the_summary_count_in_it() {
        let t0 = Instant::now();
        let mut l = limiter();
        verdicts(&mut l, 7, 4, t0);
        assert_eq!(l.record(7, t0 + 12 * SEC), Verdict::Quiet);
        let s = l.summarise(t0 + 13 * SEC);
        assert_eq!(s, [Summary { key: Some(7), events: 5, quiet: 2, over: 13 * SEC }], "the real span is reported");
    }

    #[test]
    fn keys_are_limited_independently() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10 * SEC, 2, 100, 10);
        assert_eq!(verdicts(&mut l, 1, 3, t0), [Verdict::Log, Verdict::Log, Verdict::Quiet]);
        assert_eq!(verdicts(&mut l, 2, 3, t0 + SEC), [Verdict::Log, Verdict::Log, Verdict::Quiet]);
        assert_eq!(l.summarise(t0 + 10 * SEC), [Summary { key: Some(1), events: 3, quiet: 1, over: 10 * SEC }]);
        assert_eq!(l.next_due(), Some(t0 + 11 * SEC));
        assert_eq!(l.summarise(t0 + 11 * SEC), [Summary { key: Some(2), events: 3, quiet: 1, over: 10 * SEC }]);
    }

    #[test]
    fn the_total_burst_caps_lines_over_all_keys() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10 * SEC, 3, 4, 10);
        assert_eq!(verdicts(&mut l, 1, 3, t0), [Verdict::Log; 3]);
        assert_eq!(verdicts(&mut l, 2, 2, t0), [Verdict::Log, Verdict::Quiet], "one line left in all");
        assert_eq!(l.record(3, t0 + 5 * SEC), Verdict::Quiet);
        // The total's interval ends too: key 4 may log again.
        assert_eq!(l.record(4, t0 + 10 * SEC), Verdict::Log);
        let s = l.summarise(t0 + 10 * SEC);
        assert_eq!(s, [Summary { key: Some(2), events: 2, quiet: 1, over: 10 * SEC }]);
    }

    #[test]
    fn a_full_table_counts_further_keys_together_without_logging_them() {
        let t0 = Instant::now();
        let mut l = limiter();
        assert_eq!(l.record(1, t0), Verdict::Log);
        assert_eq!(l.record(2, t0), Verdict::Log);
        assert_eq!(l.record(3, t0 + SEC), Verdict::Quiet, "no slot for key 3");
        assert_eq!(l.record(4, t0 + 2 * SEC), Verdict::Quiet);
        assert_eq!(l.record(1, t0 + 2 * SEC), Verdict::Log, "tracked keys go on");
        assert_eq!(l.next_due(), Some(t0 + 10 * SEC));
        assert_eq!(l.summarise(t0 + 10 * SEC), [], "keys 1 and 2 logged everything");
        assert_eq!(l.summarise(t0 + 11 * SEC), [Summary { key: None, events: 2, quiet: 2, over: 10 * SEC }]);
        assert_eq!(l.record(3, t0 + 12 * SEC), Verdict::Log, "slots were freed");
    }

    #[test]
    fn memory_stays_bounded_under_many_keys() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10 * SEC, 3, 1000, 64);
        let logged = (0..100_000u32).filter(|&k| l.record(k, t0) == Verdict::Log).count();
        assert_eq!(logged, 64);
        assert_eq!(l.windows.len(), 64);
        let s = l.summarise(t0 + 10 * SEC);
        assert_eq!(s, [Summary { key: None, events: 100_000 - 64, quiet: 100_000 - 64, over: 10 * SEC }]);
        assert!(l.windows.is_empty() && l.others.is_none());
    }

    #[test]
    fn summaries_come_in_order_of_their_intervals_start() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10 * SEC, 0, 0, 10);
        verdicts(&mut l, 2, 1, t0 + SEC);
        verdicts(&mut l, 1, 1, t0 + 2 * SEC);
        verdicts(&mut l, 3, 5, t0 + SEC);
        let keys: Vec<Option<u32>> = l.summarise(t0 + 20 * SEC).into_iter().map(|s| s.key).collect();
        assert_eq!(keys, [Some(3), Some(2), Some(1)]);
    }

    #[test]
    fn a_zero_burst_logs_nothing_but_summaries() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(SEC, 0, 10, 10);
        assert_eq!(l.record(1, t0), Verdict::Quiet);
        assert_eq!(l.summarise(t0 + SEC), [Summary { key: Some(1), events: 1, quiet: 1, over: SEC }]);
    }

    #[test]
    fn next_due_is_none_until_something_is_recorded() {
        let t0 = Instant::now();
        let mut l = limiter();
        assert_eq!(l.next_due(), None);
        assert_eq!(l.summarise(t0), []);
        l.record(1, t0 + SEC);
        assert_eq!(l.next_due(), Some(t0 + 11 * SEC));
    }

    #[test]
    fn a_clock_that_goes_backwards_does_not_panic() {
        let t0 = Instant::now() + 100 * SEC;
        let mut l = limiter();
        l.record(1, t0);
        l.record(1, t0 - 50 * SEC);
        assert_eq!(l.summarise(t0 - 60 * SEC), []);
        assert_eq!(l.next_due(), Some(t0 + 10 * SEC));
    }
}
