//! Issue 12's proof with real servers under a real systemd, 252 (the
//! host's) and 257 (the cached trixie root, which has Debian's python3 and
//! nodejs): `app.service` is `Type=notify`, `ExecStart=baton run -l
//! http=127.0.0.1:PORT --name app ... -- SERVER`, the scenarios those of
//! `tests/real_servers.rs` (see `real_servers_support`), the load from the
//! host over the shared loopback, `baton restart` run inside the testbed as
//! an operator would.
//!
//! The fixtures directory and gunicorn's install directory are bound into
//! the testbed at their host paths ([`BedBuilder::bind`]); the variant file
//! is in the testbed's scratch directory, which the host writes.
//!
//! [`BedBuilder::bind`]: baton_testbed::BedBuilder::bind

mod real_servers_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_testbed::{Bed, Flavor};
use real_servers_support::{self as support, Deploy, Restarted, Server, Service};

/// Where `RuntimeDirectory=baton` puts the control socket of `--name app`.
const CONTROL: &str = "/run/baton/app.sock";
/// The unit under test.
const APP: &str = "app.service";
/// How long one `baton restart` inside may take.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

/// `app.service` in a booted testbed.
struct UnderSystemd {
    bed: Bed,
    variant_file: PathBuf,
}

impl UnderSystemd {
    /// Boots `flavor`, installs and starts `app.service` running `server`
    /// (good variant) under `baton run ARGS`; `None` when the test may skip.
    fn start(flavor: Flavor, test: &str, server: Server, args: &[&str]) -> Option<UnderSystemd> {
        // Skipping (not root, outside CI) comes before needing the servers.
        if !baton_testbed::skip_unless_root(test) {
            return None;
        }
        support::require_servers(test);
        let bed = Bed::builder(flavor, test).bind(support::fixtures_dir()).bind(support::GUNICORN_DIR).boot()?;
        assert_eq!(bed.tb.systemd_version(), flavor.expected_systemd(), "{test}");
        let variant_file = bed.tb.scratch().join("variant");
        std::fs::write(&variant_file, server.variant(Deploy::Good)).unwrap();
        let baton = env!("CARGO_BIN_EXE_baton");
        let env: String = server.env(&variant_file).iter().map(|(k, v)| format!(" \"{k}={v}\"")).collect();
        let unit = format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=notify\nRuntimeDirectory=baton\nEnvironment={env}\n\
             ExecStart={baton} run -l http=127.0.0.1:{port} --name app {args} -- {command}\n\
             ExecReload={baton} restart --name app\n",
            env = env.trim_start(),
            port = bed.port,
            args = args.join(" "),
            command = server.command().join(" "),
        );
        bed.install_unit(APP, &unit);
        bed.systemctl_ok(&["start", APP]);
        Some(UnderSystemd { bed, variant_file })
    }
}

impl Service for UnderSystemd {
    fn test(&self) -> &str {
        &self.bed.name
    }

    fn port(&self) -> u16 {
        self.bed.port
    }

    fn deploy(&self, variant: &str) {
        std::fs::write(&self.variant_file, variant).unwrap();
    }

