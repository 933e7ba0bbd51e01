//! The broker connection: every topic name keyrelay uses, the session options
//! (persistent session, manual acks, Last Will, size and in-flight limits), and the
//! loop that drives rumqttc with backoff and resubscribes after every connect.
//! What a task means is not this module's business; it hands publishes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

/// Keep-alive: the broker publishes the Last Will after 1.5× this without a packet.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long the broker keeps the session (subscriptions and queued QoS 1 tasks) while
/// keyrelay is away: a day covers a restart, an upgrade or a power cut.
pub const SESSION_EXPIRY_SECS: u32 = 86_400;
/// QoS 1 tasks the broker may have in flight to us unacknowledged (MQTT 5 Receive
/// Maximum). Tasks beyond it wait in the broker, not in our memory.
pub const RECEIVE_MAXIMUM: u16 = 128;
/// A task up to this much over `max_payload_bytes` still reaches us, so the client is
/// told `invalid_request`; anything larger the broker drops before sending.
pub const OVERSIZE_HEADROOM_BYTES: usize = 64 * 1024;
/// First wait before reconnecting; doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Longest wait between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Requests (publishes, acks) buffered between the client handle and the event loop.
const REQUEST_CHANNEL_CAPACITY: usize = 256;
/// Where Debian keeps the system's CA bundle, used for `mqtts://` without a `ca_file`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// All topic names, built in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    node_id: String,
    share_group: String,
}

impl Topics {
    pub fn new(prefix: &str, node_id: &str, share_group: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            node_id: node_id.to_owned(),
            share_group: share_group.to_owned(),
        }
    }

    /// Tasks any node of the fleet may take.
    pub fn shared_tasks(&self) -> String {
        format!("$share/{}/{}/tasks", self.share_group, self.prefix)
    }

    /// The topic a client publishes fleet tasks to (what [`Self::shared_tasks`] matches).
    pub fn fleet_tasks(&self) -> String {
        format!("{}/tasks", self.prefix)
    }

    /// Tasks for this node only.
    pub fn node_tasks(&self) -> String {
        format!("{}/{}/tasks", self.prefix, self.node_id)
    }

    pub fn availability(&self) -> String {
        format!("{}/{}/availability", self.prefix, self.node_id)
    }

    pub fn health(&self) -> String {
        format!("{}/{}/health", self.prefix, self.node_id)
    }

    /// The default reply topic, the one topic inside the prefix that replies use.
    pub fn reply(&self, id: &str) -> String {
        format!("{}/replies/{id}", self.prefix)
    }

    /// Whether a topic lies inside keyrelay's own prefix.
    pub fn is_own(&self, topic: &str) -> bool {
        topic == self.prefix
            || topic
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Whether a received publish is a task (as opposed to anything else a broker sends).
    pub fn is_task(&self, topic: &str) -> bool {
        topic == self.fleet_tasks() || topic == self.node_tasks()
    }
}

/// Why the broker options could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// The client id: fixed per node, so the broker keeps our session across restarts.
pub fn client_id(node_id: &str) -> String {
    format!("keyrelay-{node_id}")
}

/// Connect options for the daemon: persistent session, manual acks, Last Will.
pub fn daemon_options(
    cfg: &MqttConfig,
    topics: &Topics,
    node_id: &str,
) -> Result<MqttOptions, SetupError> {
    let mut options = base_options(cfg, &client_id(node_id))?;
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_manual_acks(true)
        .set_receive_maximum(Some(RECEIVE_MAXIMUM))
        .set_max_packet_size(Some(max_packet_size(cfg.max_payload_bytes)))
        .set_last_will(LastWill::new(
            topics.availability(),
            "offline",
            QoS::AtLeastOnce,
            true,
            None,
        ));
    Ok(options)
}

/// Connect options for a short-lived client such as `keyrelay send`.
pub fn client_options(cfg: &MqttConfig, client_id: &str) -> Result<MqttOptions, SetupError> {
    base_options(cfg, client_id)
}

fn max_packet_size(max_payload_bytes: usize) -> u32 {
    u32::try_from(max_payload_bytes.saturating_add(OVERSIZE_HEADROOM_BYTES)).unwrap_or(u32::MAX)
}

fn base_options(cfg: &MqttConfig, client_id: &str) -> Result<MqttOptions, SetupError> {
    let mut options = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    options.set_keep_alive(KEEP_ALIVE);
    let mut network = NetworkOptions::new();
    // Nagle would hold every small publish back by up to 40 ms.
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    if let Some(user) = &cfg.username {
        let password = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        options.set_credentials(user.clone(), password);
    }
    if cfg.tls {
        let ca_path = cfg
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| SYSTEM_CA_BUNDLE.to_owned());
        let ca = read(&ca_path)?;
        let client_auth = match (&cfg.client_cert_file, &cfg.client_key_file) {
            (Some(cert), Some(key)) => Some((
                read(&cert.display().to_string())?,
                read(&key.display().to_string())?,
            )),
            _ => None,
        };
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(options)
}

fn read(path: &str) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|source| SetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates the client handle and its event loop.
pub fn connect(options: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY)
}

/// A task publish as received, tagged with the connection it came on: an ack is only
/// valid on that connection (packet ids are reused after a reconnect).
#[derive(Debug, Clone)]
pub struct Received {
    pub publish: Publish,
    pub connection: u64,
}

impl Received {
    pub fn topic(&self) -> String {
        String::from_utf8_lossy(&self.publish.topic).into_owned()
    }

    pub fn properties(&self) -> Option<&PublishProperties> {
        self.publish.properties.as_ref()
    }

    pub fn response_topic(&self) -> Option<&str> {
        self.properties().and_then(|p| p.response_topic.as_deref())
    }

