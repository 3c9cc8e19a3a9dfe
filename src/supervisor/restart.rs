//! The restart transaction's edge: spawning a generation and its health
//! check, feeding their exits to the core, and keeping a failed start's
//! output for its report (the decisions are the core's: `core::transaction`).

use super::*;

impl Supervisor {
    /// Starts generation `number` (the core's [`Action::Spawn`]).
    pub(super) fn spawn_generation(&mut self, number: u64, slot: Slot) {
        match self.spawn(number, slot) {
            Ok(p) => {
                let leader = p.child.pid;
                tracing::info!(
                    event = "spawned",
                    generation = number,
                    pid = leader,
                    "generation {number} started as pid {leader}"
                );
                self.procs.push(p);
                self.feed(Input::Spawned { generation: number, leader, slot });
            }
            Err(why) => self.feed(Input::SpawnFailed { generation: number, why }),
        }
    }

    /// Runs `--health-cmd` for generation `number`, which sent READY=1
    /// (with its probe listener's address, under `--probe`).
    pub(super) fn run_health_check(&mut self, number: u64) {
        let Some(cmd) = self.cfg.policy.health_cmd.clone() else { return };
        let pid = self.main_pid(number);
        let sh = AppCommand::new("/bin/sh".as_ref(), &["-c".into(), cmd.into()]);
        let mut extra = vec![("BATON_PID", pid.to_string()), ("BATON_GENERATION", number.to_string())];
        if let Some(probe) = self.procs(number).and_then(|p| p.probe.as_ref()) {
            extra.push((probe::PROBE_ADDR_ENV, probe.addr.to_string()));
        }
        let setup = GenerationSetup { extra_env: &extra, ..GenerationSetup::default() };
        match sh.and_then(|sh| sh.spawn(&setup)) {
            Ok(child) => {
                let pid = child.pid;
                match self.procs_mut(number) {
                    Some(p) => p.health = Some(child),
                    None => drop(child.signal_group(Signal::KILL)),
                }
                self.feed(Input::HealthCheckStarted { generation: number, pid });
            }
            Err(e) => self.feed(Input::HealthCheckNotRun { generation: number, why: e.to_string() }),
        }
    }

    /// A child of Baton's was reaped.
    pub(super) fn on_exit(&mut self, pid: u32, status: &std::process::ExitStatus) {
        self.on_gone(pid, Exit::from_status(status));
    }

    /// A child is gone (`how` it ended): its handle goes (a health check's
    /// process group must never be signalled once reaped), the core
    /// decides what it means.
    pub(super) fn on_gone(&mut self, pid: u32, how: Exit) {
        for p in &mut self.procs {
            if p.health.as_ref().is_some_and(|h| h.pid == pid) {
                p.health = None;
            }
        }
        self.feed(Input::Exited { pid, exit: how });
    }

    /// The output of the generation whose exit report waits may be complete.
    pub(super) fn output_maybe_complete(&mut self) {
        if let Some(generation) = self.core.awaiting_output()
            && self.procs(generation).is_none_or(|p| p.output.is_closed())
        {
            self.feed(Input::OutputComplete { generation });
        }
    }

    /// Keeps a failed start's last `STATUS=` and output lines, and where
    /// its output is if Baton did not capture it, for the report the
    /// core's next actions render.
    pub(super) fn keep_failed_output(&mut self, number: u64, status_text: Option<String>) {
        let (lines, hint) = match self.procs(number) {
            Some(p) => (p.output.lines(), self.output_hint(p)),
            None => (Vec::new(), None),
        };
        self.failed_output = Some(FailedOutput { number, status_text, lines, hint });
    }

    /// Where `p`'s output can be read if Baton did not capture it.
    pub(super) fn output_hint(&self, p: &Procs) -> Option<String> {
        match p.output {
            Output::Captured(_) => None,
            Output::Inherited => {
                let since = std::time::SystemTime::now().checked_sub(p.spawned_at.elapsed());
                Some(self.inherited_to.hint(p.main_pid(), since.unwrap_or(std::time::UNIX_EPOCH)))
            }
        }
    }

    /// Where generation `number`'s output is, if Baton did not capture it.
    pub(super) fn hint_for(&self, number: u64) -> Option<String> {
        self.procs(number).and_then(|p| self.output_hint(p))
    }
}
