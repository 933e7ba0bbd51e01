//! The `[mqtt]` section: the broker URL, topic names, credentials and TLS files.

use std::fs::File;
use std::path::Path;

use toml::Spanned;

use super::super::check::Checker;
use super::super::raw::RawMqtt;
use super::super::secrets::{read_secret, secret_origin};
use super::super::{
    DEFAULT_HOMEASSISTANT_PREFIX, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_SHARE_GROUP,
    DEFAULT_TOPIC_PREFIX, Environment, MqttConfig, SecretSource,
};
use super::{topic_level_problem, topic_prefix_problem, topic_root_problem};

const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";
const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;

fn parse_mqtt_url(text: &str) -> Result<(String, u16, bool), String> {
    // The URL itself is never echoed: a password may have been written into it.
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    let tls = match url.scheme() {
        "mqtt" => false,
        "mqtts" => true,
        _ => return Err("must start with mqtt:// or mqtts://".into()),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold credentials: use mqtt.username and mqtt.password_file".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("must be mqtt://host[:port] or mqtts://host[:port], with nothing after".into());
    }
    let host = match url.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
        Some(url::Host::Ipv4(addr)) => addr.to_string(),
        Some(url::Host::Ipv6(addr)) => addr.to_string(),
        _ => return Err("names no host".into()),
    };
    let port = url
        .port()
        .unwrap_or(if tls { MQTTS_PORT } else { MQTT_PORT });
    if port == 0 {
        return Err("port 0 is no port to connect to".into());
    }
    Ok((host, port, tls))
}

