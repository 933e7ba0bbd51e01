//! Talking to LLM providers: one file per wire format. Each call's outcome is
//! classified here into what the rotator needs to decide (never a string to grep).

mod gemini;
mod openai;

/// The integration tests' fake Groq and Gemini, included here too, so that the unit tests and
/// the integration tests speak to one fake with one behaviour.
#[cfg(test)]
#[path = "../../tests/it/fake_provider.rs"]
mod fake_provider;

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::config::{ProviderConfig, ProviderKind};
use crate::secret::Secret;

/// One chat message, OpenAI format (`role`: system, user or assistant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A chat request in provider-neutral form; each wire format maps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a response's `x-ratelimit-*` and `retry-after` headers said (any status).
/// Groq: `-requests` is the day's request budget and `-tokens` the minute's token
/// budget; OpenAI: both per minute. The ledger tells them apart by the reset delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitHeaders {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
    pub retry_after: Option<Duration>,
}

/// Which window a rate limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// Per-minute (or shorter): comes back after the given delay.
    Minute,
    /// Per-day: comes back at the daily reset, whatever the delay says.
    Day,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitDimension {
    Requests,
    Tokens,
}

/// One limit a 429 names as the one that refused (Groq's "on requests per minute
/// (RPM): Limit 30", a Gemini `QuotaFailure` violation): what the ledger learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub scope: LimitScope,
    pub dimension: LimitDimension,
    /// The limit's value, when the provider stated it.
    pub limit: Option<u64>,
}

/// A failed call, classified for the rotator. Every `detail` is scrubbed of secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// 429: this key (for this model) is out of budget for now.
    #[error("rate limited ({scope:?}): {detail}")]
    RateLimited {
        /// The wait the provider gave, from whichever signal it sent.
        retry_after: Option<Duration>,
        scope: LimitScope,
        /// The limits the provider named; empty when it named none it could be read from.
        violations: Vec<Violation>,
        detail: String,
    },
    /// 413 "Request too large": this request exceeds this key's per-minute token limit.
    #[error("request too large for this key: {detail}")]
    TooLarge { detail: String },
    /// 401/403, Gemini's `API_KEY_INVALID`: the key itself is refused.
    #[error("key rejected ({status}): {detail}")]
    KeyRejected { status: u16, detail: String },
    /// OpenAI's `insufficient_quota`: no budget left on the account, not coming back by itself.
    #[error("quota gone: {detail}")]
    QuotaGone { detail: String },
    /// 400 and the like: the request itself is refused; no key is to blame.
    #[error("request rejected ({status}): {detail}")]
    Rejected { status: u16, detail: String },
    /// Timeouts, connection errors, 5xx, unreadable answers: may succeed if retried.
    #[error("transient failure: {detail}")]
    Transient { detail: String },
}

/// One call's result, with what the headers said whatever the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOutcome {
    pub result: Result<Completion, Failure>,
    pub headers: RateLimitHeaders,
}

/// How long establishing a TCP (and TLS) connection may take. It matters only while
/// smaller than the provider's whole-request timeout (`timeout_secs`, which bounds the
/// connection too): then an unreachable host is reported as such, and early.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest provider text (error message or body) kept in a [`Failure`]'s `detail`:
/// enough to say what went wrong, short enough for a log line or an MQTT reply.
pub const DETAIL_MAX_CHARS: usize = 300;

/// Largest response body read from a provider. A chat answer is a few KiB; a
/// broken proxy streaming without end must not fill a Pi's memory.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The `status` of a [`Failure::KeyRejected`] raised before any HTTP exchange: the key
/// cannot even be written into a request header.
pub const NO_HTTP_STATUS: u16 = 0;

impl RateLimitHeaders {
    /// Reads the `x-ratelimit-*` and `retry-after` headers; a header that is absent
    /// or unreadable is `None` (a provider's word is used only when it is clear).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let count = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
        let delay = |name: &str| text(name).and_then(parse_go_duration);
        Self {
            limit_requests: count("x-ratelimit-limit-requests"),
            remaining_requests: count("x-ratelimit-remaining-requests"),
            reset_requests: delay("x-ratelimit-reset-requests"),
            limit_tokens: count("x-ratelimit-limit-tokens"),
            remaining_tokens: count("x-ratelimit-remaining-tokens"),
            reset_tokens: delay("x-ratelimit-reset-tokens"),
            // Seconds, possibly fractional; the HTTP-date form is ignored, since the
            // reset headers or the message say the same when it matters.
            retry_after: text("retry-after").and_then(parse_seconds),
        }
    }
}

