//! The configuration: the TOML file of SPEC §2 parsed, validated and turned into
//! the typed values below, with secrets loaded. Nothing half-valid leaves this module:
//! `load` returns a whole `Config` or every problem found, each with file, line and field.
//!
//! Layout: `raw` is what the file holds before validation, `check` collects problems
//! with their lines and fields, `build` turns raw into typed one section at a time,
//! `secrets` reads key and password files and variables, `summary` is what
//! `keyrelay check-config` prints.

mod build;
mod check;
mod raw;
mod secrets;
mod summary;
#[cfg(test)]
mod testing;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::Secret;

pub use check::Problem;
pub use secrets::SecretError;

use build::build;
use check::{Checker, read_raw, render_problems};
use secrets::read_secret;

/// Where the config is looked for when `--config` is not given and `$KEYRELAY_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keyrelay/keyrelay.toml";
/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "KEYRELAY_CONFIG";

const DEFAULT_TOPIC_PREFIX: &str = "keyrelay";
const DEFAULT_SHARE_GROUP: &str = "keyrelay";
const DEFAULT_MAX_PAYLOAD_BYTES: usize = 262_144;
const DEFAULT_MAX_QUEUE: usize = 1000;
/// 16 MiB: a full queue of the default 1000 tasks at up to 16 KiB of prompt each.
const DEFAULT_MAX_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Requests in flight to one provider at once unless its table says otherwise.
pub const DEFAULT_MAX_CONCURRENCY: usize = 16;
const DEFAULT_HOMEASSISTANT_PREFIX: &str = "homeassistant";
/// Used when neither `state_dir` nor systemd's `$STATE_DIRECTORY` says otherwise.
const DEFAULT_STATE_DIR: &str = "./state";
const HOSTNAME_FILES: [&str; 2] = ["/proc/sys/kernel/hostname", "/etc/hostname"];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub source: PathBuf,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub log_level: log::LevelFilter,
    pub trust_unsynchronised_clock: bool,
    pub mqtt: MqttConfig,
    pub providers: Vec<ProviderConfig>,
    pub routing: RoutingConfig,
    pub leds: LedConfig,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub topic_prefix: String,
    pub share_group: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub max_payload_bytes: usize,
    /// `None`: any topic outside `{prefix}/` and `$`-topics.
    pub allowed_reply_prefixes: Option<Vec<String>>,
    /// Whether to publish Home Assistant's MQTT discovery configs (SPEC §8), so that
    /// the node and each key show up there with no setup.
    pub homeassistant: bool,
    /// The topic prefix Home Assistant reads discovery configs under
    /// (default `homeassistant`, as Home Assistant's own default).
    pub homeassistant_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI-compatible `/chat/completions` (Groq, OpenAI, OpenRouter, llama.cpp, vLLM…).
    OpenAi,
    /// Google Generative Language API, `generateContent`.
    Gemini,
}

impl ProviderKind {
    /// The name the config file uses for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Gemini => "gemini",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing slash.
    pub base_url: String,
    pub daily_reset: DailyReset,
    pub timeout: Duration,
    /// Requests in flight to this provider at once (at least 1); more tasks wait their turn.
    pub max_concurrency: usize,
    pub models: BTreeMap<String, ModelLimits>,
    pub keys: Vec<KeyConfig>,
}

/// When a key's daily budget comes back.
#[derive(Debug, Clone, PartialEq)]
pub enum DailyReset {
    /// A 24 h window sliding behind the present.
    Rolling,
    /// Local midnight in this IANA zone.
    Zone {
        name: String,
        tz: jiff::tz::TimeZone,
    },
}

impl fmt::Display for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rolling => f.write_str("rolling"),
            Self::Zone { name, .. } => write!(f, "midnight {name}"),
        }
    }
}

/// Limits of one key (or one account) for one model; `None` is "no limit of this kind".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelLimits {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub tpd: Option<u64>,
}

impl fmt::Display for ModelLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: Vec<String> = [
            ("rpm", self.rpm),
            ("rpd", self.rpd),
            ("tpm", self.tpm),
            ("tpd", self.tpd),
        ]
        .into_iter()
        .filter_map(|(name, limit)| limit.map(|n| format!("{name} {n}")))
        .collect();
        if set.is_empty() {
            f.write_str("no limits")
        } else {
            f.write_str(&set.join(", "))
        }
    }
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The only name a key ever has in logs, topics and replies.
    pub label: String,
    pub secret_source: SecretSource,
    pub secret: Secret,
    /// Keys with the same account share one budget.
    pub account: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// Where the secret comes from, never the secret: a file path or a variable's name.
impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// What model `"auto"` means, tried in order.
    pub auto: Vec<Target>,
    pub max_queue: usize,
    /// The bytes the waiting tasks may hold together (at least 1), counted as `max_queue` is.
    pub max_queue_bytes: usize,
    /// The order the targets of a task are tried in.
    pub order: RouteOrder,
}

/// The order a task's targets are tried in (`[routing] order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteOrder {
    /// The order the route lists them.
    #[default]
    Listed,
    /// While a target whose daily budget is lost at a calendar reset (an IANA
    /// `daily_reset`) has budget left today, it is tried before targets with a rolling day.
    ExpiringFirst,
}

impl RouteOrder {
    const ALL: [Self; 2] = [Self::Listed, Self::ExpiringFirst];

    /// The name the config file uses for this order.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listed => "listed",
            Self::ExpiringFirst => "expiring_first",
        }
    }
}

impl fmt::Display for RouteOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider and one of its models.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub provider: String,
    pub model: String,
}

impl Target {
    /// Splits `provider/model` at the first `/`: provider names never hold one, while
    /// model names may (OpenRouter's `meta-llama/llama-3.3-70b-instruct`).
    pub fn parse(text: &str) -> Option<Self> {
        let (provider, model) = text.split_once('/')?;
        (!provider.is_empty() && !model.is_empty()).then(|| Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedBackendKind {
    Auto,
    Rppal,
    Gpiochip,
    Sysfs,
    File,
    None,
}

impl LedBackendKind {
    const ALL: [Self; 6] = [
        Self::Auto,
        Self::Rppal,
        Self::Gpiochip,
        Self::Sysfs,
        Self::File,
        Self::None,
    ];

    /// The name the config file uses for this backend.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Rppal => "rppal",
            Self::Gpiochip => "gpiochip",
            Self::Sysfs => "sysfs",
            Self::File => "file",
            Self::None => "none",
        }
    }
}

impl fmt::Display for LedBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A light: a BCM pin or gpiochip line offset, or a `/sys/class/leds` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedPin {
    Line(u32),
    Name(String),
}

impl fmt::Display for LedPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(line) => write!(f, "{line}"),
            Self::Name(name) => write!(f, "{name:?}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LedConfig {
    pub backend: LedBackendKind,
    /// `/dev/gpiochipN` for the gpiochip backend (default `/dev/gpiochip0`).
    pub chip: Option<PathBuf>,
    pub green: Option<LedPin>,
    pub amber: Option<LedPin>,
    pub red: Option<LedPin>,
    pub activity: Option<LedPin>,
    /// The JSON file of the `file` backend.
    pub path: Option<PathBuf>,
}

impl LedConfig {
    /// Each configured light with its name, in the order green, amber, red, activity.
    pub fn pins(&self) -> impl Iterator<Item = (&'static str, &LedPin)> {
        [
            ("green", &self.green),
            ("amber", &self.amber),
            ("red", &self.red),
            ("activity", &self.activity),
        ]
        .into_iter()
        .filter_map(|(name, pin)| pin.as_ref().map(|pin| (name, pin)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// Every problem found, in the order of the file.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}
/// The config file to use: `--config`, else `$KEYRELAY_CONFIG`, else [`DEFAULT_CONFIG_PATH`].
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    resolve_path_in(cli, &System)
}

/// Reads and validates the config file, loading every secret it names.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Validates config text as if read from `source`, which names it in problems and is
/// where relative file paths in it start from.
pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
    parse_in(text, source, &System)
}

/// Reads a key again, as `keyrelay reset` does after an operator fixed or replaced it.
pub fn load_secret(source: &SecretSource) -> Result<Secret, SecretError> {
    read_secret(source, &System)
}

impl Config {
    /// A config with these providers and `auto` route and every other setting at its
    /// default (a local broker, no LEDs): for tests and benchmarks that build one in code.
    pub fn from_providers(providers: Vec<ProviderConfig>, auto: Vec<Target>) -> Config {
        Config {
            source: PathBuf::from("keyrelay.toml"),
            node_id: "keyrelay".to_owned(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_level: log::LevelFilter::Info,
            trust_unsynchronised_clock: false,
            mqtt: MqttConfig {
                host: "127.0.0.1".to_owned(),
                port: 1883,
                tls: false,
                topic_prefix: DEFAULT_TOPIC_PREFIX.to_owned(),
                share_group: DEFAULT_SHARE_GROUP.to_owned(),
                username: None,
                password: None,
                ca_file: None,
                client_cert_file: None,
                client_key_file: None,
                max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
                allowed_reply_prefixes: None,
                homeassistant: false,
                homeassistant_prefix: DEFAULT_HOMEASSISTANT_PREFIX.to_owned(),
            },
            providers,
            routing: RoutingConfig {
                auto,
                max_queue: DEFAULT_MAX_QUEUE,
                max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
                order: RouteOrder::Listed,
            },
            leds: LedConfig {
                backend: LedBackendKind::None,
                chip: None,
                green: None,
                amber: None,
                red: None,
                activity: None,
                path: None,
            },
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The key with this label and the provider it belongs to.
    pub fn key(&self, label: &str) -> Option<(&ProviderConfig, &KeyConfig)> {
        self.providers
            .iter()
            .find_map(|p| p.keys.iter().find(|k| k.label == label).map(|k| (p, k)))
    }

    /// The targets a task's `model` may be served by, in the order to try them; empty
    /// when nothing serves it. `"provider/model"` not configured as such is also tried
    /// as a bare model name, since model names may hold a `/`.
    pub fn targets_for_model(&self, model: &str) -> Vec<Target> {
        if model == "auto" {
            return self.routing.auto.clone();
        }
        if let Some(target) = Target::parse(model)
            && self
                .provider(&target.provider)
                .is_some_and(|p| p.models.contains_key(&target.model))
        {
            return vec![target];
        }
        self.providers
            .iter()
            .filter(|p| p.models.contains_key(model))
            .map(|p| Target {
                provider: p.name.clone(),
                model: model.to_owned(),
            })
            .collect()
    }
}
/// What the config reads from around the process, a seam so tests need not change
/// the real environment (which other threads read at the same time).
trait Environment {
    fn var(&self, name: &str) -> Option<OsString>;
    fn hostname(&self) -> Option<String>;
}

struct System;

impl Environment for System {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn hostname(&self) -> Option<String> {
        HOSTNAME_FILES.iter().find_map(|file| {
            let text = std::fs::read_to_string(file).ok()?;
            // hostname(5): lines starting with '#' are comments.
            text.lines()
                .map(str::trim)
                .find(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_owned)
        })
    }
}

fn resolve_path_in(cli: Option<&Path>, env: &dyn Environment) -> PathBuf {
    if let Some(path) = cli {
        return path.to_owned();
    }
    match env.var(CONFIG_PATH_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

fn parse_in(text: &str, source: &Path, env: &dyn Environment) -> Result<Config, ConfigError> {
    let mut check = Checker::new(text);
    let config = read_raw(text, &mut check).map(|raw| build(raw, source, env, &mut check));
    let problems = check.finish();
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid {
            path: source.to_owned(),
            problems,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::testing::*;
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/keyrelay.toml");

    #[test]
    fn the_example_parses_with_its_files_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "groq-1", "gsk_example_one\n", 0o600);
        let text = EXAMPLE.replace(
            "/run/credentials/keyrelay.service/",
            &format!("{}/", dir.path().display()),
        );
        let env = FakeEnv::new()
            .with("GROQ_API_KEY_2", "gsk_example_two")
            .with("GEMINI_API_KEY", "AIza_example");
        let config = accept(&text, &env);

        assert_eq!(config.node_id, "pi-kitchen");
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/keyrelay"));
        assert_eq!(config.log_level, log::LevelFilter::Info);
        assert!(!config.trust_unsynchronised_clock);
        assert_eq!(
            (config.mqtt.host.as_str(), config.mqtt.port, config.mqtt.tls),
            ("127.0.0.1", 1883, false)
        );
        assert_eq!(
            config.mqtt.allowed_reply_prefixes,
            Some(vec!["clients/".to_owned()])
        );
        let names: Vec<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["groq", "gemini"]);

        let groq = config.provider("groq").unwrap();
        assert_eq!(groq.kind, ProviderKind::OpenAi);
        assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
        assert_eq!(groq.daily_reset, DailyReset::Rolling);
        assert_eq!(groq.timeout, Duration::from_secs(60));
        assert_eq!(
            groq.models["llama-3.3-70b-versatile"],
            ModelLimits {
                rpm: Some(30),
                rpd: Some(1000),
                tpm: Some(12000),
                tpd: Some(100_000)
            }
        );
        assert_eq!(groq.keys[0].label, "groq-1");
        assert_eq!(groq.keys[0].secret.expose(), "gsk_example_one");
        assert_eq!(groq.keys[0].account.as_deref(), Some("acct-a"));
        assert_eq!(
            groq.keys[0].secret_source,
            SecretSource::File(dir.path().join("groq-1"))
        );
        assert_eq!(groq.keys[1].secret.expose(), "gsk_example_two");
        assert_eq!(
            groq.keys[1].secret_source,
            SecretSource::Env("GROQ_API_KEY_2".to_owned())
        );

        let gemini = config.provider("gemini").unwrap();
        assert_eq!(gemini.kind, ProviderKind::Gemini);
        assert!(matches!(&gemini.daily_reset,
            DailyReset::Zone { name, .. } if name == "America/Los_Angeles"));
        assert_eq!(gemini.models["gemini-2.0-flash"].rpd, Some(1500));
        assert_eq!(gemini.models["gemini-2.0-flash"].tpm, None);
        assert_eq!(gemini.keys[0].secret.expose(), "AIza_example");

        let auto: Vec<String> = config.routing.auto.iter().map(Target::to_string).collect();
        assert_eq!(
            auto,
            [
                "groq/llama-3.3-70b-versatile",
                "groq/llama-3.1-8b-instant",
                "gemini/gemini-2.0-flash"
            ]
        );
        assert_eq!(config.routing.max_queue, 1000);
        assert_eq!(config.routing.max_queue_bytes, 16 * 1024 * 1024);
        assert_eq!(config.routing.order, RouteOrder::Listed);
        assert!(!config.mqtt.homeassistant);
        assert_eq!(config.providers[0].max_concurrency, 16);
        assert_eq!(config.leds.backend, LedBackendKind::Auto);
        assert_eq!(config.leds.green, Some(LedPin::Line(17)));
        assert_eq!(config.leds.amber, Some(LedPin::Line(27)));
        assert_eq!(config.leds.red, Some(LedPin::Line(22)));
        assert_eq!(config.leds.activity, Some(LedPin::Line(23)));
    }

    #[test]
    fn the_example_without_its_key_file_and_variables_says_so() {
        let problems = problems(EXAMPLE, &FakeEnv::new());
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "providers[0].keys[0].secret_file",
                "providers[0].keys[1].secret_env",
                "providers[1].keys[0].secret_env"
            ]
        );
    }

    #[test]
    fn an_empty_config_is_all_defaults() {
        let config = accept("", &FakeEnv::new());
        assert_eq!(config.source, PathBuf::from(FILE));
        assert_eq!(config.node_id, "pi-test");
        assert_eq!(config.state_dir, PathBuf::from("./state"));
        assert_eq!(config.log_level, log::LevelFilter::Info);
        assert!(!config.trust_unsynchronised_clock);
        let m = &config.mqtt;
        assert_eq!((m.host.as_str(), m.port, m.tls), ("127.0.0.1", 1883, false));
        assert_eq!(m.topic_prefix, "keyrelay");
        assert_eq!(m.share_group, "keyrelay");
        assert_eq!(m.username, None);
        assert!(m.password.is_none());
        assert_eq!(m.ca_file, None);
        assert_eq!(m.max_payload_bytes, 262_144);
        assert_eq!(m.allowed_reply_prefixes, None);
        assert!(config.providers.is_empty());
        assert!(config.routing.auto.is_empty());
        assert_eq!(config.routing.max_queue, 1000);
        assert_eq!(config.routing.max_queue_bytes, 16 * 1024 * 1024);
        assert_eq!(config.routing.order, RouteOrder::Listed);
        assert!(!m.homeassistant);
        assert_eq!(m.homeassistant_prefix, "homeassistant");
        assert_eq!(config.leds.backend, LedBackendKind::Auto);
        assert_eq!(config.leds.pins().count(), 0);
        assert_eq!(config.leds.path, None);
        assert!(config.targets_for_model("auto").is_empty());
    }

    #[test]
    fn the_system_hostname_is_read() {
        let host = System.hostname().expect("a Linux machine has a hostname");
        assert!(!host.is_empty());
        assert_eq!(host, host.trim());
    }

    #[test]
    fn targets_for_a_model() {
        let f = fixture();
        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY")).replace(
            "[providers.models.m]",
            "[providers.models.\"gemini-2.0-flash\"]\n[providers.models.\"meta/llama\"]",
        );
        let config = accept(&text, &f.env);
        let t = |p: &str, m: &str| Target {
            provider: p.into(),
            model: m.into(),
        };
        assert_eq!(config.targets_for_model("auto"), config.routing.auto);
        assert_eq!(
            config.targets_for_model("gemini/gemini-2.0-flash"),
            [t("gemini", "gemini-2.0-flash")]
        );
        assert_eq!(
            config.targets_for_model("gemini-2.0-flash"),
            [
                t("groq", "gemini-2.0-flash"),
                t("gemini", "gemini-2.0-flash")
            ]
        );
        assert_eq!(
            config.targets_for_model("groq/meta/llama"),
            [t("groq", "meta/llama")]
        );
        assert_eq!(
            config.targets_for_model("meta/llama"),
            [t("groq", "meta/llama")]
        );
        assert!(config.targets_for_model("gpt-4o").is_empty());
        assert!(config.targets_for_model("gemini/meta/llama").is_empty());
        assert_eq!(
            config.provider("gemini").map(|p| p.kind),
            Some(ProviderKind::Gemini)
        );
        assert!(config.provider("openai").is_none());
        assert_eq!(
            config.key("g1").map(|(p, _)| p.name.as_str()),
            Some("gemini")
        );
        assert!(config.key("nope").is_none());
    }

    #[test]
    fn the_config_path_comes_from_the_flag_then_the_environment() {
        let env = FakeEnv::new().with("KEYRELAY_CONFIG", "/tmp/k.toml");
        assert_eq!(
            resolve_path_in(Some(Path::new("/a.toml")), &env),
            PathBuf::from("/a.toml")
        );
        assert_eq!(resolve_path_in(None, &env), PathBuf::from("/tmp/k.toml"));
        assert_eq!(
            resolve_path_in(None, &FakeEnv::new()),
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
        let empty = FakeEnv::new().with("KEYRELAY_CONFIG", "");
        assert_eq!(
            resolve_path_in(None, &empty),
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let f = fixture();
        let path = f.dir.path().join("keyrelay.toml");
        fs::write(&path, valid(&f.key, "node_id = \"from-file\"", "")).unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.node_id, "from-file");
        assert_eq!(config.source, path);

        let missing = f.dir.path().join("none.toml");
        let err = load(&missing).unwrap_err();
        assert!(matches!(&err, ConfigError::Read { path, .. } if *path == missing));
        assert!(err.to_string().contains("none.toml"));

        fs::write(&path, "log_level = 3\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:1: log_level: invalid type", path.display())),
            "{err}"
        );
    }

    #[test]
    fn no_secret_reaches_debug_summary_or_errors() {
        const KEY: &str = "gsk_LEAKCHECK_0123456789";
        const ENV_KEY: &str = "AIza_LEAKCHECK_abcdef";
        const PASSWORD: &str = "hunter2_LEAKCHECK";
        let leaks = |text: &str| [KEY, ENV_KEY, PASSWORD].iter().any(|s| text.contains(s));

        let f = fixture();
        let dir = f.dir.path();
        let key = write_key(dir, "leak", &format!("{KEY}\n"), 0o600);
        let pw = write_key(dir, "pw", &format!("{PASSWORD}\n"), 0o600);
        let env = FakeEnv::new().with("GEMINI_KEY", ENV_KEY);
        let top = format!(
            "[mqtt]\nusername = \"relay\"\npassword_file = \"{}\"",
            pw.display()
        );
        let text = valid(&key, &top, &provider("gemini", "g1", "GEMINI_KEY"));
        let config = accept(&text, &env);
        assert_eq!(config.providers[0].keys[0].secret.expose(), KEY);
        assert!(!leaks(&format!("{config:?}")));
        assert!(!leaks(&format!("{config:#?}")));
        assert!(!leaks(&config.summary()));

        let broken = [
            // The key file readable by others.
            valid(&write_key(dir, "leak-open", KEY, 0o644), "", ""),
            // One key under two labels.
            valid(&key, "", &provider("gemini", "dup", "DUP")),
            // A key pasted where its file name or variable name belongs.
            valid(Path::new(KEY), "", ""),
            valid(&key, "", &provider("gemini", "g1", ENV_KEY)),
            // A key written into the config itself, which is no TOML.
            format!("secret = {KEY}\n"),
            // A password in the broker URL, a key in the provider URL.
            format!("[mqtt]\nurl = \"mqtt://relay:{PASSWORD}@broker\""),
            valid(&key, "", "").replace("openai/v1", &format!("openai/v1?key={KEY}")),
            // The password file readable by others.
            format!(
                "[mqtt]\nusername = \"u\"\npassword_file = \"{}\"",
                write_key(dir, "pw-open", PASSWORD, 0o644).display()
            ),
        ];
        let env = env.with("DUP", KEY);
        for text in &broken {
            let err = parse_in(text, Path::new(FILE), &env).unwrap_err();
            let shown = format!("{err}\n{err:?}");
            assert!(!leaks(&shown), "a secret leaked:\n{shown}");
            assert!(matches!(err, ConfigError::Invalid { .. }));
        }
        let open = SecretSource::File(dir.join("leak-open"));
        let err = load_secret(&open).unwrap_err();
        assert!(!leaks(&format!("{err} {err:?}")));
    }
}