    pub fn correlation_data(&self) -> Option<&Bytes> {
        self.properties().and_then(|p| p.correlation_data.as_ref())
    }
}

/// The connection's state as the rest of the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Connected and subscribed.
    pub up: bool,
    /// Counts connections; bumps on every ConnAck.
    pub connection: u64,
}

/// A handle to publish and acknowledge through the driven connection.
#[derive(Clone)]
pub struct Link {
    client: AsyncClient,
    connection: Arc<AtomicU64>,
}

impl Link {
    /// Acknowledges a task, but only on the connection it arrived on; after a reconnect
    /// the broker redelivers it instead (and the store answers it without a second call).
    pub async fn ack(&self, received: &Received) {
        if received.publish.qos == QoS::AtMostOnce
            || received.connection != self.connection.load(Ordering::SeqCst)
        {
            return;
        }
        if let Err(e) = self.client.ack(&received.publish).await {
            log::warn!("could not acknowledge a task: {e}");
        }
    }

    /// Publishes at QoS 1; the event loop sends it (again after a reconnect if needed).
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        correlation: Option<Bytes>,
    ) {
        let result = match correlation {
            Some(data) => {
                let properties = PublishProperties {
                    correlation_data: Some(data),
                    ..PublishProperties::default()
                };
                self.client
                    .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, properties)
                    .await
            }
            None => {
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload)
                    .await
            }
        };
        if let Err(e) = result {
            log::warn!("could not queue a publish to {topic}: {e}");
        }
    }

    /// Stops the session cleanly; the broker does not send the Will after this.
    pub async fn disconnect(&self) {
        if let Err(e) = self.client.disconnect().await {
            log::debug!("disconnect: {e}");
        }
    }
}

/// Drives a daemon connection until `stop` fires or the client disconnects:
/// subscribes after every ConnAck (a session-less reconnect has lost the
/// subscriptions), publishes `online`, forwards task publishes to `tasks`, and on errors
/// waits with capped exponential backoff and jitter before rumqttc reconnects.
pub struct Driver {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
    pub topics: Topics,
}

impl Driver {
    pub fn link(&self, connection: Arc<AtomicU64>) -> Link {
        Link {
            client: self.client.clone(),
            connection,
        }
    }

    pub async fn run(
        mut self,
        connection: Arc<AtomicU64>,
        tasks: mpsc::Sender<Received>,
        state: watch::Sender<LinkState>,
        stop: CancellationToken,
    ) {
        let mut backoff = RECONNECT_MIN;
        let mut subscribe_pkids = Vec::new();
        loop {
            // Cancel-safe: `poll` keeps its state in the event loop between calls.
            let event = tokio::select! {
                () = stop.cancelled() => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = RECONNECT_MIN;
                    let n = connection.fetch_add(1, Ordering::SeqCst) + 1;
                    log::info!(
                        "connected to the broker (session {})",
                        if ack.session_present {
                            "resumed"
                        } else {
                            "new"
                        }
                    );
                    subscribe_pkids.clear();
                    for topic in [self.topics.shared_tasks(), self.topics.node_tasks()] {
                        if let Err(e) = self.client.subscribe(topic, QoS::AtLeastOnce).await {
                            log::warn!("could not queue a subscribe: {e}");
                        }
                    }
                    state.send_replace(LinkState {
                        up: false,
                        connection: n,
                    });
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => {
                    subscribe_pkids.push(pkid)
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let failed = ack.return_codes.iter().any(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    });
                    if failed {
                        log::error!(
                            "the broker refused a task subscription: {:?}",
                            ack.return_codes
                        );
                    }
                    subscribe_pkids.retain(|p| *p != ack.pkid);
                    if subscribe_pkids.is_empty() && !failed {
                        let link = self.link(connection.clone());
                        link.publish(&self.topics.availability(), b"online".to_vec(), true, None)
                            .await;
                        state.send_modify(|s| s.up = true);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let received = Received {
                        publish,
                        connection: connection.load(Ordering::SeqCst),
                    };
                    if !self.topics.is_task(&received.topic()) {
                        continue;
                    }
                    // The channel holds RECEIVE_MAXIMUM tasks, as many as the broker may
                    // have unacknowledged, so this send waits only under a stuck consumer.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        sent = tasks.send(received) => if sent.is_err() { break },
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    if state.borrow().up {
                        log::warn!("lost the broker: {e}");
                    } else {
                        log::debug!("broker unreachable: {e}");
                    }
                    state.send_modify(|s| s.up = false);
                    let wait = jittered(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        state.send_modify(|s| s.up = false);
    }
}

/// `base` ±25 %, so that a fleet of nodes does not reconnect in lockstep.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.75 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let t = Topics::new("keyrelay", "pi-kitchen", "grp");
        assert_eq!(t.shared_tasks(), "$share/grp/keyrelay/tasks");
        assert_eq!(t.node_tasks(), "keyrelay/pi-kitchen/tasks");
        assert_eq!(t.availability(), "keyrelay/pi-kitchen/availability");
        assert_eq!(t.health(), "keyrelay/pi-kitchen/health");
        assert_eq!(t.reply("a1"), "keyrelay/replies/a1");
        assert!(t.is_own("keyrelay/x") && t.is_own("keyrelay"));
        assert!(!t.is_own("keyrelayx/y"));
        assert!(t.is_task("keyrelay/tasks") && t.is_task("keyrelay/pi-kitchen/tasks"));
        assert!(!t.is_task("keyrelay/other/tasks"));
    }

    #[test]
    fn jitter_stays_near_base() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(4));
            assert!(d >= Duration::from_secs(3) && d <= Duration::from_secs(5));
        }
    }
}
