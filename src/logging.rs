//! Where log lines go: journald when the process runs under it, stderr otherwise, at the
//! level of `RUST_LOG` when set, else the config's `log_level` (SPEC §6). This module owns
//! the logger only; what is logged belongs to each module.
//!
//! # Structured fields
//!
//! Log through the `log` macros with key-values before the `;`, using these keys:
//!
//! | key        | journald field       | value                          |
//! |------------|----------------------|--------------------------------|
//! | `event`    | `KEYRELAY_EVENT`     | what happened, `snake_case`: `task_done`, `key_cooling`… |
//! | `task_id`  | `KEYRELAY_TASK_ID`   | the task's id                  |
//! | `key`      | `KEYRELAY_KEY`       | a key's label, never its secret |
//! | `provider` | `KEYRELAY_PROVIDER`  | the provider's `name`          |
//! | `model`    | `KEYRELAY_MODEL`     | the model                      |
//!
//! ```ignore
//! log::info!(event = "task_done", task_id = id.as_str(), key = label.as_str(); "answered in {ms} ms");
//! log::warn!(event = "key_cooling", key:% = label, provider:% = name; "429 until {until}");
//! ```
//!
//! (`key:% = x` takes any `Display`.) Every key-value becomes a journald field named
//! `KEYRELAY_` + the key in upper case, so `journalctl -u keyrelay KEYRELAY_KEY=groq-1`
//! finds everything about one key; on stderr they follow the message as `key=value`.
//! Other keys work the same way, but add them to the table above first.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

/// Put before each key-value's key in journald, whose field namespace is shared with
/// systemd's own fields (`_PID`, `MESSAGE`, …) and every other program's.
pub const JOURNAL_FIELD_PREFIX: &str = "keyrelay_";

/// The environment variable that, when set, overrides the config's `log_level`.
pub const RUST_LOG: &str = "RUST_LOG";

/// Installs the logger. `level` is the config's `log_level`; `RUST_LOG`, when set, wins.
///
/// It may be called again (e.g. once with a default before the config is read, then with
/// the config's level): later calls only change the level.
pub fn init(level: LevelFilter) {
    let rust_log = std::env::var(RUST_LOG)
        .ok()
        .filter(|spec| !spec.trim().is_empty());
    let (filter, bad) = match rust_log.as_deref() {
        Some(spec) => Filter::parse(spec, level),
        None => (Filter::new(level), Vec::new()),
    };
    let max = filter.max_level();
    if let Some(installed) = INSTALLED.get() {
        // RUST_LOG, when set, already decided; otherwise the new level applies.
        if rust_log.is_none() {
            installed.store(level as usize, Ordering::Relaxed);
            log::set_max_level(level);
        }
        return;
    }
    let default = INSTALLED.get_or_init(|| AtomicUsize::new(filter.default as usize));
    let logger: Box<dyn Log> = if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => Box::new(Journal {
                inner: journal,
                filter: SharedFilter { filter, default },
            }),
            Err(e) => {
                eprintln!("keyrelay: journald unreachable ({e}); logging to stderr");
                Box::new(Stderr {
                    filter: SharedFilter { filter, default },
                })
            }
        }
    } else {
        Box::new(Stderr {
            filter: SharedFilter { filter, default },
        })
    };
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(max);
    }
    for directive in bad {
        log::warn!("ignoring {directive:?} in RUST_LOG: not a level or target=level");
    }
}

/// The default level of the installed logger, shared so that a later `init` can change it.
static INSTALLED: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();

