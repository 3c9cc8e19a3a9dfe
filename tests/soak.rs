//! Soak: `baton run` supervising the reference server `baton-httpd` under
//! constant client load (a paced keep-alive pool and paced
//! one-connection-per-request clients, from `baton_testbed::load`), through
//! many `baton restart`s in a row.
//!
//! Baton's resources are read after a warm-up (the first generations and a
//! couple of restarts create lazily allocated fds, threads and buffers) and
//! again at the end, once every draining generation has exited: open fds
//! and threads must be back to their start values, no child of Baton may be
//! left a zombie, the fd store must be back to its start size (and small
//! all along), and RSS may grow only by a generous bound. Not one request
//! may fail, and every generation must have answered some.
//!
//! `BATON_SOAK_RESTARTS` sets the number of restarts (default 100, for CI;
//! the full soak is 1000):
//!
//! ```sh
//! BATON_SOAK_RESTARTS=1000 cargo test --release -p baton --test soak -- --nocapture
//! ```
//!
//! No root needed: the control socket lives in a private temporary
//! directory.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use baton::control::Status;
use baton_testbed::baton::{Baton, BatonBuilder, WAIT};
use baton_testbed::load::{Load, LoadConfig, LoadReport, Mode};
use baton_testbed::{cargo_bin, poll_until};

/// Default number of restarts.
const DEFAULT_RESTARTS: u64 = 100;

/// Allowed RSS growth of Baton over the soak.
const RSS_GROWTH_MAX_KIB: u64 = 4 * 1024;

/// Most fd-store entries allowed at any sample: idle keep-alive connections
/// a draining generation hands over wait there briefly (the pool has 8).
const STORE_MAX: usize = 32;

/// `baton run -l http=127.0.0.1:0 --control DIR/baton.sock -- baton-httpd
/// --root DIR/www`, at Baton's default log level, generation 1 active.
fn start(dir: &Path) -> Baton {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "soak\n").unwrap();
    BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), dir)
        // Every restart goes through the whole proving lifecycle (probes,
        // quiet period, steering flip, probation, the queue check), just
        // faster than the defaults' 2 s + 2 s, which would make 100
        // restarts take 7 minutes.
        .args(["--health-http", "/", "--quiet-period", "100ms", "--probation", "100ms"])
        .app([cargo_bin("baton-httpd", "baton-httpd").as_os_str(), "--root".as_ref(), www.as_os_str()])
        .log_level(None)
        .start()
}

/// Waits until the draining generations have exited.
fn wait_drained(b: &Baton) -> Status {
    b.wait_status("draining generations gone", |s| s.generations.len() == 1)
}

/// Baton's resources now (not its children's).
fn resources(b: &Baton) -> Resources {
    let pid = b.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Resources {
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count(),
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
        zombies: zombie_children(pid),
    }
}

/// What the soak watches of Baton's process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resources {
    fds: usize,
    threads: u64,
    rss_kib: u64,
    /// Children of Baton in state Z (exited, not reaped).
    zombies: Vec<u32>,
}

/// Children of `parent` that are zombies, from `/proc/*/stat`.
fn zombie_children(parent: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the parenthesised name: state, ppid, ...
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid == Some(parent) && state == Some("Z") {
            zombies.push(pid);
        }
    }
    zombies
}

/// The value `read` settles on: the same in two reads 300 ms apart (a
/// control connection of our own, a retiring generation's output pipe or
/// an idle blocking-pool thread may still be closing).
fn settled<T: PartialEq + std::fmt::Debug>(what: &str, mut read: impl FnMut() -> T) -> T {
    let mut last = read();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("{what} never settled (last {last:?})");
}

/// The value `read` keeps unchanged for `quiet` (sampled every 500 ms).
fn steady<T: PartialEq + std::fmt::Debug>(what: &str, quiet: Duration, mut read: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + quiet * 5;
    let mut last = read();
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(Instant::now() < deadline, "{what} never held still for {quiet:?} (last {last:?})");
        std::thread::sleep(Duration::from_millis(500));
        let now = read();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

fn restarts_wanted() -> u64 {
    match std::env::var("BATON_SOAK_RESTARTS") {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("BATON_SOAK_RESTARTS={v:?}: {e}")),
        Err(_) => DEFAULT_RESTARTS,
    }
}