/// Parses a Go-style duration as OpenAI and Groq send them (`2m59.56s`, `6m0s`,
/// `7.66s`, `12ms`, `1h2m3s`), the protobuf JSON form Gemini uses (`37s`, `0.5s`),
/// or plain seconds (`1`, `2.5`). `None` for anything else, negatives included.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Some(plain) = parse_seconds(text) {
        return Some(plain);
    }
    let mut rest = text;
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let seconds_per_unit = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * seconds_per_unit;
        rest = next;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Non-negative seconds written as a plain number (`retry-after: 2`, `1.5`).
fn parse_seconds(text: &str) -> Option<Duration> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    Duration::try_from_secs_f64(text.parse().ok()?).ok()
}

/// Why a [`ProviderClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProviderBuildError {
    /// reqwest panics without one; `main` installs ring's before any client is built.
    #[error(
        "no TLS crypto provider is installed for the process (install rustls' ring provider first)"
    )]
    NoCryptoProvider,
    #[error("cannot build the HTTP client for provider {provider}: {reason}")]
    Http { provider: String, reason: String },
}

/// An HTTP client for one configured provider, speaking its wire format.
#[derive(Debug, Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
    kind: ProviderKind,
    base_url: String,
}

/// A request in wire form, built without I/O so that what is sent can be tested.
#[derive(Debug)]
pub(crate) struct WireRequest {
    pub url: String,
    /// Values carrying a secret are marked sensitive, so that they never print.
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

impl ProviderClient {
    pub fn new(cfg: &ProviderConfig) -> Result<Self, ProviderBuildError> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(ProviderBuildError::NoCryptoProvider);
        }
        let http = reqwest::Client::builder()
            // Nagle would hold each small request back ~40 ms waiting for an ACK.
            .tcp_nodelay(true)
            .timeout(cfg.timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("keyrelay/", env!("CARGO_PKG_VERSION")))
            // reqwest drops `Authorization` on a cross-host redirect but not
            // `x-goog-api-key`; provider APIs do not redirect, so follow none.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ProviderBuildError::Http {
                provider: cfg.name.clone(),
                reason: error_chain(&e.without_url()),
            })?;
        Ok(Self {
            http,
            kind: cfg.kind,
            base_url: cfg.base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// Sends one chat request with `key` and classifies the answer. Never fails
    /// otherwise: every problem, network ones included, is a [`Failure`].
    pub async fn chat(&self, key: &Secret, req: &ChatRequest) -> CallOutcome {
        let wire = match self.kind {
            ProviderKind::OpenAi => openai::build(&self.base_url, key, req),
            ProviderKind::Gemini => gemini::build(&self.base_url, key, req),
        };
        let wire = match wire {
            Ok(wire) => wire,
            Err(failure) => return failed(failure),
        };
        let sent = self
            .http
            .post(&wire.url)
            .headers(wire.headers)
            .json(&wire.body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => return failed(transport_failure(key, e)),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match read_body(&mut response).await {
            Ok(body) => body,
            Err(e) => {
                return CallOutcome {
                    result: Err(transport_failure(key, e)),
                    headers: RateLimitHeaders::from_headers(&headers),
                };
            }
        };
        let Some(body) = body else {
            return CallOutcome {
                result: Err(Failure::Transient {
                    detail: format!(
                        "HTTP {status}: response larger than {MAX_RESPONSE_BYTES} bytes"
                    ),
                }),
                headers: RateLimitHeaders::from_headers(&headers),
            };
        };
        match self.kind {
            ProviderKind::OpenAi => openai::classify(status, &headers, &body, key),
            ProviderKind::Gemini => gemini::classify(status, &headers, &body, key),
        }
    }
}

/// The body, or `None` when it exceeds [`MAX_RESPONSE_BYTES`].
async fn read_body(response: &mut reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn failed(failure: Failure) -> CallOutcome {
    CallOutcome {
        result: Err(failure),
        headers: RateLimitHeaders::default(),
    }
}

/// Timeouts, refused connections, TLS failures, bodies cut short: all may pass.
fn transport_failure(key: &Secret, error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "HTTP exchange failed"
    };
    Failure::Transient {
        detail: detail(key, &format!("{what}: {}", error_chain(&error))),
    }
}

/// An error and its sources in one line; reqwest's own message alone ("error
/// sending request") does not say what happened.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Provider text made fit for a [`Failure`]'s `detail`: the key and anything that
/// looks like part of a key removed, then cut to [`DETAIL_MAX_CHARS`]. Scrubbing
/// comes first, so that a cut cannot leave half a key behind.
pub(crate) fn detail(key: &Secret, text: &str) -> String {
    let scrubbed = redact_key_fragments(&key.scrub(text));
    let trimmed = scrubbed.trim();
    if trimmed.chars().count() <= DETAIL_MAX_CHARS {
        trimmed.to_owned()
    } else {
        let mut cut: String = trimmed.chars().take(DETAIL_MAX_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Prefixes of the providers' key formats (OpenAI, Groq, Google, xAI).
const KEY_PREFIXES: [&str; 5] = ["sk-", "sk_", "gsk_", "AIza", "xai-"];

/// Shortest word taken for a key by its prefix alone; shorter ones are ordinary words.
const KEY_FRAGMENT_MIN_CHARS: usize = 12;

/// Replaces words that are masked keys (OpenAI's "Incorrect API key provided:
/// sk-abc***xyz" keeps the first and last characters of the real key) or look like
/// another key, which [`Secret::scrub`] cannot know about.
fn redact_key_fragments(text: &str) -> String {
    const EDGES: &[char] = &[
        '.', ',', ';', ':', '!', '?', '\'', '"', '`', '(', ')', '[', ']', '{', '}', '<', '>',
    ];
    let mut out = String::with_capacity(text.len());
    for piece in text.split_inclusive(char::is_whitespace) {
        let word_end = piece.trim_end_matches(char::is_whitespace).len();
        let (word, space) = piece.split_at(word_end);
        let core = word.trim_matches(EDGES);
        let masked = core.contains("**");
        let key_like = core.chars().count() >= KEY_FRAGMENT_MIN_CHARS
            && KEY_PREFIXES.iter().any(|p| core.starts_with(p));
        if !core.is_empty() && (masked || key_like) {
            out.push_str(&word.replacen(core, "[redacted]", 1));
        } else {
            out.push_str(word);
        }
        out.push_str(space);
    }
    out
}

/// What a failed call's body said, as `detail`: the provider's message when it
/// sent its error format, else the body itself.
pub(crate) fn body_detail(key: &Secret, status: u16, message: Option<&str>, body: &[u8]) -> String {
    match message {
        Some(message) => detail(key, message),
        None => {
            let text = String::from_utf8_lossy(body);
            if text.trim().is_empty() {
                format!("HTTP {status} with an empty body")
            } else {
                detail(key, &format!("HTTP {status}: {text}"))
            }
        }
    }
}

/// Recorded provider answers (`tests/fixtures/providers/*.http`) read back for tests,
/// and what both classifiers' tests look at in a 429.
#[cfg(test)]
pub(crate) mod test_support {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

    use super::{CallOutcome, Failure, LimitDimension, LimitScope, Violation};

    /// The limits a `RateLimited` outcome names; panics on anything else.
    pub(crate) fn violations(outcome: &CallOutcome) -> &[Violation] {
        match &outcome.result {
            Err(Failure::RateLimited { violations, .. }) => violations,
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    pub(crate) fn violation(
        scope: LimitScope,
        dimension: LimitDimension,
        limit: Option<u64>,
    ) -> Violation {
        Violation {
            scope,
            dimension,
            limit,
        }
    }

    /// One HTTP response as a provider sent it.
    pub(crate) struct Fixture {
        pub status: u16,
        pub headers: HeaderMap,
        pub body: String,
    }

    /// Parses `HTTP/1.1 429 Too Many Requests`, `name: value` lines, a blank line, the body.
    pub(crate) fn fixture(text: &str) -> Fixture {
        let (head, body) = text
            .split_once("\n\n")
            .expect("a blank line after the headers");
        let mut lines = head.lines();
        let status_line = lines.next().expect("a status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        let mut headers = HeaderMap::new();
        for line in lines {
            let (name, value) = line.split_once(':').expect("name: value");
            headers.append(
                HeaderName::from_bytes(name.trim().as_bytes()).expect("header name"),
                HeaderValue::from_str(value.trim()).expect("header value"),
            );
        }
        Fixture {
            status,
            headers,
            body: body.trim_end().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::fake_provider::{FAKE_COMPLETION_TOKENS, FakeKind, FakeLimits, FakeProvider};
    use super::*;
    use crate::config::DailyReset;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("2m59.56s"), Some(ms(179_560)));
        assert_eq!(parse_go_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_go_duration("7.66s"), Some(ms(7_660)));
        assert_eq!(parse_go_duration("12ms"), Some(ms(12)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(ms(3_723_000)));
        assert_eq!(parse_go_duration("9m19.008s"), Some(ms(559_008)));
        assert_eq!(parse_go_duration("1"), Some(ms(1_000)));
        assert_eq!(parse_go_duration("2.5"), Some(ms(2_500)));
        assert_eq!(parse_go_duration(" 0s "), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("37s"), Some(ms(37_000)));
        assert_eq!(parse_go_duration("0.5s"), Some(ms(500)));
        assert_eq!(
            parse_go_duration("1.234567s"),
            Some(Duration::from_micros(1_234_567))
        );
        assert_eq!(parse_go_duration("1m30.002s"), Some(ms(90_002)));
        assert_eq!(parse_go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("250µs"), Some(Duration::from_micros(250)));
        for bad in [
            "",
            "s",
            "-1s",
            "-1",
            "1d",
            "1.2.3s",
            "abc",
            "5 s",
            ".s",
            "Fri, 31 Dec 1999 23:59:59 GMT",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_in_seconds_only() {
        let parse = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", value.parse().expect("a header value"));
            RateLimitHeaders::from_headers(&headers).retry_after
        };
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse("soon"), None);
    }

    #[test]
    fn details_lose_keys_whole_masked_or_unknown() {
        let key = Secret::new("gsk_RealKey0123456789");
        assert_eq!(
            detail(&key, "bad key gsk_RealKey0123456789 given"),
            "bad key [redacted] given"
        );
        assert_eq!(
            detail(
                &key,
                "Incorrect API key provided: sk-abc***xyz. You can find"
            ),
            "Incorrect API key provided: [redacted]. You can find"
        );
        assert_eq!(
            detail(&key, "other key 'sk-proj-OtherKey98765' refused"),
            "other key '[redacted]' refused"
        );
        // Ordinary words with a key's prefix stay.
        assert_eq!(detail(&key, "sk-learn failed"), "sk-learn failed");
    }

    fn config(kind: ProviderKind, base_url: &str, timeout: Duration) -> ProviderConfig {
        ProviderConfig {
            name: "test".to_owned(),
            kind,
            base_url: base_url.to_owned(),
            daily_reset: DailyReset::Rolling,
            timeout,
            max_concurrency: crate::config::DEFAULT_MAX_CONCURRENCY,
            models: BTreeMap::new(),
            keys: Vec::new(),
        }
    }

    fn client(kind: ProviderKind, base_url: &str, timeout: Duration) -> ProviderClient {
        let _ = rustls::crypto::ring::default_provider().install_default();
        ProviderClient::new(&config(kind, base_url, timeout)).expect("client")
    }

    fn hola(model: &str) -> ChatRequest {
        ChatRequest {
            model: model.to_owned(),
            messages: vec![ChatMessage {
                role: "user".to_owned(),
                content: "Hola".to_owned(),
            }],
            max_tokens: Some(64),
            temperature: None,
            top_p: None,
            stop: Vec::new(),
        }
    }

    #[tokio::test]
    async fn openai_round_trip_sends_a_bearer_and_reads_the_answer() {
        let fake = FakeProvider::start(FakeKind::Groq).await;
        let key = "gsk_RoundTripKey0123456789";
        fake.add_key(key, FakeLimits::unlimited().rpd(1000));
        let outcome = client(
            ProviderKind::OpenAi,
            &fake.base_url(),
            Duration::from_secs(10),
        )
        .chat(&Secret::new(key), &hola("llama-3.3-70b-versatile"))
        .await;
        let completion = outcome.result.expect("a completion");
        assert_eq!(completion.content, "echo: Hola");
        assert_eq!(completion.usage.completion_tokens, FAKE_COMPLETION_TOKENS);
        assert!(completion.usage.prompt_tokens > 0, "{:?}", completion.usage);
        assert_eq!(outcome.headers.limit_requests, Some(1000));
        assert_eq!(outcome.headers.remaining_requests, Some(999));
        let recorded = fake.recorded();
        let [seen] = recorded.as_slice() else {
            panic!("one request expected, the fake saw {recorded:?}");
        };
        assert_eq!(seen.uri(), "/openai/v1/chat/completions");
        assert_eq!(
            seen.header("authorization"),
            Some("Bearer gsk_RoundTripKey0123456789")
        );
        assert!(
            seen.header("user-agent")
                .is_some_and(|ua| ua.starts_with("keyrelay/"))
        );
        assert_eq!(seen.body["max_tokens"], 64);
        assert!(seen.body.get("temperature").is_none());
    }

    #[tokio::test]
    async fn gemini_round_trip_keeps_the_key_out_of_the_url() {
        let fake = FakeProvider::start(FakeKind::Gemini).await;
        let key = "AIzaRoundTripKey0123456789";
        fake.add_key(key, FakeLimits::unlimited().rpd(1));
        let client = client(
            ProviderKind::Gemini,
            &fake.base_url(),
            Duration::from_secs(10),
        );
        let served = client
            .chat(&Secret::new(key), &hola("gemini-2.0-flash"))
            .await;
        assert!(served.result.is_ok(), "{:?}", served.result);
        let outcome = client
            .chat(&Secret::new(key), &hola("gemini-2.0-flash"))
            .await;
        assert!(
            matches!(
                outcome.result,
                Err(Failure::RateLimited {
                    scope: LimitScope::Day,
                    ..
                })
            ),
            "{:?}",
            outcome.result
        );
        let recorded = fake.recorded();
        assert_eq!(recorded.len(), 2);
        for seen in recorded {
            assert_eq!(
                seen.uri(),
                "/v1beta/models/gemini-2.0-flash:generateContent"
            );
            assert_eq!(
                seen.header("x-goog-api-key"),
                Some("AIzaRoundTripKey0123456789")
            );
            assert!(seen.header("authorization").is_none());
        }
    }

    #[tokio::test]
    async fn an_unreachable_provider_is_transient() {
        // Bind then drop: the port is closed, so the connection is refused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let key = Secret::new("gsk_UnreachableKey0123456789");
        let outcome = client(
            ProviderKind::OpenAi,
            &format!("http://{addr}/v1"),
            Duration::from_secs(10),
        )
        .chat(&key, &hola("m"))
        .await;
        let Err(Failure::Transient { detail }) = outcome.result else {
            panic!("expected Transient, got {:?}", outcome.result);
        };
        assert!(detail.starts_with("cannot connect"), "{detail}");
        assert!(!detail.contains("127.0.0.1"), "no URL in {detail}");
    }

    #[tokio::test]
    async fn a_provider_slower_than_the_timeout_is_transient() {
        let fake = FakeProvider::start(FakeKind::Gemini).await;
        let key = "AIzaSlowKey0123456789";
        fake.add_key(key, FakeLimits::unlimited());
        fake.delay(key, Duration::from_secs(30));
        let outcome = client(
            ProviderKind::Gemini,
            &fake.base_url(),
            Duration::from_millis(200),
        )
        .chat(&Secret::new(key), &hola("m"))
        .await;
        assert!(
            matches!(outcome.result, Err(Failure::Transient { ref detail }) if detail.starts_with("timed out")),
            "{:?}",
            outcome.result
        );
    }
}
