//! Baton's supervisor, as a library so the `baton` binary, the integration
//! tests and the benchmarks share one implementation.
//!
//! The pieces, each in its own module:
//!
//! - [`listen`]: `[NAME=]ADDR` listen specs, binding sockets with their
//!   options, and taking inherited sockets (from systemd or another Baton).
//! - [`spawn`]: starting one generation of the app exactly as systemd would
//!   (fds at 3.., `LISTEN_*`, `NOTIFY_SOCKET`, `LISTEN_PID` set after fork
//!   without allocating), in its own process group, tracked by pidfd.
//! - [`lineage`]: which processes belong to a generation (pidfds for
//!   `MAINPID=`, parent chains for `--notify-access all`).
//! - [`reaper`]: reaps every child (Baton is a subreaper) and reports exits.
//! - [`notify_server`]: the receiving end of `sd_notify`, with systemd's
//!   credential checks and limits.
//! - [`notify_refusal`]: how a refused `baton notify` learns it was refused
//!   (a line in its `BARRIER=1` pipe).
//! - [`output`]: passes each generation's output through and keeps its last
//!   lines for failure reports.
//! - [`handoff`]: moves connections a draining generation stores straight
//!   to the running one (overlapped restarts).
//! - [`closer`]: closes fds other processes chose on its own thread, so
//!   that no close can block the supervisor.
//! - [`ratelimit`]: rate limit and summaries for the log of refused traffic.
//! - [`store`]: Baton's own fd store (`FDSTORE=1` from the app), polled for
//!   hang-ups.
//! - [`stop_signal`]: whether SIGTERM/SIGINT arrived, before tokio's stream
//!   says so (no replacement is spawned once a stop is on its way).
//! - [`steering`]: pairs of `SO_REUSEPORT` sockets and the classic-BPF
//!   program that sends new connections to one generation's socket.
//! - [`supervisor`]: the generation state machine: start, READY, overlapped
//!   restart, drain, crash backoff.
//! - [`control`]: the control socket and the client side of `baton restart`,
//!   `status`, `stop`, `upgrade`.
//! - [`rundir`]: the directory holding Baton's own sockets, created 0700 and
//!   checked so that no other user can replace them.
//! - [`upgrade`]: `baton upgrade`, Baton re-executing a new binary of itself
//!   in the same process, keeping every socket and generation.
#![warn(missing_docs)]

pub mod cli;
pub mod closer;
pub mod control;
pub mod handoff;
pub mod journal;
pub mod lineage;
pub mod listen;
pub mod notify_refusal;
pub mod notify_server;
pub mod output;
pub mod ratelimit;
pub mod reaper;
pub mod rundir;
pub mod spawn;
pub mod steering;
pub mod stop_signal;
pub mod store;
pub mod supervisor;
pub mod units;
pub mod upgrade;
pub mod vault;
