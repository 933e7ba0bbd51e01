//! The `[[providers]]` tables: kind, URL, daily reset, timeout, models with their
//! limits, and keys with their secrets (labels and keys unique across providers).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::super::check::{Checker, join_path};
use super::super::raw::{RawKey, RawLimits, RawProvider};
use super::super::secrets::{read_secret, secret_origin};
use super::super::{
    DEFAULT_MAX_CONCURRENCY, DailyReset, Environment, KeyConfig, ModelLimits, ProviderConfig,
    ProviderKind, SecretSource,
};
use super::topic_level_problem;
use crate::secret::Secret;

const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Gemini has one API, so its `base_url` may be left out.
const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// A provider as built, with its models in the order the file lists them (the
/// default `auto` route follows it).
pub(super) struct BuiltProvider {
    pub(super) config: ProviderConfig,
    pub(super) model_order: Vec<String>,
}

pub(super) fn build_providers(
    raw: Vec<Spanned<RawProvider>>,
    base: &Path,
    env: &dyn Environment,
    c: &mut Checker<'_>,
) -> Vec<BuiltProvider> {
    let mut providers = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut seen = SeenKeys::default();

    for (i, provider) in raw.into_iter().enumerate() {
        let path = format!("providers[{i}]");
        let span = provider.span();
        let p = provider.into_inner();

        let name = match p.name {
            Some(name) => {
                let field = format!("{path}.name");
                if let Some(why) = topic_level_problem(name.get_ref()) {
                    c.at(&name, &field, why);
                } else if let Some(first) = names.get(name.get_ref()) {
                    c.at(
                        &name,
                        &field,
                        format!("{:?} is already {first}", name.get_ref()),
                    );
                } else {
                    names.insert(name.get_ref().clone(), path.clone());
                }
                name.into_inner()
            }
            None => {
                c.missing(
                    span.clone(),
                    &format!("{path}.name"),
                    "missing: every provider needs a name",
                );
                String::new()
            }
        };

        let kind = match &p.kind {
            Some(kind) => match kind.get_ref().as_str() {
                "openai" => Some(ProviderKind::OpenAi),
                "gemini" => Some(ProviderKind::Gemini),
                other => {
                    c.at(
                        kind,
                        &format!("{path}.kind"),
                        format!("unknown kind {other:?}: openai (OpenAI-compatible) or gemini"),
                    );
                    None
                }
            },
            None => {
                c.missing(
                    span.clone(),
                    &format!("{path}.kind"),
                    "missing: openai (OpenAI-compatible) or gemini",
                );
                None
            }
        };

        let base_url = match &p.base_url {
            Some(url) => {
                if let Err(why) = check_base_url(url.get_ref()) {
                    c.at(url, &format!("{path}.base_url"), why);
                }
                url.get_ref().trim_end_matches('/').to_owned()
            }
            None => {
                if kind == Some(ProviderKind::OpenAi) {
                    c.missing(
                        span.clone(),
                        &format!("{path}.base_url"),
                        "missing: an openai provider needs the URL its /chat/completions is under",
                    );
                }
                GEMINI_BASE_URL.to_owned()
            }
        };

        let daily_reset = match p.daily_reset {
            Some(reset) if reset.get_ref() == "rolling" => DailyReset::Rolling,
            Some(reset) => match jiff::tz::TimeZone::get(reset.get_ref()) {
                Ok(tz) => DailyReset::Zone {
                    name: reset.get_ref().clone(),
                    tz,
                },
                Err(_) => {
                    c.at(
                        &reset,
                        &format!("{path}.daily_reset"),
                        format!(
                            "unknown time zone {:?}: \"rolling\" or an IANA zone such as \"America/Los_Angeles\"",
                            reset.get_ref()
                        ),
                    );
                    DailyReset::Rolling
                }
            },
            None => DailyReset::Rolling,
        };

        let timeout = match p.timeout_secs {
            Some(secs) => {
                if *secs.get_ref() == 0 {
                    c.at(
                        &secs,
                        &format!("{path}.timeout_secs"),
                        "0 would time out every call",
                    );
                }
                Duration::from_secs(secs.into_inner())
            }
            None => Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        };

        let max_concurrency = match p.max_concurrency {
            Some(max) => {
                if *max.get_ref() == 0 {
                    c.at(
                        &max,
                        &format!("{path}.max_concurrency"),
                        "0 would never send a request; at least 1",
                    );
                }
                max.into_inner()
            }
            None => DEFAULT_MAX_CONCURRENCY,
        };

        let models_field = format!("{path}.models");
        if p.models.is_empty() {
            c.missing(
                span.clone(),
                &models_field,
                "lists no models: add a [providers.models.\"NAME\"] table for each",
            );
        }
        let mut ordered: Vec<(Range<usize>, String)> = Vec::new();
        let mut models = BTreeMap::new();
        for (model, limits) in p.models {
            let field = join_path(&models_field, model.get_ref());
            if model.get_ref().is_empty() {
                c.at(&model, &field, "a model name must not be empty");
            }
            ordered.push((model.span(), model.get_ref().clone()));
            models.insert(model.into_inner(), build_limits(limits, &field, c));
        }
        ordered.sort_by_key(|(span, _)| span.start);

        let keys_field = format!("{path}.keys");
        if p.keys.is_empty() {
            c.missing(
                span.clone(),
                &keys_field,
                "has no keys: add a [[providers.keys]] table for each",
            );
        }
        let mut keys = Vec::new();
        for (k, key) in p.keys.into_iter().enumerate() {
            let key_path = format!("{keys_field}[{k}]");
            if let Some(key) = build_key(key, &key_path, base, env, &mut seen, c) {
                keys.push(key);
            }
        }

        providers.push(BuiltProvider {
            config: ProviderConfig {
                name,
                kind: kind.unwrap_or(ProviderKind::OpenAi),
                base_url,
                daily_reset,
                timeout,
                max_concurrency,
                models,
                keys,
            },
            model_order: ordered.into_iter().map(|(_, model)| model).collect(),
        });
    }
    providers
}

