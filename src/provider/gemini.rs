//! The Google Generative Language API (`models/{model}:generateContent`): the
//! request it takes, and every answer classified from the status and the
//! `google.rpc.Status` error body (`QuotaFailure`, `RetryInfo`, `ErrorInfo` details).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    CallOutcome, ChatRequest, Completion, Failure, LimitDimension, LimitScope, NO_HTTP_STATUS,
    RateLimitHeaders, Usage, Violation, WireRequest, body_detail, detail, parse_go_duration,
};
use crate::secret::Secret;

/// Where the key goes: a header, so that no URL (which proxies and logs keep)
/// ever carries it, unlike the `?key=` form Google's examples use.
const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-goog-api-key");

/// `POST {base_url}/models/{model}:generateContent`, the key in [`API_KEY_HEADER`].
pub(super) fn build(
    base_url: &str,
    key: &Secret,
    req: &ChatRequest,
) -> Result<WireRequest, Failure> {
    let mut value = HeaderValue::from_str(key.expose()).map_err(|_| Failure::KeyRejected {
        status: NO_HTTP_STATUS,
        detail: "the key holds characters that cannot go in an HTTP header".to_owned(),
    })?;
    value.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(API_KEY_HEADER, value);
    Ok(WireRequest {
        url: format!("{base_url}/models/{}:generateContent", req.model),
        headers,
        body: body(req),
    })
}

