//! The OpenAI-compatible `/chat/completions` wire format (Groq, OpenAI, OpenRouter,
//! llama.cpp, vLLM…): the request it takes, and every answer classified from the
//! status, the `x-ratelimit-*` headers and the `{"error":{message,type,code}}` body.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    CallOutcome, ChatRequest, Completion, Failure, LimitDimension, LimitScope, NO_HTTP_STATUS,
    RateLimitHeaders, Usage, Violation, WireRequest, body_detail, parse_go_duration,
};
use crate::secret::Secret;

/// `POST {base_url}/chat/completions` with the key as a bearer token.
pub(super) fn build(
    base_url: &str,
    key: &Secret,
    req: &ChatRequest,
) -> Result<WireRequest, Failure> {
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
        Failure::KeyRejected {
            status: NO_HTTP_STATUS,
            detail: "the key holds characters that cannot go in an HTTP header".to_owned(),
        }
    })?;
    auth.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, auth);
    Ok(WireRequest {
        url: format!("{base_url}/chat/completions"),
        headers,
        body: body(req),
    })
}

/// The JSON body; absent options are left out so that the provider's defaults apply
/// (some servers refuse `null` where they expect a number).
fn body(req: &ChatRequest) -> Value {
    let mut body = Map::new();
    body.insert("model".to_owned(), json!(req.model));
    body.insert("messages".to_owned(), json!(req.messages));
    if let Some(max_tokens) = req.max_tokens {
        body.insert("max_tokens".to_owned(), json!(max_tokens));
    }
    if let Some(temperature) = req.temperature {
        body.insert("temperature".to_owned(), json!(temperature));
    }
    if let Some(top_p) = req.top_p {
        body.insert("top_p".to_owned(), json!(top_p));
    }
    if !req.stop.is_empty() {
        body.insert("stop".to_owned(), json!(req.stop));
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
struct ChatResponse {
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Message>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

fn completion(status: u16, body: &[u8], key: &Secret) -> Result<Completion, Failure> {
    let unreadable = |why: &str| Failure::Transient {
        detail: format!("{why}: {}", body_detail(key, status, None, body)),
    };
    let response: ChatResponse =
        serde_json::from_slice(body).map_err(|_| unreadable("unreadable answer"))?;
    let usage = response.usage.map_or_else(Usage::default, |u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
    });
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| unreadable("answer without choices"))?;
    match choice.message.and_then(|m| m.content) {
        Some(content) => Ok(Completion { content, usage }),
        // Azure and some proxies withhold the text of a filtered answer: asking
        // again with another key gives the same.
        None if choice.finish_reason.as_deref() == Some("content_filter") => {
            Err(Failure::Rejected {
                status,
                detail: "the provider's content filter withheld the answer".to_owned(),
            })
        }
        None => Err(unreadable("answer without content")),
    }
}

/// The provider's error object. Compatible servers differ: `code` is a string
/// (OpenAI, Groq), a number (llama.cpp, OpenRouter) or null, and a few send
/// `{"error": "text"}`.
#[derive(Default)]
struct ApiError {
    message: Option<String>,
    kind: Option<String>,
    code: Option<String>,
}

impl ApiError {
    fn parse(body: &[u8]) -> Self {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return Self::default();
        };
        let text = |v: &Value| v.as_str().map(str::to_owned);
        match value.get("error") {
            Some(Value::String(message)) => Self {
                message: Some(message.clone()),
                ..Self::default()
            },
            Some(error) => Self {
                message: error.get("message").and_then(text),
                kind: error.get("type").and_then(text),
                code: error.get("code").and_then(text),
            },
            None => Self::default(),
        }
    }

    fn says(&self, what: &str) -> bool {
        self.code.as_deref() == Some(what) || self.kind.as_deref() == Some(what)
    }

    fn message_starts_with(&self, prefix: &str) -> bool {
        self.message
            .as_deref()
            .is_some_and(|m| m.trim_start().to_ascii_lowercase().starts_with(prefix))
    }
}

fn failure(status: u16, limits: &RateLimitHeaders, body: &[u8], key: &Secret) -> Failure {
    let error = ApiError::parse(body);
    let detail = body_detail(key, status, error.message.as_deref(), body);
    match status {
        429 if error.says("insufficient_quota") => Failure::QuotaGone { detail },
        // OpenAI answers a single request above the minute's token limit with 429,
        // Groq with 413; both begin "Request too large". Waiting does not help.
        429 | 413 if error.message_starts_with("request too large") => Failure::TooLarge { detail },
        429 => Failure::RateLimited {
            retry_after: retry_after(limits, &error),
            scope: scope(error.message.as_deref().unwrap_or_default()),
            violations: violation(&error).into_iter().collect(),
            detail,
        },
        401 | 403 => Failure::KeyRejected { status, detail },
        408 | 500..=599 => Failure::Transient {
            detail: with_status(status, detail),
        },
        400..=499 => Failure::Rejected { status, detail },
        // Informational or redirect statuses: no provider API sends them, so a
        // proxy in between is misbehaving, perhaps only for now.
        _ => Failure::Transient {
            detail: with_status(status, detail),
        },
    }
}