/// Labels and secrets already taken, by the field path of the key that took them.
#[derive(Default)]
struct SeenKeys {
    labels: HashMap<String, String>,
    secrets: Vec<(Secret, String)>,
}

fn check_base_url(text: &str) -> Result<(), String> {
    // The URL is never echoed: a key may have been pasted into it.
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must start with https:// (or http:// for a server on this machine)".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(
            "must not carry credentials or a query: keys go in secret_file or secret_env".into(),
        );
    }
    Ok(())
}

fn build_limits(raw: RawLimits, field: &str, c: &mut Checker<'_>) -> ModelLimits {
    let mut limit = |value: Option<Spanned<u64>>, name: &str| {
        value.map(|value| {
            if *value.get_ref() == 0 {
                c.at(
                    &value,
                    &format!("{field}.{name}"),
                    "0 would let nothing through; leave the limit out for none",
                );
            }
            value.into_inner()
        })
    };
    ModelLimits {
        rpm: limit(raw.rpm, "rpm"),
        rpd: limit(raw.rpd, "rpd"),
        tpm: limit(raw.tpm, "tpm"),
        tpd: limit(raw.tpd, "tpd"),
    }
}

fn build_key(
    key: Spanned<RawKey>,
    path: &str,
    base: &Path,
    env: &dyn Environment,
    seen: &mut SeenKeys,
    c: &mut Checker<'_>,
) -> Option<KeyConfig> {
    let span = key.span();
    let k = key.into_inner();

    let label = match k.label {
        Some(label) => {
            let field = format!("{path}.label");
            if let Some(why) = topic_level_problem(label.get_ref()) {
                c.at(&label, &field, why);
            } else if let Some(first) = seen.labels.get(label.get_ref()) {
                c.at(
                    &label,
                    &field,
                    format!("{:?} is already the label of {first}", label.get_ref()),
                );
            } else {
                seen.labels.insert(label.get_ref().clone(), path.to_owned());
            }
            Some(label.into_inner())
        }
        None => {
            c.missing(
                span.clone(),
                &format!("{path}.label"),
                "missing: every key needs a label",
            );
            None
        }
    };

    let account = k.account.map(|account| {
        if account.get_ref().is_empty() {
            c.at(
                &account,
                &format!("{path}.account"),
                "must not be empty; leave it out for a key with its own budget",
            );
        }
        account.into_inner()
    });

    let (field, spanned, source) = match (k.secret_file, k.secret_env) {
        (Some(file), None) => {
            let source = SecretSource::File(base.join(file.get_ref()));
            ("secret_file", file, source)
        }
        (None, Some(name)) => {
            if name.get_ref().is_empty() {
                c.at(
                    &name,
                    &format!("{path}.secret_env"),
                    "must name an environment variable",
                );
                return None;
            }
            let source = SecretSource::Env(name.get_ref().clone());
            ("secret_env", name, source)
        }
        (Some(file), Some(_)) => {
            c.at(&file, path, "has both secret_file and secret_env: keep one");
            return None;
        }
        (None, None) => {
            let file_field = format!("{path}.secret_file");
            let env_field = format!("{path}.secret_env");
            if !c.reported.contains(&file_field) && !c.reported.contains(&env_field) {
                c.problem(
                    Some(span),
                    path,
                    "needs secret_file or secret_env: a key is never written in the config",
                );
            }
            return None;
        }
    };
    let secret = match read_secret(&source, env) {
        Ok(secret) => secret,
        Err(e) => {
            // The operator fixing a key needs its label and the file or variable, never
            // just the field's place in the file.
            let origin = secret_origin(&source, spanned.get_ref());
            let message = match &label {
                Some(label) => format!("key {label:?} ({origin}): {e}"),
                None => format!("key ({origin}): {e}"),
            };
            c.at(&spanned, &format!("{path}.{field}"), message);
            return None;
        }
    };
    if let Some((_, first)) = seen.secrets.iter().find(|(s, _)| *s == secret) {
        // Two labels on one key would count its one budget twice.
        c.at(
            &spanned,
            &format!("{path}.{field}"),
            format!("holds the same key as {first}"),
        );
    } else {
        seen.secrets.push((secret.clone(), path.to_owned()));
    }

    Some(KeyConfig {
        label: label?,
        secret_source: source,
        secret,
        account,
    })
}

