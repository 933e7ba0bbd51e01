//! The task protocol of SPEC §3: the request a client publishes, the reply keyrelay
//! publishes back, the error codes, and the rules for where a reply may go.
//! Pure data and validation; no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mqtt::Topics;
use crate::provider::{ChatMessage, ChatRequest, Usage};

/// Longest task id a client may choose.
pub const MAX_ID_CHARS: usize = 128;
/// Deadline when a task names none.
pub const DEFAULT_DEADLINE_SECS: u64 = 120;
/// Longest deadline a task may ask for: a day, the span over which answered ids are kept.
pub const MAX_DEADLINE_SECS: u64 = 86_400;
/// Longest MQTT 5 Correlation Data echoed back; a longer one makes the task invalid
/// rather than letting any client make keyrelay store and publish large blobs.
pub const MAX_CORRELATION_BYTES: usize = 1024;
/// Roles of the OpenAI chat format.
const ROLES: [&str; 3] = ["system", "user", "assistant"];
/// OpenAI allows at most four stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;

/// A validated task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    /// What to ask, as the client asked it. Its `model` is the one the client named
    /// (`auto`, `provider/model` or a model name), from which the route is chosen; each
    /// call to a provider names its own target's model instead.
    pub request: ChatRequest,
    pub reply_to: Option<String>,
    pub deadline_secs: u64,
}

/// The wire form of a task: every field optional so that a wrong one is reported by name.
#[derive(Debug, Deserialize)]
struct RawTask {
    id: Option<Value>,
    model: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    stop: Option<Value>,
    reply_to: Option<Value>,
    deadline_secs: Option<Value>,
}

/// Why a payload is not a task. `id` and `reply_to` are what could be read of it,
/// so that the refusal can still be answered where the client listens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidTask {
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub message: String,
}

/// Parses and validates a task payload. `new_id` makes an id when the task has none.
pub fn parse(
    payload: &[u8],
    max_payload_bytes: usize,
    new_id: impl FnOnce() -> String,
) -> Result<Task, InvalidTask> {
    let invalid = |id: Option<String>, reply_to: Option<String>, message: String| InvalidTask {
        id,
        reply_to,
        message,
    };
    if payload.len() > max_payload_bytes {
        return Err(invalid(
            None,
            None,
            format!(
                "the task is {} bytes, more than max_payload_bytes = {max_payload_bytes}",
                payload.len()
            ),
        ));
    }
    let raw: RawTask = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => match serde_json::from_value(Value::Object(map)) {
            Ok(raw) => raw,
            Err(e) => return Err(invalid(None, None, format!("not a task: {e}"))),
        },
        Ok(_) => return Err(invalid(None, None, "a task is a JSON object".into())),
        Err(e) => return Err(invalid(None, None, format!("not JSON: {e}"))),
    };
    // Read what can be read of where to answer before judging anything else.
    let reply_to = match &raw.reply_to {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid(None, None, "`reply_to` must be a string".into())),
    };
    let id = match &raw.id {
        None | Some(Value::Null) => new_id(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid(None, reply_to, "`id` must be a string".into())),
    };
    if let Err(why) = check_id(&id) {
        return Err(invalid(None, reply_to, why));
    }
    let fail = |message: String| invalid(Some(id.clone()), reply_to.clone(), message);

    let model = match &raw.model {
        None | Some(Value::Null) => "auto".to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        Some(_) => return Err(fail("`model` must be a non-empty string".into())),
    };
    let messages = parse_messages(raw.messages.as_ref()).map_err(&fail)?;
    let max_tokens = match &raw.max_tokens {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Some(n),
            _ => return Err(fail("`max_tokens` must be a positive integer".into())),
        },
    };
    let temperature =
        number_in(raw.temperature.as_ref(), "temperature", 0.0, 2.0).map_err(&fail)?;
    let top_p = number_in(raw.top_p.as_ref(), "top_p", 0.0, 1.0).map_err(&fail)?;
    let stop = parse_stop(raw.stop.as_ref()).map_err(&fail)?;
    let deadline_secs = match &raw.deadline_secs {
        None | Some(Value::Null) => DEFAULT_DEADLINE_SECS,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_DEADLINE_SECS).contains(&n) => n,
            _ => {
                return Err(fail(format!(
                    "`deadline_secs` must be an integer from 1 to {MAX_DEADLINE_SECS}"
                )));
            }
        },
    };
    Ok(Task {
        id,
        request: ChatRequest {
            model,
            messages,
            max_tokens,
            temperature,
            top_p,
            stop,
        },
        reply_to,
        deadline_secs,
    })
}

/// An id becomes part of the default reply topic, so it may not hold wildcards.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("`id` is empty".into());
    }
    if id.chars().count() > MAX_ID_CHARS {
        return Err(format!("`id` is longer than {MAX_ID_CHARS} characters"));
    }
    if id
        .chars()
        .any(|c| matches!(c, '+' | '#' | '/') || c.is_control())
    {
        return Err("`id` may not contain `+`, `#`, `/` or control characters".into());
    }
    Ok(())
}