fn with_status(status: u16, detail: String) -> String {
    if detail.starts_with("HTTP ") {
        detail
    } else {
        format!("HTTP {status}: {detail}")
    }
}

/// The wait a 429 asks for, from the clearest signal present: `retry-after`, then
/// the reset of the limit that was hit, then "Please try again in 9m19.008s".
fn retry_after(limits: &RateLimitHeaders, error: &ApiError) -> Option<Duration> {
    if limits.retry_after.is_some() {
        return limits.retry_after;
    }
    let requests_out = limits.remaining_requests == Some(0);
    let tokens_out = limits.remaining_tokens == Some(0);
    // The error's `type` ("requests" or "tokens") names the limit when the
    // remaining counts do not (Groq checks a request's tokens before spending any).
    let (requests, tokens) = match (requests_out, tokens_out) {
        (true, false) => (true, false),
        (false, true) => (false, true),
        _ => match error.kind.as_deref() {
            Some("requests") => (true, false),
            Some("tokens") => (false, true),
            _ => (true, true),
        },
    };
    let reset = [
        limits.reset_requests.filter(|_| requests),
        limits.reset_tokens.filter(|_| tokens),
    ]
    .into_iter()
    .flatten()
    .max();
    reset.or_else(|| error.message.as_deref().and_then(try_again_in))
}

/// "… Please try again in 9m19.008s. …" → 9 min 19.008 s.
fn try_again_in(message: &str) -> Option<Duration> {
    const PHRASE: &str = "try again in ";
    // ASCII lowercasing keeps byte offsets, so `at` indexes `message` too.
    let at = message.to_ascii_lowercase().find(PHRASE)? + PHRASE.len();
    let word = message.get(at..)?.split_whitespace().next()?;
    parse_go_duration(word.trim_end_matches(['.', ',', ';', ')']))
}

/// Groq and OpenAI name the limit in the message: "… on tokens per day (TPD): …",
/// "requests per day (RPD)", against "per minute (TPM)" / "per min (RPM)".
fn scope(message: &str) -> LimitScope {
    let message = message.to_ascii_lowercase();
    if message.contains("per day") || message.contains("(rpd)") || message.contains("(tpd)") {
        LimitScope::Day
    } else {
        LimitScope::Minute
    }
}

/// Words in a 429 message that name what the refusing limit counts, the clearest first.
const DIMENSION_WORDS: [(&str, LimitDimension); 6] = [
    ("(rpm)", LimitDimension::Requests),
    ("(rpd)", LimitDimension::Requests),
    ("(tpm)", LimitDimension::Tokens),
    ("(tpd)", LimitDimension::Tokens),
    ("requests per", LimitDimension::Requests),
    ("tokens per", LimitDimension::Tokens),
];

/// The limit a 429 names. Groq and OpenAI write "… on tokens per minute (TPM): Limit
/// 6000, Used 5800, Requested 400. …"; where the message names no limit, the error's
/// `type` ("requests" or "tokens") still says what it counts. `None` when nothing does.
fn violation(error: &ApiError) -> Option<Violation> {
    // ASCII lowercasing keeps byte offsets, so positions found here index it throughout.
    let message = error
        .message
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let named = DIMENSION_WORDS.iter().find_map(|(words, dimension)| {
        message.find(words).map(|at| (*dimension, at + words.len()))
    });
    let (dimension, from) = match named {
        Some(found) => found,
        None => match error.kind.as_deref() {
            Some("requests") => (LimitDimension::Requests, 0),
            Some("tokens") => (LimitDimension::Tokens, 0),
            _ => return None,
        },
    };
    Some(Violation {
        scope: scope(&message),
        dimension,
        limit: message.get(from..).and_then(stated_limit),
    })
}

