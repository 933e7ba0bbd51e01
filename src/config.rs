//! The configuration: the TOML file of SPEC §2 parsed, validated and turned into
//! the typed values below, with secrets loaded. Nothing half-valid leaves this module:
//! `load` returns a whole `Config` or every problem found, each with file, line and field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use toml::de::DeTable;

use crate::secret::Secret;

/// Where the config is looked for when `--config` is not given and `$KEYRELAY_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keyrelay/keyrelay.toml";
/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "KEYRELAY_CONFIG";

const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";
const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
const DEFAULT_TOPIC_PREFIX: &str = "keyrelay";
const DEFAULT_SHARE_GROUP: &str = "keyrelay";
const DEFAULT_MAX_PAYLOAD_BYTES: usize = 262_144;
const DEFAULT_TIMEOUT_SECS: u64 = 60;
const DEFAULT_MAX_QUEUE: usize = 1000;
/// Used when neither `state_dir` nor systemd's `$STATE_DIRECTORY` says otherwise.
const DEFAULT_STATE_DIR: &str = "./state";
const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";
const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";
const HOSTNAME_FILES: [&str; 2] = ["/proc/sys/kernel/hostname", "/etc/hostname"];
/// API keys and passwords are short; a bigger file is the wrong file, and is not read whole.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;
/// The bits that make a file readable, writable or runnable by anyone but its owner.
const GROUP_OR_OTHER_BITS: u32 = 0o077;

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

/// One thing wrong with the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; `None` where the problem has no place in the file (a default that failed).
    pub line: Option<usize>,
    /// Where in the config, e.g. `providers[1].keys[0].secret_file`; empty for a syntax error.
    pub field: String,
    pub message: String,
}

impl Problem {
    fn render(&self, file: &Path, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{}", file.display());
        if let Some(line) = self.line {
            let _ = write!(out, ":{line}");
        }
        if !self.field.is_empty() {
            let _ = write!(out, ": {}", self.field);
        }
        let _ = write!(out, ": {}", self.message);
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

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, problem) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        problem.render(path, &mut out);
    }
    out
}

