//! The task path end to end: a task in over MQTT (5 and 3.1.1), a provider call out,
//! the reply back; every error code; refused reply topics; a broker restart; the CLI.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_provider::{FakeKind, FakeLimits, FakeProvider, REJECT_MARKER};
use crate::harness::{Broker, Client, Daemon, Setup, WAIT, keyrelay, path_str, task};

const MODEL: &str = "llama-3.3-70b-versatile";
const GEMINI_MODEL: &str = "gemini-2.0-flash";
const LIMITS: &str = "rpm = 30\nrpd = 1000\ntpm = 12000\ntpd = 100000";
const SECRET_1: &str = "gsk_test_secret_one_0001";
const SECRET_2: &str = "gsk_test_secret_two_0002";

/// A Groq fake with two keys and a config naming them.
async fn groq_pair(broker: &Broker) -> (Setup, FakeProvider) {
    let fake = FakeProvider::start(FakeKind::Groq).await;
    fake.add_key(SECRET_1, FakeLimits::unlimited());
    fake.add_key(SECRET_2, FakeLimits::unlimited());
    let mut setup = Setup::new(broker);
    setup.groq(
        "groq",
        &fake.base_url(),
        MODEL,
        LIMITS,
        &[("groq-1", SECRET_1), ("groq-2", SECRET_2)],
    );
    (setup, fake)
}