#[cfg(test)]
mod tests {
    use super::GEMINI_BASE_URL;
    use crate::config::testing::*;
    use crate::config::*;

    #[test]
    fn a_key_needs_exactly_one_source_and_a_set_variable() {
        let f = fixture();
        let key = format!("secret_file = \"{}\"", f.key.display());
        let both =
            valid(&f.key, "", "").replace(&key, &format!("{key}\nsecret_env = \"GEMINI_KEY\""));
        refused(
            &both,
            &f.env,
            "providers[0].keys[0]",
            "both secret_file and secret_env",
        );
        let neither = valid(&f.key, "", "").replace(&key, "");
        refused(
            &neither,
            &f.env,
            "providers[0].keys[0]",
            "needs secret_file or secret_env",
        );

        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_UNSET"));
        refused(&text, &f.env, "providers[1].keys[0].secret_env", "not set");
        let env = FakeEnv::new().with("GEMINI_UNSET", "  ");
        refused(&text, &env, "providers[1].keys[0].secret_env", "empty");
        let empty_name = valid(&f.key, "", &provider("gemini", "g1", ""));
        refused(
            &empty_name,
            &f.env,
            "providers[1].keys[0].secret_env",
            "must name",
        );
        let env = FakeEnv::new().with("GEMINI_UNSET", " AIza_set\n");
        let config = accept(&text, &env);
        assert_eq!(config.providers[1].keys[0].secret.expose(), "AIza_set");
    }

    #[test]
    fn labels_and_provider_names_are_unique_and_topic_safe() {
        let f = fixture();
        let text = valid(&f.key, "", &provider("gemini", "k1", "GEMINI_KEY"));
        let p = refused(
            &text,
            &f.env,
            "providers[1].keys[0].label",
            "already the label of providers[0].keys[0]",
        );
        assert!(p.line.is_some());
        let text = valid(&f.key, "", &provider("groq", "g1", "GEMINI_KEY"));
        refused(&text, &f.env, "providers[1].name", "already providers[0]");
        for bad in ["", "a/b", "a+b", "a#b"] {
            let text = valid(&f.key, "", &provider("gemini", bad, "GEMINI_KEY"));
            refused(&text, &f.env, "providers[1].keys[0].label", "must not");
            let text = valid(&f.key, "", &provider(bad, "g1", "GEMINI_KEY"));
            refused(&text, &f.env, "providers[1].name", "must not");
        }
    }

    #[test]
    fn one_key_under_two_labels_is_refused() {
        let f = fixture();
        let env = FakeEnv::new().with("GEMINI_KEY", "gsk_one");
        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY"));
        refused(
            &text,
            &env,
            "providers[1].keys[0].secret_env",
            "same key as providers[0].keys[0]",
        );
    }

