//! Turns the raw file into the typed `Config`, one section per file, reporting every
//! problem to the `Checker` rather than stopping at the first.

mod leds;
mod mqtt;
mod providers;
mod routing;

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::check::Checker;
use super::raw::RawConfig;
use super::{Config, DEFAULT_STATE_DIR, Environment};
use leds::build_leds;
use mqtt::build_mqtt;
use providers::build_providers;
use routing::build_routing;

/// Where systemd puts the `StateDirectory=` it made for the service.
const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

pub(super) fn build(
    raw: RawConfig,
    source: &Path,
    env: &dyn Environment,
    c: &mut Checker<'_>,
) -> Config {
    // Files named in the config are found from the config's own folder, so that a
    // config and its key files can be moved together and checked from anywhere.
    let base = source.parent().unwrap_or(Path::new(""));

    let node_id = match raw.node_id {
        Some(node_id) => {
            if let Some(why) = topic_level_problem(node_id.get_ref()) {
                c.at(&node_id, "node_id", why);
            }
            node_id.into_inner()
        }
        None => match env.hostname() {
            Some(host) => {
                if let Some(why) = topic_level_problem(&host) {
                    c.problem(
                        None,
                        "node_id",
                        format!("not set, and the hostname {host:?} cannot be one: {why}"),
                    );
                }
                host
            }
            None => {
                c.problem(
                    None,
                    "node_id",
                    "not set, and no hostname in /proc/sys/kernel/hostname or /etc/hostname",
                );
                String::new()
            }
        },
    };

    let state_dir = match raw.state_dir {
        Some(dir) => {
            if dir.get_ref().is_empty() {
                c.at(&dir, "state_dir", "must not be empty");
            }
            PathBuf::from(dir.into_inner())
        }
        None => env
            .var(STATE_DIRECTORY_ENV)
            .and_then(|dirs| {
                // systemd joins several StateDirectory= entries with ':'; the first is ours.
                let dirs = dirs.to_string_lossy().into_owned();
                dirs.split(':')
                    .next()
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
    };

    let log_level = match raw.log_level {
        Some(level) => level.get_ref().parse().unwrap_or_else(|_| {
            c.at(
                &level,
                "log_level",
                format!(
                    "unknown level {:?}: off, error, warn, info, debug or trace",
                    level.get_ref()
                ),
            );
            log::LevelFilter::Info
        }),
        None => log::LevelFilter::Info,
    };

    let mqtt = build_mqtt(
        raw.mqtt.map(Spanned::into_inner).unwrap_or_default(),
        base,
        env,
        c,
    );
    let providers = build_providers(raw.providers, base, env, c);
    let routing = build_routing(
        raw.routing.map(Spanned::into_inner).unwrap_or_default(),
        &providers,
        c,
    );
    let leds = build_leds(raw.leds, base, c);

    Config {
        source: source.to_owned(),
        node_id,
        state_dir,
        log_level,
        trust_unsynchronised_clock: raw.trust_unsynchronised_clock.unwrap_or(false),
        mqtt,
        providers: providers.into_iter().map(|p| p.config).collect(),
        routing,
        leds,
    }
}

/// Why `text` cannot be one level of an MQTT topic (node id, share group, label, name).
pub(super) fn topic_level_problem(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("must not be empty")
    } else if text.contains(['+', '#']) {
        Some("must not contain the MQTT wildcards + or #")
    } else if text.contains('/') {
        Some("must not contain /, which would make it two topic levels")
    } else if text.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Why `text` cannot begin a topic name (the topic prefix, a reply prefix).
pub(super) fn topic_prefix_problem(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("must not be empty")
    } else if text.contains(['+', '#']) {
        Some("must not contain the MQTT wildcards + or #")
    } else if text.starts_with('$') {
        Some("must not start with $, which the broker keeps for itself")
    } else if text.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Why `text` cannot be the root under which a whole set of topics lives (keyrelay's
/// own topic prefix, Home Assistant's discovery prefix): a topic prefix whose levels
/// are all there.
pub(super) fn topic_root_problem(text: &str) -> Option<&'static str> {
    topic_prefix_problem(text).or_else(|| {
        (text.starts_with('/') || text.ends_with('/') || text.contains("//"))
            .then_some("must not start or end with / or hold an empty level")
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::testing::*;

    #[test]
    fn state_dir_defaults_to_systemds_state_directory() {
        let env = FakeEnv::new().with("STATE_DIRECTORY", "/var/lib/keyrelay:/var/lib/other");
        assert_eq!(
            accept("", &env).state_dir,
            PathBuf::from("/var/lib/keyrelay")
        );
        let env = FakeEnv::new().with("STATE_DIRECTORY", "/var/lib/keyrelay");
        let config = accept("state_dir = \"/srv/relay\"", &env);
        assert_eq!(config.state_dir, PathBuf::from("/srv/relay"));
    }

    #[test]
    fn node_id_defaults_to_the_hostname_and_needs_one() {
        let mut env = FakeEnv::new();
        env.hostname = Some("relay-7".to_owned());
        assert_eq!(accept("", &env).node_id, "relay-7");
        env.hostname = None;
        refused("", &env, "node_id", "no hostname");
        assert_eq!(accept("node_id = \"set\"", &env).node_id, "set");
        env.hostname = Some("bad+host".to_owned());
        refused("", &env, "node_id", "cannot be one");
    }

    #[test]
    fn log_level_is_a_known_level() {
        refused(
            "log_level = \"verbose\"",
            &FakeEnv::new(),
            "log_level",
            "unknown level",
        );
        let config = accept("log_level = \"DEBUG\"", &FakeEnv::new());
        assert_eq!(config.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn topic_names_hold_no_wildcards() {
        let env = FakeEnv::new();
        for bad in ["", "a+b", "a#", "a/b"] {
            refused(&format!("node_id = \"{bad}\""), &env, "node_id", "must not");
            refused(
                &format!("[mqtt]\nshare_group = \"{bad}\""),
                &env,
                "mqtt.share_group",
                "must not",
            );
        }
        for bad in ["", "a/+/b", "a/#", "$SYS", "/a", "a/", "a//b"] {
            refused(
                &format!("[mqtt]\ntopic_prefix = \"{bad}\""),
                &env,
                "mqtt.topic_prefix",
                "must not",
            );
        }
        let config = accept("[mqtt]\ntopic_prefix = \"home/relay\"", &env);
        assert_eq!(config.mqtt.topic_prefix, "home/relay");
        for bad in [
            "",
            "clients/+",
            "$SYS/",
            "home/relay/",
            "home/relay/replies/",
            "home/",
        ] {
            let text = format!(
                "[mqtt]\ntopic_prefix = \"home/relay\"\nallowed_reply_prefixes = [\"{bad}\"]"
            );
            refused(&text, &env, "mqtt.allowed_reply_prefixes[0]", "");
        }
    }
}
