//! One file per subcommand. Each returns its outcome; `dispatch` prints the error
//! once and turns it into the exit codes of SPEC §1 (0 ok, 1 runtime, 2 usage or config).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::{self, Config};

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

/// The local socket of a running daemon: in `$RUNTIME_DIRECTORY` under systemd,
/// else beside the state file. Clients try every place it may be.
pub fn control_socket_candidates(config: &Config) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        paths.push(PathBuf::from(dir).join(crate::control::SOCKET_NAME));
    }
    paths
        .push(PathBuf::from(crate::control::SYSTEMD_RUNTIME_DIR).join(crate::control::SOCKET_NAME));
    paths.push(config.state_dir.join(crate::control::SOCKET_NAME));
    paths
}

/// Where the daemon listens.
pub fn control_socket_path(config: &Config) -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(dir) => PathBuf::from(dir).join(crate::control::SOCKET_NAME),
        None => config.state_dir.join(crate::control::SOCKET_NAME),
    }
}

/// The redb file.
pub fn state_file(config: &Config) -> PathBuf {
    config.state_dir.join(crate::store::FILE_NAME)
}
