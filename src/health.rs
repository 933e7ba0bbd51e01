//! One health value for the whole node, derived in one place from the keys, the broker and
//! the store, so that the retained health topic, `keyrelay status` and the LEDs never disagree.
//! This module only computes; publishing and driving the lights belong to `mqtt` and `leds`.

use jiff::Timestamp;
use serde::Serialize;

use crate::config::Target;
use crate::rotator::Rotator;
use crate::rotator::{KeyReport, KeyState};

/// Under this fraction of a daily limit left, a key makes the node `degraded` (SPEC §3, §5).
pub const DEGRADED_FRACTION: f64 = 0.2;

/// The node's state (SPEC §3): what the `auto` route can do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Every key ready, none under [`DEGRADED_FRACTION`] of today's budget.
    Healthy,
    /// `auto` can be served now, but some key is cooling, exhausted or disabled, or low.
    Degraded,
    /// No key of the `auto` route can serve now.
    Exhausted,
}

/// Whether the wall clock is trusted for daily resets (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockState {
    Synchronised,
    Unsynchronised,
}

impl ClockState {
    pub fn from_synced(synced: bool) -> Self {
        if synced {
            ClockState::Synchronised
        } else {
            ClockState::Unsynchronised
        }
    }
}

/// Task counters since the daemon started (SPEC §3 `tasks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Counters {
    /// Replies with status `ok`.
    pub ok: u64,
    /// Replies with status `error`.
    pub failed: u64,
    /// HTTP calls made to providers, retries and moves to other keys included.
    pub provider_calls: u64,
    /// 429s received.
    pub rate_limited: u64,
}

/// The health object of SPEC §3: the retained `{prefix}/{node_id}/health` payload and the
/// output of `keyrelay status --json`. Field order is the order the SPEC shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub state: HealthState,
    pub clock: ClockState,
    pub queue: usize,
    pub tasks: Counters,
    pub keys: Vec<KeyReport>,
}

impl Health {
    /// The JSON payload of the health topic.
    pub fn to_json(&self) -> String {
        // Every field is a plain string, number, map with string keys or a timestamp, for
        // which serde_json cannot fail; the fallback exists only so no panic path is left.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Derives the node's health. `auto_servable_now` comes from the rotator: whether some key of
/// the `auto` route could take a task at this instant. It decides `exhausted` on its own,
/// because a key can be `ready` and still have no room for `auto`'s models.
pub fn derive(
    keys: Vec<KeyReport>,
    auto_servable_now: bool,
    queue: usize,
    tasks: Counters,
    clock_synced: bool,
) -> Health {
    let state = if !auto_servable_now {
        HealthState::Exhausted
    } else if keys
        .iter()
        .all(|k| k.state == KeyState::Ready && k.day_fraction_left >= DEGRADED_FRACTION)
    {
        HealthState::Healthy
    } else {
        HealthState::Degraded
    };
    Health {
        state,
        clock: ClockState::from_synced(clock_synced),
        queue,
        tasks,
        keys,
    }
}

/// The node's health as `rotator` sees it, `auto` being the route whose service decides
/// between degraded and exhausted.
pub fn of_rotator(
    rotator: &Rotator,
    auto: &[Target],
    now: Timestamp,
    synced: bool,
    queue: usize,
    tasks: Counters,
) -> Health {
    derive(
        rotator.key_reports(now, synced),
        rotator.servable_now(auto, now, synced),
        queue,
        tasks,
        synced,
    )
}

/// What one light does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LightState {
    #[default]
    Off,
    On,
    Blink,
}

/// The pattern of the four lights of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lights {
    pub green: LightState,
    pub amber: LightState,
    pub red: LightState,
    /// Always `Off` from [`lights`]: the LED driver pulses it once per finished task.
    pub activity: LightState,
}

impl Lights {
    /// Everything dark: before the first health value, and on a clean stop.
    pub const fn all_off() -> Lights {
        Lights {
            green: LightState::Off,
            amber: LightState::Off,
            red: LightState::Off,
            activity: LightState::Off,
        }
    }

    /// Whether any light blinks, i.e. whether the blink timer has to run.
    pub fn any_blinking(&self) -> bool {
        [self.green, self.amber, self.red, self.activity].contains(&LightState::Blink)
    }
}

