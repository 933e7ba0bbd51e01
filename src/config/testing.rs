//! Helpers for the config's unit tests: a fake environment, key files, and configs
//! that are valid but for the one thing a test changes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError, Environment, Problem, parse_in};

pub(super) const FILE: &str = "/etc/keyrelay/keyrelay.toml";

/// The environment the tests pretend to run in, so that none of them sets a real
/// variable under the others.
pub(super) struct FakeEnv {
    pub(super) vars: HashMap<String, String>,
    pub(super) hostname: Option<String>,
}

impl FakeEnv {
    pub(super) fn new() -> Self {
        Self {
            vars: HashMap::new(),
            hostname: Some("pi-test".to_owned()),
        }
    }

    pub(super) fn with(mut self, name: &str, value: &str) -> Self {
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

pub(super) fn write_key(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

pub(super) fn accept(text: &str, env: &FakeEnv) -> Config {
    match parse_in(text, Path::new(FILE), env) {
        Ok(config) => config,
        Err(e) => panic!("refused:\n{e}\n--- config:\n{text}"),
    }
}

pub(super) fn problems(text: &str, env: &FakeEnv) -> Vec<Problem> {
    match parse_in(text, Path::new(FILE), env) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Asserts that `text` is refused with a problem on `field` whose message holds `why`.
#[track_caller]
pub(super) fn refused(text: &str, env: &FakeEnv, field: &str, why: &str) -> Problem {
    let problems = problems(text, env);
    problems
        .iter()
        .find(|p| p.field == field && p.message.contains(why))
        .cloned()
        .unwrap_or_else(|| panic!("no problem {field}: …{why}… in {problems:#?}"))
}

/// A valid config with one provider `groq` (model `m`, key `k1` read from `key`):
/// `top` comes before it, `rest` after it.
pub(super) fn valid(key: &Path, top: &str, rest: &str) -> String {
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
pub(super) fn provider(name: &str, label: &str, var: &str) -> String {
    format!(
        "[[providers]]\nname = \"{name}\"\nkind = \"gemini\"\n\
         [providers.models.\"gemini-2.0-flash\"]\nrpm = 15\n\
         [[providers.keys]]\nlabel = \"{label}\"\nsecret_env = \"{var}\"\n"
    )
}

pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) key: PathBuf,
    pub(super) env: FakeEnv,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k1", "gsk_one\n", 0o600);
    Fixture {
        dir,
        key,
        env: FakeEnv::new().with("GEMINI_KEY", "AIza_two"),
    }
}
