//! `keyrelay check-config`: validates the config and its key files, prints a summary.

use std::path::Path;
use std::process::ExitCode;

use super::CmdError;

pub fn run(path: &Path) -> Result<ExitCode, CmdError> {
    let config = super::load_config(path)?;
    println!("{}", config.summary());
    println!("{}: valid", path.display());
    Ok(ExitCode::SUCCESS)
}