fn parse_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, String> {
    let Some(Value::Array(items)) = value else {
        return Err("`messages` must be a non-empty array of {role, content}".into());
    };
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item.get("role").and_then(Value::as_str);
            let content = item.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) if ROLES.contains(&role) => Ok(ChatMessage {
                    role: role.to_owned(),
                    content: content.to_owned(),
                }),
                (Some(role), Some(_)) => Err(format!(
                    "`messages[{i}].role` is {role:?}; it must be system, user or assistant"
                )),
                _ => Err(format!(
                    "`messages[{i}]` must have a string `role` and a string `content`"
                )),
            }
        })
        .collect()
}

fn number_in(value: Option<&Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(format!("`{name}` must be a number from {lo} to {hi}")),
        },
    }
}

fn parse_stop(value: Option<&Value>) -> Result<Vec<String>, String> {
    let stop = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or("`stop` must be a string or an array of strings")?,
        Some(_) => return Err("`stop` must be a string or an array of strings".into()),
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(format!(
            "`stop` has more than {MAX_STOP_SEQUENCES} sequences"
        ));
    }
    Ok(stop)
}

/// Why a reply topic is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicRefused {
    #[error("reply topic {0:?} is empty or holds a wildcard (`+`, `#`) or a NUL")]
    Wildcard(String),
    #[error("reply topic {0:?} is a `$` topic")]
    System(String),
    #[error("reply topic {0:?} is inside keyrelay's own prefix")]
    OwnPrefix(String),
    #[error("reply topic {0:?} is outside allowed_reply_prefixes")]
    NotAllowed(String),
}

/// Where the reply goes (SPEC §3): the MQTT 5 Response Topic, else `reply_to`, else
/// `{prefix}/replies/{id}`. A client-given topic is checked; the default is ours.
pub fn reply_topic(
    response_topic: Option<&str>,
    reply_to: Option<&str>,
    id: &str,
    topics: &Topics,
    allowed_prefixes: Option<&[String]>,
) -> Result<String, TopicRefused> {
    let Some(topic) = response_topic.or(reply_to) else {
        return Ok(topics.reply(id));
    };
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(TopicRefused::Wildcard(topic.to_owned()));
    }
    if topic.starts_with('$') {
        return Err(TopicRefused::System(topic.to_owned()));
    }
    if topics.is_own(topic) {
        return Err(TopicRefused::OwnPrefix(topic.to_owned()));
    }
    if let Some(prefixes) = allowed_prefixes
        && !prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    {
        return Err(TopicRefused::NotAllowed(topic.to_owned()));
    }
    Ok(topic.to_owned())
}

/// The error codes of SPEC §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    NoRoute,
    BudgetExhausted,
    DeadlineExceeded,
    UpstreamRejected,
    UpstreamError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// A reply (SPEC §3). Field order follows the examples of the contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// What a successful reply says beside its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub provider: String,
    pub model: String,
    pub key: String,
    pub usage: Usage,
    pub attempts: u32,
    pub queued_ms: u64,
    pub latency_ms: u64,
}

impl Reply {
    pub fn ok(id: &str, content: String, served: Served) -> Self {
        Self {
            id: id.to_owned(),
            status: Status::Ok,
            content: Some(content),
            provider: Some(served.provider),
            model: Some(served.model),
            key: Some(served.key),
            usage: Some(served.usage),
            attempts: Some(served.attempts),
            queued_ms: Some(served.queued_ms),
            latency_ms: Some(served.latency_ms),
            error: None,
        }
    }

