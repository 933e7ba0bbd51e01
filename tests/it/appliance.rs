//! What a person next to the Pi relies on: the LEDs (file backend) and the health topic
//! telling the same story, systemd's READY and WATCHDOG, and clean stops.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_provider::{FakeKind, FakeLimits, FakeProvider};
use crate::harness::{Broker, Client, Daemon, Setup, WAIT, keyrelay, one_groq_key, path_str, task};

const MODEL: &str = "llama-3.3-70b-versatile";

/// Waits until the LED file shows `expected` for every LED named in it.
async fn leds_become(setup: &Setup, daemon: &Daemon, expected: Value) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let now: Value = std::fs::read(setup.led_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let matches = expected
            .as_object()
            .unwrap()
            .iter()
            .all(|(led, state)| now.get(led) == Some(state));
        if matches {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "LEDs are {now}, expected {expected}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next retained health whose state is `state`.
async fn health_becomes(client: &mut Client, state: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = client
            .next_within(left)
            .await
            .unwrap_or_else(|| panic!("health never became {state}"));
        if m.topic == "keyrelay/pi-test/health" {
            let v = m.json();
            if v["state"] == state {
                return v;
            }
        }
    }
}

async fn ask(client: &mut Client, id: &str) -> Value {
    let topic = format!("clients/led/{id}");
    client
        .publish("keyrelay/tasks", task(id, "x", json!({"reply_to": topic})))
        .await;
    client.next_on(&topic).await.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn leds_and_health_tell_the_same_story_from_healthy_to_stopped() {
    let mut broker = Broker::start();
    let first = FakeProvider::start(FakeKind::Groq).await;
    let second = FakeProvider::start(FakeKind::Groq).await;
    // The provider allows key A one call a minute; the config believes 30.
    first.add_key("gsk_led_key_a_0000001", FakeLimits::unlimited().rpm(1));
    second.add_key("gsk_led_key_b_0000001", FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    setup.groq(
        "p1",
        &first.base_url(),
        MODEL,
        "rpm = 30",
        &[("key-a", "gsk_led_key_a_0000001")],
    );
    setup.groq(
        "p2",
        &second.base_url(),
        "backup-model",
        "rpm = 30\nrpd = 2",
        &[("key-b", "gsk_led_key_b_0000001")],
    );
    setup.body.push_str(&format!(
        "\n[routing]\nauto = [\"p1/{MODEL}\", \"p2/backup-model\"]\n"
    ));
    setup.leds_file();
    let mut daemon = Daemon::start(&setup).await;
    let mut watch = Client::connect(broker.port, "led-watch").await;
    watch.subscribe("keyrelay/pi-test/health").await;
    let mut client = Client::connect(broker.port, "led-client").await;
    client.subscribe("clients/led/#").await;

    // Healthy: green alone.
    leds_become(
        &setup,
        &daemon,
        json!({"green": "on", "amber": "off", "red": "off"}),
    )
    .await;
    health_becomes(&mut watch, "healthy").await;

    // Key A answers once, then 429s and cools; B serves: degraded, green + amber.
    assert_eq!(ask(&mut client, "l1").await["key"], "key-a");
    assert_eq!(ask(&mut client, "l2").await["key"], "key-b");
    let h = health_becomes(&mut watch, "degraded").await;
    let a = h["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "key-a")
        .unwrap()
        .clone();
    assert_eq!(a["state"], "cooling", "{h}");
    assert!(a["until"].is_string());
    leds_become(
        &setup,
        &daemon,
        json!({"green": "on", "amber": "on", "red": "off"}),
    )
    .await;

    // B's day is spent too: nothing can serve auto: red.
    assert_eq!(ask(&mut client, "l3").await["key"], "key-b");
    health_becomes(&mut watch, "exhausted").await;
    leds_become(
        &setup,
        &daemon,
        json!({"green": "off", "amber": "off", "red": "on"}),
    )
    .await;

    // The broker goes away: amber blinks.
    broker.stop();
    leds_become(&setup, &daemon, json!({"amber": "blink", "green": "off"})).await;

    // It comes back: the retained health is published again and red is steady.
    broker.restart();
    let mut watch = Client::connect(broker.port, "led-watch-2").await;
    watch.subscribe("keyrelay/pi-test/health").await;
    health_becomes(&mut watch, "exhausted").await;
    leds_become(&setup, &daemon, json!({"red": "on", "amber": "off"})).await;

    // SIGTERM: all off, `offline`, exit 0.
    let mut avail = Client::connect(broker.port, "led-avail").await;
    avail.subscribe("keyrelay/pi-test/availability").await;
    let status = daemon
        .terminate(Duration::from_secs(10))
        .expect("did not stop within 10 s");
    assert_eq!(status.code(), Some(0));
    let leds: Value = serde_json::from_slice(&std::fs::read(setup.led_file()).unwrap()).unwrap();
    assert_eq!(
        leds,
        json!({"green": "off", "amber": "off", "red": "off", "activity": "off"})
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let m = avail
            .next_within(deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("no offline");
        if m.payload == b"offline".as_slice() {
            assert!(m.retain || m.topic.ends_with("availability"));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_only_once_subscribed_and_the_watchdog_is_fed() {
    let broker = Broker::start();
    let (setup, _fake) = one_groq_key(&broker, MODEL, "gsk_notify_key_0000001", "rpm = 30").await;
    let socket_path = setup.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let daemon = Daemon::spawn(
        &setup,
        &[
            ("NOTIFY_SOCKET", path_str(&socket_path)),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m: &String| m.contains("READY=1")) {
        assert!(
            Instant::now() < deadline,
            "no READY=1; got {got:?}; log:\n{}",
            daemon.log_text()
        );
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // READY means subscribed: a task published now, on a fresh broker with no queued
    // session, is only answered if the subscription already exists.
    let mut client = Client::connect(broker.port, "ready").await;
    client.subscribe("clients/ready").await;
    client
        .publish(
            "keyrelay/pi-test/tasks",
            task("rdy", "x", json!({"reply_to": "clients/ready"})),
        )
        .await;
    assert_eq!(client.next_on("clients/ready").await.json()["status"], "ok");

    let mut watchdogs = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && watchdogs < 2 {
        if let Ok(n) = socket.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            watchdogs += usize::from(m.contains("WATCHDOG=1"));
            got.push(m);
        }
    }
    assert!(
        watchdogs >= 2,
        "the watchdog was not fed every second: {got:?}"
    );
    assert!(
        got.iter()
            .any(|m| m.contains("STATUS=") && m.contains("keys ready")),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_task_in_flight_still_answers_it_and_exits_zero() {
    let broker = Broker::start();
    let (setup, fake) = one_groq_key(&broker, MODEL, "gsk_term_key_00000001", "rpm = 30").await;
    fake.delay("gsk_term_key_00000001", Duration::from_secs(2));
    let mut daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "term").await;
    client.subscribe("clients/term").await;
    client
        .publish(
            "keyrelay/tasks",
            task("slow", "x", json!({"reply_to": "clients/term"})),
        )
        .await;
    let deadline = Instant::now() + WAIT;
    while fake.total_calls() == 0 {
        assert!(
            Instant::now() < deadline,
            "the task never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let status = daemon
        .terminate(Duration::from_secs(10))
        .expect("did not exit within 10 s");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    let v = client.next_on("clients/term").await.json();
    assert_eq!(v["status"], "ok", "{v}");
}

#[test]
fn a_gpio_backend_that_cannot_work_here_names_the_others() {
    for backend in ["rppal", "gpiochip"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[leds]\nbackend = \"{backend}\"\nchip = \"/dev/gpiochip-nonexistent\"\ngreen = 17\n",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let (code, out, err) = keyrelay(&["run", "--config", path_str(&path)], &[]);
        assert_eq!(code, 2, "{backend}: stdout {out}\nstderr {err}");
        let others: Vec<&str> = ["rppal", "gpiochip", "sysfs", "file", "none"]
            .into_iter()
            .filter(|b| *b != backend)
            .collect();
        for other in others {
            assert!(
                err.contains(other),
                "{backend}'s error does not name {other}: {err}"
            );
        }
    }
}
