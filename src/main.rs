use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keyrelay::cli::Cli::parse();
    keyrelay::cmd::dispatch(cli.command)
}
