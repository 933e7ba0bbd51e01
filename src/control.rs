//! The local control socket: how `keyrelay status` and `keyrelay reset` reach a running
//! daemon (redb lets only one process open the state file). One JSON line in, one out.
//! Owns both ends: where the socket is, the daemon's server and the subcommands' client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::relay::Relay;

/// The socket's file name.
const SOCKET_NAME: &str = "keyrelay.sock";
/// Where systemd's `RuntimeDirectory=keyrelay` puts it.
const SYSTEMD_RUNTIME_DIR: &str = "/run/keyrelay";
/// How long either side waits for the other's line.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reset { label: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("no daemon answers on {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon did not answer in time")]
    Timeout,
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon's answer is not understood: {0}")]
    Protocol(#[from] serde_json::Error),
}

/// Where the daemon listens: in `$RUNTIME_DIRECTORY` under systemd, else beside the
/// state file.
pub fn socket_path(config: &Config) -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(dir) => PathBuf::from(dir).join(SOCKET_NAME),
        None => config.state_dir.join(SOCKET_NAME),
    }
}

/// Every place a running daemon's socket may be, for clients, which need not share the
/// daemon's environment.
fn socket_candidates(config: &Config) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        paths.push(PathBuf::from(dir).join(SOCKET_NAME));
    }
    paths.push(PathBuf::from(SYSTEMD_RUNTIME_DIR).join(SOCKET_NAME));
    paths.push(config.state_dir.join(SOCKET_NAME));
    paths
}

/// Binds the socket, replacing a stale one left by a crash.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    UnixListener::bind(path).map_err(bind_error)
}

/// Answers requests until `stop`.
pub async fn serve(
    listener: UnixListener,
    relay: Arc<Relay>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("control socket: {e}");
                    continue;
                }
            },
        };
        let relay = relay.clone();
        tracker.spawn(async move {
            if tokio::time::timeout(CONTROL_TIMEOUT, answer(stream, &relay))
                .await
                .is_err()
            {
                log::debug!("a control client went quiet");
            }
        });
    }
}

async fn answer(stream: UnixStream, relay: &Relay) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => Response {
            ok: true,
            health: serde_json::to_value(relay.health()).ok(),
            error: None,
        },
        Ok(Request::Reset { label }) => match relay.reset(&label).await {
            Ok(()) => Response {
                ok: true,
                health: serde_json::to_value(relay.health()).ok(),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                health: None,
                error: Some(e.to_string()),
            },
        },
        Err(e) => Response {
            ok: false,
            health: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        log::debug!("control client left: {e}");
    }
}

/// Sends one request to the daemon listening at `path`.
async fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let exchange = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: path.display().to_string(),
                    source,
                })?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await?;
        Ok(serde_json::from_str(reply.trim())?)
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::Timeout)?
}

/// The running daemon's answer, or `None` when no daemon listens at any of the places its
/// socket may be.
pub async fn ask(config: &Config, req: &Request) -> Option<Response> {
    for path in socket_candidates(config) {
        match request(&path, req).await {
            Ok(response) => return Some(response),
            Err(ControlError::Connect { .. }) => continue,
            Err(e) => {
                log::warn!("{e}");
                continue;
            }
        }
    }
    None
}