/// Levels per target, as `RUST_LOG` gives them: `debug`, `keyrelay=debug`,
/// `info,rumqttc=warn`, or a bare target (`keyrelay`: everything from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    /// Longest target first, so the most specific directive wins.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    pub fn new(default: LevelFilter) -> Self {
        Filter {
            default,
            targets: Vec::new(),
        }
    }

    /// Parses `RUST_LOG`; `fallback` applies where it names no default level. Returns the
    /// directives it could not read, so they are reported rather than silently dropped.
    pub fn parse(spec: &str, fallback: LevelFilter) -> (Self, Vec<String>) {
        let mut filter = Filter::new(fallback);
        let mut bad = Vec::new();
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match directive.split_once('=') {
                Some((target, level)) => match level.trim().parse::<LevelFilter>() {
                    Ok(level) if !target.trim().is_empty() => {
                        filter.targets.push((target.trim().to_string(), level));
                    }
                    _ => bad.push(directive.to_string()),
                },
                None => match directive.parse::<LevelFilter>() {
                    Ok(level) => filter.default = level,
                    // env_logger's convention: a bare target means all of it.
                    Err(_) if is_target(directive) => {
                        filter
                            .targets
                            .push((directive.to_string(), LevelFilter::Trace));
                    }
                    Err(_) => bad.push(directive.to_string()),
                },
            }
        }
        filter
            .targets
            .sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        (filter, bad)
    }

    /// The level for records of `target`, given the default level in force.
    pub fn level_for(&self, target: &str, default: LevelFilter) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| {
                target == t
                    || target
                        .strip_prefix(t.as_str())
                        .is_some_and(|rest| rest.starts_with("::"))
            })
            .map_or(default, |&(_, level)| level)
    }

    /// The most verbose level any target gets, for `log::set_max_level`.
    pub fn max_level(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|&(_, level)| level)
            .fold(self.default, Ord::max)
    }
}

fn is_target(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The parsed filter with the default level that [`init`] may change later.
struct SharedFilter {
    filter: Filter,
    default: &'static AtomicUsize,
}

impl SharedFilter {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let default = match self.default.load(Ordering::Relaxed) {
            0 => LevelFilter::Off,
            1 => LevelFilter::Error,
            2 => LevelFilter::Warn,
            3 => LevelFilter::Info,
            4 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        };
        metadata.level() <= self.filter.level_for(metadata.target(), default)
    }
}

/// Lines on stderr, for a terminal or anything that is not journald.
struct Stderr {
    filter: SharedFilter,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format!("{:.3} ", jiff::Timestamp::now());
        format_record(&mut line, record);
        line.push('\n');
        // One write per line, so lines from several threads never interleave; a failed
        // write to stderr has nowhere else to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Formats a record for stderr: `LEVEL target: message key=value …`. Values with spaces,
/// quotes or `=` are quoted, so a line splits back into its fields unambiguously.
pub fn format_record(out: &mut String, record: &Record) {
    let _ = write!(
        out,
        "{:<5} {}: {}",
        record.level(),
        record.target(),
        record.args()
    );
    let mut pairs = KeyValueText(out);
    let _ = record.key_values().visit(&mut pairs);
}

struct KeyValueText<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for KeyValueText<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let text = value.to_string();
        let plain = !text.is_empty()
            && !text
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
        if plain {
            let _ = write!(self.0, " {key}={text}");
        } else {
            let _ = write!(self.0, " {key}={text:?}");
        }
        Ok(())
    }
}

/// journald, with each key-value renamed `keyrelay_<key>` (which systemd-journal-logger
/// upper-cases into `KEYRELAY_<KEY>`: it has no hook of its own to rename fields).
struct Journal {
    inner: JournalLog,
    filter: SharedFilter,
}

impl Log for Journal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let fields = PrefixedFields::of(record);
        self.inner
            .log(&record.to_builder().key_values(&fields).build());
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// A record's key-values under their journald names.
#[derive(Debug, PartialEq, Eq)]
pub struct PrefixedFields(Vec<(String, String)>);

impl PrefixedFields {
    pub fn of(record: &Record) -> Self {
        struct Collect(Vec<(String, String)>);
        impl<'kvs> VisitSource<'kvs> for Collect {
            fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
                self.0
                    .push((format!("{JOURNAL_FIELD_PREFIX}{key}"), value.to_string()));
                Ok(())
            }
        }
        let mut collect = Collect(Vec::new());
        let _ = record.key_values().visit(&mut collect);
        PrefixedFields(collect.0)
    }

    /// The fields' names and values, in the order they were logged.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

