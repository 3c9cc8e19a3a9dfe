//! # baton-sd
//!
//! Everything a Rust service needs to restart without dropping a connection
//! under systemd — or under [Baton](https://example.invalid/baton), which
//! speaks the same protocols:
//!
//! - [`ListenFds`]: sockets passed by socket activation (`LISTEN_FDS`,
//!   `LISTEN_PID`, `LISTEN_FDNAMES`, `LISTEN_PIDFDID`), taken by name or index as std or tokio
//!   sockets, each checked to really be what was asked for; the private
//!   probe listener of `baton run --probe` in one call
//!   ([`ListenFds::take_probe_listener`]).
//! - [`Notifier`]: `sd_notify(3)` messages (`READY=1`, `STATUS=`,
//!   `RELOADING=1`, `STOPPING=1`, watchdog, `EXTEND_TIMEOUT_USEC=`,
//!   `BARRIER=1`, …) over path and abstract sockets; a message systemd would
//!   drop is refused with an error instead of being lost.
//! - [`fdstore`]: keeping fds — listeners, live connections, memfds — in the
//!   manager's fd store across restarts, with a naming convention.
//! - [`watchdog`]: `WATCHDOG_USEC` and a ping task.
//! - [`shutdown`]: SIGTERM/SIGINT with `STOPPING=1`, and a drain tracker.
//! - [`handoff`]: receiving connections pushed by Baton while running (its
//!   overlapped restarts), a no-op under plain systemd.
//! - [`pidfs`]: a process's pidfd inode id (Linux 6.9+), for
//!   `LISTEN_PIDFDID`.
//! - [`wire`]: the wire formats, shared with the supervisor side.
//!
//! Nothing here needs libsystemd, and outside a service manager every call is
//! a harmless no-op, so the same binary runs from a terminal.
//!
//! ## Example
//!
//! A tokio TCP service that takes the socket named `http` from systemd (or
//! binds its own), reports readiness, pings the watchdog and drains on
//! SIGTERM:
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use baton_sd::{ListenFds, Notifier, NotifyState, shutdown::{Drain, Shutdown}, watchdog};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut fds = ListenFds::from_env()?;
//!     let listener = match fds.take_tokio_tcp_listener("http")? {
//!         Some(l) => l,
//!         None => tokio::net::TcpListener::bind("127.0.0.1:8080").await?,
//!     };
//!     let notifier = Notifier::from_env()?.map(Arc::new);
//!     let mut shutdown = Shutdown::install()?;
//!     if let Some(n) = &notifier {
//!         n.notify(&[NotifyState::Ready, NotifyState::Status("serving")])?;
//!         if let Some(timeout) = watchdog::watchdog_timeout()? {
//!             watchdog::spawn_watchdog(Arc::clone(n), timeout);
//!         }
//!     }
//!     let drain = Drain::new();
//!     loop {
//!         tokio::select! {
//!             conn = listener.accept() => {
//!                 let (stream, _) = conn?;
//!                 let guard = drain.track();
//!                 tokio::spawn(async move {
//!                     // ... serve `stream` ...
//!                     drop((stream, guard));
//!                 });
//!             }
//!             _ = shutdown.wait(notifier.as_deref()) => break,
//!         }
//!     }
//!     drain.wait_idle(Duration::from_secs(30)).await?;
//!     Ok(())
//! }
//! ```
//!
//! ## Features
//!
//! - `tokio` (default): tokio socket types (`take_tokio_*`),
//!   [`Notifier::barrier_async`], [`watchdog::spawn_watchdog`] and the
//!   [`shutdown`] module.
//!
//! ## Environment changes
//!
//! Reading the environment is safe; changing it is not while other threads
//! run. The two functions that unset variables,
//! [`ListenFds::from_env_and_unset`] and [`notify::unset_notify_env`], are
//! `unsafe fn`s to call before any thread starts (before the tokio runtime).
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod activation;
pub mod fdstore;
pub mod fdtable;
#[cfg(feature = "tokio")]
pub mod handoff;
pub mod notify;
pub mod pidfs;
#[cfg(feature = "tokio")]
pub mod shutdown;
pub mod watchdog;
pub mod wire;

pub use activation::{ActivationError, FdKind, ListenFds, PROBE_FDNAME, Select};
pub use fdstore::{FdPoll, StoredName};
pub use fdtable::reserve_fds;
pub use notify::{Notifier, NotifyError, notify};
pub use wire::{NotifyState, monotonic_usec};
