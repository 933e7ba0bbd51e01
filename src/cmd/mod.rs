//! One file per subcommand. Each returns its outcome; `dispatch` prints the error
//! once and turns it into the exit codes of SPEC §1 (0 ok, 1 runtime, 2 usage or config).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::{self, Config};
use crate::rotator::Rotator;
use crate::store::Store;

pub mod check_config;
pub mod reset;
pub mod run;
pub mod send;
pub mod status;

/// Why a subcommand failed, deciding the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The config (or the command line) is wrong: exit 2, and systemd does not restart.
    #[error("{0}")]
    Config(String),
    /// Something failed while running: exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl From<config::ConfigError> for CmdError {
    fn from(e: config::ConfigError) -> Self {
        Self::Config(e.to_string())
    }
}

/// Runs a subcommand and maps its outcome to an exit code.
pub fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Run(c) => {
            let path = config::resolve_path(c.config.as_deref());
            with_runtime(|| run::run(&path))
        }
        Command::CheckConfig(c) => check_config::run(&config::resolve_path(c.config.as_deref())),
        Command::Status { config, json } => {
            let path = config::resolve_path(config.config.as_deref());
            with_runtime(|| status::run(&path, json))
        }
        Command::Reset { config, label } => {
            let path = config::resolve_path(config.config.as_deref());
            with_runtime(|| reset::run(&path, &label))
        }
        Command::Send {
            config,
            model,
            timeout,
            prompt,
        } => {
            let path = config::resolve_path(config.config.as_deref());
            with_runtime(|| send::run(&path, &model, timeout, &prompt))
        }
    };
    match result {
        Ok(code) => code,
        Err(CmdError::Config(message)) => {
            eprintln!("keyrelay: {message}");
            ExitCode::from(2)
        }
        Err(CmdError::Runtime(message)) => {
            eprintln!("keyrelay: {message}");
            ExitCode::from(1)
        }
    }
}

fn with_runtime<F, Fut>(f: F) -> Result<ExitCode, CmdError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<ExitCode, CmdError>>,
{
    // rustls needs one process-wide crypto provider; ring is the only one built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CmdError::Runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(f())
}

/// Loads the config for a subcommand, logging quietly to stderr.
pub fn load_config(path: &Path) -> Result<Config, CmdError> {
    Ok(config::load(path)?)
}

/// The redb file.
pub fn state_file(config: &Config) -> PathBuf {
    config.state_dir.join(crate::store::FILE_NAME)
}

/// Opens the state file and rebuilds the rotator from it, for the subcommands that work
/// on it while no daemon runs.
pub async fn open_state(config: &Config) -> Result<(Store, Rotator), CmdError> {
    let path = state_file(config);
    let (store, loaded) = tokio::task::spawn_blocking(move || Store::open(&path))
        .await
        .map_err(|e| CmdError::Runtime(e.to_string()))?
        .map_err(|e| CmdError::Runtime(e.to_string()))?;
    let mut rotator = Rotator::new(config);
    rotator
        .restore(loaded.rows)
        .map_err(|e| CmdError::Runtime(e.to_string()))?;
    Ok((store, rotator))
}
