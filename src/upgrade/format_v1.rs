//! Reading handover format 1, what Batons before the typed
//! [`Policy`](crate::supervisor::Policy) wrote: a package upgrade runs
//! `baton upgrade` from the previous release to this one, so its state must
//! be adopted as it is.
//!
//! Format 1 differs from 2 only in the supervisor's policy: its fields sat
//! flat in `supervisor` (`ready_timeout`, `stop_signal`, ..., the backoff
//! as `backoff_initial`, `backoff_max`, `backoff_burst`,
//! `backoff_interval`, and `output_mode`, absent in states written before
//! `--output` existed). [`migrate`] moves them into `supervisor.policy`,
//! which then deserializes like format 2.

use serde_json::{Map, Value};

/// The policy's fields that format 1 has flat, under the same names.
const POLICY_FIELDS: [&str; 8] = [
    "ready_timeout",
    "stop_signal",
    "stop_timeout",
    "notify_access",
    "watchdog",
    "fdstore_max",
    "health_cmd",
    "max_draining",
];
/// The backoff's fields, `backoff_`-prefixed in format 1.
const BACKOFF_FIELDS: [&str; 4] = ["initial", "max", "burst", "interval"];

/// Rewrites a format-1 state (parsed JSON) into format 2's shape. `Err`
/// names the field that is missing.
pub fn migrate(state: &mut Value) -> Result<(), String> {
    let supervisor = state
        .get_mut("supervisor")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| "it has no supervisor object".to_owned())?;
    let mut take = |key: &str| supervisor.remove(key).ok_or_else(|| format!("supervisor.{key} is missing"));
    let mut policy = Map::new();
    for key in POLICY_FIELDS {
        policy.insert(key.to_owned(), take(key)?);
    }
    let mut backoff = Map::new();
    for key in BACKOFF_FIELDS {
        backoff.insert(key.to_owned(), take(&format!("backoff_{key}"))?);
    }
    policy.insert("backoff".to_owned(), Value::Object(backoff));
    // `#[serde(default)]` in format 1: `pipe`, the only mode there was.
    let output = take("output_mode").unwrap_or_else(|_| Value::String("pipe".into()));
    policy.insert("output".to_owned(), output);
    supervisor.insert("policy".to_owned(), Value::Object(policy));
    Ok(())
}