/// Why a secret could not be loaded. The messages name neither the secret nor where it
/// came from (a secret pasted where its file name belongs must not be echoed); the caller
/// says which field or key it was.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot open the file: {0}")]
    Open(io::Error),
    #[error("cannot read the file: {0}")]
    ReadFile(io::Error),
    #[error("is not a regular file")]
    NotAFile,
    #[error(
        "the file is readable by group or others (mode {mode:04o}); make it private to its owner, e.g. chmod 600"
    )]
    Exposed { mode: u32 },
    #[error("the file is larger than {MAX_SECRET_FILE_BYTES} bytes, so it holds no API key")]
    TooLarge,
    #[error("the file is not UTF-8 text")]
    NotUtf8,
    #[error("the file is empty")]
    EmptyFile,
    #[error("the environment variable is not set")]
    EnvUnset,
    #[error("the environment variable is not UTF-8 text")]
    EnvNotUnicode,
    #[error("the environment variable is empty")]
    EnvEmpty,
    #[error(
        "holds several lines or control characters, which no HTTP header or password can carry"
    )]
    ControlCharacters,
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
            },
            providers,
            routing: RoutingConfig {
                auto,
                max_queue: DEFAULT_MAX_QUEUE,
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

    /// What `keyrelay check-config` prints: everything an operator checks, never a secret.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let m = &self.mqtt;
        writeln!(out, "config: {}", self.source.display())?;
        writeln!(out, "node id: {}", self.node_id)?;
        writeln!(out, "state dir: {}", self.state_dir.display())?;
        writeln!(
            out,
            "log level: {}",
            self.log_level.as_str().to_ascii_lowercase()
        )?;
        if self.trust_unsynchronised_clock {
            writeln!(out, "clock: trusted before it is synchronised")?;
        }
        write!(
            out,
            "broker: {}:{} ({}",
            m.host,
            m.port,
            if m.tls { "tls" } else { "no tls" }
        )?;
        if let Some(username) = &m.username {
            write!(out, ", user {username}")?;
            if m.password.is_some() {
                write!(out, " with password")?;
            }
        }
        if let Some(ca) = &m.ca_file {
            write!(out, ", ca {}", ca.display())?;
        }
        if let Some(cert) = &m.client_cert_file {
            write!(out, ", client cert {}", cert.display())?;
        }
        writeln!(out, ")")?;
        writeln!(
            out,
            "topics: prefix {}, share group {}, payloads up to {} bytes",
            m.topic_prefix, m.share_group, m.max_payload_bytes
        )?;
        match &m.allowed_reply_prefixes {
            Some(prefixes) => writeln!(out, "reply topics: under {}", prefixes.join(", "))?,
            None => writeln!(
                out,
                "reply topics: any outside {}/ and $-topics",
                m.topic_prefix
            )?,
        }
        if self.providers.is_empty() {
            writeln!(out, "providers: none")?;
        } else {
            writeln!(out, "providers:")?;
        }
        for p in &self.providers {
            writeln!(
                out,
                "  {} ({}, {}, daily reset {}, timeout {} s)",
                p.name,
                p.kind,
                p.base_url,
                p.daily_reset,
                p.timeout.as_secs()
            )?;
            for (model, limits) in &p.models {
                writeln!(out, "    model {model}: {limits}")?;
            }
            for key in &p.keys {
                write!(out, "    key {} ({}", key.label, key.secret_source)?;
                if let Some(account) = &key.account {
                    write!(out, ", account {account}")?;
                }
                writeln!(out, ")")?;
            }
        }
        let auto: Vec<String> = self.routing.auto.iter().map(Target::to_string).collect();
        if auto.is_empty() {
            writeln!(out, "auto route: none")?;
        } else {
            writeln!(out, "auto route: {}", auto.join(", "))?;
        }
        writeln!(out, "queue: up to {} tasks", self.routing.max_queue)?;
        let l = &self.leds;
        write!(out, "leds: {}", l.backend)?;
        let pins: Vec<String> = l
            .pins()
            .map(|(name, pin)| format!("{name} {pin}"))
            .collect();
        if !pins.is_empty() {
            write!(out, " ({})", pins.join(", "))?;
        }
        if let Some(chip) = &l.chip {
            write!(out, ", chip {}", chip.display())?;
        }
        if let Some(path) = &l.path {
            write!(out, ", file {}", path.display())?;
        }
        writeln!(out)
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

fn read_secret(source: &SecretSource, env: &dyn Environment) -> Result<Secret, SecretError> {
    let raw = match source {
        SecretSource::File(path) => read_secret_file(path)?,
        SecretSource::Env(name) => env
            .var(name)
            .ok_or(SecretError::EnvUnset)?
            .into_string()
            .map_err(|_| SecretError::EnvNotUnicode)?,
    };
    let secret = Secret::new(&raw);
    if secret.expose().is_empty() {
        return Err(match source {
            SecretSource::File(_) => SecretError::EmptyFile,
            SecretSource::Env(_) => SecretError::EnvEmpty,
        });
    }
    if secret.expose().chars().any(char::is_control) {
        return Err(SecretError::ControlCharacters);
    }
    Ok(secret)
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let file = File::open(path).map_err(SecretError::Open)?;
    // The checks look at the file opened, not at the path again, so that it cannot
    // be swapped between the check and the read.
    let meta = file.metadata().map_err(SecretError::ReadFile)?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile);
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & GROUP_OR_OTHER_BITS != 0 {
        return Err(SecretError::Exposed { mode });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(SecretError::ReadFile)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8)
}

