//! keyrelay: takes LLM tasks over MQTT and runs each through a pool of rate-limited
//! API keys, spending every key's budget before a provider has to refuse it.
//!
//! # Layout
//! - [`cli`] and [`cmd`]: the command line; one file per subcommand.
//! - [`config`]: the TOML file, validated into typed values; [`secret`]: keys that never print.
//! - [`mqtt`]: the broker connection and every topic name.
//! - [`task`]: the task and reply payloads, the error codes, reply-topic rules.
//! - [`provider`]: one file per wire format; each call's outcome classified for the rotator.
//! - [`ledger`]: budgets, windows and reservations per key and model (pure).
//! - [`rotator`]: which key serves a task next, and what a provider's answer means (pure).
//! - [`state`]: the schema of what is persisted: row names, key states, task records.
//! - [`store`]: the only module touching redb: budgets, key states and task records on disk.
//! - [`clock`]: wall time that never runs backwards, and whether it is synchronised.
//! - [`health`]: one health value from the broker and the keys, for topic, LEDs and `status`.
//! - [`leds`]: the lights, one file per backend.
//! - [`logging`]: journald or stderr.
//! - [`control`]: the local socket through which `status` and `reset` reach a running daemon.
//! - [`relay`]: the running daemon: intake, dispatch, replies.
//! - [`service`]: systemd notify, signals, shutdown.

pub mod cli;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod control;
pub mod health;
pub mod ledger;
pub mod leds;
pub mod logging;
pub mod mqtt;
pub mod provider;
pub mod relay;
pub mod rotator;
pub mod secret;
pub mod service;
pub mod state;
pub mod store;
pub mod task;

// The fake providers of `tests/it`, which the unit tests share, name this crate `keyrelay` as an
// integration test must.
#[cfg(test)]
extern crate self as keyrelay;