/// The lights for the node's condition, SPEC §5. `health_state` is `None` until the first
/// health value exists (or while the store cannot give one).
///
/// One pattern wins, in this order, most urgent first:
/// 1. store unusable → red blinking: nothing can be spent or recorded, whatever the broker
///    or the keys say, and only an operator (disk full, broken SD card) can fix it;
/// 2. broker unreachable → amber blinking: no task can arrive or be answered, so the keys'
///    state says nothing a user would notice; it usually heals by itself (reconnecting);
/// 3. exhausted → red steady: tasks arrive but none can be served now;
/// 4. degraded → green + amber steady;
/// 5. healthy → green steady.
///
/// With the store usable and the broker connected but no health yet (the first instant of
/// the start), all lights stay off rather than claim a state not yet known.
pub fn lights(
    health_state: Option<HealthState>,
    broker_connected: bool,
    store_usable: bool,
) -> Lights {
    use LightState::{Blink, Off, On};
    let (green, amber, red) = if !store_usable {
        (Off, Off, Blink)
    } else if !broker_connected {
        (Off, Blink, Off)
    } else {
        match health_state {
            Some(HealthState::Exhausted) => (Off, Off, On),
            Some(HealthState::Degraded) => (On, On, Off),
            Some(HealthState::Healthy) => (On, Off, Off),
            None => (Off, Off, Off),
        }
    };
    Lights {
        green,
        amber,
        red,
        activity: Off,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::Remaining;
    use LightState::{Blink, Off, On};

    fn key(label: &str, state: KeyState, fraction: f64) -> KeyReport {
        KeyReport {
            label: label.to_string(),
            provider: "groq".to_string(),
            state,
            until: None,
            reason: None,
            remaining: BTreeMap::new(),
            day_fraction_left: fraction,
        }
    }

    fn state_of(keys: Vec<KeyReport>, servable: bool) -> HealthState {
        derive(keys, servable, 0, Counters::default(), true).state
    }

    #[test]
    fn every_key_ready_with_budget_is_healthy() {
        let keys = vec![
            key("a", KeyState::Ready, 1.0),
            key("b", KeyState::Ready, DEGRADED_FRACTION),
        ];
        assert_eq!(state_of(keys, true), HealthState::Healthy);
    }

    #[test]
    fn a_key_under_a_fifth_of_todays_budget_degrades() {
        let keys = vec![
            key("a", KeyState::Ready, 1.0),
            key("b", KeyState::Ready, 0.19),
        ];
        assert_eq!(state_of(keys, true), HealthState::Degraded);
    }

    #[test]
    fn a_cooling_exhausted_or_disabled_key_degrades() {
        for bad in [KeyState::Cooling, KeyState::Exhausted, KeyState::Disabled] {
            let keys = vec![key("a", KeyState::Ready, 1.0), key("b", bad, 1.0)];
            assert_eq!(state_of(keys, true), HealthState::Degraded, "{bad:?}");
        }
    }

    #[test]
    fn auto_not_servable_is_exhausted_even_with_ready_keys() {
        let keys = vec![key("a", KeyState::Ready, 1.0)];
        assert_eq!(state_of(keys, false), HealthState::Exhausted);
        assert_eq!(state_of(Vec::new(), false), HealthState::Exhausted);
    }

    #[test]
    fn health_serializes_as_the_spec_shows() {
        let mut remaining = BTreeMap::new();
        remaining.insert(
            "llama-3.3-70b-versatile".to_string(),
            Remaining {
                rpd: Some(812),
                tpd: Some(53120),
            },
        );
        let cooling = KeyReport {
            label: "groq-1".to_string(),
            provider: "groq".to_string(),
            state: KeyState::Cooling,
            until: Some("2026-11-22T08:00:00Z".parse().unwrap()),
            reason: Some("429 from groq".to_string()),
            remaining,
            day_fraction_left: 0.8,
        };
        let counters = Counters {
            ok: 812,
            failed: 3,
            provider_calls: 840,
            rate_limited: 2,
        };
        let health = derive(vec![cooling], true, 0, counters, false);
        let json: serde_json::Value = serde_json::from_str(&health.to_json()).unwrap();
        let expected = serde_json::json!({
            "state": "degraded",
            "clock": "unsynchronised",
            "queue": 0,
            "tasks": {"ok": 812, "failed": 3, "provider_calls": 840, "rate_limited": 2},
            "keys": [{
                "label": "groq-1",
                "provider": "groq",
                "state": "cooling",
                "until": "2026-11-22T08:00:00Z",
                "reason": "429 from groq",
                "remaining": {"llama-3.3-70b-versatile": {"rpd": 812, "tpd": 53120}}
            }]
        });
        assert_eq!(json, expected);
        // The order operators read in `mosquitto_sub` output is the SPEC's order.
        assert!(
            health
                .to_json()
                .starts_with(r#"{"state":"degraded","clock":"unsynchronised","queue":0,"tasks":"#)
        );
    }

    #[test]
    fn a_ready_key_has_no_until_or_reason() {
        let health = derive(
            vec![key("a", KeyState::Ready, 1.0)],
            true,
            3,
            Counters::default(),
            true,
        );
        let json: serde_json::Value = serde_json::from_str(&health.to_json()).unwrap();
        assert_eq!(json["state"], "healthy");
        assert_eq!(json["clock"], "synchronised");
        assert_eq!(json["queue"], 3);
        assert_eq!(
            json["keys"][0],
            serde_json::json!({"label": "a", "provider": "groq", "state": "ready", "remaining": {}})
        );
    }

    fn rgb(l: Lights) -> (LightState, LightState, LightState) {
        assert_eq!(
            l.activity, Off,
            "activity is the driver's, never the health's"
        );
        (l.green, l.amber, l.red)
    }

    #[test]
    fn healthy_and_connected_is_green_steady() {
        assert_eq!(
            rgb(lights(Some(HealthState::Healthy), true, true)),
            (On, Off, Off)
        );
    }

    #[test]
    fn degraded_is_green_and_amber_steady() {
        assert_eq!(
            rgb(lights(Some(HealthState::Degraded), true, true)),
            (On, On, Off)
        );
    }

    #[test]
    fn exhausted_is_red_steady() {
        assert_eq!(
            rgb(lights(Some(HealthState::Exhausted), true, true)),
            (Off, Off, On)
        );
    }

    #[test]
    fn broker_unreachable_is_amber_blinking_whatever_the_keys() {
        for h in [
            None,
            Some(HealthState::Healthy),
            Some(HealthState::Degraded),
            Some(HealthState::Exhausted),
        ] {
            assert_eq!(rgb(lights(h, false, true)), (Off, Blink, Off), "{h:?}");
        }
    }

    #[test]
    fn unusable_store_is_red_blinking_over_everything() {
        for connected in [true, false] {
            for h in [
                None,
                Some(HealthState::Healthy),
                Some(HealthState::Exhausted),
            ] {
                assert_eq!(rgb(lights(h, connected, false)), (Off, Off, Blink));
            }
        }
    }

    #[test]
    fn no_health_yet_shows_nothing() {
        assert_eq!(lights(None, true, true), Lights::all_off());
    }
}
