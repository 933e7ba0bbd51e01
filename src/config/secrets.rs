//! Secrets named by the config: key and password files (private, small, UTF-8,
//! trimmed) and environment variables. Nothing here ever puts a secret in a message.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{Environment, SecretSource};
use crate::secret::Secret;

/// API keys and passwords are short; a bigger file is the wrong file, and is not read whole.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;
/// The bits that make a file readable, writable or runnable by anyone but its owner.
const GROUP_OR_OTHER_BITS: u32 = 0o077;

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

/// Where a secret was looked for, as a problem shows it: `file PATH` or `env NAME`, the
/// same words `check-config` prints for a key. `written` is the text of the config field,
/// which is only echoed when it cannot be a pasted secret: a path holding a `/` (the
/// providers' API keys never do), or a variable name in the usual `UPPER_SNAKE` form
/// (their keys mix cases). Otherwise only the folder a bare file name was looked for in.
pub(super) fn secret_origin(source: &SecretSource, written: &str) -> String {
    match source {
        SecretSource::File(_) if written.contains('/') => source.to_string(),
        SecretSource::File(path) => match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => format!(
                "a file in {}/, its name not shown as it may be a pasted key",
                dir.display()
            ),
            _ => "a file in the current folder, its name not shown as it may be a pasted key"
                .to_owned(),
        },
        SecretSource::Env(name) if looks_like_a_variable(name) => source.to_string(),
        SecretSource::Env(_) => {
            "a variable whose name is not shown as it may be a pasted key".to_owned()
        }
    }
}

fn looks_like_a_variable(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

pub(super) fn read_secret(
    source: &SecretSource,
    env: &dyn Environment,
) -> Result<Secret, SecretError> {
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use crate::config::testing::*;
    use crate::config::*;

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
    fn a_key_problem_names_the_key_and_its_file_or_variable() {
        let f = fixture();
        let dir = f.dir.path();
        let missing = dir.join("groq-2");
        let text = valid(
            &f.key,
            "",
            &format!(
                "[[providers.keys]]\nlabel = \"groq-2\"\nsecret_file = \"{}\"\n{}",
                missing.display(),
                provider("gemini", "gemini-1", "GEMINI_API_KEY")
            ),
        );
        let problems = problems(&text, &f.env);
        let shown: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        assert_eq!(
            shown,
            [
                format!(
                    "providers[0].keys[1].secret_file: key \"groq-2\" (file {}): \
                     cannot open the file: No such file or directory (os error 2)",
                    missing.display()
                ),
                "providers[1].keys[0].secret_env: key \"gemini-1\" (env GEMINI_API_KEY): \
                 the environment variable is not set"
                    .to_owned(),
            ]
        );

        let open = write_key(dir, "open", "gsk_open\n", 0o644);
        let p = refused(
            &valid(&open, "", ""),
            &f.env,
            "providers[0].keys[0].secret_file",
            "readable by group or others",
        );
        assert!(
            p.message
                .starts_with(&format!("key \"k1\" (file {}): ", open.display())),
            "{}",
            p.message
        );

        // A bare file name or a variable name not in UPPER_SNAKE form may be a key pasted
        // in the wrong place: the problem names the key and the folder, never the text.
        let config_path = dir.join("keyrelay.toml");
        let bare = valid(Path::new("gsk_pasted_by_mistake"), "", "");
        let Err(ConfigError::Invalid { problems, .. }) = parse_in(&bare, &config_path, &f.env)
        else {
            panic!("accepted a missing key file");
        };
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(
            problems[0].message,
            format!(
                "key \"k1\" (a file in {}/, its name not shown as it may be a pasted key): \
                 cannot open the file: No such file or directory (os error 2)",
                dir.display()
            )
        );
        let lower = valid(&f.key, "", &provider("gemini", "g1", "AIza_pasted"));
        let p = refused(&lower, &f.env, "providers[1].keys[0].secret_env", "not set");
        assert!(!p.message.contains("AIza"), "{}", p.message);
        assert!(
            p.message.starts_with("key \"g1\" (a variable"),
            "{}",
            p.message
        );
    }
}