pub(super) fn build_mqtt(
    raw: RawMqtt,
    base: &Path,
    env: &dyn Environment,
    c: &mut Checker<'_>,
) -> MqttConfig {
    let broker = match &raw.url {
        Some(url) => parse_mqtt_url(url.get_ref())
            .map_err(|why| c.at(url, "mqtt.url", why))
            .ok(),
        None => parse_mqtt_url(DEFAULT_MQTT_URL).ok(),
    };
    // Unknown while the url is wrong: the TLS files are then not blamed for it.
    let tls_known = broker.as_ref().map(|(_, _, tls)| *tls);
    let (host, port, tls) = broker.unwrap_or_default();

    let topic_prefix = match raw.topic_prefix {
        Some(prefix) => {
            if let Some(why) = topic_root_problem(prefix.get_ref()) {
                c.at(&prefix, "mqtt.topic_prefix", why);
            }
            prefix.into_inner()
        }
        None => DEFAULT_TOPIC_PREFIX.to_owned(),
    };

    let share_group = match raw.share_group {
        Some(group) => {
            if let Some(why) = topic_level_problem(group.get_ref()) {
                c.at(&group, "mqtt.share_group", why);
            }
            group.into_inner()
        }
        None => DEFAULT_SHARE_GROUP.to_owned(),
    };

    let username = raw.username.map(|name| {
        if name.get_ref().is_empty() {
            c.at(
                &name,
                "mqtt.username",
                "must not be empty; leave it out for none",
            );
        }
        name.into_inner()
    });

    let password = raw.password_file.and_then(|file| {
        if username.is_none() {
            c.at(&file, "mqtt.password_file", "needs mqtt.username");
        }
        let source = SecretSource::File(base.join(file.get_ref()));
        read_secret(&source, env)
            .map_err(|e| {
                let origin = secret_origin(&source, file.get_ref());
                c.at(&file, "mqtt.password_file", format!("{origin}: {e}"));
            })
            .ok()
    });

    let mut tls_file = |file: Option<Spanned<String>>, field: &str| {
        file.map(|file| {
            let path = base.join(file.get_ref());
            if tls_known == Some(false) {
                c.at(&file, field, "is used only with an mqtts:// url");
            } else if let Err(e) = File::open(&path) {
                c.at(&file, field, format!("cannot open the file: {e}"));
            }
            path
        })
    };
    let cert_span = raw.client_cert_file.as_ref().map(Spanned::span);
    let key_span = raw.client_key_file.as_ref().map(Spanned::span);
    let ca_file = tls_file(raw.ca_file, "mqtt.ca_file");
    let client_cert_file = tls_file(raw.client_cert_file, "mqtt.client_cert_file");
    let client_key_file = tls_file(raw.client_key_file, "mqtt.client_key_file");
    match (cert_span, key_span) {
        (Some(span), None) => c.problem(
            Some(span),
            "mqtt.client_cert_file",
            "needs mqtt.client_key_file as well",
        ),
        (None, Some(span)) => c.problem(
            Some(span),
            "mqtt.client_key_file",
            "needs mqtt.client_cert_file as well",
        ),
        _ => {}
    }

    let max_payload_bytes = match raw.max_payload_bytes {
        Some(max) => {
            if *max.get_ref() == 0 {
                c.at(&max, "mqtt.max_payload_bytes", "0 would refuse every task");
            }
            max.into_inner()
        }
        None => DEFAULT_MAX_PAYLOAD_BYTES,
    };

    let allowed_reply_prefixes = raw.allowed_reply_prefixes.map(|prefixes| {
        let ours = format!("{topic_prefix}/");
        prefixes
            .into_iter()
            .enumerate()
            .map(|(i, prefix)| {
                let field = format!("mqtt.allowed_reply_prefixes[{i}]");
                let text = prefix.get_ref();
                if let Some(why) = topic_prefix_problem(text) {
                    c.at(&prefix, &field, why);
                } else if text.starts_with(&ours) || ours.starts_with(text.as_str()) {
                    c.at(
                        &prefix,
                        &field,
                        format!(
                            "overlaps {ours}, where replies are never sent but to {ours}replies/"
                        ),
                    );
                }
                prefix.into_inner()
            })
            .collect()
    });

    let homeassistant_prefix = match raw.homeassistant_prefix {
        Some(prefix) => {
            if let Some(why) = topic_root_problem(prefix.get_ref()) {
                c.at(&prefix, "mqtt.homeassistant_prefix", why);
            }
            prefix.into_inner()
        }
        None => DEFAULT_HOMEASSISTANT_PREFIX.to_owned(),
    };

    MqttConfig {
        host,
        port,
        tls,
        topic_prefix,
        share_group,
        username,
        password,
        ca_file,
        client_cert_file,
        client_key_file,
        max_payload_bytes,
        allowed_reply_prefixes,
        homeassistant: raw.homeassistant.unwrap_or(false),
        homeassistant_prefix,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::testing::*;
    use crate::secret::Secret;

    #[test]
    fn the_broker_url_is_mqtt_or_mqtts_host_and_port() {
        let env = FakeEnv::new();
        let broker = |url: &str| {
            let m = accept(&format!("[mqtt]\nurl = \"{url}\""), &env).mqtt;
            (m.host, m.port, m.tls)
        };
        assert_eq!(
            broker("mqtt://broker.lan"),
            ("broker.lan".into(), 1883, false)
        );
        assert_eq!(
            broker("mqtts://broker.lan"),
            ("broker.lan".into(), 8883, true)
        );
        assert_eq!(
            broker("mqtts://broker.lan:8884/"),
            ("broker.lan".into(), 8884, true)
        );
        assert_eq!(broker("mqtt://[::1]:1884"), ("::1".into(), 1884, false));
        for (bad, why) in [
            ("http://broker", "mqtt:// or mqtts://"),
            ("broker:1883", "mqtt:// or mqtts://"),
            ("mqtt://broker/topic", "nothing after"),
            ("mqtt://broker:0", "port 0"),
            ("mqtt://broker:99999", "not a URL"),
            ("mqtt://", "no host"),
            ("mqtt://relay:hunter2@broker", "credentials"),
        ] {
            let p = refused(&format!("[mqtt]\nurl = \"{bad}\""), &env, "mqtt.url", why);
            assert!(!p.message.contains("hunter2"));
        }
    }

    #[test]
    fn the_mqtt_password_file_follows_the_key_file_rules() {
        let f = fixture();
        let dir = f.dir.path();
        let with = |file: &Path| {
            format!(
                "[mqtt]\nusername = \"relay\"\npassword_file = \"{}\"",
                file.display()
            )
        };
        let open = write_key(dir, "pw-open", "hunter2\n", 0o644);
        refused(
            &with(&open),
            &f.env,
            "mqtt.password_file",
            "readable by group or others",
        );
        let none = dir.join("none");
        let p = refused(&with(&none), &f.env, "mqtt.password_file", "cannot open");
        assert!(
            p.message
                .starts_with(&format!("file {}: cannot open", none.display())),
            "{}",
            p.message
        );
        let empty = write_key(dir, "pw-empty", "\n", 0o600);
        refused(&with(&empty), &f.env, "mqtt.password_file", "empty");
        let good = write_key(dir, "pw", "hunter2\n", 0o600);
        let config = accept(&with(&good), &f.env);
        assert_eq!(config.mqtt.username.as_deref(), Some("relay"));
        assert_eq!(
            config.mqtt.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        let text = format!("[mqtt]\npassword_file = \"{}\"", good.display());
        refused(&text, &f.env, "mqtt.password_file", "needs mqtt.username");
    }

    #[test]
    fn tls_files_need_mqtts_and_come_in_pairs() {
        let f = fixture();
        let dir = f.dir.path();
        let pem = write_key(dir, "client.pem", "cert", 0o644);
        let key = write_key(dir, "client.key", "key", 0o600);
        let text = |url: &str, lines: &str| format!("[mqtt]\nurl = \"{url}\"\n{lines}");
        let cert_line = format!("client_cert_file = \"{}\"", pem.display());
        let key_line = format!("client_key_file = \"{}\"", key.display());
        let ca_line = format!("ca_file = \"{}\"", pem.display());
        refused(
            &text("mqtts://b", &cert_line),
            &f.env,
            "mqtt.client_cert_file",
            "needs mqtt.client_key_file",
        );
        refused(
            &text("mqtts://b", &key_line),
            &f.env,
            "mqtt.client_key_file",
            "needs mqtt.client_cert_file",
        );
        refused(
            &text("mqtt://b", &ca_line),
            &f.env,
            "mqtt.ca_file",
            "only with an mqtts://",
        );
        let missing = format!("ca_file = \"{}\"", dir.join("none.pem").display());
        refused(
            &text("mqtts://b", &missing),
            &f.env,
            "mqtt.ca_file",
            "cannot open",
        );
        let all = format!("{ca_line}\n{cert_line}\n{key_line}");
        // A wrong url is one problem: the TLS files are not blamed for it.
        let found = problems(&text("mqtss://b", &all), &f.env);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["mqtt.url"]);
        let config = accept(&text("mqtts://b", &all), &f.env);
        assert_eq!(config.mqtt.ca_file, Some(pem.clone()));
        assert_eq!(config.mqtt.client_cert_file, Some(pem));
        assert_eq!(config.mqtt.client_key_file, Some(key));
    }

    #[test]
    fn home_assistant_discovery_is_off_by_default_and_its_prefix_is_a_topic_root() {
        let env = FakeEnv::new();
        let config = accept("", &env);
        assert!(!config.mqtt.homeassistant);
        assert_eq!(config.mqtt.homeassistant_prefix, "homeassistant");

        let config = accept(
            "[mqtt]\nhomeassistant = true\nhomeassistant_prefix = \"ha/discovery\"",
            &env,
        );
        assert!(config.mqtt.homeassistant);
        assert_eq!(config.mqtt.homeassistant_prefix, "ha/discovery");

        for bad in ["", "ha/+", "ha/#", "$SYS", "/ha", "ha/", "ha//x"] {
            let p = refused(
                &format!("[mqtt]\nhomeassistant = true\nhomeassistant_prefix = \"{bad}\""),
                &env,
                "mqtt.homeassistant_prefix",
                "must not",
            );
            assert_eq!(p.line, Some(3), "{bad:?}");
        }
        refused(
            "[mqtt]\nhomeassistant = \"yes\"",
            &env,
            "mqtt.homeassistant",
            "invalid type",
        );
        refused(
            "[mqtt]\nhome_assistant = true",
            &env,
            "mqtt.home_assistant",
            "unknown field",
        );
    }
}