/// OpenAI-style messages in Gemini's shape: system messages become the
/// `systemInstruction`, the assistant is the "model".
fn body(req: &ChatRequest) -> Value {
    let text_part = |text: &str| json!({ "text": text });
    let mut system = Vec::new();
    let mut contents = Vec::new();
    for message in &req.messages {
        match message.role.as_str() {
            "system" => system.push(text_part(&message.content)),
            role => {
                let role = if role == "assistant" { "model" } else { "user" };
                contents.push(json!({ "role": role, "parts": [text_part(&message.content)] }));
            }
        }
    }
    let mut config = Map::new();
    if let Some(max_tokens) = req.max_tokens {
        config.insert("maxOutputTokens".to_owned(), json!(max_tokens));
    }
    if let Some(temperature) = req.temperature {
        config.insert("temperature".to_owned(), json!(temperature));
    }
    if let Some(top_p) = req.top_p {
        config.insert("topP".to_owned(), json!(top_p));
    }
    if !req.stop.is_empty() {
        config.insert("stopSequences".to_owned(), json!(req.stop));
    }
    let mut body = Map::new();
    body.insert("contents".to_owned(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".to_owned(), json!({ "parts": system }));
    }
    if !config.is_empty() {
        body.insert("generationConfig".to_owned(), Value::Object(config));
    }
    Value::Object(body)
}

/// Classifies one answer. Pure: the whole HTTP exchange is in the arguments.
pub(super) fn classify(status: u16, headers: &HeaderMap, body: &[u8], key: &Secret) -> CallOutcome {
    let limits = RateLimitHeaders::from_headers(headers);
    let result = if (200..300).contains(&status) {
        completion(status, body, key)
    } else {
        Err(failure(status, &limits, body, key))
    };
    CallOutcome {
        result,
        headers: limits,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
    /// Thinking models may return their reasoning as parts marked `thought`.
    #[serde(default)]
    thought: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct UsageMetadata {
    prompt_token_count: u64,
    candidates_token_count: u64,
    thoughts_token_count: u64,
}

fn completion(status: u16, body: &[u8], key: &Secret) -> Result<Completion, Failure> {
    let response: GenerateResponse =
        serde_json::from_slice(body).map_err(|_| Failure::Transient {
            detail: format!(
                "unreadable answer: {}",
                body_detail(key, status, None, body)
            ),
        })?;
    let metadata = response.usage_metadata.unwrap_or_default();
    let usage = Usage {
        prompt_tokens: metadata.prompt_token_count,
        // Thinking tokens are billed and counted as output, so they spend budget too.
        completion_tokens: metadata.candidates_token_count + metadata.thoughts_token_count,
    };
    let candidate = response.candidates.into_iter().next();
    let finish_reason = candidate.as_ref().and_then(|c| c.finish_reason.clone());
    let texts: Vec<String> = candidate
        .and_then(|c| c.content)
        .map(|c| c.parts)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.thought)
        .filter_map(|p| p.text)
        .collect();
    if texts.is_empty() {
        // A blocked prompt or an answer stopped for safety: the request's doing,
        // and another key would be refused the same way.
        let why = match (
            response.prompt_feedback.and_then(|f| f.block_reason),
            finish_reason,
        ) {
            (Some(reason), _) => format!("the prompt was blocked ({reason})"),
            (None, Some(reason)) => format!("no answer text (finishReason {reason})"),
            (None, None) => "no answer text".to_owned(),
        };
        return Err(Failure::Rejected {
            status,
            detail: detail(key, &why),
        });
    }
    Ok(Completion {
        content: texts.concat(),
        usage,
    })
}

/// The `google.rpc.Status` error object, with the details that matter here.
#[derive(Default)]
struct ApiError {
    message: Option<String>,
    status: Option<String>,
    /// `ErrorInfo.reason`, e.g. `API_KEY_INVALID`.
    reasons: Vec<String>,
    /// `QuotaFailure.violations[].quotaId`, e.g. `GenerateRequestsPerDayPerProjectPerModel-FreeTier`.
    quota_ids: Vec<String>,
    /// The violations whose `quotaId` names what the quota counts.
    violations: Vec<Violation>,
    /// `RetryInfo.retryDelay`, e.g. `37s`.
    retry_delay: Option<Duration>,
}

impl ApiError {
    fn parse(body: &[u8]) -> Self {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return Self::default();
        };
        // Google front ends sometimes wrap the error in a one-element array.
        let value = match value {
            Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
            other => other,
        };
        let Some(error) = value.get("error") else {
            return Self::default();
        };
        let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).map(str::to_owned);
        let mut parsed = Self {
            message: text(error, "message"),
            status: text(error, "status"),
            ..Self::default()
        };
        let details = error.get("details").and_then(Value::as_array);
        for item in details.into_iter().flatten() {
            let kind = item
                .get("@type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if kind.ends_with("google.rpc.ErrorInfo") {
                parsed.reasons.extend(text(item, "reason"));
            } else if kind.ends_with("google.rpc.QuotaFailure") {
                let violations = item.get("violations").and_then(Value::as_array);
                for violation in violations.into_iter().flatten() {
                    let Some(id) = text(violation, "quotaId") else {
                        continue;
                    };
                    parsed
                        .violations
                        .extend(quota_violation(&id, violation.get("quotaValue")));
                    parsed.quota_ids.push(id);
                }
            } else if kind.ends_with("google.rpc.RetryInfo") {
                parsed.retry_delay = text(item, "retryDelay")
                    .as_deref()
                    .and_then(parse_go_duration);
            }
        }
        parsed
    }

    fn key_invalid(&self) -> bool {
        self.reasons.iter().any(|r| r == "API_KEY_INVALID")
            || (self.status.as_deref() == Some("INVALID_ARGUMENT")
                && self
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains("API key not valid")))
    }

    /// A daily quota is known by its id, not by the delay: Google sends
    /// `retryDelay: "0s"` with a `…PerDay…` violation.
    fn scope(&self) -> LimitScope {
        if self.quota_ids.iter().any(|id| id.contains("PerDay")) {
            LimitScope::Day
        } else {
            LimitScope::Minute
        }
    }
}

