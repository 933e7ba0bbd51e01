//! The command line of SPEC §1, parsed by clap; each subcommand runs from `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keyrelay",
    version,
    about = "Runs LLM tasks from MQTT through a pool of rate-limited API keys"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the config is: `--config`, else `$KEYRELAY_CONFIG`, else /etc/keyrelay/keyrelay.toml.
#[derive(Debug, Args)]
pub struct ConfigArg {
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the daemon in the foreground (systemd runs exactly this).
    Run(ConfigArg),
    /// Validates the config and the key files it names, and prints a summary.
    CheckConfig(ConfigArg),
    /// Shows each key's health, from the running daemon or from the state file.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Prints the health object as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Clears a key's cooldown, exhaustion or disabled state and reads its key file again.
    Reset {
        #[command(flatten)]
        config: ConfigArg,
        /// The key's label.
        label: String,
    },
    /// Publishes one task through the configured broker and prints the reply.
    Send {
        #[command(flatten)]
        config: ConfigArg,
        /// "auto", "provider/model" or a bare model name.
        #[arg(long, default_value = "auto")]
        model: String,
        /// Seconds to wait for the reply (also the task's deadline).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        timeout: u64,
        /// The user message.
        prompt: String,
    },
}
