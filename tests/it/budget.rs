//! Budgets against fake providers with strict sliding windows: no 429 with correct
//! limits, 429s absorbed when the config is wrong, daily exhaustion, fallback, dedup,
//! crashes, and a state file that is damaged.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_provider::{FakeKind, FakeLimits, FakeProvider};
use crate::harness::{Broker, Client, Daemon, Setup, WAIT, keyrelay, one_groq_key, path_str, task};

const MODEL: &str = "llama-3.3-70b-versatile";
const GEMINI_MODEL: &str = "gemini-2.0-flash";

fn secrets(n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("groq-{i}"), format!("gsk_budget_test_key_{i:04}")))
        .collect()
}

fn as_refs(keys: &[(String, String)]) -> Vec<(&str, &str)> {
    keys.iter().map(|(l, s)| (l.as_str(), s.as_str())).collect()
}

/// Publishes `n` tasks at once and collects their replies by id.
async fn burst(
    client: &mut Client,
    prefix: &str,
    n: usize,
    extra: Value,
) -> std::collections::HashMap<String, Value> {
    let topic = format!("clients/{prefix}/replies");
    for i in 0..n {
        let mut more = extra.clone();
        more["reply_to"] = json!(topic);
        client
            .publish(
                "keyrelay/tasks",
                task(
                    &format!("{prefix}-{i}"),
                    &format!("{prefix} task {i}"),
                    more,
                ),
            )
            .await;
    }
    client.replies(&topic, n).await
}

