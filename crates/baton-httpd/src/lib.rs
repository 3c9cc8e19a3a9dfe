//! # baton-httpd
//!
//! Baton's reference HTTP server: a real static-file server that does
//! everything right on systemd's protocols, using only [`baton_sd`]:
//!
//! - takes its listening socket from socket activation (systemd or `baton
//!   run`, by name) or binds `--listen` ([`listener`]);
//! - sends `READY=1` only once it can serve, `STATUS=` as it goes, pings the
//!   watchdog when asked, logs natively to journald ([`logging`]);
//! - on SIGTERM drains in-flight requests and **hands idle keep-alive
//!   connections over** to the next generation through the fd store, which
//!   adopts them and serves their next requests on the same TCP connection
//!   ([`conn`], [`handoff`]);
//! - survives hostile clients: a deadline for a partial request head, an
//!   idle cap, a connection limit answered with `503`, a 64 KiB head cap,
//!   and paced accepts at the fd limit ([`conn`], [`admission`]).
//!
//! The HTTP side ([`service`], [`files`], [`body`]) is independent of all
//! that: the benchmark serves the same [`service::Handler`] with plain hyper
//! to show what the handoff machinery costs.
//!
//! See the crate's README for the units and the test and benchmark commands.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod admission;
pub mod app;
pub mod body;
pub mod config;
pub mod conn;
pub mod files;
pub mod generation;
pub mod handoff;
pub mod listener;
pub mod logging;
pub mod service;