    pub fn error(id: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            status: Status::Error,
            content: None,
            provider: None,
            model: None,
            key: None,
            usage: None,
            attempts: None,
            queued_ms: None,
            latency_ms: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
                retry_after_secs: None,
            }),
        }
    }

    /// An error reply that says when to come back.
    pub fn retry_after(mut self, secs: Option<u64>) -> Self {
        if let Some(error) = &mut self.error {
            error.retry_after_secs = secs;
        }
        self
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A Reply holds only strings and numbers: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 262_144;

    fn topics() -> Topics {
        Topics::new("keyrelay", "pi-test", "keyrelay")
    }

    fn ok(json: &str) -> Task {
        parse(json.as_bytes(), MAX, || "made-up".into()).unwrap()
    }

    fn err(json: &[u8]) -> InvalidTask {
        parse(json, MAX, || "made-up".into()).unwrap_err()
    }

    #[test]
    fn full_task_parses() {
        let t = ok(r#"{"id":"b1f0","model":"groq/llama-3.3-70b-versatile",
            "messages":[{"role":"system","content":"Be brief"},{"role":"user","content":"Hola"}],
            "max_tokens":512,"temperature":0.7,"top_p":0.9,"stop":["\n\n"],
            "reply_to":"clients/bot-1/replies","deadline_secs":30}"#);
        assert_eq!(t.id, "b1f0");
        assert_eq!(t.request.model, "groq/llama-3.3-70b-versatile");
        assert_eq!(t.request.messages.len(), 2);
        assert_eq!(t.request.max_tokens, Some(512));
        assert_eq!(t.request.temperature, Some(0.7));
        assert_eq!(t.request.top_p, Some(0.9));
        assert_eq!(t.request.stop, vec!["\n\n".to_owned()]);
        assert_eq!(t.reply_to.as_deref(), Some("clients/bot-1/replies"));
        assert_eq!(t.deadline_secs, 30);
    }

    #[test]
    fn defaults_fill_in() {
        let t = ok(r#"{"messages":[{"role":"user","content":"hi"}],"stop":"END"}"#);
        assert_eq!(t.id, "made-up");
        assert_eq!(t.request.model, "auto");
        assert_eq!(t.deadline_secs, DEFAULT_DEADLINE_SECS);
        assert_eq!(t.request.stop, vec!["END".to_owned()]);
        assert_eq!(t.request.max_tokens, None);
        assert_eq!(t.request.temperature, None);
        assert_eq!(t.request.top_p, None);
    }

    #[test]
    fn bad_payloads_are_named() {
        assert!(err(b"{nope").message.starts_with("not JSON"));
        assert_eq!(err(b"[1]").message, "a task is a JSON object");
        assert!(err(br#"{"id":"x"}"#).message.contains("messages"));
        let e = err(
            br#"{"id":"x","reply_to":"clients/a","messages":[{"role":"robot","content":"hi"}]}"#,
        );
        assert_eq!(e.id.as_deref(), Some("x"));
        assert_eq!(e.reply_to.as_deref(), Some("clients/a"));
        assert!(e.message.contains("robot"));
        assert!(
            err(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#)
                .message
                .contains("max_tokens")
        );
        assert!(
            err(br#"{"messages":[{"role":"user","content":"hi"}],"temperature":3}"#)
                .message
                .contains("temperature")
        );
        assert!(
            err(br#"{"messages":[{"role":"user","content":"hi"}],"deadline_secs":-1}"#)
                .message
                .contains("deadline_secs")
        );
        let long = format!(r#"{{"id":"{}","messages":[]}}"#, "x".repeat(129));
        assert!(err(long.as_bytes()).message.contains("128"));
        assert!(
            err(br#"{"id":"a/b","messages":[{"role":"user","content":"hi"}]}"#)
                .message
                .contains("may not contain")
        );
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let big = vec![b' '; 101];
        let e = parse(&big, 100, || "x".into()).unwrap_err();
        assert!(e.message.contains("max_payload_bytes = 100"));
    }

    #[test]
    fn reply_topic_rules() {
        let t = topics();
        assert_eq!(
            reply_topic(None, None, "a1", &t, None).unwrap(),
            "keyrelay/replies/a1"
        );
        assert_eq!(
            reply_topic(Some("clients/v5"), Some("clients/v3"), "a1", &t, None).unwrap(),
            "clients/v5"
        );
        assert_eq!(
            reply_topic(None, Some("clients/v3"), "a1", &t, None).unwrap(),
            "clients/v3"
        );
        for bad in [
            "clients/+",
            "clients/#",
            "",
            "$SYS/x",
            "keyrelay/replies/x",
            "keyrelay",
        ] {
            assert!(
                reply_topic(None, Some(bad), "a1", &t, None).is_err(),
                "{bad}"
            );
        }
        let allowed = vec!["clients/".to_owned()];
        assert!(reply_topic(None, Some("clients/a"), "a1", &t, Some(&allowed)).is_ok());
        assert_eq!(
            reply_topic(None, Some("other/a"), "a1", &t, Some(&allowed)),
            Err(TopicRefused::NotAllowed("other/a".into()))
        );
    }

    #[test]
    fn replies_serialize_as_the_contract_shows() {
        let r =
            Reply::error("b1", ErrorCode::BudgetExhausted, "all keys spent").retry_after(Some(540));
        assert_eq!(
            String::from_utf8(r.to_json()).unwrap(),
            r#"{"id":"b1","status":"error","error":{"code":"budget_exhausted","message":"all keys spent","retry_after_secs":540}}"#
        );
        let served = Served {
            provider: "groq".into(),
            model: "m".into(),
            key: "groq-3".into(),
            usage: Usage {
                prompt_tokens: 21,
                completion_tokens: 9,
            },
            attempts: 2,
            queued_ms: 0,
            latency_ms: 412,
        };
        let v: Value =
            serde_json::from_slice(&Reply::ok("b1", "¡Hola!".into(), served).to_json()).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["key"], "groq-3");
        assert_eq!(v["usage"]["prompt_tokens"], 21);
        assert_eq!(v["attempts"], 2);
        assert!(v.get("error").is_none());
    }
}
