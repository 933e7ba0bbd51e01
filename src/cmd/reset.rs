//! `keyrelay reset LABEL`: clears a key's cooldown, exhaustion or disabled state and
//! reads its key file again, in the running daemon at once, else in the state file.

use std::path::Path;
use std::process::ExitCode;

use super::CmdError;
use crate::control::{self, Request};
use crate::store::Batch;

pub async fn run(path: &Path, label: &str) -> Result<ExitCode, CmdError> {
    let config = super::load_config(path)?;
    if config.key(label).is_none() {
        return Err(CmdError::Config(format!(
            "no key is labelled {label:?} in {}",
            path.display()
        )));
    }
    let req = Request::Reset {
        label: label.to_owned(),
    };
    if let Some(response) = control::ask(&config, &req).await {
        return if response.ok {
            println!("{label}: reset in the running daemon");
            Ok(ExitCode::SUCCESS)
        } else {
            Err(CmdError::Runtime(
                response
                    .error
                    .unwrap_or_else(|| "the daemon refused".into()),
            ))
        };
    }
    let (store, mut rotator) = super::open_state(&config).await?;
    rotator.reset(label);
    let batch = Batch {
        rows: rotator.snapshot_dirty(),
        ..Batch::default()
    };
    store
        .commit(batch)
        .await
        .map_err(|e| CmdError::Runtime(e.to_string()))?;
    println!("{label}: reset in {}", super::state_file(&config).display());
    Ok(ExitCode::SUCCESS)
}