fn assert_no_secret(text: &str) {
    for secret in [SECRET_1, SECRET_2] {
        assert!(!text.contains(secret), "a secret leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_round_trip_uses_response_topic_and_echoes_correlation() {
    let broker = Broker::start();
    let (setup, fake) = groq_pair(&broker).await;
    let daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "v5").await;
    client.subscribe("clients/v5/replies").await;
    let payload = task("t-v5", "Hola", json!({"model": "auto", "max_tokens": 64}));
    client
        .publish_v5(
            "keyrelay/tasks",
            payload,
            Some("clients/v5/replies"),
            Some(b"corr-42"),
        )
        .await;

    let reply = client.next_on("clients/v5/replies").await;
    assert_eq!(reply.correlation.as_deref(), Some(b"corr-42".as_slice()));
    let v = reply.json();
    assert_eq!(v["id"], "t-v5");
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["content"], "echo: Hola");
    assert_eq!(v["provider"], "groq");
    assert_eq!(v["model"], MODEL);
    assert!(["groq-1", "groq-2"].contains(&v["key"].as_str().unwrap()));
    assert_eq!(v["attempts"], 1);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_no_secret(&v.to_string());

    let sent = fake.recorded();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].uri(), "/openai/v1/chat/completions");
    let auth = sent[0].header("authorization").unwrap();
    assert!(auth == format!("Bearer {SECRET_1}") || auth == format!("Bearer {SECRET_2}"));
    assert_no_secret(&daemon.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt311_client_is_served_through_reply_to_on_the_node_topic() {
    let broker = Broker::start();
    let (setup, _fake) = groq_pair(&broker).await;
    let _daemon = Daemon::start(&setup).await;

    let mut options = rumqttc::MqttOptions::new("v311-client", "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe("clients/v3/replies", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let payload = task(
        "t-v3",
        "Hi there",
        json!({"reply_to": "clients/v3/replies"}),
    );
    let got = tokio::time::timeout(WAIT, async {
        let mut published = false;
        loop {
            match eventloop.poll().await.unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) if !published => {
                    published = true;
                    client
                        .publish(
                            "keyrelay/pi-test/tasks",
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                        )
                        .await
                        .unwrap();
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))
                    if p.topic == "clients/v3/replies" =>
                {
                    return serde_json::from_slice::<Value>(&p.payload).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .expect("no reply for the MQTT 3.1.1 client");
    assert_eq!(got["id"], "t-v3");
    assert_eq!(got["status"], "ok");
    assert_eq!(got["content"], "echo: Hi there");
}

#[tokio::test(flavor = "multi_thread")]
async fn default_reply_topic_and_gemini_key_only_in_header() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Gemini).await;
    let secret = "AIzaTestGeminiKey0123456789";
    fake.add_key(secret, FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    setup.gemini(
        "gemini",
        &fake.base_url(),
        GEMINI_MODEL,
        "rpm = 15\nrpd = 1500",
        &[("gemini-1", secret)],
    );
    let daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "gem").await;
    client.subscribe("keyrelay/replies/#").await;
    let payload = serde_json::to_vec(&json!({
        "id": "g1", "model": GEMINI_MODEL,
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Ping"}]
    }))
    .unwrap();
    client.publish("keyrelay/tasks", payload).await;
    let v = client.next_on("keyrelay/replies/g1").await.json();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["provider"], "gemini");
    assert_eq!(v["key"], "gemini-1");
    assert_eq!(v["content"], "echo: Ping");

    let sent = fake.recorded();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].uri(),
        format!("/v1beta/models/{GEMINI_MODEL}:generateContent")
    );
    assert!(!sent[0].uri().contains(secret));
    assert_eq!(sent[0].header("x-goog-api-key"), Some(secret));
    assert!(!daemon.log_text().contains(secret));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_code_reaches_the_client() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    fake.add_key(SECRET_1, FakeLimits::unlimited());
    let broken = FakeProvider::start(FakeKind::Groq).await;
    broken.add_key(SECRET_2, FakeLimits::unlimited());
    broken.always(SECRET_2, 500);
    let mut setup = Setup::new(&broker);
    setup.extra_mqtt = "max_payload_bytes = 4096".into();
    setup.groq(
        "groq",
        &fake.base_url(),
        MODEL,
        "rpm = 30\nrpd = 2",
        &[("groq-1", SECRET_1)],
    );
    setup.groq(
        "flaky",
        &broken.base_url(),
        "flaky-model",
        LIMITS,
        &[("flaky-1", SECRET_2)],
    );
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "errors").await;
    client.subscribe("clients/e/#").await;
    let ask = |id: &str, body: Value| {
        let mut v = body;
        v["id"] = json!(id);
        v["reply_to"] = json!(format!("clients/e/{id}"));
        serde_json::to_vec(&v).unwrap()
    };
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();

    // invalid_request: a field missing, a wrong type, and a payload over max_payload_bytes.
    client
        .publish("keyrelay/tasks", ask("bad-1", json!({"model": "auto"})))
        .await;
    let v = client.next_on("clients/e/bad-1").await.json();
    assert_eq!(code(&v), "invalid_request", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("messages"));
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "bad-2",
                json!({"messages": user("x"), "max_tokens": "lots"}),
            ),
        )
        .await;
    assert_eq!(
        code(&client.next_on("clients/e/bad-2").await.json()),
        "invalid_request"
    );
    let huge = "x".repeat(8000);
    client
        .publish_v5(
            "keyrelay/tasks",
            ask("big", json!({"messages": user(&huge)})),
            Some("clients/e/big"),
            None,
        )
        .await;
    let v = client.next_on("clients/e/big").await.json();
    assert_eq!(code(&v), "invalid_request");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_payload_bytes")
    );
    // Malformed JSON cannot be answered, but must not block what comes after it.
    client
        .publish("keyrelay/tasks", b"{not json".to_vec())
        .await;

    // no_route
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "nr",
                json!({"model": "nobody/serves-this", "messages": user("x")}),
            ),
        )
        .await;
    assert_eq!(
        code(&client.next_on("clients/e/nr").await.json()),
        "no_route"
    );

    // upstream_rejected: the provider answers 400, no key is blamed.
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "rej",
                json!({"model": MODEL, "messages": user(REJECT_MARKER)}),
            ),
        )
        .await;
    assert_eq!(
        code(&client.next_on("clients/e/rej").await.json()),
        "upstream_rejected"
    );

    // budget_exhausted: rpd = 2 and two calls made (the 400 counted one).
    client
        .publish(
            "keyrelay/tasks",
            ask("ok-1", json!({"model": MODEL, "messages": user("x")})),
        )
        .await;
    assert_eq!(
        client.next_on("clients/e/ok-1").await.json()["status"],
        "ok"
    );
    let calls_before = fake.total_calls();
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "spent",
                json!({"model": MODEL, "messages": user("x"), "deadline_secs": 30}),
            ),
        )
        .await;
    let v = client.next_on("clients/e/spent").await.json();
    assert_eq!(code(&v), "budget_exhausted", "{v}");
    assert!(v["error"]["retry_after_secs"].as_u64().unwrap() > 30, "{v}");
    assert_eq!(fake.total_calls(), calls_before, "a spent key was called");

    // deadline_exceeded: the provider fails with 500s past the task's deadline.
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "late",
                json!({"model": "flaky-model", "messages": user("x"), "deadline_secs": 2}),
            ),
        )
        .await;
    assert_eq!(
        code(&client.next_on("clients/e/late").await.json()),
        "deadline_exceeded"
    );

    // upstream_error: 500s until the retries run out, well within the deadline.
    client
        .publish(
            "keyrelay/tasks",
            ask(
                "down",
                json!({"model": "flaky-model", "messages": user("x"), "deadline_secs": 120}),
            ),
        )
        .await;
    let v = client.next_on("clients/e/down").await.json();
    assert_eq!(code(&v), "upstream_error", "{v}");
    assert!(
        broken.calls(SECRET_2) >= 2,
        "transient failures are retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_reply_topics_get_nothing_and_the_task_is_dropped() {
    let broker = Broker::start();
    let (mut setup, fake) = groq_pair(&broker).await;
    setup.extra_mqtt = "allowed_reply_prefixes = [\"clients/\"]".into();
    let _daemon = Daemon::start(&setup).await;
    let mut watcher = Client::connect(broker.port, "watch-all").await;
    watcher.subscribe("#").await;
    let client = Client::connect(broker.port, "sender").await;
    let refused = [
        "clients/+/x",
        "clients/#",
        "$SYS/evil",
        "keyrelay/replies/evil",
        "keyrelay/pi-test/health",
        "elsewhere/replies",
    ];
    for (i, topic) in refused.iter().enumerate() {
        client
            .publish(
                "keyrelay/tasks",
                task(&format!("r{i}"), "x", json!({"reply_to": topic})),
            )
            .await;
    }
    // MQTT 5 Response Topic is checked the same way.
    client
        .publish_v5(
            "keyrelay/tasks",
            task("r-v5", "x", json!({})),
            Some("keyrelay/replies/evil-v5"),
            None,
        )
        .await;
    client
        .publish(
            "keyrelay/tasks",
            task("fine", "x", json!({"reply_to": "clients/ok"})),
        )
        .await;
    let mut seen = Vec::new();
    loop {
        let m = watcher
            .next_within(WAIT)
            .await
            .expect("the good task was never answered");
        if m.topic == "clients/ok" {
            break;
        }
        seen.push(m);
    }
    seen.extend(watcher.drain(Duration::from_millis(500)).await);
    for m in seen.iter().filter(|m| m.topic != "keyrelay/tasks") {
        // The daemon's own retained topics are fine; a reply (it has an "id") is not.
        let is_reply =
            serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v.get("id").is_some());
        assert!(
            !is_reply,
            "a refused task was answered on {}: {:?}",
            m.topic, m.payload
        );
        assert!(
            !refused.contains(&m.topic.as_str()) || m.topic == "keyrelay/pi-test/health",
            "something was published to refused topic {}",
            m.topic
        );
    }
    assert_eq!(
        fake.total_calls(),
        1,
        "refused tasks must not reach a provider"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_key_is_disabled_and_never_called_again() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    // The fake knows only the second key: the first gets 401.
    fake.add_key(SECRET_2, FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    setup.groq(
        "groq",
        &fake.base_url(),
        MODEL,
        LIMITS,
        &[("groq-1", SECRET_1), ("groq-2", SECRET_2)],
    );
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "c401").await;
    client.subscribe("clients/k/#").await;
    for i in 0..6 {
        client
            .publish(
                "keyrelay/tasks",
                task(
                    &format!("k{i}"),
                    "x",
                    json!({"reply_to": format!("clients/k/{i}")}),
                ),
            )
            .await;
        let v = client.next_on(&format!("clients/k/{i}")).await.json();
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["key"], "groq-2");
    }
    assert_eq!(
        fake.calls(SECRET_1),
        1,
        "a disabled key was called again, or never tried"
    );

    let config = path_str(&setup.config_path()).to_owned();
    let (code, out, _) = keyrelay(&["status", "--json", "--config", &config], &[]);
    assert_eq!(code, 0);
    let health: Value = serde_json::from_str(&out).unwrap();
    let key1 = health["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "groq-1")
        .unwrap();
    assert_eq!(key1["state"], "disabled", "{health}");
    assert!(key1["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(health["state"], "degraded");
    assert_no_secret(&out);
    let (_, table, _) = keyrelay(&["status", "--config", &config], &[]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("groq-1") && l.contains("disabled")),
        "{table}"
    );

    // The operator fixes the key and resets it: the running daemon uses it again at once.
    fake.add_key(SECRET_1, FakeLimits::unlimited());
    let (code, out, err) = keyrelay(&["reset", "--config", &config, "groq-1"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = keyrelay(&["status", "--json", "--config", &config], &[]);
    let health: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(health["state"], "healthy", "{health}");
    for i in 6..10 {
        client
            .publish(
                "keyrelay/tasks",
                task(
                    &format!("k{i}"),
                    "x",
                    json!({"reply_to": format!("clients/k/{i}")}),
                ),
            )
            .await;
        assert_eq!(
            client.next_on(&format!("clients/k/{i}")).await.json()["status"],
            "ok"
        );
    }
    assert!(fake.calls(SECRET_1) > 1, "the reset key was not used again");
    let (code, _, err) = keyrelay(&["reset", "--config", &config, "no-such-key"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("no-such-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_flow_again_after_the_broker_restarts() {
    let mut broker = Broker::start();
    let (setup, _fake) = groq_pair(&broker).await;
    let daemon = Daemon::start(&setup).await;
    {
        let mut client = Client::connect(broker.port, "before").await;
        client.subscribe("clients/b/#").await;
        client
            .publish(
                "keyrelay/tasks",
                task("b1", "one", json!({"reply_to": "clients/b/1"})),
            )
            .await;
        assert_eq!(client.next_on("clients/b/1").await.json()["status"], "ok");
    }
    broker.restart();
    let mut watcher = Client::connect(broker.port, "after-watch").await;
    watcher.subscribe("keyrelay/pi-test/availability").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = watcher
            .next_within(deadline.saturating_duration_since(std::time::Instant::now()))
            .await;
        match m {
            Some(m) if m.payload == b"online".as_slice() => break,
            Some(_) => continue,
            None => panic!("keyrelay did not reconnect; log:\n{}", daemon.log_text()),
        }
    }
    let mut client = Client::connect(broker.port, "after").await;
    client.subscribe("clients/b/#").await;
    client
        .publish(
            "keyrelay/tasks",
            task("b2", "two", json!({"reply_to": "clients/b/2"})),
        )
        .await;
    let v = client.next_on("clients/b/2").await.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["content"], "echo: two");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_subcommand_prints_the_reply() {
    let broker = Broker::start();
    let (setup, _fake) = groq_pair(&broker).await;
    let _daemon = Daemon::start(&setup).await;
    let config = setup.config_path();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        keyrelay(
            &[
                "send",
                "--config",
                path_str(&config),
                "--timeout",
                "20",
                "Hola",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out.trim(), "echo: Hola");

    let config = setup.config_path();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        keyrelay(
            &[
                "send",
                "--config",
                path_str(&config),
                "--model",
                "nobody/none",
                "Hola",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(out.contains("no_route"), "{out}");
}

#[test]
fn check_config_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"node_id = "pi"
colour = "blue"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[providers]]
name = "groq"
kind = "openai"
base_url = "https://api.groq.com/openai/v1"
  [providers.models."m"]
  rpm = 0
  [[providers.keys]]
  label = "k1"
  secret_env = "KEYRELAY_TEST_SURELY_UNSET"
  [[providers.keys]]
  label = "k1"
  secret_file = "/nonexistent/key"

[routing]
auto = ["groq/m", "nobody/m"]
"#,
    )
    .unwrap();
    let (code, out, err) = keyrelay(&["check-config", "--config", path_str(&path)], &[]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    let file = path.display().to_string();
    for (line, needle) in [
        (2, "colour"),
        (12, "rpm"),
        (15, "secret_env"),
        (17, "label"),
        (18, "secret_file"),
        (21, "nobody"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{file}:{line}:")) && l.contains(needle)),
            "no problem for {needle} at line {line} in:\n{err}"
        );
    }
}

#[test]
fn check_config_summarises_a_valid_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, format!("{SECRET_1}\n")).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&key).unwrap().permissions(),
        0o600,
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        format!(
            "[[providers]]\nname = \"groq\"\nkind = \"openai\"\nbase_url = \"https://api.groq.com/openai/v1\"\n[providers.models.\"{MODEL}\"]\n{LIMITS}\n[[providers.keys]]\nlabel = \"groq-1\"\nsecret_file = \"{}\"\n[[providers.keys]]\nlabel = \"groq-2\"\nsecret_env = \"KR_TEST_KEY\"\n",
            key.display()
        ),
    )
    .unwrap();
    let (code, out, err) = keyrelay(
        &["check-config", "--config", path_str(&path)],
        &[("KR_TEST_KEY", SECRET_2)],
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("groq-1") && out.contains("groq-2") && out.contains(MODEL),
        "{out}"
    );
    assert_no_secret(&out);
    assert_no_secret(&err);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_key_stays_disabled_across_restarts_until_its_file_is_replaced() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    fake.add_key(SECRET_2, FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    // Only one key: its 401 disables it and tasks fail with budget_exhausted.
    setup.groq(
        "groq",
        &fake.base_url(),
        MODEL,
        LIMITS,
        &[("groq-1", SECRET_1)],
    );
    let mut daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "refile").await;
    client.subscribe("clients/f/#").await;
    let mut ask = async |id: &str| {
        client
            .publish(
                "keyrelay/tasks",
                task(
                    id,
                    "x",
                    json!({"reply_to": format!("clients/f/{id}"), "deadline_secs": 5}),
                ),
            )
            .await;
        client.next_on(&format!("clients/f/{id}")).await.json()
    };
    assert_eq!(ask("f1").await["error"]["code"], "budget_exhausted");
    assert_eq!(fake.calls(SECRET_1), 1, "{}", daemon.log_text());

    // A restart alone changes nothing: the key is not tried again.
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(12))
            .and_then(|s| s.code()),
        Some(0)
    );
    let mut daemon = Daemon::start(&setup).await;
    assert_eq!(ask("f2").await["error"]["code"], "budget_exhausted");
    assert_eq!(
        fake.calls(SECRET_1),
        1,
        "a disabled key was tried again after a plain restart"
    );

    // The operator puts a working key in the file and restarts.
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(12))
            .and_then(|s| s.code()),
        Some(0)
    );
    setup.key_file("groq-1", SECRET_2);
    let _daemon = Daemon::start(&setup).await;
    let v = ask("f3").await;
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(fake.calls(SECRET_2), 1);
}
