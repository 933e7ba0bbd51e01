//! (in progress)

use jiff::Timestamp;
use serde::Serialize;
use std::collections::BTreeMap;

/// A key's state as operators see it (SPEC §3 health topic, `keyrelay status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Ready,
    Cooling,
    Exhausted,
    Disabled,
}

/// What remains today of one key's budget for one model; `None`: no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Remaining {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
}

/// One key, as the rotator reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyReport {
    pub label: String,
    pub provider: String,
    pub state: KeyState,
    /// When the state ends by itself (cooling, exhausted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub remaining: BTreeMap<String, Remaining>,
    /// The smallest fraction of a daily limit left over this key's models (1.0 when none is set);
    /// under 0.2 the node is `degraded`.
    #[serde(skip)]
    pub day_fraction_left: f64,
}
