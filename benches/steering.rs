//! Accept latency with the steering program attached vs without, in one
//! run: does steering cost new connections anything?
//!
//! `cargo bench --bench steering`. Set `BATON_BENCH_N` to change the number
//! of connections per setup (default 3000). Run without `--bench` (e.g. by
//! `cargo test --benches`) it does a 20-connection smoke run.
//!
//! Two listeners on 127.0.0.1, each served by an accept-and-echo thread:
//!
//! - **plain**: one socket with `SO_REUSEPORT`, alone in its group, no
//!   program (the kernel's own choice: today's shared accept);
//! - **steered**: a [`Steering`] pair (the socket and the sibling Baton
//!   binds) with the one-instruction program sending everything to slot A,
//!   where the server accepts.
//!
//! The connections alternate between the two (which goes first alternates
//! too), so both see the same machine. For each: **connect→accept**, from
//! the client's `connect()` call until the server's `accept()` returned
//! (both `Instant`s of this process, CLOCK_MONOTONIC), and
//! **connect→echo**, until the client read back the byte it sent. A
//! canary setup (50%, a four-instruction program) is measured as well.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton::listen::{self, ListenSpec, SocketOptions};
use baton::steering::{Slot, Steering, SteeringOptions};

/// Accepts and echoes one byte per connection, reporting each accept's time.
fn serve(listener: TcpListener, accepted: mpsc::Sender<Instant>) {
    std::thread::spawn(move || {
        while let Ok((mut conn, _)) = listener.accept() {
            let at = Instant::now();
            if accepted.send(at).is_err() {
                return;
            }
            let mut b = [0];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
}

struct Setup {
    name: &'static str,
    addr: SocketAddr,
    accepted: mpsc::Receiver<Instant>,
    to_accept: Vec<Duration>,
    to_echo: Vec<Duration>,
}

impl Setup {
    fn new(name: &'static str, listener: TcpListener) -> Setup {
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = mpsc::channel();
        serve(listener, tx);
        Setup { name, addr, accepted, to_accept: Vec::new(), to_echo: Vec::new() }
    }

    fn once(&mut self) {
        let start = Instant::now();
        let mut c = TcpStream::connect(self.addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0];
        c.read_exact(&mut b).unwrap();
        let echoed = Instant::now();
        let accepted = self.accepted.recv_timeout(Duration::from_secs(30)).expect("the server accepted");
        self.to_accept.push(accepted.saturating_duration_since(start));
        self.to_echo.push(echoed - start);
    }
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn row(name: &str, metric: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "| {:<8} | {:<15} | {:>9.1} | {:>9.1} | {:>9.1} |",
        name,
        metric,
        quantile(&v, 0.5),
        quantile(&v, 0.99),
        quantile(&v, 1.0)
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = match std::env::var("BATON_BENCH_N") {
        Ok(v) => v.parse().expect("BATON_BENCH_N must be a number"),
        Err(_) if full => 3000,
        Err(_) => 20,
    };
    if cfg!(debug_assertions) {
        eprintln!("steering: built without optimisations; run `cargo bench --bench steering` for meaningful numbers");
    }
    let opts = SocketOptions { reuse_port: true, ..SocketOptions::default() };
    let bind = |spec: &str| listen::bind(&spec.parse::<ListenSpec>().unwrap(), &opts).unwrap();
    let standalone = SteeringOptions { bind_siblings: true, ..SteeringOptions::default() };

    let plain = bind("plain=127.0.0.1:0");
    let steered = bind("steered=127.0.0.1:0");
    let canaried = bind("canary=127.0.0.1:0");
    let (steering, unsteered) = Steering::new(std::slice::from_ref(&steered), &standalone).unwrap();
    assert!(unsteered.is_empty(), "{unsteered:?}");
    steering.steer(Slot::A).unwrap();
    let (canary, unsteered) = Steering::new(std::slice::from_ref(&canaried), &standalone).unwrap();
    assert!(unsteered.is_empty(), "{unsteered:?}");
    canary.canary(Slot::B, 50).unwrap();
    // The calibration connections (one per socket, closed) must not be
    // served as measured ones.
    for s in [&steering, &canary] {
        for slot in [Slot::A, Slot::B] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while s.queued(slot).unwrap() < 1 {
                assert!(Instant::now() < deadline, "the calibration connection on slot {slot} never arrived");
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(s.take_queued(slot, 10).unwrap());
        }
    }
    let listener = |fd: std::os::fd::BorrowedFd<'_>| TcpListener::from(fd.try_clone_to_owned().unwrap());
    let mut setups = vec![
        Setup::new("plain", listener(plain.fd.as_fd())),
        Setup::new("steered", listener(steering.sockets_for(Slot::A)[0])),
    ];
    // The canary's two sockets are served by two threads, as two
    // generations would; its setup reads accept times from both.
    let canary_setup = {
        let (tx, accepted) = mpsc::channel();
        serve(listener(canary.sockets_for(Slot::A)[0]), tx.clone());
        serve(listener(canary.sockets_for(Slot::B)[0]), tx);
        Setup {
            name: "canary",
            addr: TcpListener::from(canaried.fd.as_fd().try_clone_to_owned().unwrap()).local_addr().unwrap(),
            accepted,
            to_accept: Vec::new(),
            to_echo: Vec::new(),
        }
    };
    setups.push(canary_setup);

    // Warm-up, not counted.
    for s in &mut setups {
        for _ in 0..n.min(100) {
            s.once();
        }
        s.to_accept.clear();
        s.to_echo.clear();
    }
    let started = Instant::now();
    for i in 0..n {
        let k = setups.len();
        for j in 0..k {
            setups[(i + j) % k].once();
        }
    }
    let elapsed = started.elapsed();
    println!("\nsteering: {n} connections per setup, interleaved, in {elapsed:.1?} (times in µs)\n");
    println!("| {:<8} | {:<15} | {:>9} | {:>9} | {:>9} |", "setup", "metric", "median", "p99", "max");
    println!("|{:-<10}|{:-<17}|{:->11}|{:->11}|{:->11}|", "", "", "", "", "");
    for s in setups {
        row(s.name, "connect→accept", s.to_accept);
        row(s.name, "connect→echo", s.to_echo);
    }
}
