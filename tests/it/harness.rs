//! Shared test plumbing: a real Mosquitto on an ephemeral loopback port, the real
//! `keyrelay` binary as a child process with its own config and state, and an MQTT
//! client that records what it receives.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

/// How long a test waits for something that should happen within a second or two.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free loopback port (bound and released; Mosquitto takes it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Mosquitto broker.
pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        let mut broker = Broker {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\n",
                self.port,
                self.dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (scripts/deps installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker (as a crash would: SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A keyrelay config under construction, with its key files and state directory.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub broker_port: u16,
    pub node_id: String,
    /// Extra TOML appended after the [mqtt] section (providers, routing, leds).
    pub body: String,
    pub extra_top: String,
    pub extra_mqtt: String,
}

impl Setup {
    pub fn new(broker: &Broker) -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            broker_port: broker.port,
            node_id: "pi-test".into(),
            body: String::new(),
            extra_top: String::new(),
            extra_mqtt: String::new(),
        }
    }

    /// Writes a key file (mode 0600) and returns its path.
    pub fn key_file(&self, name: &str, secret: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.key"));
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{secret}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn led_file(&self) -> PathBuf {
        self.dir.path().join("leds.json")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keyrelay.toml")
    }

    pub fn write_config(&self) -> PathBuf {
        let text = format!(
            "node_id = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\ntrust_unsynchronised_clock = true\n{}\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n{}\n{}\n",
            self.node_id,
            self.state_dir().display(),
            self.extra_top,
            self.broker_port,
            self.extra_mqtt,
            self.body
        );
        let path = self.config_path();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Adds an OpenAI-kind (Groq-like) provider with keys `(label, secret)`.
    pub fn groq(
        &mut self,
        name: &str,
        base_url: &str,
        model: &str,
        limits: &str,
        keys: &[(&str, &str)],
    ) {
        self.provider(name, "openai", base_url, model, limits, keys);
    }

    pub fn gemini(
        &mut self,
        name: &str,
        base_url: &str,
        model: &str,
        limits: &str,
        keys: &[(&str, &str)],
    ) {
        self.provider(name, "gemini", base_url, model, limits, keys);
    }

    fn provider(
        &mut self,
        name: &str,
        kind: &str,
        base_url: &str,
        model: &str,
        limits: &str,
        keys: &[(&str, &str)],
    ) {
        let mut text = format!(
            "\n[[providers]]\nname = \"{name}\"\nkind = \"{kind}\"\nbase_url = \"{base_url}\"\ntimeout_secs = 5\n[providers.models.\"{model}\"]\n{limits}\n"
        );
        for (label, secret) in keys {
            let path = self.key_file(label, secret);
            text.push_str(&format!(
                "[[providers.keys]]\nlabel = \"{label}\"\nsecret_file = \"{}\"\n",
                path.display()
            ));
        }
        self.body.push_str(&text);
    }

    pub fn leds_file(&mut self) {
        let path = self.led_file();
        self.body.push_str(&format!(
            "\n[leds]\nbackend = \"file\"\npath = \"{}\"\ngreen = 17\namber = 27\nred = 22\nactivity = 23\n",
            path.display()
        ));
    }
}

/// The path of the binary under test.
pub fn keyrelay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyrelay")
}

/// A running `keyrelay run`.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until it has announced itself `online`.
    pub async fn start(setup: &Setup) -> Daemon {
        let daemon = Self::spawn(setup, &[]);
        let mut watcher = Client::connect(setup.broker_port, "watch-online").await;
        let topic = format!("keyrelay/{}/availability", setup.node_id);
        watcher.subscribe(&topic).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let m = watcher
                .next_within(deadline.saturating_duration_since(Instant::now()))
                .await;
            match m {
                Some(m) if m.topic == topic && m.payload == b"online".as_slice() => break,
                Some(_) => continue,
                None => panic!("keyrelay did not come online; log:\n{}", daemon.log_text()),
            }
        }
        daemon
    }

    /// Spawns the daemon with extra environment variables, without waiting.
    pub fn spawn(setup: &Setup, env: &[(&str, &str)]) -> Daemon {
        let config = setup.write_config();
        let log = setup
            .dir
            .path()
            .join(format!("keyrelay-{}.log", fastrand::u32(..)));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(keyrelay_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUNTIME_DIRECTORY")
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (None if it did not exit within `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or a power cut would end it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as a test client saw it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub correlation: Option<Bytes>,
}

impl Message {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("not JSON on {}: {e}: {:?}", self.topic, self.payload))
    }
}

/// An MQTT 5 test client.
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Message>,
    suback: Arc<tokio::sync::Notify>,
}

impl Client {
    pub async fn connect(port: u16, id: &str) -> Client {
        let mut options =
            MqttOptions::new(format!("{id}-{}", fastrand::u32(..)), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let suback = Arc::new(tokio::sync::Notify::new());
        let notify = suback.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                            correlation: p.properties.and_then(|pp| pp.correlation_data),
                        };
                        if tx.send(msg).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => notify.notify_one(),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Client { client, rx, suback }
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.suback.notified())
            .await
            .expect("no SUBACK");
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    pub async fn publish_v5(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
    ) {
        let props = PublishProperties {
            response_topic: response_topic.map(str::to_owned),
            correlation_data: correlation.map(Bytes::copy_from_slice),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props)
            .await
            .unwrap();
    }

    pub async fn next_within(&mut self, limit: Duration) -> Option<Message> {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message on `topic`, skipping others; panics after WAIT.
    pub async fn next_on(&mut self, topic: &str) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(m) if m.topic == topic => return m,
                Some(_) => continue,
                None => panic!("nothing arrived on {topic} within {WAIT:?}"),
            }
        }
    }

    /// Every message that arrives within `limit`.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Message> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(m) = self
            .next_within(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            out.push(m);
        }
        out
    }

    /// The replies to the given task ids on `topic`, keyed by id.
    pub async fn replies(&mut self, topic: &str, n: usize) -> HashMap<String, Value> {
        let mut out = HashMap::new();
        while out.len() < n {
            let m = self.next_on(topic).await;
            let v = m.json();
            out.insert(v["id"].as_str().unwrap().to_owned(), v);
        }
        out
    }
}

/// A task payload with one user message.
pub fn task(id: &str, prompt: &str, extra: Value) -> Vec<u8> {
    let mut v = serde_json::json!({"id": id, "messages": [{"role": "user", "content": prompt}]});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    serde_json::to_vec(&v).unwrap()
}

/// Runs `keyrelay` with arguments, returning (exit code, stdout, stderr).
pub fn keyrelay(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(keyrelay_bin());
    cmd.args(args).env_remove("RUNTIME_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A Groq fake that knows one unlimited key, and a config with that key as `groq-1`
/// under `config_limits` for `model`.
pub async fn one_groq_key(
    broker: &Broker,
    model: &str,
    secret: &str,
    config_limits: &str,
) -> (Setup, crate::fake_provider::FakeProvider) {
    use crate::fake_provider::{FakeKind, FakeLimits, FakeProvider};
    let fake = FakeProvider::start(FakeKind::Groq).await;
    fake.add_key(secret, FakeLimits::unlimited());
    let mut setup = Setup::new(broker);
    setup.groq(
        "groq",
        &fake.base_url(),
        model,
        config_limits,
        &[("groq-1", secret)],
    );
    (setup, fake)
}
