//! Issue 12's proof with real servers nobody here wrote, standalone (`baton
//! run` as a child of the test, no root needed): gunicorn from PyPI and
//! Debian's Node.js, installed by `.ci/deps`, running the fixture apps of
//! `tests/fixtures/apps` (see `real_servers_support`). Under constant
//! loopback load:
//!
//! - (a) overlapped restarts of a good deploy lose nothing;
//! - (b) three bad deploys (exits before READY, crashes about 1 s after
//!   READY, answers 500 with `--health-http`) are each refused with the
//!   reason while the old generation serves throughout: 0 failed requests,
//!   0 5xx, with the default quiet period;
//! - (c) a deploy that passes its probes and crashes on its first real
//!   request after the flip is refused and the old generation serves
//!   after; its cost (failed requests) is printed, as `COST`.
//!
//! gunicorn's plain good restarts run without any proving option (as
//! before issue 12: READY=1 alone); everything else uses
//! [`Server::proven_args`] with the default quiet period and probation.

mod real_servers_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_testbed::baton::{Baton, BatonBuilder};
use real_servers_support::{self as support, Deploy, Restarted, Server, Service};

/// `baton run` of one test, with its variant file.
struct Standalone {
    test: String,
    baton: Baton,
    variant_file: PathBuf,
}

impl Standalone {
    /// `baton run -l http=127.0.0.1:0 ARGS -- SERVER`, its first generation
    /// running the good variant and active.
    fn start(test: &str, server: Server, args: &[&str]) -> Standalone {
        support::require_servers(test);
        let dir = baton_testbed::unique_temp_dir("baton-real", test);
        let variant_file = dir.join("variant");
        std::fs::write(&variant_file, server.variant(Deploy::Good)).unwrap();
        let mut baton = BatonBuilder::new(env!("CARGO_BIN_EXE_baton"), dir)
            .args(args)
            .app(server.command())
            .envs(server.env(&variant_file))
            .log_level(Some("info"))
            .spawn();
        // Fails at once, with Baton's own words, when it refuses the options.
        let deadline = Instant::now() + support::WAIT;
        loop {
            if let Some(status) = baton.try_exit() {
                panic!("{test}: baton run exited ({status}) before its first generation was active:\n{}", baton.log());
            }
            let active = baton.try_status().is_some_and(|s| s.generations.iter().any(|g| g.state == "active"));
            if active {
                break;
            }
            assert!(Instant::now() < deadline, "{test}: no active generation:\n{}", baton.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
        baton.port();
        Standalone { test: test.to_owned(), baton, variant_file }
    }
}

impl Service for Standalone {
    fn test(&self) -> &str {
        &self.test
    }

    fn port(&self) -> u16 {
        self.baton.port()
    }

    fn deploy(&self, variant: &str) {
        std::fs::write(&self.variant_file, variant).unwrap();
    }

    fn restart(&self) -> Restarted {
        let t0 = Instant::now();
        let out = self.baton.cli(&["restart"]);
        Restarted {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: t0.elapsed(),
        }
    }

    fn status(&self) -> serde_json::Value {
        let out = self.baton.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}: baton status: {out:?}\n{}", self.test, self.baton.log_tail());
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: status JSON: {e}: {out:?}", self.test))
    }

    fn diagnostics(&self) -> String {
        format!("--- baton log (end) ---\n{}", self.baton.log_tail())
    }

    fn reports_output(&self) -> bool {
        true
    }
}

#[test]
fn gunicorn_restarts_under_load_lose_nothing() {
    let svc = Standalone::start("gunicorn_restarts_under_load_lose_nothing", Server::Gunicorn, &[]);
    support::good_restarts_lose_nothing(&svc);
}

#[test]
fn gunicorn_proven_restarts_under_load_lose_nothing() {
    let server = Server::Gunicorn;
    let svc = Standalone::start("gunicorn_proven_restarts_under_load_lose_nothing", server, &server.proven_args());
    support::good_restarts_lose_nothing(&svc);
}

#[test]
fn node_restarts_under_load_lose_nothing() {
    let server = Server::Node;
    let svc = Standalone::start("node_restarts_under_load_lose_nothing", server, &server.proven_args());
    support::good_restarts_lose_nothing(&svc);
}

/// (b) for `server` and `deploy`, with the server's proven options.
fn refused(test: &str, server: Server, deploy: Deploy) {
    let svc = Standalone::start(test, server, &server.proven_args());
    support::bad_deploy_is_refused_without_impact(&svc, server, deploy);
}

#[test]
fn gunicorn_import_error_is_refused_without_impact() {
    refused("gunicorn_import_error_is_refused_without_impact", Server::Gunicorn, Deploy::ExitsBeforeReady);
}

#[test]
fn gunicorn_crash_after_ready_is_refused_without_impact() {
    refused("gunicorn_crash_after_ready_is_refused_without_impact", Server::Gunicorn, Deploy::CrashesAfterReady);
}

#[test]
fn gunicorn_http_500_is_refused_without_impact() {
    refused("gunicorn_http_500_is_refused_without_impact", Server::Gunicorn, Deploy::Answers500);
}

#[test]
fn node_exit_before_ready_is_refused_without_impact() {
    refused("node_exit_before_ready_is_refused_without_impact", Server::Node, Deploy::ExitsBeforeReady);
}

#[test]
fn node_crash_after_listening_is_refused_without_impact() {
    refused("node_crash_after_listening_is_refused_without_impact", Server::Node, Deploy::CrashesAfterReady);
}

#[test]
fn node_http_500_is_refused_without_impact() {
    refused("node_http_500_is_refused_without_impact", Server::Node, Deploy::Answers500);
}

#[test]
fn gunicorn_crash_on_first_real_request_is_handed_back() {
    let server = Server::Gunicorn;
    let svc = Standalone::start("gunicorn_crash_on_first_real_request_is_handed_back", server, &server.proven_args());
    support::first_real_request_crash(&svc, server);
}

#[test]
fn node_crash_on_first_real_request_is_handed_back() {
    let server = Server::Node;
    let svc = Standalone::start("node_crash_on_first_real_request_is_handed_back", server, &server.proven_args());
    support::first_real_request_crash(&svc, server);
}
