//! The configuration: the TOML file of SPEC §2 parsed, validated and turned into
//! the typed values below, with secrets loaded. Nothing half-valid leaves this module:
//! `load` returns a whole `Config` or every problem found, each with file, line and field.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// Where the config is looked for when `--config` is not given and `$KEYRELAY_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keyrelay/keyrelay.toml";

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI-compatible `/chat/completions` (Groq, OpenAI, OpenRouter, llama.cpp, vLLM…).
    OpenAi,
    /// Google Generative Language API, `generateContent`.
    Gemini,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing slash.
    pub base_url: String,
    pub daily_reset: DailyReset,
    pub timeout: Duration,
    pub models: BTreeMap<String, ModelLimits>,
    pub keys: Vec<KeyConfig>,
}

/// When a key's daily budget comes back.
#[derive(Debug, Clone, PartialEq)]
pub enum DailyReset {
    /// A 24 h window sliding behind the present.
    Rolling,
    /// Local midnight in this IANA zone.
    Zone { name: String, tz: jiff::tz::TimeZone },
}

/// Limits of one key (or one account) for one model; `None` is "no limit of this kind".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelLimits {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub tpd: Option<u64>,
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

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// What model `"auto"` means, tried in order.
    pub auto: Vec<Target>,
    pub max_queue: usize,
}

/// A provider and one of its models.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub provider: String,
    pub model: String,
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

/// A light: a BCM pin or gpiochip line offset, or a `/sys/class/leds` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedPin {
    Line(u32),
    Name(String),
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