/// "…: Limit 6000, Used 5800 …" → 6000: the first "limit" followed by a number (so
/// that the "Rate limit reached" every message opens with is passed over).
fn stated_limit(text: &str) -> Option<u64> {
    text.match_indices("limit").find_map(|(at, word)| {
        let rest = text.get(at + word.len()..)?.trim_start_matches([' ', ':']);
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest.get(..digits)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ChatMessage;
    use crate::provider::test_support::{Fixture, fixture, violation, violations};

    const GROQ_KEY: &str = "gsk_TestKey0123456789abcdefghijklmnopqrstuvwxyzABCD";
    const OPENAI_KEY: &str = "sk-proj-abcTestKeyThatMustNeverBePrinted0123456789wxyz";

    fn run(fixture: &Fixture, key: &str) -> CallOutcome {
        classify(
            fixture.status,
            &fixture.headers,
            fixture.body.as_bytes(),
            &Secret::new(key),
        )
    }

    /// The wait and scope of a `RateLimited` outcome; panics on anything else.
    fn rate_limited(outcome: &CallOutcome) -> (Option<Duration>, LimitScope) {
        match &outcome.result {
            Err(Failure::RateLimited {
                retry_after, scope, ..
            }) => (*retry_after, *scope),
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    fn named(scope: LimitScope, dimension: LimitDimension, limit: Option<u64>) -> Vec<Violation> {
        vec![violation(scope, dimension, limit)]
    }

    /// A 429 with this error body and no headers.
    fn refused(body: &str) -> CallOutcome {
        classify(
            429,
            &HeaderMap::new(),
            body.as_bytes(),
            &Secret::new(GROQ_KEY),
        )
    }

    fn groq(name: &str) -> CallOutcome {
        run(&fixture(name), GROQ_KEY)
    }

    #[test]
    fn groq_success_gives_content_usage_and_budget_headers() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_200_chat_completion.http"
        ));
        assert_eq!(
            outcome.result,
            Ok(Completion {
                content: "¡Hola! ¿En qué puedo ayudarte hoy?".to_owned(),
                usage: Usage {
                    prompt_tokens: 21,
                    completion_tokens: 9
                },
            })
        );
        assert_eq!(
            outcome.headers,
            RateLimitHeaders {
                limit_requests: Some(1000),
                remaining_requests: Some(812),
                reset_requests: Some(Duration::from_millis(2 * 60_000 + 59_560)),
                limit_tokens: Some(12000),
                remaining_tokens: Some(11979),
                reset_tokens: Some(Duration::from_millis(105)),
                retry_after: None,
            }
        );
    }

    #[test]
    fn groq_429_tokens_per_minute_waits_for_retry_after() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_429_tpm_with_headers.http"
        ));
        let Err(Failure::RateLimited {
            retry_after,
            scope,
            violations,
            detail,
        }) = outcome.result
        else {
            panic!("expected RateLimited, got {:?}", outcome.result);
        };
        assert_eq!(scope, LimitScope::Minute);
        assert_eq!(retry_after, Some(Duration::from_secs(5)));
        assert_eq!(
            violations,
            named(LimitScope::Minute, LimitDimension::Tokens, Some(12000))
        );
        assert!(detail.contains("tokens per minute (TPM)"), "{detail}");
        assert_eq!(outcome.headers.remaining_tokens, Some(10766));
        assert_eq!(
            outcome.headers.reset_tokens,
            Some(Duration::from_millis(4770))
        );
    }

    #[test]
    fn groq_429_requests_per_day_is_a_daily_limit() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_429_rpd.http"
        ));
        let (retry_after, scope) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Day);
        assert_eq!(retry_after, Some(Duration::from_secs(52)));
        assert_eq!(
            violations(&outcome),
            named(LimitScope::Day, LimitDimension::Requests, Some(1000))
        );
        assert_eq!(outcome.headers.remaining_requests, Some(0));
    }

    #[test]
    fn groq_429_tokens_per_day_without_headers_reads_the_message() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_429_tpd_body_only.http"
        ));
        let (retry_after, scope) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Day);
        assert_eq!(
            retry_after,
            Some(Duration::from_millis(9 * 60_000 + 38_016))
        );
        assert_eq!(
            violations(&outcome),
            named(LimitScope::Day, LimitDimension::Tokens, Some(100_000))
        );
    }

    #[test]
    fn openai_429_per_minute_uses_the_reset_of_the_limit_hit() {
        let outcome = run(
            &fixture(include_str!(
                "../../tests/fixtures/providers/openai_429_rpm_reset_headers.http"
            )),
            OPENAI_KEY,
        );
        let (retry_after, scope) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Minute);
        // remaining-requests is 0: the requests' reset, not the tokens' one.
        assert_eq!(retry_after, Some(Duration::from_secs(20)));
        // "per min (RPM): Limit 3".
        assert_eq!(
            violations(&outcome),
            named(LimitScope::Minute, LimitDimension::Requests, Some(3))
        );
    }

    #[test]
    fn groq_429_names_the_limit_and_its_value() {
        let rpm = refused(
            r#"{"error":{"message":"Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01fake` service tier `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s. Need more requests? Upgrade to Dev Tier today at https://console.groq.com/settings/billing","type":"requests","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(
            violations(&rpm),
            named(LimitScope::Minute, LimitDimension::Requests, Some(30))
        );
        let tpm = refused(
            r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01fake` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5800, Requested 400. Please try again in 2s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing","type":"tokens","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(
            violations(&tpm),
            named(LimitScope::Minute, LimitDimension::Tokens, Some(6000))
        );
    }

    #[test]
    fn a_429_without_a_stated_limit_names_what_it_can() {
        // The error's type names the dimension; no number follows any "limit".
        let typed = refused(
            r#"{"error":{"message":"Rate limit reached, please slow down","type":"tokens"}}"#,
        );
        assert_eq!(
            violations(&typed),
            named(LimitScope::Minute, LimitDimension::Tokens, None)
        );
        // The words alone, as a compatible server may write them.
        let worded =
            refused(r#"{"error":{"message":"Too many requests per minute for this key"}}"#);
        assert_eq!(
            violations(&worded),
            named(LimitScope::Minute, LimitDimension::Requests, None)
        );
        // Nothing names a limit: no violation, only the wait.
        let bare = refused(r#"{"error":{"message":"Too Many Requests"}}"#);
        assert_eq!(violations(&bare), []);
        assert_eq!(violations(&refused("slow down")), []);
    }

    #[test]
    fn groq_413_request_too_large_skips_the_key_for_that_size() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_413_request_too_large.http"
        ));
        assert!(
            matches!(outcome.result, Err(Failure::TooLarge { ref detail }) if detail.contains("Limit 12000, Requested 14137")),
            "{:?}",
            outcome.result
        );
    }

    #[test]
    fn openai_429_request_too_large_is_too_large_not_a_wait() {
        let outcome = run(
            &fixture(include_str!(
                "../../tests/fixtures/providers/openai_429_request_too_large.http"
            )),
            OPENAI_KEY,
        );
        assert!(
            matches!(outcome.result, Err(Failure::TooLarge { .. })),
            "{:?}",
            outcome.result
        );
    }

    #[test]
    fn openai_insufficient_quota_is_quota_gone() {
        let outcome = run(
            &fixture(include_str!(
                "../../tests/fixtures/providers/openai_429_insufficient_quota.http"
            )),
            OPENAI_KEY,
        );
        assert!(
            matches!(outcome.result, Err(Failure::QuotaGone { ref detail }) if detail.starts_with("You exceeded your current quota")),
            "{:?}",
            outcome.result
        );
    }

    #[test]
    fn openai_401_never_repeats_the_partial_key() {
        let outcome = run(
            &fixture(include_str!(
                "../../tests/fixtures/providers/openai_401_incorrect_api_key.http"
            )),
            OPENAI_KEY,
        );
        let Err(Failure::KeyRejected { status, detail }) = outcome.result else {
            panic!("expected KeyRejected, got {:?}", outcome.result);
        };
        assert_eq!(status, 401);
        assert!(
            detail.starts_with("Incorrect API key provided: [redacted]."),
            "{detail}"
        );
        for fragment in ["sk-proj-abc", "wxyz", "***"] {
            assert!(!detail.contains(fragment), "{fragment} in {detail}");
        }
    }

    #[test]
    fn a_key_echoed_whole_is_scrubbed() {
        let body = format!(
            r#"{{"error":{{"message":"Invalid API Key {GROQ_KEY}","type":"invalid_request_error","code":"invalid_api_key"}}}}"#
        );
        let outcome = classify(
            401,
            &HeaderMap::new(),
            body.as_bytes(),
            &Secret::new(GROQ_KEY),
        );
        let Err(failure) = outcome.result else {
            panic!("expected a failure");
        };
        assert!(!failure.to_string().contains("TestKey"), "{failure}");
    }

    #[test]
    fn groq_401_invalid_key_is_key_rejected() {
        let outcome = groq(include_str!(
            "../../tests/fixtures/providers/groq_401_invalid_api_key.http"
        ));
        assert_eq!(
            outcome.result,
            Err(Failure::KeyRejected {
                status: 401,
                detail: "Invalid API Key".to_owned()
            })
        );
    }

    #[test]
    fn groq_400_and_404_reject_the_request_not_the_key() {
        for (text, status) in [
            (
                include_str!("../../tests/fixtures/providers/groq_400_model_decommissioned.http"),
                400,
            ),
            (
                include_str!("../../tests/fixtures/providers/groq_404_model_not_found.http"),
                404,
            ),
        ] {
            let outcome = groq(text);
            assert!(
                matches!(outcome.result, Err(Failure::Rejected { status: s, .. }) if s == status),
                "{:?}",
                outcome.result
            );
        }
    }

    #[test]
    fn server_errors_and_timeouts_are_transient() {
        for text in [
            include_str!("../../tests/fixtures/providers/groq_500_internal_server_error.http"),
            include_str!("../../tests/fixtures/providers/groq_503_over_capacity.http"),
        ] {
            let outcome = groq(text);
            assert!(
                matches!(outcome.result, Err(Failure::Transient { ref detail }) if detail.starts_with("HTTP 5")),
                "{:?}",
                outcome.result
            );
        }
        let outcome = classify(408, &HeaderMap::new(), b"", &Secret::new(GROQ_KEY));
        assert_eq!(
            outcome.result,
            Err(Failure::Transient {
                detail: "HTTP 408 with an empty body".to_owned()
            })
        );
    }

    #[test]
    fn a_200_that_is_not_a_completion_is_transient() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":{"role":"assistant","content":null},"finish_reason":"stop"}]}"#,
        ] {
            let outcome = classify(200, &HeaderMap::new(), body, &Secret::new(GROQ_KEY));
            assert!(
                matches!(outcome.result, Err(Failure::Transient { .. })),
                "{:?}",
                outcome.result
            );
        }
    }

    #[test]
    fn error_bodies_are_cut_short() {
        let body = format!(
            r#"{{"error":{{"message":"{}","type":"x"}}}}"#,
            "a".repeat(5000)
        );
        let outcome = classify(
            400,
            &HeaderMap::new(),
            body.as_bytes(),
            &Secret::new(GROQ_KEY),
        );
        let Err(Failure::Rejected { detail, .. }) = outcome.result else {
            panic!("expected Rejected");
        };
        assert_eq!(
            detail.chars().count(),
            crate::provider::DETAIL_MAX_CHARS + 1
        );
    }

    fn request() -> ChatRequest {
        ChatRequest {
            model: "llama-3.3-70b-versatile".to_owned(),
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "Be brief.".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: "Hola".to_owned(),
                },
            ],
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
        }
    }

    #[test]
    fn body_leaves_out_absent_options() {
        let wire = build(
            "https://api.groq.com/openai/v1",
            &Secret::new(GROQ_KEY),
            &request(),
        )
        .expect("builds");
        assert_eq!(wire.url, "https://api.groq.com/openai/v1/chat/completions");
        assert_eq!(
            wire.body,
            json!({
                "model": "llama-3.3-70b-versatile",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hola"}
                ]
            })
        );
        let auth = &wire.headers[AUTHORIZATION];
        assert_eq!(
            auth.to_str().ok(),
            Some(format!("Bearer {GROQ_KEY}").as_str())
        );
        assert!(auth.is_sensitive());
        assert!(!format!("{:?}", wire.headers).contains("TestKey"));
    }

    #[test]
    fn body_carries_every_given_option() {
        let req = ChatRequest {
            max_tokens: Some(512),
            temperature: Some(0.5),
            top_p: Some(0.25),
            stop: vec!["\n\n".to_owned()],
            ..request()
        };
        let wire = build("http://x/v1", &Secret::new(GROQ_KEY), &req).expect("builds");
        assert_eq!(wire.body["max_tokens"], json!(512));
        assert_eq!(wire.body["temperature"], json!(0.5));
        assert_eq!(wire.body["top_p"], json!(0.25));
        assert_eq!(wire.body["stop"], json!(["\n\n"]));
    }

    #[test]
    fn a_key_unfit_for_a_header_is_rejected_before_sending() {
        let result = build("http://x/v1", &Secret::new("gsk_a\u{7}b"), &request());
        assert!(matches!(
            result,
            Err(Failure::KeyRejected {
                status: NO_HTTP_STATUS,
                ..
            })
        ));
    }

    #[test]
    fn try_again_in_reads_go_durations_from_messages() {
        assert_eq!(
            try_again_in("Please try again in 9m19.008s. Visit https://x"),
            Some(Duration::from_millis(559_008))
        );
        assert_eq!(
            try_again_in("try again in 2.5s"),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            try_again_in("Please try again in 644ms."),
            Some(Duration::from_millis(644))
        );
        assert_eq!(try_again_in("Please try again later."), None);
    }
}