    fn restart(&self) -> Restarted {
        let baton = env!("CARGO_BIN_EXE_baton");
        let t0 = Instant::now();
        let out = self
            .bed
            .tb
            .run_with_timeout(&[baton, "restart", "--control", CONTROL], RESTART_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: baton restart: {e}", self.bed.name));
        Restarted {
            code: out.status.code(),
            stdout: out.stdout.clone(),
            stderr: out.stderr.clone(),
            took: t0.elapsed(),
        }
    }

    fn status(&self) -> serde_json::Value {
        let baton = env!("CARGO_BIN_EXE_baton");
        let out = self.bed.run(&[baton, "status", "--control", CONTROL, "--json"]);
        assert!(out.success(), "{}: baton status: {out}\n{}", self.bed.name, self.diagnostics());
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{}: status JSON: {e}: {}", self.bed.name, out.stdout))
    }

    fn diagnostics(&self) -> String {
        let journal = self.bed.journal(Some(APP));
        let lines: Vec<&str> = journal.lines().collect();
        format!("--- journal of {APP} (end) ---\n{}", lines[lines.len().saturating_sub(80)..].join("\n"))
    }

    fn reports_output(&self) -> bool {
        false
    }
}

fn gunicorn_restarts(flavor: Flavor, test: &str) {
    let Some(svc) = UnderSystemd::start(flavor, test, Server::Gunicorn, &[]) else { return };
    support::good_restarts_lose_nothing(&svc);
}

fn gunicorn_proven_restarts(flavor: Flavor, test: &str) {
    let server = Server::Gunicorn;
    let Some(svc) = UnderSystemd::start(flavor, test, server, &server.proven_args()) else { return };
    support::good_restarts_lose_nothing(&svc);
}

fn node_restarts(flavor: Flavor, test: &str) {
    let server = Server::Node;
    let Some(svc) = UnderSystemd::start(flavor, test, server, &server.proven_args()) else { return };
    support::good_restarts_lose_nothing(&svc);
}

/// (b) for `server` and `deploy`, with the server's proven options.
fn refused(flavor: Flavor, test: &str, server: Server, deploy: Deploy) {
    let Some(svc) = UnderSystemd::start(flavor, test, server, &server.proven_args()) else { return };
    support::bad_deploy_is_refused_without_impact(&svc, server, deploy);
}

fn gunicorn_import_error(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Gunicorn, Deploy::ExitsBeforeReady);
}

fn gunicorn_crash_after_ready(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Gunicorn, Deploy::CrashesAfterReady);
}

fn gunicorn_http_500(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Gunicorn, Deploy::Answers500);
}

fn node_exit_before_ready(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Node, Deploy::ExitsBeforeReady);
}

fn node_crash_after_listening(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Node, Deploy::CrashesAfterReady);
}

fn node_http_500(flavor: Flavor, test: &str) {
    refused(flavor, test, Server::Node, Deploy::Answers500);
}

/// (c) for `server`.
fn first_request_crash(flavor: Flavor, test: &str, server: Server) {
    let Some(svc) = UnderSystemd::start(flavor, test, server, &server.proven_args()) else { return };
    support::first_real_request_crash(&svc, server);
}

fn gunicorn_first_request_crash(flavor: Flavor, test: &str) {
    first_request_crash(flavor, test, Server::Gunicorn);
}

fn node_first_request_crash(flavor: Flavor, test: &str) {
    first_request_crash(flavor, test, Server::Node);
}

baton_testbed::systemd_tests! {
    gunicorn_restarts:
    gunicorn_restarts_under_load_lose_nothing_on_252: Host,
    gunicorn_restarts_under_load_lose_nothing_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    gunicorn_proven_restarts:
    gunicorn_proven_restarts_under_load_lose_nothing_on_252: Host,
    gunicorn_proven_restarts_under_load_lose_nothing_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    node_restarts:
    node_restarts_under_load_lose_nothing_on_252: Host,
    node_restarts_under_load_lose_nothing_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    gunicorn_import_error:
    gunicorn_import_error_is_refused_without_impact_on_252: Host,
    gunicorn_import_error_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    gunicorn_crash_after_ready:
    gunicorn_crash_after_ready_is_refused_without_impact_on_252: Host,
    gunicorn_crash_after_ready_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    gunicorn_http_500:
    gunicorn_http_500_is_refused_without_impact_on_252: Host,
    gunicorn_http_500_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    node_exit_before_ready:
    node_exit_before_ready_is_refused_without_impact_on_252: Host,
    node_exit_before_ready_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    node_crash_after_listening:
    node_crash_after_listening_is_refused_without_impact_on_252: Host,
    node_crash_after_listening_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    node_http_500:
    node_http_500_is_refused_without_impact_on_252: Host,
    node_http_500_is_refused_without_impact_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    gunicorn_first_request_crash:
    gunicorn_crash_on_first_real_request_is_handed_back_on_252: Host,
    gunicorn_crash_on_first_real_request_is_handed_back_on_257: Trixie,
}
baton_testbed::systemd_tests! {
    node_first_request_crash:
    node_crash_on_first_real_request_is_handed_back_on_252: Host,
    node_crash_on_first_real_request_is_handed_back_on_257: Trixie,
}