#[tokio::test(flavor = "multi_thread")]
async fn correct_limits_serve_everything_without_a_single_429() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    let keys = secrets(3);
    for (_, secret) in &keys {
        fake.add_key(secret, FakeLimits::unlimited().rpm(5));
    }
    let mut setup = Setup::new(&broker);
    setup.groq("groq", &fake.base_url(), MODEL, "rpm = 5", &as_refs(&keys));
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "fit").await;
    client.subscribe("clients/fit/#").await;
    let replies = burst(&mut client, "fit", 15, json!({"max_tokens": 16})).await;
    assert!(replies.values().all(|v| v["status"] == "ok"), "{replies:?}");
    assert_eq!(fake.rate_limited(), 0, "the provider had to refuse a call");
    for (_, secret) in &keys {
        assert_eq!(
            fake.calls(secret),
            5,
            "the load was not spread over the keys"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_set_too_high_are_absorbed_and_a_cooling_key_is_left_alone() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    let keys = secrets(3);
    // The config believes every key takes 30 a minute; the provider allows the first 1.
    fake.add_key(&keys[0].1, FakeLimits::unlimited().rpm(1));
    fake.add_key(&keys[1].1, FakeLimits::unlimited());
    fake.add_key(&keys[2].1, FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    setup.groq("groq", &fake.base_url(), MODEL, "rpm = 30", &as_refs(&keys));
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "high").await;
    client.subscribe("clients/#").await;
    let replies = burst(&mut client, "high", 9, json!({"deadline_secs": 60})).await;
    assert!(
        replies.values().all(|v| v["status"] == "ok"),
        "a client saw a rate limit: {replies:?}"
    );
    assert!(
        fake.rate_limited() >= 1,
        "the first key should have been refused"
    );
    // One served; the rest were refused while already in flight when the first 429 came.
    let calls = fake.calls(&keys[0].1);
    assert!(
        calls <= 3,
        "the first key was called {calls} times by 9 tasks over 3 keys"
    );
    // Still cooling: a second burst goes to the other keys only.
    let replies = burst(&mut client, "again", 6, json!({"deadline_secs": 60})).await;
    assert!(
        replies
            .values()
            .all(|v| v["status"] == "ok" && v["key"] != "groq-1"),
        "{replies:?}"
    );
    assert_eq!(
        fake.calls(&keys[0].1),
        calls,
        "a cooling key was called again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daily_limit_exhausts_the_key_and_the_next_task_costs_no_call() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Gemini).await;
    let secret = "AIzaBudgetTestKey000000001";
    // The provider allows one a day; the config thinks 1500.
    fake.add_key(secret, FakeLimits::unlimited().rpd(1));
    let mut setup = Setup::new(&broker);
    setup.body.push_str(&format!(
        "\n[[providers]]\nname = \"gemini\"\nkind = \"gemini\"\nbase_url = \"{}\"\ndaily_reset = \"America/Los_Angeles\"\n[providers.models.\"{GEMINI_MODEL}\"]\nrpm = 15\nrpd = 1500\n[[providers.keys]]\nlabel = \"gemini-1\"\nsecret_file = \"{}\"\n",
        fake.base_url(),
        setup.key_file("gemini-1", secret).display()
    ));
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "day").await;
    client.subscribe("clients/#").await;
    let one = burst(&mut client, "day1", 1, json!({})).await;
    assert_eq!(one["day1-0"]["status"], "ok");
    let two = burst(&mut client, "day2", 1, json!({"deadline_secs": 60})).await;
    let v = &two["day2-0"];
    assert_eq!(v["error"]["code"], "budget_exhausted", "{v}");
    let retry = v["error"]["retry_after_secs"]
        .as_u64()
        .expect("retry_after_secs");
    assert!(
        retry > 60 && retry <= 86_400,
        "retry_after_secs should point at LA midnight: {retry}"
    );
    // The 429 named the quota and its value (`quotaValue` "1"): the operator sees the
    // provider's day budget, not the config's 1500 less the one request.
    let config = path_str(&setup.config_path()).to_owned();
    let (code, out, err) = keyrelay(&["status", "--json", "--config", &config], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let health: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        health["keys"][0]["remaining"][GEMINI_MODEL]["rpd"], 0,
        "{health}"
    );
    let calls = fake.total_calls();
    let three = burst(&mut client, "day3", 1, json!({"deadline_secs": 60})).await;
    assert_eq!(three["day3-0"]["error"]["code"], "budget_exhausted");
    assert_eq!(fake.total_calls(), calls, "an exhausted key was called");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_provider_falls_back_to_the_next_target() {
    let broker = Broker::start();
    let groq = FakeProvider::start(FakeKind::Groq).await;
    let gemini = FakeProvider::start(FakeKind::Gemini).await;
    groq.add_key("gsk_fallback_key_000001", FakeLimits::unlimited());
    gemini.add_key("AIzaFallbackKey000000001", FakeLimits::unlimited());
    let mut setup = Setup::new(&broker);
    setup.groq(
        "groq",
        &groq.base_url(),
        MODEL,
        "rpm = 30\nrpd = 2",
        &[("groq-1", "gsk_fallback_key_000001")],
    );
    setup.gemini(
        "gemini",
        &gemini.base_url(),
        GEMINI_MODEL,
        "rpm = 15\nrpd = 1500",
        &[("gemini-1", "AIzaFallbackKey000000001")],
    );
    setup.body.push_str(&format!(
        "\n[routing]\nauto = [\"groq/{MODEL}\", \"gemini/{GEMINI_MODEL}\"]\n"
    ));
    let _daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "fb").await;
    client.subscribe("clients/#").await;
    let mut providers = Vec::new();
    for i in 0..4 {
        let r = burst(&mut client, &format!("fb{i}"), 1, json!({})).await;
        let v = &r[&format!("fb{i}-0")];
        assert_eq!(v["status"], "ok", "{v}");
        providers.push(v["provider"].as_str().unwrap().to_owned());
    }
    assert_eq!(providers, ["groq", "groq", "gemini", "gemini"]);
    assert_eq!(groq.total_calls(), 2);
    assert_eq!(gemini.rate_limited() + groq.rate_limited(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_task_is_answered_again_without_a_second_call() {
    let broker = Broker::start();
    let (setup, fake) = one_groq_key(&broker, MODEL, "gsk_dedup_key_00000001", "rpm = 30").await;
    let mut daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "dup").await;
    client.subscribe("clients/dup").await;
    let payload = task("same-id", "once only", json!({"reply_to": "clients/dup"}));
    client.publish("keyrelay/tasks", payload.clone()).await;
    let first = client.next_on("clients/dup").await.json();
    client.publish("keyrelay/tasks", payload.clone()).await;
    let second = client.next_on("clients/dup").await.json();
    assert_eq!(first, second);
    assert_eq!(fake.total_calls(), 1);

    // Also after a restart: the answered id lives in the store.
    assert_eq!(
        daemon
            .terminate(Duration::from_secs(12))
            .and_then(|s| s.code()),
        Some(0)
    );
    let _daemon = Daemon::start(&setup).await;
    client.publish("keyrelay/tasks", payload).await;
    let third = client.next_on("clients/dup").await.json();
    assert_eq!(third, first);
    assert_eq!(
        fake.total_calls(),
        1,
        "an answered task was sent to a provider again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_dash_nine_mid_load_never_overspends_or_resends_an_answered_task() {
    let broker = Broker::start();
    let fake = FakeProvider::start(FakeKind::Groq).await;
    let keys = secrets(2);
    for (_, secret) in &keys {
        fake.add_key(secret, FakeLimits::unlimited().rpm(3));
        fake.delay(secret, Duration::from_millis(150));
    }
    let mut setup = Setup::new(&broker);
    setup.groq("groq", &fake.base_url(), MODEL, "rpm = 3", &as_refs(&keys));
    let mut daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "crash").await;
    client.subscribe("clients/crash").await;
    let n = 10;
    for i in 0..n {
        client
            .publish(
                "keyrelay/tasks",
                task(
                    &format!("c{i}"),
                    &format!("crash task {i}"),
                    json!({"reply_to": "clients/crash", "deadline_secs": 110}),
                ),
            )
            .await;
    }
    let mut answered_before = HashSet::new();
    while answered_before.len() < 3 {
        let v = client.next_on("clients/crash").await.json();
        answered_before.insert(v["id"].as_str().unwrap().to_owned());
    }
    daemon.kill9();
    let before_log = daemon.log_text();
    let daemon = Daemon::start(&setup).await;
    // The 6 calls the minute allows are spent by now or soon; the rest wait for the
    // window, so collect what arrives within a while and check the provider's counts.
    let mut all: HashSet<String> = answered_before.clone();
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline && all.len() < n {
        if let Some(m) = client.next_within(Duration::from_secs(1)).await {
            all.insert(m.json()["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        fake.rate_limited(),
        0,
        "after the crash the daemon overspent a key; before:\n{before_log}\nafter:\n{}",
        daemon.log_text()
    );
    for (_, secret) in &keys {
        assert!(
            fake.calls(secret) <= 3,
            "a key was called {} times in a minute",
            fake.calls(secret)
        );
    }
    let prompts: Vec<String> = fake
        .recorded()
        .iter()
        .map(|r| {
            r.body["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    for id in &answered_before {
        let i: usize = id[1..].parse().unwrap();
        let sent = prompts
            .iter()
            .filter(|p| **p == format!("crash task {i}"))
            .count();
        assert_eq!(
            sent, 1,
            "task {id} was answered before the crash but sent {sent} times"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_state_file_is_refused_and_nothing_is_spent() {
    let broker = Broker::start();
    let (mut setup, fake) =
        one_groq_key(&broker, MODEL, "gsk_corrupt_key_0000001", "rpm = 30").await;
    setup.leds_file();
    // A real state file, with bytes flipped in the middle.
    {
        let mut daemon = Daemon::start(&setup).await;
        assert_eq!(
            daemon
                .terminate(Duration::from_secs(12))
                .and_then(|s| s.code()),
            Some(0)
        );
    }
    let state = setup.state_dir().join("keyrelay.redb");
    let mut bytes = std::fs::read(&state).unwrap();
    // Flip a byte in every 64: the header, the tables and the free space alike.
    for b in bytes.iter_mut().step_by(64) {
        *b ^= 0x5a;
    }
    std::fs::write(&state, &bytes).unwrap();

    let daemon = Daemon::spawn(&setup, &[]);
    let mut client = Client::connect(broker.port, "corrupt").await;
    client.subscribe("clients/corrupt").await;
    client
        .publish(
            "keyrelay/tasks",
            task("x1", "x", json!({"reply_to": "clients/corrupt"})),
        )
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let leds = std::fs::read_to_string(setup.led_file()).unwrap_or_default();
        if leds.contains("\"red\":\"blink\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "red is not blinking: {leds}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon.log_text();
    assert!(
        log.contains(&state.display().to_string()),
        "the error does not name the file:\n{log}"
    );
    assert!(
        client.next_within(Duration::from_secs(2)).await.is_none(),
        "a task was served without a usable store"
    );
    assert_eq!(
        fake.total_calls(),
        0,
        "budget was spent without a usable store"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        bytes,
        "the damaged file was changed"
    );
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop. `None` when this process may
/// not mount (not root): the test says so and does nothing.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stops_spending_and_the_daemon_carries_on_once_there_is_room() {
    let broker = Broker::start();
    let (mut setup, fake) =
        one_groq_key(&broker, MODEL, "gsk_full_disk_key_000001", "rpm = 30").await;
    setup.leds_file();
    let Some(_tmpfs) = Tmpfs::mount(&setup.state_dir(), "4m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let daemon = Daemon::start(&setup).await;
    let mut client = Client::connect(broker.port, "full").await;
    client.subscribe("clients/full/#").await;
    let ask = |id: &str, deadline: u64| {
        task(
            id,
            "x",
            json!({"reply_to": format!("clients/full/{id}"), "deadline_secs": deadline}),
        )
    };
    client.publish("keyrelay/tasks", ask("before", 30)).await;
    assert_eq!(
        client.next_on("clients/full/before").await.json()["status"],
        "ok"
    );

    // Fill the disk under the state file.
    let filler = setup.state_dir().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // Tasks keep coming; whatever reaches a provider must have its budget on disk, so
    // once the lease runs out nothing more is spent, and every task still gets an answer.
    for i in 0..40 {
        client
            .publish("keyrelay/tasks", ask(&format!("full-{i}"), 3))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 0..40 {
        let m = client.next_within(WAIT).await;
        let m = m.unwrap_or_else(|| {
            panic!(
                "tasks went unanswered on a full disk: {codes:?}; log:\n{}",
                daemon.log_text()
            )
        });
        codes.push(
            m.json()["error"]["code"]
                .as_str()
                .unwrap_or("ok")
                .to_owned(),
        );
    }
    assert!(
        codes.iter().any(|c| c == "deadline_exceeded"),
        "nothing was held back on a full disk: {codes:?}"
    );
    leds_show_red_blink(&setup, &daemon).await;
    let log = daemon.log_text();
    assert!(
        log.contains("No space left") || log.contains("ENOSPC") || log.contains("full"),
        "the log does not say the disk is full:\n{log}"
    );
    let spent = fake.total_calls();
    client.publish("keyrelay/tasks", ask("still-full", 2)).await;
    assert_eq!(
        client.next_on("clients/full/still-full").await.json()["error"]["code"],
        "deadline_exceeded"
    );
    assert_eq!(
        fake.total_calls(),
        spent,
        "budget was spent that the store could not record"
    );

    // Room again: the store reopens on its own and tasks are served.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("after-{n}");
        client.publish("keyrelay/tasks", ask(&id, 5)).await;
        let v = client.next_on(&format!("clients/full/{id}")).await.json();
        if v["status"] == "ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keyrelay did not carry on after the disk had room; log:\n{}",
            daemon.log_text()
        );
    }
}

async fn leds_show_red_blink(setup: &Setup, daemon: &Daemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        let leds = std::fs::read_to_string(setup.led_file()).unwrap_or_default();
        if leds.contains("\"red\":\"blink\"") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "red is not blinking: {leds}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
