//! What the file holds, before validation. Every field is optional here so that serde
//! never stops at a missing one: required fields are checked in `build`, all at once.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::LedPin;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node_id: Option<Spanned<String>>,
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) log_level: Option<Spanned<String>>,
    pub(super) trust_unsynchronised_clock: Option<bool>,
    pub(super) mqtt: Option<Spanned<RawMqtt>>,
    pub(super) providers: Vec<Spanned<RawProvider>>,
    pub(super) routing: Option<Spanned<RawRouting>>,
    pub(super) leds: Option<Spanned<RawLeds>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawMqtt {
    pub(super) url: Option<Spanned<String>>,
    pub(super) topic_prefix: Option<Spanned<String>>,
    pub(super) share_group: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_cert_file: Option<Spanned<String>>,
    pub(super) client_key_file: Option<Spanned<String>>,
    pub(super) max_payload_bytes: Option<Spanned<usize>>,
    pub(super) allowed_reply_prefixes: Option<Vec<Spanned<String>>>,
    pub(super) homeassistant: Option<bool>,
    pub(super) homeassistant_prefix: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) name: Option<Spanned<String>>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) base_url: Option<Spanned<String>>,
    pub(super) daily_reset: Option<Spanned<String>>,
    pub(super) timeout_secs: Option<Spanned<u64>>,
    pub(super) max_concurrency: Option<Spanned<usize>>,
    pub(super) models: BTreeMap<Spanned<String>, RawLimits>,
    pub(super) keys: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) rpm: Option<Spanned<u64>>,
    pub(super) rpd: Option<Spanned<u64>>,
    pub(super) tpm: Option<Spanned<u64>>,
    pub(super) tpd: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) label: Option<Spanned<String>>,
    pub(super) secret_file: Option<Spanned<String>>,
    pub(super) secret_env: Option<Spanned<String>>,
    pub(super) account: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) auto: Option<Vec<Spanned<String>>>,
    pub(super) max_queue: Option<usize>,
    pub(super) max_queue_bytes: Option<Spanned<usize>>,
    pub(super) order: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLeds {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) chip: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) green: Option<Spanned<LedPin>>,
    pub(super) amber: Option<Spanned<LedPin>>,
    pub(super) red: Option<Spanned<LedPin>>,
    pub(super) activity: Option<Spanned<LedPin>>,
}

/// A pin is written as a line number or as an LED name.
impl<'de> Deserialize<'de> for LedPin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PinVisitor;

        impl Visitor<'_> for PinVisitor {
            type Value = LedPin;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPIO line number or an LED name")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LedPin, E> {
                u32::try_from(v)
                    .map(LedPin::Line)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LedPin, E> {
                u32::try_from(v)
                    .map(LedPin::Line)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<LedPin, E> {
                Ok(LedPin::Name(v.to_owned()))
            }
        }

        deserializer.deserialize_any(PinVisitor)
    }
}