/// Milliseconds of a duration, for printing.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn soak_restarts_under_load_leak_nothing_and_lose_nothing() {
    let n = restarts_wanted();
    let dir = baton_testbed::unique_temp_dir("baton-soak", "soak");
    let b = start(&dir);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, b.port()));
    let config = |mode, connections, rate| {
        LoadConfig::new(addr)
            .mode(mode)
            .connections(connections)
            .rate(Some(rate))
            .request_timeout(Duration::from_secs(10))
            .max_duration(Duration::from_secs(6 * 3600))
    };
    let loads = [
        ("keep-alive", Load::start(config(Mode::KeepAlive, 8, 200)).expect("keep-alive load")),
        ("new-connection", Load::start(config(Mode::NewConnection, 2, 50)).expect("new-connection load")),
    ];
    // Waits until the keep-alive load got `k` more answers and the (4 times
    // slower) new-connection load a quarter of that.
    let wait_ok = |k: u64, when: &str| {
        for ((name, load), k) in loads.iter().zip([k, k.div_ceil(4)]) {
            assert!(
                load.wait_for_ok(k, WAIT),
                "{when}: the {name} load did not get {k} more answers within {WAIT:?}: {:?}",
                load.progress()
            );
        }
    };

    // Warm-up: the first generation serves, then a couple of restarts.
    wait_ok(100, "warm-up");
    for _ in 0..2 {
        b.restart();
        wait_ok(20, "warm-up restart");
    }
    wait_drained(&b);
    let store_start = settled("the fd store", || b.try_status().map(|s| s.fdstore));
    let fds = settled("baton's fds", || resources(&b).fds);
    // Idle threads of tokio's blocking pool exit after 10 s without work:
    // the count at rest is the one that held that long.
    let threads = steady("baton's threads", Duration::from_secs(12), || resources(&b).threads);
    let start = Resources { fds, threads, ..resources(&b) };
    eprintln!("soak: start (after warm-up): {start:?}, fd store {store_start:?}");
    assert!(start.zombies.is_empty(), "{start:?}");

    let t0 = Instant::now();
    let mut took = Vec::with_capacity(n as usize);
    let mut store_max = 0;
    let mut last = 0;
    for i in 1..=n {
        let t = Instant::now();
        last = b.restart();
        took.push(t.elapsed());
        // The new generation gets requests before the next restart.
        wait_ok(20, &format!("after restart {i}"));
        if i % 10 == 0 {
            let s = b.try_status().expect("status during the soak");
            store_max = store_max.max(s.fdstore);
            assert!(s.fdstore <= STORE_MAX, "fd store at {} entries after restart {i}: {s:?}", s.fdstore);
        }
        if i % 100 == 0 {
            let r = resources(&b);
            eprintln!("soak: {i} restarts in {:.1} s: {r:?}, fd store max {store_max}", t0.elapsed().as_secs_f64());
        }
    }
    let wall = t0.elapsed();
    wait_ok(100, "after the last restart");
    let reports: Vec<(&str, LoadReport)> = loads.into_iter().map(|(name, load)| (name, load.stop())).collect();

    // Settle: the draining generations exit, then Baton's counts come back.
    let s = wait_drained(&b);
    let store_end = settled("the fd store", || b.try_status().map(|s| s.fdstore));
    let fds_back =
        poll_until("baton's fds back to the start value", WAIT, || (resources(&b).fds == start.fds).then_some(()));
    let threads_back = poll_until("baton's threads back to the start value", WAIT, || {
        (resources(&b).threads == start.threads).then_some(())
    });
    let no_zombies = poll_until("no zombie child", WAIT, || resources(&b).zombies.is_empty().then_some(()));
    let end = resources(&b);

    took.sort();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
    eprintln!(
        "soak: {n} restarts in {:.1} s ({:.1} ms each on average); restart took min {:.1} ms, median {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        wall.as_secs_f64(),
        ms(wall) / n as f64,
        ms(took[0]),
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*took.last().unwrap())
    );
    eprintln!(
        "soak: baton fds {} -> {}, threads {} -> {}, RSS {} KiB -> {} KiB ({:+} KiB), zombies {:?}, fd store {:?} -> \
         {:?} (max sampled {store_max}); status: {} restarts, {} crash restarts",
        start.fds,
        end.fds,
        start.threads,
        end.threads,
        start.rss_kib,
        end.rss_kib,
        end.rss_kib as i64 - start.rss_kib as i64,
        end.zombies,
        store_start,
        store_end,
        s.restarts,
        s.crash_restarts
    );
    let mut per_generation: BTreeMap<u64, u64> = BTreeMap::new();
    for (name, r) in &reports {
        let mut summary = r.to_json();
        // One entry per generation: summarized below instead.
        if let Some(map) = summary.as_object_mut() {
            map.remove("per_generation");
        }
        eprintln!("soak: {name} load: {summary}");
        for (generation, count) in &r.per_generation {
            let g = generation.parse().unwrap_or_else(|_| panic!("generation {generation:?} is not a number"));
            *per_generation.entry(g).or_default() += count;
        }
    }
    let least = per_generation.iter().min_by_key(|(_, c)| **c).map(|(g, c)| (*g, *c));
    eprintln!(
        "soak: {} generations answered; fewest answers: {least:?}; {} requests, {} failed",
        per_generation.len(),
        reports.iter().map(|(_, r)| r.requests).sum::<u64>(),
        reports.iter().map(|(_, r)| r.failed()).sum::<u64>()
    );

    for (name, r) in &reports {
        assert_eq!(r.failed(), 0, "{} {name} requests failed: {}", r.failed(), r.to_json());
    }
    fds_back.unwrap_or_else(|e| panic!("{e}: {} at the start, {} now: {:?}", start.fds, end.fds, b.fd_targets()));
    threads_back.unwrap_or_else(|e| panic!("{e}: {} at the start, {} now", start.threads, end.threads));
    no_zombies.unwrap_or_else(|e| panic!("{e}: {:?}", end.zombies));
    assert_eq!(store_end, store_start, "fd store entries");
    let growth = end.rss_kib.saturating_sub(start.rss_kib);
    assert!(growth < RSS_GROWTH_MAX_KIB, "baton's RSS grew by {growth} KiB over {n} restarts");
    // Generation 1, two warm-up restarts, then one generation per restart.
    assert_eq!(last, n + 3, "the last generation");
    let all: Vec<u64> = (1..=last).collect();
    let answered: Vec<u64> = per_generation.keys().copied().collect();
    assert_eq!(answered, all, "every generation ({} of them) must have answered", last);
    assert_eq!(s.restarts, n + 2, "{s:?}");
    assert_eq!(s.crash_restarts, 0, "{s:?}");
}