/// The other way: a format-2 state (serialized JSON) in format 1's shape,
/// for a target binary that reads only format 1 (a package downgrade to
/// the previous release).
pub fn downgrade(state: &mut Value) -> Result<(), String> {
    let supervisor = state
        .get_mut("supervisor")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| "it has no supervisor object".to_owned())?;
    let Some(Value::Object(mut policy)) = supervisor.remove("policy") else {
        return Err("supervisor.policy is missing".into());
    };
    let mut take = |key: &str| policy.remove(key).ok_or_else(|| format!("supervisor.policy.{key} is missing"));
    for key in POLICY_FIELDS {
        let value = take(key)?;
        supervisor.insert(key.to_owned(), value);
    }
    let Value::Object(mut backoff) = take("backoff")? else {
        return Err("supervisor.policy.backoff is not an object".into());
    };
    for key in BACKOFF_FIELDS {
        let value = backoff.remove(key).ok_or_else(|| format!("supervisor.policy.backoff.{key} is missing"))?;
        supervisor.insert(format!("backoff_{key}"), value);
    }
    let output = take("output")?;
    supervisor.insert("output_mode".to_owned(), output);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustix::process::Signal;

    use crate::output::OutputMode;
    use crate::supervisor::{Backoff, NotifyAccess, Policy};
    use crate::upgrade::{STATE_FORMAT, parse_state, state_json};

    /// Captured from the binary of main at 800ca5b (format 1): `baton run
    /// --name cap --listen http=127.0.0.1:18731 --ready-timeout 20s
    /// --stop-timeout 7s --notify-access all --fdstore-max 100 --health-cmd
    /// true --max-draining 3 --restart-burst 7 --restart-interval 45s
    /// --output pipe --stop-signal SIGINT -- baton-httpd ...`, one `baton
    /// restart`, then `baton upgrade --binary` a script that copied the
    /// state memfd and exec'd that binary again (which adopted it).
    const CAPTURED_V1: &str = include_str!("fixtures/handover-v1.json");

    #[test]
    fn a_state_written_by_the_previous_release_is_adopted_with_its_policy() {
        let h = parse_state(CAPTURED_V1.as_bytes()).unwrap();
        assert_eq!(h.format, 1);
        assert_eq!(
            h.supervisor.policy,
            Policy {
                ready_timeout: Duration::from_secs(20),
                stop_signal: Signal::INT,
                stop_timeout: Duration::from_secs(7),
                notify_access: NotifyAccess::All,
                watchdog: None,
                fdstore_max: 100,
                health_cmd: Some("true".into()),
                max_draining: 3,
                backoff: Backoff {
                    initial: Duration::from_millis(100),
                    max: Duration::from_secs(30),
                    burst: 7,
                    interval: Duration::from_secs(45),
                },
                output: OutputMode::Pipe,
                probe: false,
                // Proven as that release did: by READY=1 and the health
                // command, taking over at once.
                proving: crate::supervisor::Proving::by_ready_alone(),
                compat: crate::supervisor::Compat::default(),
            }
        );
        // The rest is read as before.
        let s = &h.supervisor;
        assert_eq!((s.name.as_str(), s.next_number, s.restarts), ("cap", 3, 1));
        let states: Vec<(u64, &str)> = s.generations.iter().map(|g| (g.number, g.state.as_str())).collect();
        assert_eq!(states, [(1, "draining"), (2, "active")]);
        assert_eq!(s.sockets[0].local, "tcp 127.0.0.1:18731");
    }

    #[test]
    fn a_format_1_state_without_output_mode_means_pipe() {
        let mut v: serde_json::Value = serde_json::from_str(CAPTURED_V1).unwrap();
        v["supervisor"].as_object_mut().unwrap().remove("output_mode");
        let h = parse_state(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(h.supervisor.policy.output, OutputMode::Pipe);
    }

    #[test]
    fn a_format_1_state_missing_a_policy_field_names_it() {
        let mut v: serde_json::Value = serde_json::from_str(CAPTURED_V1).unwrap();
        v["supervisor"].as_object_mut().unwrap().remove("backoff_burst");
        let e = parse_state(&serde_json::to_vec(&v).unwrap()).unwrap_err().to_string();
        assert!(e.contains("supervisor.backoff_burst is missing"), "{e}");
    }

    #[test]
    fn a_state_for_a_format_1_reader_has_exactly_the_fields_the_previous_release_wrote() {
        let mut h = parse_state(CAPTURED_V1.as_bytes()).unwrap();
        h.format = 1;
        let written: serde_json::Value = serde_json::from_slice(&state_json(&h).unwrap()).unwrap();
        let captured: serde_json::Value = serde_json::from_str(CAPTURED_V1).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v["supervisor"].as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&written), keys(&captured));
        assert_eq!(written["supervisor"]["backoff_burst"], 7);
        assert_eq!(written["supervisor"]["notify_access"], "all");
        assert_eq!(written["supervisor"]["stop_signal"], 2);
        assert_eq!(parse_state(&state_json(&h).unwrap()).unwrap().supervisor.policy, h.supervisor.policy);
    }

    #[test]
    fn a_generations_probe_listener_is_carried_and_absent_without_one() {
        let mut h = parse_state(CAPTURED_V1.as_bytes()).unwrap();
        h.format = STATE_FORMAT;
        // Without probes the generations are written as before probes existed.
        let plain: serde_json::Value = serde_json::from_slice(&state_json(&h).unwrap()).unwrap();
        assert!(plain["supervisor"]["generations"].as_array().unwrap().iter().all(|g| g.get("probe").is_none()));
        h.supervisor.generations[1].probe = Some(1000);
        let again = parse_state(&state_json(&h).unwrap()).unwrap();
        assert_eq!(again.supervisor.generations[1].probe, Some(1000));
        assert_eq!(again.supervisor.generations[0].probe, None);
        assert!(again.fds().contains(&1000), "the probe listener must survive the exec");
    }

    #[test]
    fn the_current_format_round_trips() {
        let mut h = parse_state(CAPTURED_V1.as_bytes()).unwrap();
        h.format = STATE_FORMAT;
        let again = parse_state(&state_json(&h).unwrap()).unwrap();
        assert_eq!(again.supervisor.policy, h.supervisor.policy);
        assert_eq!(again.supervisor.generations.len(), 2);
    }
}
