//! `keyrelay send`: publishes one task through the configured broker, waits for the
//! reply and prints it, for a person at a terminal.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;

use super::CmdError;
use crate::mqtt::{self, Topics};
use crate::task::Reply;

/// Extra wait beyond the task's deadline for the reply to travel back.
const REPLY_GRACE: Duration = Duration::from_secs(5);

pub async fn run(
    path: &Path,
    model: &str,
    timeout_secs: u64,
    prompt: &str,
) -> Result<ExitCode, CmdError> {
    let config = super::load_config(path)?;
    if timeout_secs == 0 {
        return Err(CmdError::Config(
            "--timeout must be at least 1 second".into(),
        ));
    }
    let topics = Topics::new(
        &config.mqtt.topic_prefix,
        &config.node_id,
        &config.mqtt.share_group,
    );
    let id = uuid::Uuid::new_v4().to_string();
    let reply_topic = topics.reply(&id);
    let task = serde_json::json!({
        "id": id,
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "deadline_secs": timeout_secs,
    });
    let client_id = format!("keyrelay-send-{}", &id[..8]);
    let options = mqtt::client_options(&config.mqtt, &client_id)
        .map_err(|e| CmdError::Config(e.to_string()))?;
    let (client, mut eventloop) = mqtt::connect(options);

    let exchange = async {
        let mut published = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(reply_topic.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| CmdError::Runtime(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) if !published => {
                    published = true;
                    client
                        .publish(
                            topics.fleet_tasks(),
                            QoS::AtLeastOnce,
                            false,
                            task.to_string(),
                        )
                        .await
                        .map_err(|e| CmdError::Runtime(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == reply_topic.as_bytes() => {
                    return serde_json::from_slice::<Reply>(&p.payload).map_err(|e| {
                        CmdError::Runtime(format!("the reply is not understood: {e}"))
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(CmdError::Runtime(format!(
                        "cannot reach the broker at {}:{}: {e}",
                        config.mqtt.host, config.mqtt.port
                    )));
                }
            }
        }
    };
    let limit = Duration::from_secs(timeout_secs) + REPLY_GRACE;
    let reply = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| CmdError::Runtime(format!("no reply within {} s", limit.as_secs())))??;
    let _ = client.disconnect().await;
    match (&reply.content, &reply.error) {
        (Some(content), None) => {
            println!("{content}");
            eprintln!(
                "({} via {}, {} ms)",
                reply.model.as_deref().unwrap_or("?"),
                reply.key.as_deref().unwrap_or("?"),
                reply.latency_ms.unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        (_, Some(error)) => {
            let retry = error
                .retry_after_secs
                .map(|s| format!(" (retry after {s} s)"))
                .unwrap_or_default();
            let code = serde_json::to_value(error.code).unwrap_or_default();
            println!(
                "error {}: {}{retry}",
                code.as_str().unwrap_or("unknown"),
                error.message
            );
            Ok(ExitCode::from(1))
        }
        _ => Ok(ExitCode::from(1)),
    }
}