// ---------------------------------------------------------------------------
// What the file holds, before validation. Every field is optional here so that serde
// never stops at a missing one: required fields are checked below, all at once.

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    node_id: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    trust_unsynchronised_clock: Option<bool>,
    mqtt: Option<Spanned<RawMqtt>>,
    providers: Vec<Spanned<RawProvider>>,
    routing: Option<Spanned<RawRouting>>,
    leds: Option<Spanned<RawLeds>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawMqtt {
    url: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    share_group: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert_file: Option<Spanned<String>>,
    client_key_file: Option<Spanned<String>>,
    max_payload_bytes: Option<Spanned<usize>>,
    allowed_reply_prefixes: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawProvider {
    name: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    base_url: Option<Spanned<String>>,
    daily_reset: Option<Spanned<String>>,
    timeout_secs: Option<Spanned<u64>>,
    models: BTreeMap<Spanned<String>, RawLimits>,
    keys: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawLimits {
    rpm: Option<Spanned<u64>>,
    rpd: Option<Spanned<u64>>,
    tpm: Option<Spanned<u64>>,
    tpd: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawKey {
    label: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
    account: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawRouting {
    auto: Option<Vec<Spanned<String>>>,
    max_queue: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawLeds {
    backend: Option<Spanned<String>>,
    chip: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    green: Option<Spanned<LedPin>>,
    amber: Option<Spanned<LedPin>>,
    red: Option<Spanned<LedPin>>,
    activity: Option<Spanned<LedPin>>,
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

// ---------------------------------------------------------------------------
// Validation.

/// Collects problems while the config is checked.
struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
    /// Fields the type pass already reported and took out, so that the rules
    /// after it do not call them missing as well.
    reported: HashSet<String>,
}

impl<'t> Checker<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            text,
            problems: Vec::new(),
            reported: HashSet::new(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        let before = &self.text.as_bytes()[..offset.min(self.text.len())];
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn problem(&mut self, span: Option<Range<usize>>, field: &str, message: impl Into<String>) {
        let line = span.map(|span| self.line(span.start));
        self.problems.push(Problem {
            line,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn at<T>(&mut self, value: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.problem(Some(value.span()), field, message);
    }

    /// A required field is absent, unless the type pass already said what was wrong with it.
    fn missing(&mut self, span: Range<usize>, field: &str, message: &str) {
        if !self.reported.contains(field) {
            self.problem(Some(span), field, message);
        }
    }

    fn finish(mut self) -> Vec<Problem> {
        // Stable: problems on one line keep the order in which they were found.
        self.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        self.problems
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

/// Parses the TOML and deserializes it, reporting every unknown field and every value of
/// the wrong type. Serde stops at the first of those, so each one found is reported,
/// taken out of the parsed document, and the rest deserialized again.
fn read_raw(text: &str, check: &mut Checker<'_>) -> Option<RawConfig> {
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(e) => {
            check.problem(e.span(), "", e.message());
            return None;
        }
    };
    let span = document.span();
    let mut table = document.into_inner();
    loop {
        let attempt = toml::de::Deserializer::from(Spanned::new(span.clone(), table.clone()));
        let error = match RawConfig::deserialize(attempt) {
            Ok(raw) => return Some(raw),
            Err(error) => error,
        };
        let field = error
            .span()
            .and_then(|at| take_out(&mut table, &at, String::new()));
        match field {
            Some(field) => {
                check.problem(error.span(), &field, error.message());
                check.reported.insert(field);
            }
            None => {
                // Nothing to take out, so another pass would fail the same way.
                check.problem(error.span(), "", error.message());
                return None;
            }
        }
    }
}

/// Removes the entry whose key or value lies at `at` (the innermost one) and returns
/// its field path.
fn take_out(table: &mut DeTable<'_>, at: &Range<usize>, prefix: String) -> Option<String> {
    let contains = |span: Range<usize>| span.start <= at.start && at.end <= span.end;
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        let path = join_path(&prefix, key.get_ref());
        let inner = match value.get_mut() {
            toml::de::DeValue::Table(inner) => take_out(inner, at, path.clone()),
            toml::de::DeValue::Array(items) => {
                items
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, item)| match item.get_mut() {
                        toml::de::DeValue::Table(inner) => {
                            take_out(inner, at, format!("{path}[{i}]"))
                        }
                        _ => None,
                    })
            }
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        if contains(key.span()) || contains(value.span()) {
            hit = Some((key.get_ref().to_string(), path));
            break;
        }
    }
    let (key, path) = hit?;
    table.remove(key.as_str());
    Some(path)
}

/// `prefix.key`, with the key quoted as TOML would need it (model names hold dots).
fn join_path(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

fn build(raw: RawConfig, source: &Path, env: &dyn Environment, c: &mut Checker<'_>) -> Config {
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
fn topic_level_problem(text: &str) -> Option<&'static str> {
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
fn topic_prefix_problem(text: &str) -> Option<&'static str> {
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

fn build_mqtt(raw: RawMqtt, base: &Path, env: &dyn Environment, c: &mut Checker<'_>) -> MqttConfig {
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
            let text = prefix.get_ref();
            let why = topic_prefix_problem(text).or_else(|| {
                (text.starts_with('/') || text.ends_with('/') || text.contains("//"))
                    .then_some("must not start or end with / or hold an empty level")
            });
            if let Some(why) = why {
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
            .map_err(|e| c.at(&file, "mqtt.password_file", e.to_string()))
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
    }
}

/// A provider as built, with its models in the order the file lists them (the
/// default `auto` route follows it).
struct BuiltProvider {
    config: ProviderConfig,
    model_order: Vec<String>,
}

fn build_providers(
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
            c.at(&spanned, &format!("{path}.{field}"), e.to_string());
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

fn build_routing(
    raw: RawRouting,
    providers: &[BuiltProvider],
    c: &mut Checker<'_>,
) -> RoutingConfig {
    let auto = match raw.auto {
        Some(targets) => {
            let mut auto: Vec<Target> = Vec::new();
            for (i, text) in targets.into_iter().enumerate() {
                let field = format!("routing.auto[{i}]");
                let Some(target) = Target::parse(text.get_ref()) else {
                    c.at(
                        &text,
                        &field,
                        format!("{:?} is not provider/model", text.get_ref()),
                    );
                    continue;
                };
                let provider = providers.iter().find(|p| p.config.name == target.provider);
                match provider {
                    None => c.at(
                        &text,
                        &field,
                        format!("no provider is named {:?}", target.provider),
                    ),
                    Some(p) if !p.config.models.contains_key(&target.model) => c.at(
                        &text,
                        &field,
                        format!(
                            "provider {:?} lists no model {:?}",
                            target.provider, target.model
                        ),
                    ),
                    Some(_) if auto.contains(&target) => {
                        c.at(&text, &field, format!("{target} is listed twice"));
                    }
                    Some(_) => auto.push(target),
                }
            }
            auto
        }
        None => providers
            .iter()
            .flat_map(|p| {
                p.model_order.iter().map(|model| Target {
                    provider: p.config.name.clone(),
                    model: model.clone(),
                })
            })
            .collect(),
    };
    RoutingConfig {
        auto,
        max_queue: raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
    }
}

fn build_leds(raw: Option<Spanned<RawLeds>>, base: &Path, c: &mut Checker<'_>) -> LedConfig {
    let (span, raw) = match raw {
        Some(raw) => (Some(raw.span()), raw.into_inner()),
        None => (None, RawLeds::default()),
    };
    let backend = match &raw.backend {
        Some(name) => LedBackendKind::ALL
            .into_iter()
            .find(|b| b.as_str() == name.get_ref())
            .unwrap_or_else(|| {
                let known: Vec<&str> = LedBackendKind::ALL.iter().map(|b| b.as_str()).collect();
                c.at(
                    name,
                    "leds.backend",
                    format!("unknown backend {:?}: {}", name.get_ref(), known.join(", ")),
                );
                LedBackendKind::None
            }),
        None => LedBackendKind::Auto,
    };

    let path = raw.path.map(|p| base.join(p.into_inner()));
    if backend == LedBackendKind::File && path.is_none() {
        c.problem(
            span.clone(),
            "leds.path",
            "missing: backend \"file\" needs the path of its JSON file",
        );
    }

    let mut seen: Vec<(LedPin, &str)> = Vec::new();
    let mut pin = |value: Option<Spanned<LedPin>>, name: &'static str| {
        let value = value?;
        let field = format!("leds.{name}");
        let why = match (backend, value.get_ref()) {
            (
                LedBackendKind::Auto | LedBackendKind::Rppal | LedBackendKind::Gpiochip,
                LedPin::Name(_),
            ) => Some(format!(
                "backend {backend} takes a GPIO line number (BCM pin or line offset), not a name"
            )),
            (LedBackendKind::Sysfs, LedPin::Line(_)) => Some(
                "backend sysfs takes the name of an LED under /sys/class/leds, not a number"
                    .to_owned(),
            ),
            (_, LedPin::Name(n)) if n.is_empty() => Some("must not be empty".to_owned()),
            _ => None,
        };
        if let Some(why) = why {
            c.at(&value, &field, why);
        } else if let Some((_, first)) = seen.iter().find(|(p, _)| p == value.get_ref()) {
            c.at(&value, &field, format!("is the same light as leds.{first}"));
        }
        seen.push((value.get_ref().clone(), name));
        Some(value.into_inner())
    };
    let green = pin(raw.green, "green");
    let amber = pin(raw.amber, "amber");
    let red = pin(raw.red, "red");
    let activity = pin(raw.activity, "activity");

    LedConfig {
        backend,
        chip: raw.chip.map(|chip| base.join(chip.into_inner())),
        green,
        amber,
        red,
        activity,
        path,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const EXAMPLE: &str = include_str!("../examples/keyrelay.toml");
    const FILE: &str = "/etc/keyrelay/keyrelay.toml";

    /// The environment the tests pretend to run in, so that none of them sets a real
    /// variable under the others.
    struct FakeEnv {
        vars: HashMap<String, String>,
        hostname: Option<String>,
    }

    impl FakeEnv {
        fn new() -> Self {
            Self {
                vars: HashMap::new(),
                hostname: Some("pi-test".to_owned()),
            }
        }

        fn with(mut self, name: &str, value: &str) -> Self {
            self.vars.insert(name.to_owned(), value.to_owned());
            self
        }
    }

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<OsString> {
            self.vars.get(name).map(OsString::from)
        }

        fn hostname(&self) -> Option<String> {
            self.hostname.clone()
        }
    }

    fn write_key(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn accept(text: &str, env: &FakeEnv) -> Config {
        match parse_in(text, Path::new(FILE), env) {
            Ok(config) => config,
            Err(e) => panic!("refused:\n{e}\n--- config:\n{text}"),
        }
    }

    fn problems(text: &str, env: &FakeEnv) -> Vec<Problem> {
        match parse_in(text, Path::new(FILE), env) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// Asserts that `text` is refused with a problem on `field` whose message holds `why`.
    #[track_caller]
    fn refused(text: &str, env: &FakeEnv, field: &str, why: &str) -> Problem {
        let problems = problems(text, env);
        problems
            .iter()
            .find(|p| p.field == field && p.message.contains(why))
            .cloned()
            .unwrap_or_else(|| panic!("no problem {field}: …{why}… in {problems:#?}"))
    }

    /// A valid config with one provider `groq` (model `m`, key `k1` read from `key`):
    /// `top` comes before it, `rest` after it.
    fn valid(key: &Path, top: &str, rest: &str) -> String {
        format!(
            "{top}\n\
             [[providers]]\n\
             name = \"groq\"\n\
             kind = \"openai\"\n\
             base_url = \"https://api.groq.com/openai/v1\"\n\
             [providers.models.m]\n\
             rpm = 30\n\
             [[providers.keys]]\n\
             label = \"k1\"\n\
             secret_file = \"{}\"\n\
             {rest}\n",
            key.display()
        )
    }

    /// A provider table to append, with one key read from the env var `var`.
    fn provider(name: &str, label: &str, var: &str) -> String {
        format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"gemini\"\n\
             [providers.models.\"gemini-2.0-flash\"]\nrpm = 15\n\
             [[providers.keys]]\nlabel = \"{label}\"\nsecret_env = \"{var}\"\n"
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
        key: PathBuf,
        env: FakeEnv,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = write_key(dir.path(), "k1", "gsk_one\n", 0o600);
        Fixture {
            dir,
            key,
            env: FakeEnv::new().with("GEMINI_KEY", "AIza_two"),
        }
    }

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
        assert_eq!(config.leds.backend, LedBackendKind::Auto);
        assert_eq!(config.leds.pins().count(), 0);
        assert_eq!(config.leds.path, None);
        assert!(config.targets_for_model("auto").is_empty());
    }

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
    fn the_system_hostname_is_read() {
        let host = System.hostname().expect("a Linux machine has a hostname");
        assert!(!host.is_empty());
        assert_eq!(host, host.trim());
    }

    #[test]
    fn a_broken_config_lists_every_problem_with_its_line() {
        let lines = [
            r#"node_id = "kitchen/pi""#,                                   // 1
            r#"log_level = "loud""#,                                       // 2
            r#"colour = "red""#,                                           // 3
            "[mqtt]",                                                      // 4
            r#"url = "http://broker""#,                                    // 5
            r#"topic_prefix = "$SYS""#,                                    // 6
            "[[providers]]",                                               // 7
            r#"name = "groq""#,                                            // 8
            r#"kind = "openia""#,                                          // 9
            r#"base_url = "https://api.groq.com/openai/v1""#,              // 10
            r#"daily_reset = "Mars/Olympus_Mons""#,                        // 11
            r#"[providers.models."llama-3.3-70b-versatile"]"#,             // 12
            "rpm = 0",                                                     // 13
            r#"tpd = "lots""#,                                             // 14
            "[[providers.keys]]",                                          // 15
            r#"label = "groq-1""#,                                         // 16
            r#"secret_env = "KEYRELAY_TEST_UNSET""#,                       // 17
            "[routing]",                                                   // 18
            r#"auto = ["groq/llama-3.3-70b-versatile", "openai/gpt-4o"]"#, // 19
            "[leds]",                                                      // 20
            r#"backend = "blinkenlights""#,                                // 21
        ];
        let text = lines.join("\n");
        let err = parse_in(
            &text,
            Path::new("/etc/keyrelay/broken.toml"),
            &FakeEnv::new(),
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let found: Vec<(Option<usize>, &str)> = problems
            .iter()
            .map(|p| (p.line, p.field.as_str()))
            .collect();
        let model = r#"providers[0].models."llama-3.3-70b-versatile""#;
        let rpm = format!("{model}.rpm");
        let tpd = format!("{model}.tpd");
        assert_eq!(
            found,
            [
                (Some(1), "node_id"),
                (Some(2), "log_level"),
                (Some(3), "colour"),
                (Some(5), "mqtt.url"),
                (Some(6), "mqtt.topic_prefix"),
                (Some(9), "providers[0].kind"),
                (Some(11), "providers[0].daily_reset"),
                (Some(13), rpm.as_str()),
                (Some(14), tpd.as_str()),
                (Some(17), "providers[0].keys[0].secret_env"),
                (Some(19), "routing.auto[1]"),
                (Some(21), "leds.backend"),
            ]
        );
        let shown = err.to_string();
        let shown: Vec<&str> = shown.lines().collect();
        assert_eq!(shown.len(), problems.len());
        assert!(
            shown[0].starts_with("/etc/keyrelay/broken.toml:1: node_id: must not contain /"),
            "{}",
            shown[0]
        );
        assert!(
            shown[2].starts_with("/etc/keyrelay/broken.toml:3: colour: unknown field `colour`")
        );
        assert!(
            shown[8]
                .contains(":14: providers[0].models.\"llama-3.3-70b-versatile\".tpd: invalid type")
        );
    }

    #[test]
    fn every_unknown_field_is_reported_at_once() {
        let f = fixture();
        let text = format!(
            "nodeid = \"x\"\n[mqtt]\npassword = \"p\"\n{}\nflavour = 1\n[routing]\nfallback = []\n[leds]\nblue = 4\n",
            valid(&f.key, "", "")
                .replace("rpm = 30\n", "rpm = 30\nrps = 1\n")
                .replace("label = \"k1\"\n", "label = \"k1\"\nweight = 2\n")
        );
        let problems = problems(&text, &f.env);
        let mut fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "leds.blue",
                "mqtt.password",
                "nodeid",
                "providers[0].keys[0].flavour",
                "providers[0].keys[0].weight",
                "providers[0].models.m.rps",
                "routing.fallback",
            ]
        );
        assert!(
            problems
                .iter()
                .all(|p| p.message.starts_with("unknown field"))
        );
        assert!(problems.iter().all(|p| p.line.is_some()));
    }

    #[test]
    fn values_of_the_wrong_type_are_all_reported_without_knock_on_problems() {
        let f = fixture();
        let text = valid(
            &f.key,
            "trust_unsynchronised_clock = \"yes\"",
            "[routing]\nmax_queue = -1\n",
        )
        .replace("name = \"groq\"", "name = 7")
        .replace("rpm = 30", "rpm = \"30\"")
        .replace("label = \"k1\"", "label = [\"k1\"]");
        let problems = problems(&text, &f.env);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "trust_unsynchronised_clock",
                "providers[0].name",
                "providers[0].models.m.rpm",
                "providers[0].keys[0].label",
                "routing.max_queue",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_its_line() {
        let env = FakeEnv::new();
        let found = problems("node_id = \"a\"\n\n[mqtt\nurl = 1\n", &env);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, Some(3));
        assert_eq!(found[0].field, "");
        let found = problems("x = 1\nnode_id = \n", &env);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, Some(2));
    }

    #[test]
    fn sections_of_the_wrong_shape_are_refused() {
        refused("mqtt = 5", &FakeEnv::new(), "mqtt", "invalid type");
        refused(
            "[providers]\nname = \"x\"",
            &FakeEnv::new(),
            "providers",
            "invalid type",
        );
        refused("routing = 5", &FakeEnv::new(), "routing", "invalid type");
        refused(
            "[[leds]]\ngreen = 1",
            &FakeEnv::new(),
            "leds",
            "invalid type",
        );
    }

    #[test]
    fn key_files_must_be_private_non_empty_and_are_trimmed() {
        let f = fixture();
        let dir = f.dir.path();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let key = write_key(dir, "open", "gsk_open\n", mode);
            let p = refused(
                &valid(&key, "", ""),
                &f.env,
                "providers[0].keys[0].secret_file",
                "readable by group or others",
            );
            assert!(
                p.message.contains(&format!("mode {mode:04o}")),
                "{}",
                p.message
            );
            assert_eq!(p.line, Some(10));
        }
        for mode in [0o600, 0o400] {
            let key = write_key(dir, "private", "  gsk_private \n", mode);
            let config = accept(&valid(&key, "", ""), &f.env);
            assert_eq!(config.providers[0].keys[0].secret.expose(), "gsk_private");
        }
        let empty = write_key(dir, "empty", " \n", 0o600);
        refused(
            &valid(&empty, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "empty",
        );
        let missing = dir.join("missing");
        refused(
            &valid(&missing, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "cannot open",
        );
        refused(
            &valid(dir, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "not a regular file",
        );
        let unreadable = f.key.join("below-a-file");
        refused(
            &valid(&unreadable, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "cannot open",
        );
        let two_lines = write_key(dir, "two", "gsk_a\ngsk_b\n", 0o600);
        refused(
            &valid(&two_lines, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "several lines",
        );
        let big = write_key(dir, "big", &"k".repeat(100_000), 0o600);
        refused(
            &valid(&big, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "larger than",
        );
    }

    #[test]
    fn relative_key_files_are_found_beside_the_config() {
        let f = fixture();
        write_key(f.dir.path(), "near", "gsk_near\n", 0o600);
        let config_path = f.dir.path().join("keyrelay.toml");
        fs::write(&config_path, valid(Path::new("near"), "", "")).unwrap();
        let config = parse_in(
            &fs::read_to_string(&config_path).unwrap(),
            &config_path,
            &f.env,
        )
        .unwrap();
        assert_eq!(config.providers[0].keys[0].secret.expose(), "gsk_near");
        assert_eq!(
            config.providers[0].keys[0].secret_source,
            SecretSource::File(f.dir.path().join("near"))
        );
    }

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
    fn routes_name_configured_providers_and_models() {
        let f = fixture();
        let rest = format!(
            "{}[routing]\nauto = [",
            provider("gemini", "g1", "GEMINI_KEY")
        );
        let route = |targets: &str| valid(&f.key, "", &format!("{rest}{targets}]\n"));
        refused(
            &route("\"openai/gpt-4o\""),
            &f.env,
            "routing.auto[0]",
            "no provider is named \"openai\"",
        );
        refused(
            &route("\"groq/m\", \"groq/n\""),
            &f.env,
            "routing.auto[1]",
            "lists no model \"n\"",
        );
        refused(
            &route("\"groq\""),
            &f.env,
            "routing.auto[0]",
            "not provider/model",
        );
        refused(
            &route("\"groq/m\", \"groq/m\""),
            &f.env,
            "routing.auto[1]",
            "listed twice",
        );
        let config = accept(&route("\"gemini/gemini-2.0-flash\", \"groq/m\""), &f.env);
        let auto: Vec<String> = config.routing.auto.iter().map(Target::to_string).collect();
        assert_eq!(auto, ["gemini/gemini-2.0-flash", "groq/m"]);
    }

    #[test]
    fn the_default_auto_route_follows_the_file() {
        let f = fixture();
        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY")).replace(
            "[providers.models.m]\nrpm = 30\n",
            "[providers.models.zeta]\n[providers.models.alpha]\nrpm = 1\n",
        );
        let config = accept(&text, &f.env);
        let auto: Vec<String> = config.routing.auto.iter().map(Target::to_string).collect();
        assert_eq!(auto, ["groq/zeta", "groq/alpha", "gemini/gemini-2.0-flash"]);
        assert_eq!(config.providers[0].models["zeta"], ModelLimits::default());
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
        refused(
            &with(&dir.join("none")),
            &f.env,
            "mqtt.password_file",
            "cannot open",
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
    fn leds_need_a_known_backend_and_pins_it_can_use() {
        let env = FakeEnv::new();
        refused(
            "[leds]\nbackend = \"neopixel\"",
            &env,
            "leds.backend",
            "unknown backend \"neopixel\"",
        );
        refused(
            "[leds]\nbackend = \"file\"",
            &env,
            "leds.path",
            "needs the path",
        );
        refused(
            "[leds]\nbackend = \"rppal\"\ngreen = \"ACT\"",
            &env,
            "leds.green",
            "line number",
        );
        refused("[leds]\nred = \"PWR\"", &env, "leds.red", "line number");
        refused(
            "[leds]\nbackend = \"sysfs\"\nred = 22",
            &env,
            "leds.red",
            "name of an LED",
        );
        refused("[leds]\ngreen = -1", &env, "leds.green", "invalid value");
        refused(
            "[leds]\ngreen = 17\nred = 17",
            &env,
            "leds.red",
            "same light as leds.green",
        );

        let config = accept(
            "[leds]\nbackend = \"sysfs\"\ngreen = \"ACT\"\nred = \"PWR\"",
            &env,
        );
        assert_eq!(config.leds.backend, LedBackendKind::Sysfs);
        assert_eq!(config.leds.green, Some(LedPin::Name("ACT".into())));
        let config = accept(
            "[leds]\nbackend = \"file\"\npath = \"/run/keyrelay/leds.json\"\ngreen = 1",
            &env,
        );
        assert_eq!(
            config.leds.path,
            Some(PathBuf::from("/run/keyrelay/leds.json"))
        );
        let config = accept(
            "[leds]\nbackend = \"gpiochip\"\nchip = \"/dev/gpiochip4\"\ngreen = 5",
            &env,
        );
        assert_eq!(config.leds.chip, Some(PathBuf::from("/dev/gpiochip4")));
        assert_eq!(config.leds.green, Some(LedPin::Line(5)));
        assert_eq!(
            accept("[leds]\nbackend = \"none\"", &env).leds.backend,
            LedBackendKind::None
        );
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
    fn load_secret_reads_a_key_again() {
        let f = fixture();
        let source = SecretSource::File(f.key.clone());
        assert_eq!(load_secret(&source).unwrap().expose(), "gsk_one");
        fs::write(&f.key, "gsk_replaced\n").unwrap();
        assert_eq!(load_secret(&source).unwrap().expose(), "gsk_replaced");
        fs::set_permissions(&f.key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_secret(&source),
            Err(SecretError::Exposed { mode: 0o644 })
        ));
        let unset = SecretSource::Env("KEYRELAY_TEST_NEVER_SET_4F1A".into());
        assert!(matches!(load_secret(&unset), Err(SecretError::EnvUnset)));
    }

    #[test]
    fn the_summary_shows_what_an_operator_checks() {
        let f = fixture();
        let top = "[mqtt]\nurl = \"mqtts://broker.lan\"\nusername = \"relay\"";
        let rest = format!(
            "{}[leds]\nbackend = \"file\"\npath = \"/run/l.json\"\ngreen = 1\n",
            provider("gemini", "g1", "GEMINI_KEY")
        );
        let text = valid(&f.key, top, &rest)
            .replace("label = \"k1\"", "label = \"k1\"\naccount = \"acct-a\"");
        let summary = accept(&text, &f.env).summary();
        for needle in [
            "node id: pi-test",
            "broker: broker.lan:8883 (tls, user relay)",
            "groq (openai, https://api.groq.com/openai/v1, daily reset rolling, timeout 60 s)",
            "model m: rpm 30",
            &format!("key k1 (file {}, account acct-a)", f.key.display()),
            "gemini (gemini, https://generativelanguage.googleapis.com/v1beta",
            "model gemini-2.0-flash: rpm 15",
            "key g1 (env GEMINI_KEY)",
            "auto route: groq/m, gemini/gemini-2.0-flash",
            "leds: file (green 1), file /run/l.json",
        ] {
            assert!(summary.contains(needle), "{needle:?} not in\n{summary}");
        }
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
