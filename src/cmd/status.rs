//! `keyrelay status`: each key's health, from the running daemon over its control
//! socket, else read from the state file when no daemon runs.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use super::CmdError;
use crate::control::{self, Request};

pub async fn run(path: &Path, json: bool) -> Result<ExitCode, CmdError> {
    let config = super::load_config(path)?;
    let health = match control::ask(&config, &Request::Status).await {
        Some(response) => response.health.ok_or_else(|| {
            CmdError::Runtime(
                response
                    .error
                    .unwrap_or_else(|| "the daemon sent no health".into()),
            )
        })?,
        None => offline::health(&config).await?,
    };
    if json {
        println!("{health}");
    } else {
        print!("{}", table(&health));
    }
    Ok(ExitCode::SUCCESS)
}

/// A human-readable table of the health object.
pub fn table(health: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node: {}   clock: {}   queue: {}",
        text(&health["state"]),
        text(&health["clock"]),
        health["queue"]
    );
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:<10} {:<22} {:<28} REASON",
        "KEY", "PROVIDER", "STATE", "UNTIL", "LEFT TODAY"
    );
    for key in health["keys"].as_array().into_iter().flatten() {
        let remaining = key["remaining"]
            .as_object()
            .map(|models| {
                models
                    .iter()
                    .map(|(model, r)| {
                        let part = |name: &str| {
                            r.get(name)
                                .and_then(Value::as_u64)
                                .map(|n| format!("{n} {name}"))
                        };
                        let parts: Vec<String> =
                            [part("rpd"), part("tpd")].into_iter().flatten().collect();
                        format!(
                            "{model}: {}",
                            if parts.is_empty() {
                                "unlimited".into()
                            } else {
                                parts.join(", ")
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<10} {:<22} {:<28} {}",
            text(&key["label"]),
            text(&key["provider"]),
            text(&key["state"]),
            text(&key["until"]),
            remaining,
            key["reason"].as_str().unwrap_or("")
        );
    }
    out
}

/// Reading the state file directly, for when no daemon runs.
pub mod offline {
    use super::CmdError;
    use crate::config::Config;
    use crate::health::Counters;

    pub async fn health(config: &Config) -> Result<serde_json::Value, CmdError> {
        let (_store, rotator) = super::super::open_state(config).await?;
        let clock = crate::clock::SystemClock {
            trust_unsynchronised: config.trust_unsynchronised_clock,
        };
        let synced = crate::clock::Clock::synchronised(&clock);
        let h = crate::health::of_rotator(
            &rotator,
            &config.routing.auto,
            jiff::Timestamp::now(),
            synced,
            0,
            Counters::default(),
        );
        serde_json::to_value(h).map_err(|e| CmdError::Runtime(e.to_string()))
    }
}