    #[test]
    fn a_limit_of_zero_is_refused() {
        let f = fixture();
        for limit in ["rpm", "rpd", "tpm", "tpd"] {
            let text = valid(&f.key, "", "").replace("rpm = 30", &format!("{limit} = 0"));
            let p = refused(
                &text,
                &f.env,
                &format!("providers[0].models.m.{limit}"),
                "0 would",
            );
            assert_eq!(p.line, Some(7));
        }
        let text = valid(&f.key, "", "").replace("base_url", "timeout_secs = 0\nbase_url");
        refused(&text, &f.env, "providers[0].timeout_secs", "0 would");
        refused(
            &valid(&f.key, "[mqtt]\nmax_payload_bytes = 0", ""),
            &f.env,
            "mqtt.max_payload_bytes",
            "0 would",
        );
    }

    #[test]
    fn providers_need_a_known_kind_a_url_models_and_keys() {
        let f = fixture();
        let text = valid(&f.key, "", "").replace("\"openai\"", "\"anthropic\"");
        refused(
            &text,
            &f.env,
            "providers[0].kind",
            "unknown kind \"anthropic\"",
        );
        let text = valid(&f.key, "", "").replace("kind = \"openai\"\n", "");
        refused(&text, &f.env, "providers[0].kind", "missing");
        let text = valid(&f.key, "", "").replace("name = \"groq\"\n", "");
        refused(&text, &f.env, "providers[0].name", "missing");
        let text =
            valid(&f.key, "", "").replace("base_url = \"https://api.groq.com/openai/v1\"\n", "");
        refused(&text, &f.env, "providers[0].base_url", "missing");
        for bad in [
            "ftp://x",
            "https://api.groq.com/v1?key=k",
            "https://u:p@x/v1",
            "groq",
        ] {
            let text = valid(&f.key, "", "").replace("https://api.groq.com/openai/v1", bad);
            refused(&text, &f.env, "providers[0].base_url", "");
        }
        let text = valid(&f.key, "", "").replace("[providers.models.m]\nrpm = 30\n", "");
        refused(&text, &f.env, "providers[0].models", "lists no models");
        let text = valid(&f.key, "", "");
        let text = &text[..text.find("[[providers.keys]]").unwrap()];
        refused(text, &f.env, "providers[0].keys", "has no keys");

        let gemini = accept(&provider("gemini", "g1", "GEMINI_KEY"), &f.env);
        assert_eq!(gemini.providers[0].base_url, GEMINI_BASE_URL);
        let text = valid(&f.key, "", "").replace("/openai/v1\"", "/openai/v1/\"");
        assert_eq!(
            accept(&text, &f.env).providers[0].base_url,
            "https://api.groq.com/openai/v1"
        );
    }

    #[test]
    fn daily_reset_is_rolling_or_a_known_zone() {
        let f = fixture();
        let with = |reset: &str| {
            valid(&f.key, "", "")
                .replace("base_url", &format!("daily_reset = \"{reset}\"\nbase_url"))
        };
        refused(
            &with("Mars/Olympus_Mons"),
            &f.env,
            "providers[0].daily_reset",
            "unknown time zone",
        );
        refused(
            &with(""),
            &f.env,
            "providers[0].daily_reset",
            "unknown time zone",
        );
        let config = accept(&with("Europe/Madrid"), &f.env);
        let DailyReset::Zone { name, tz } = &config.providers[0].daily_reset else {
            panic!("not a zone")
        };
        assert_eq!(name, "Europe/Madrid");
        assert_eq!(tz.iana_name(), Some("Europe/Madrid"));
        assert_eq!(
            accept(&with("rolling"), &f.env).providers[0].daily_reset,
            DailyReset::Rolling
        );
    }

    #[test]
    fn max_concurrency_defaults_to_16_and_is_at_least_1() {
        let f = fixture();
        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY"));
        let config = accept(&text, &f.env);
        assert_eq!(config.providers[0].max_concurrency, 16);
        assert_eq!(config.providers[1].max_concurrency, 16);

        let with = |n: &str| {
            valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY"))
                .replace("base_url", &format!("max_concurrency = {n}\nbase_url"))
        };
        let config = accept(&with("1"), &f.env);
        assert_eq!(config.providers[0].max_concurrency, 1);
        assert_eq!(config.providers[1].max_concurrency, 16);

        let p = refused(
            &with("0"),
            &f.env,
            "providers[0].max_concurrency",
            "0 would never send",
        );
        assert_eq!(p.line, Some(5));
        refused(
            &with("-1"),
            &f.env,
            "providers[0].max_concurrency",
            "invalid value",
        );
    }
}