/// One `QuotaFailure` violation as a [`Violation`]: the `quotaId` says the window and
/// what the quota counts (`GenerateRequestsPerMinutePerProjectPerModel-FreeTier`,
/// `GenerateContentInputTokensPerModelPerDay-FreeTier`), `quotaValue` the limit ("15").
/// Google's token quotas count input tokens only; taken as a limit on all tokens, as
/// the ledger counts them, they err on the safe side. `None` for an id that names
/// neither requests nor tokens.
fn quota_violation(quota_id: &str, value: Option<&Value>) -> Option<Violation> {
    let dimension = if quota_id.contains("Requests") {
        LimitDimension::Requests
    } else if quota_id.contains("Tokens") {
        LimitDimension::Tokens
    } else {
        return None;
    };
    let scope = if quota_id.contains("PerDay") {
        LimitScope::Day
    } else {
        LimitScope::Minute
    };
    // A string in Google's JSON (int64 fields are), a number from anything looser.
    let limit = value.and_then(|v| match v {
        Value::String(text) => text.trim().parse().ok(),
        other => other.as_u64(),
    });
    Some(Violation {
        scope,
        dimension,
        limit,
    })
}

fn failure(status: u16, limits: &RateLimitHeaders, body: &[u8], key: &Secret) -> Failure {
    let error = ApiError::parse(body);
    let message = match (&error.message, error.quota_ids.is_empty()) {
        // The message is the same for every quota; which one was hit is in the details.
        (Some(message), false) => Some(format!(
            "quota {} exceeded: {message}",
            error.quota_ids.join(", ")
        )),
        (message, _) => message.clone(),
    };
    let detail = body_detail(key, status, message.as_deref(), body);
    match status {
        429 => Failure::RateLimited {
            retry_after: error.retry_delay.or(limits.retry_after),
            scope: error.scope(),
            violations: error.violations,
            detail,
        },
        400 if error.key_invalid() => Failure::KeyRejected { status, detail },
        401 | 403 => Failure::KeyRejected { status, detail },
        408 | 500..=599 => Failure::Transient {
            detail: if detail.starts_with("HTTP ") {
                detail
            } else {
                format!("HTTP {status}: {detail}")
            },
        },
        400..=499 => Failure::Rejected { status, detail },
        // Google sends no informational or redirect answers to this call; a proxy
        // in between is misbehaving, perhaps only for now.
        _ => Failure::Transient {
            detail: format!("HTTP {status}: {detail}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ChatMessage;
    use crate::provider::test_support::{fixture, violation, violations};

    const KEY: &str = "AIzaSyTestKeyThatMustNeverBePrinted01234";

    fn run(text: &str) -> CallOutcome {
        let fixture = fixture(text);
        classify(
            fixture.status,
            &fixture.headers,
            fixture.body.as_bytes(),
            &Secret::new(KEY),
        )
    }

    fn rate_limited(outcome: &CallOutcome) -> (Option<Duration>, LimitScope, &str) {
        match &outcome.result {
            Err(Failure::RateLimited {
                retry_after,
                scope,
                detail,
                ..
            }) => (*retry_after, *scope, detail.as_str()),
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    /// A 429 whose `QuotaFailure` holds these (quotaId, quotaValue) violations.
    fn quota_failure(violations: &[(&str, Value)]) -> CallOutcome {
        let violations: Vec<Value> = violations
            .iter()
            .map(|(id, value)| json!({"quotaId": id, "quotaValue": value}))
            .collect();
        let body = json!({"error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": violations},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}
            ]
        }});
        classify(
            429,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
            &Secret::new(KEY),
        )
    }

    #[test]
    fn success_joins_the_parts_and_reads_usage() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_200_generate_content.http"
        ));
        assert_eq!(
            outcome.result,
            Ok(Completion {
                content: "¡Hola! ¿En qué puedo ayudarte?".to_owned(),
                usage: Usage {
                    prompt_tokens: 12,
                    completion_tokens: 9
                },
            })
        );
        assert_eq!(outcome.headers, RateLimitHeaders::default());
    }

    #[test]
    fn thoughts_are_not_the_answer_but_are_counted() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_200_thinking_parts.http"
        ));
        assert_eq!(
            outcome.result,
            Ok(Completion {
                content: "¡Hola!".to_owned(),
                usage: Usage {
                    prompt_tokens: 4,
                    completion_tokens: 40
                },
            })
        );
    }

    #[test]
    fn per_minute_quota_waits_for_retry_info() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_429_per_minute_retry_info.http"
        ));
        let (retry_after, scope, detail) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Minute);
        assert_eq!(retry_after, Some(Duration::from_secs(37)));
        assert!(
            detail
                .starts_with("quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier exceeded"),
            "{detail}"
        );
        assert_eq!(
            violations(&outcome),
            [violation(
                LimitScope::Minute,
                LimitDimension::Requests,
                Some(15)
            )]
        );
    }

    #[test]
    fn quota_ids_name_the_window_and_what_is_counted() {
        let outcome = quota_failure(&[
            (
                "GenerateContentInputTokensPerModelPerMinute-FreeTier",
                json!("1000000"),
            ),
            (
                "GenerateContentInputTokensPerModelPerDay-FreeTier",
                json!(50_000),
            ),
            // No value, or one that is not a number: the limit is named, its value not.
            (
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                json!(null),
            ),
            (
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                json!("many"),
            ),
            // Neither requests nor tokens: nothing the ledger counts.
            ("SomethingElsePerMinute", json!("3")),
        ]);
        assert_eq!(
            violations(&outcome),
            [
                violation(LimitScope::Minute, LimitDimension::Tokens, Some(1_000_000)),
                violation(LimitScope::Day, LimitDimension::Tokens, Some(50_000)),
                violation(LimitScope::Minute, LimitDimension::Requests, None),
                violation(LimitScope::Day, LimitDimension::Requests, None),
            ]
        );
        let (_, scope, _) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Day);
    }

    #[test]
    fn a_per_day_violation_among_several_makes_a_daily_limit_despite_0s() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_429_per_day_two_violations.http"
        ));
        let (retry_after, scope, _) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Day);
        assert_eq!(retry_after, Some(Duration::ZERO));
        // Each violation keeps its own window and value.
        assert_eq!(
            violations(&outcome),
            [
                violation(LimitScope::Minute, LimitDimension::Requests, Some(15)),
                violation(LimitScope::Day, LimitDimension::Requests, Some(1500)),
            ]
        );
    }

    #[test]
    fn resource_exhausted_without_details_is_a_minute_limit() {
        let body = br#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;
        let outcome = classify(429, &HeaderMap::new(), body, &Secret::new(KEY));
        let (retry_after, scope, detail) = rate_limited(&outcome);
        assert_eq!((retry_after, scope), (None, LimitScope::Minute));
        assert_eq!(detail, "Resource has been exhausted (e.g. check quota).");
        assert_eq!(violations(&outcome), []);
    }

    #[test]
    fn api_key_invalid_is_key_rejected_and_never_echoed() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_400_api_key_invalid.http"
        ));
        assert_eq!(
            outcome.result,
            Err(Failure::KeyRejected {
                status: 400,
                detail: "API key not valid. Please pass a valid API key.".to_owned()
            })
        );
        let echoed = format!(
            r#"{{"error":{{"code":400,"message":"API key not valid: {KEY}","status":"INVALID_ARGUMENT"}}}}"#
        );
        let outcome = classify(400, &HeaderMap::new(), echoed.as_bytes(), &Secret::new(KEY));
        let Err(Failure::KeyRejected { detail, .. }) = outcome.result else {
            panic!("expected KeyRejected, got {:?}", outcome.result);
        };
        assert!(!detail.contains("TestKey"), "{detail}");
    }

    #[test]
    fn permission_denied_is_key_rejected() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_403_permission_denied.http"
        ));
        assert!(
            matches!(
                outcome.result,
                Err(Failure::KeyRejected { status: 403, .. })
            ),
            "{:?}",
            outcome.result
        );
    }

    #[test]
    fn other_client_errors_reject_the_request() {
        for (text, status) in [
            (
                include_str!("../../tests/fixtures/providers/gemini_400_invalid_argument.http"),
                400,
            ),
            (
                include_str!("../../tests/fixtures/providers/gemini_404_model_not_found.http"),
                404,
            ),
        ] {
            let outcome = run(text);
            assert!(
                matches!(outcome.result, Err(Failure::Rejected { status: s, .. }) if s == status),
                "{:?}",
                outcome.result
            );
        }
    }

    #[test]
    fn blocked_prompts_and_safety_stops_reject_the_request() {
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_200_prompt_blocked.http"
        ));
        assert_eq!(
            outcome.result,
            Err(Failure::Rejected {
                status: 200,
                detail: "the prompt was blocked (SAFETY)".to_owned()
            })
        );
        let outcome = run(include_str!(
            "../../tests/fixtures/providers/gemini_200_finish_reason_safety.http"
        ));
        assert_eq!(
            outcome.result,
            Err(Failure::Rejected {
                status: 200,
                detail: "no answer text (finishReason SAFETY)".to_owned()
            })
        );
    }

    #[test]
    fn server_errors_are_transient() {
        for text in [
            include_str!("../../tests/fixtures/providers/gemini_500_internal.http"),
            include_str!("../../tests/fixtures/providers/gemini_503_overloaded.http"),
        ] {
            let outcome = run(text);
            assert!(
                matches!(outcome.result, Err(Failure::Transient { ref detail }) if detail.starts_with("HTTP 50")),
                "{:?}",
                outcome.result
            );
        }
        let outcome = classify(
            504,
            &HeaderMap::new(),
            b"upstream timeout",
            &Secret::new(KEY),
        );
        assert_eq!(
            outcome.result,
            Err(Failure::Transient {
                detail: "HTTP 504: upstream timeout".to_owned()
            })
        );
    }

    #[test]
    fn an_unreadable_200_is_transient() {
        let outcome = classify(200, &HeaderMap::new(), b"<html>", &Secret::new(KEY));
        assert!(matches!(outcome.result, Err(Failure::Transient { .. })));
    }

    #[test]
    fn the_key_goes_in_a_header_never_in_the_url() {
        let req = ChatRequest {
            model: "gemini-2.0-flash".to_owned(),
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "Be brief.".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: "Hola".to_owned(),
                },
                ChatMessage {
                    role: "assistant".to_owned(),
                    content: "¡Hola!".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: "¿Qué tal?".to_owned(),
                },
            ],
            max_tokens: Some(256),
            temperature: Some(0.5),
            top_p: None,
            stop: vec!["END".to_owned()],
        };
        let wire = build(
            "https://generativelanguage.googleapis.com/v1beta",
            &Secret::new(KEY),
            &req,
        )
        .expect("builds");
        assert_eq!(
            wire.url,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
        );
        assert!(!wire.url.contains("key"));
        let header = &wire.headers[API_KEY_HEADER];
        assert_eq!(header.to_str().ok(), Some(KEY));
        assert!(header.is_sensitive());
        assert_eq!(
            wire.body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Hola"}]},
                    {"role": "model", "parts": [{"text": "¡Hola!"}]},
                    {"role": "user", "parts": [{"text": "¿Qué tal?"}]}
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {"maxOutputTokens": 256, "temperature": 0.5, "stopSequences": ["END"]}
            })
        );
    }

    #[test]
    fn absent_options_leave_no_generation_config() {
        let req = ChatRequest {
            model: "gemini-2.0-flash".to_owned(),
            messages: vec![ChatMessage {
                role: "user".to_owned(),
                content: "Hola".to_owned(),
            }],
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
        };
        let wire = build("http://x/v1beta", &Secret::new(KEY), &req).expect("builds");
        assert_eq!(
            wire.body,
            json!({"contents": [{"role": "user", "parts": [{"text": "Hola"}]}]})
        );
    }
}