impl Source for PrefixedFields {
    fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), kv::Error> {
        for (key, value) in &self.0 {
            visitor.visit_pair(Key::from_str(key), Value::from(value.as_str()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;

    fn formatted(level: Level, kvs: &[(&str, &str)], args: std::fmt::Arguments) -> String {
        let kvs: Vec<(&str, Value)> = kvs.iter().map(|&(k, v)| (k, Value::from(v))).collect();
        let record = Record::builder()
            .level(level)
            .target("keyrelay::relay")
            .args(args)
            .key_values(&kvs)
            .build();
        let mut out = String::new();
        format_record(&mut out, &record);
        out
    }

    #[test]
    fn stderr_lines_carry_level_target_message_then_fields() {
        assert_eq!(
            formatted(
                Level::Info,
                &[
                    ("event", "task_done"),
                    ("task_id", "b1f0"),
                    ("key", "groq-3")
                ],
                format_args!("answered in {} ms", 412)
            ),
            "INFO  keyrelay::relay: answered in 412 ms event=task_done task_id=b1f0 key=groq-3"
        );
        assert_eq!(
            formatted(Level::Warn, &[], format_args!("broker gone")),
            "WARN  keyrelay::relay: broker gone"
        );
    }

    #[test]
    fn awkward_values_are_quoted() {
        assert_eq!(
            formatted(
                Level::Error,
                &[
                    ("reason", "try again in 9m19s"),
                    ("model", ""),
                    ("x", "a=b")
                ],
                format_args!("m")
            ),
            r#"ERROR keyrelay::relay: m reason="try again in 9m19s" model="" x="a=b""#
        );
    }

    #[test]
    fn the_macros_key_values_reach_the_formatter() {
        // Captured through a tiny logger so the `log!` key-value syntax the module docs
        // recommend is exercised, not just hand-built records.
        struct Capture(std::sync::Mutex<Vec<String>>);
        impl Log for Capture {
            fn enabled(&self, _: &Metadata) -> bool {
                true
            }
            fn log(&self, record: &Record) {
                let mut s = String::new();
                format_record(&mut s, record);
                self.0.lock().unwrap().push(s);
                let journal = PrefixedFields::of(record);
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{:?}", journal.pairs()));
            }
            fn flush(&self) {}
        }
        let capture = Capture(std::sync::Mutex::new(Vec::new()));
        // The macros consult the global maximum even with an explicit logger; no logger is
        // installed in this test binary, so raising it changes nothing else.
        log::set_max_level(LevelFilter::Trace);
        let label = String::from("groq-1");
        log::info!(logger: capture, target: "keyrelay::rotator", event = "key_cooling", key:% = label, model = "llama"; "429");
        let lines = capture.0.lock().unwrap().clone();
        assert_eq!(
            lines[0],
            "INFO  keyrelay::rotator: 429 event=key_cooling key=groq-1 model=llama"
        );
        assert_eq!(
            lines[1],
            r#"[("keyrelay_event", "key_cooling"), ("keyrelay_key", "groq-1"), ("keyrelay_model", "llama")]"#
        );
    }

    #[test]
    fn rust_log_levels_and_targets() {
        let (f, bad) = Filter::parse("debug", LevelFilter::Info);
        assert!(bad.is_empty());
        assert_eq!(f.level_for("rumqttc::state", f.default), LevelFilter::Debug);

        let (f, bad) = Filter::parse("keyrelay=debug", LevelFilter::Warn);
        assert!(bad.is_empty());
        assert_eq!(
            f.level_for("keyrelay::relay", f.default),
            LevelFilter::Debug
        );
        assert_eq!(f.level_for("keyrelay", f.default), LevelFilter::Debug);
        assert_eq!(f.level_for("keyrelayx", f.default), LevelFilter::Warn);
        assert_eq!(f.level_for("rumqttc", f.default), LevelFilter::Warn);
        assert_eq!(f.max_level(), LevelFilter::Debug);

        let (f, bad) = Filter::parse(
            "info, keyrelay=debug,keyrelay::store=trace,rumqttc=off,bogus=loud,=3",
            LevelFilter::Error,
        );
        assert_eq!(bad, vec!["bogus=loud".to_string(), "=3".to_string()]);
        assert_eq!(f.default, LevelFilter::Info);
        assert_eq!(
            f.level_for("keyrelay::store", f.default),
            LevelFilter::Trace
        );
        assert_eq!(f.level_for("keyrelay::mqtt", f.default), LevelFilter::Debug);
        assert_eq!(f.level_for("rumqttc::v5", f.default), LevelFilter::Off);
        assert_eq!(f.level_for("reqwest", f.default), LevelFilter::Info);

        let (f, _) = Filter::parse("keyrelay", LevelFilter::Warn);
        assert_eq!(f.level_for("keyrelay::leds", f.default), LevelFilter::Trace);
    }
}
