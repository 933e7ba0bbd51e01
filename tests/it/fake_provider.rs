//! In-process fake LLM providers on `127.0.0.1:0`: Groq's OpenAI-compatible API and
//! Gemini's `generateContent`, each speaking the real wire format (statuses,
//! `x-ratelimit-*` headers, 429/413/401 bodies, `QuotaFailure` + `RetryInfo`). Limits
//! are enforced per account (a key is its own account unless told otherwise) and per
//! model with true sliding windows, like the real services; behaviours can be
//! scripted per key, and everything sent is counted and recorded for assertions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use keyrelay::ledger::estimate_prompt_tokens;

/// The tokens every fake answer reports as its completion (fewer if `max_tokens` is lower).
pub const FAKE_COMPLETION_TOKENS: u64 = 5;

/// A prompt containing this is refused with a 400, as a provider refuses a bad request.
pub const REJECT_MARKER: &str = "REJECT_ME";

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Which provider the fake imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeKind {
    /// `POST /openai/v1/chat/completions`, `Authorization: Bearer`.
    Groq,
    /// `POST /v1beta/models/{model}:generateContent`, `x-goog-api-key`.
    Gemini,
}

/// One account's limits for each model; `None` is no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeLimits {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub tpd: Option<u64>,
}

impl FakeLimits {
    /// No limits at all.
    pub fn unlimited() -> Self {
        Self::default()
    }
    pub fn rpm(self, n: u64) -> Self {
        Self {
            rpm: Some(n),
            ..self
        }
    }
    pub fn rpd(self, n: u64) -> Self {
        Self {
            rpd: Some(n),
            ..self
        }
    }
    pub fn tpm(self, n: u64) -> Self {
        Self {
            tpm: Some(n),
            ..self
        }
    }
    pub fn tpd(self, n: u64) -> Self {
        Self {
            tpd: Some(n),
            ..self
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query string, if any (a key there would be a leak).
    pub query: Option<String>,
    /// Lower-case names; the last value of a repeated header.
    pub headers: BTreeMap<String, String>,
    /// `Value::Null` when the body was not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// The path and query, as they appeared on the request line.
    pub fn uri(&self) -> String {
        match &self.query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.clone(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A running fake provider; it stops when dropped.
pub struct FakeProvider {
    kind: FakeKind,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

struct Shared {
    kind: FakeKind,
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    /// Key → account; keys of one account share its limits and windows.
    account_of: HashMap<String, String>,
    limits: HashMap<String, FakeLimits>,
    /// Stable `org_…` ids, so that no key ever appears in a message.
    org_of: HashMap<String, String>,
    /// (account, model) → successful requests: when, and the tokens they used.
    windows: HashMap<(String, String), VecDeque<(Instant, u64)>>,
    scripts: HashMap<String, Script>,
    /// Added to the clock, so that a test can let minutes or days pass.
    offset: Duration,
    calls: HashMap<String, u64>,
    ok_calls: HashMap<String, u64>,
    total_calls: u64,
    rate_limited: u64,
    recorded: Vec<RecordedRequest>,
}

#[derive(Default)]
struct Script {
    /// Statuses still to be answered, one per request, before anything else.
    queued: VecDeque<u16>,
    always: Option<u16>,
    delay: Option<Duration>,
}

impl FakeProvider {
    /// Starts a fake on an ephemeral loopback port.
    pub async fn start(kind: FakeKind) -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake provider");
        let addr = listener.local_addr().expect("the fake's address");
        let shared = Arc::new(Shared {
            kind,
            state: Mutex::new(FakeState::default()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
                .expect("the fake provider serves");
        });
        FakeProvider {
            kind,
            addr,
            shared,
            stop,
        }
    }

    pub fn kind(&self) -> FakeKind {
        self.kind
    }

    /// What a provider's `base_url` is set to in a config.
    pub fn base_url(&self) -> String {
        match self.kind {
            FakeKind::Groq => format!("http://{}/openai/v1", self.addr),
            FakeKind::Gemini => format!("http://{}/v1beta", self.addr),
        }
    }

    /// Accepts `key`, as its own account, with these limits (replacing earlier ones).
    pub fn add_key(&self, key: &str, limits: FakeLimits) {
        self.add_key_in_account(key, key, limits);
    }

    /// Accepts `key` as one of `account`'s keys; the account's limits become `limits`.
    pub fn add_key_in_account(&self, key: &str, account: &str, limits: FakeLimits) {
        let mut state = self.state();
        state.account_of.insert(key.to_owned(), account.to_owned());
        state.limits.insert(account.to_owned(), limits);
        let next = state.org_of.len() + 1;
        state
            .org_of
            .entry(account.to_owned())
            .or_insert_with(|| format!("org_01fake{next:016}"));
    }

    /// The next `n_times` requests with `key` get `status`, in this provider's format.
    pub fn fail_with(&self, key: &str, status: u16, n_times: u32) {
        let mut state = self.state();
        let script = state.scripts.entry(key.to_owned()).or_default();
        script
            .queued
            .extend(std::iter::repeat_n(status, n_times as usize));
    }

    /// Every request with `key` gets `status` from now on.
    pub fn always(&self, key: &str, status: u16) {
        self.state()
            .scripts
            .entry(key.to_owned())
            .or_default()
            .always = Some(status);
    }

    /// Undoes [`always`](Self::always) and any queued failures for `key`.
    pub fn heal(&self, key: &str) {
        if let Some(script) = self.state().scripts.get_mut(key) {
            script.queued.clear();
            script.always = None;
        }
    }

    /// Every answer to `key` comes `delay` late (to provoke timeouts).
    pub fn delay(&self, key: &str, delay: Duration) {
        self.state()
            .scripts
            .entry(key.to_owned())
            .or_default()
            .delay = Some(delay);
    }

    /// Moves the fake's clock forward: windows slide as if `by` had passed.
    pub fn advance(&self, by: Duration) {
        self.state().offset += by;
    }

    /// Requests that carried `key`, whatever the answer.
    pub fn calls(&self, key: &str) -> u64 {
        self.state().calls.get(key).copied().unwrap_or(0)
    }

    /// Requests with `key` answered 200.
    pub fn ok_calls(&self, key: &str) -> u64 {
        self.state().ok_calls.get(key).copied().unwrap_or(0)
    }

    pub fn total_calls(&self) -> u64 {
        self.state().total_calls
    }

    /// 429 answers sent, to every key.
    pub fn rate_limited(&self) -> u64 {
        self.state().rate_limited
    }

    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state().recorded.clone()
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.shared.lock()
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock must not hide other failures.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A request reduced to what the fake decides on.
struct Call {
    key: Option<String>,
    model: String,
    prompt_tokens: u64,
    max_tokens: Option<u64>,
    last_user: String,
    rejected: bool,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = shared.kind;
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let route = route(kind, &method, uri.path());
    let call = route
        .as_ref()
        .map(|model| read_call(kind, model, &uri, &headers, &json_body));
    let delay = {
        let mut state = shared.lock();
        state.total_calls += 1;
        state.recorded.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            body: json_body.clone(),
        });
        let key = call.as_ref().and_then(|c| c.key.clone());
        if let Some(key) = &key {
            *state.calls.entry(key.clone()).or_default() += 1;
        }
        key.and_then(|k| state.scripts.get(&k).and_then(|s| s.delay))
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let Some(call) = call else {
        return not_found(kind, uri.path());
    };
    let mut state = shared.lock();
    answer(kind, &mut state, &call)
}

/// The model a request is for, or `None` when the path is not this provider's.
fn route(kind: FakeKind, method: &Method, path: &str) -> Option<String> {
    if method != Method::POST {
        return None;
    }
    match kind {
        FakeKind::Groq => (path == "/openai/v1/chat/completions").then(String::new),
        FakeKind::Gemini => path
            .strip_prefix("/v1beta/models/")
            .and_then(|rest| rest.strip_suffix(":generateContent"))
            .map(str::to_owned),
    }
}

fn read_call(kind: FakeKind, model: &str, uri: &Uri, headers: &HeaderMap, body: &Value) -> Call {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let texts = |parts: Option<&Value>| -> Vec<String> {
        parts
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p["text"].as_str().map(str::to_owned))
            .collect()
    };
    let (key, model, prompt, max_tokens, last_user) = match kind {
        FakeKind::Groq => {
            let key = header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned);
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            let prompt: Vec<String> = messages
                .iter()
                .filter_map(|m| m["content"].as_str().map(str::to_owned))
                .collect();
            let last_user = messages
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_owned();
            let max_tokens = body["max_tokens"]
                .as_u64()
                .or_else(|| body["max_completion_tokens"].as_u64());
            let model = body["model"].as_str().unwrap_or_default().to_owned();
            (key, model, prompt, max_tokens, last_user)
        }
        FakeKind::Gemini => {
            // Google also takes `?key=`; accepted here so that a leak is seen, not refused.
            let query_key = uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|pair| pair.strip_prefix("key="))
                    .map(str::to_owned)
            });
            let key = header("x-goog-api-key").map(str::to_owned).or(query_key);
            let contents = body["contents"].as_array().cloned().unwrap_or_default();
            let mut prompt = texts(body["systemInstruction"].get("parts"));
            for content in &contents {
                prompt.extend(texts(content.get("parts")));
            }
            let last_user = contents
                .iter()
                .rev()
                .find(|c| c["role"] == "user" || c.get("role").is_none())
                .map(|c| texts(c.get("parts")).concat())
                .unwrap_or_default();
            let max_tokens = body["generationConfig"]["maxOutputTokens"].as_u64();
            (key, model.to_owned(), prompt, max_tokens, last_user)
        }
    };
    Call {
        key,
        model,
        // With keyrelay's own estimator (each text is one message in both wire formats),
        // so that the fake reports what keyrelay expected and tests can reason in its terms.
        prompt_tokens: estimate_prompt_tokens(prompt.iter().map(String::as_str)),
        max_tokens,
        rejected: prompt.iter().any(|p| p.contains(REJECT_MARKER)),
        last_user,
    }
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hit {
    Rpm,
    Rpd,
    Tpm,
    Tpd,
}

impl Hit {
    fn per_day(self) -> bool {
        matches!(self, Hit::Rpd | Hit::Tpd)
    }
    fn tokens(self) -> bool {
        matches!(self, Hit::Tpm | Hit::Tpd)
    }
}

/// A limit that refused a request: how far it was used, and how long until it fits.
struct Refusal {
    hit: Hit,
    limit: u64,
    used: u64,
    requested: u64,
    wait: Duration,
}

fn answer(kind: FakeKind, state: &mut FakeState, call: &Call) -> Response {
    let Some(key) = call.key.as_deref() else {
        return missing_key(kind);
    };
    if let Some(script) = state.scripts.get_mut(key)
        && let Some(status) = script.queued.pop_front().or(script.always)
    {
        if status == 429 {
            state.rate_limited += 1;
        }
        return scripted(kind, status, &call.model);
    }
    let Some(account) = state.account_of.get(key).cloned() else {
        return unknown_key(kind);
    };
    if call.rejected {
        return bad_request(kind);
    }
    let limits = state.limits.get(&account).copied().unwrap_or_default();
    let org = state.org_of.get(&account).cloned().unwrap_or_default();
    let now = Instant::now() + state.offset;
    let window = state
        .windows
        .entry((account, call.model.clone()))
        .or_default();
    while window
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) >= DAY)
    {
        window.pop_front();
    }
    let estimated = call.prompt_tokens + call.max_tokens.unwrap_or(0);
    if kind == FakeKind::Groq
        && let Some(tpm) = limits.tpm.filter(|tpm| estimated > *tpm)
    {
        let headers = groq_headers(&limits, window, now);
        return groq_too_large(headers, &call.model, &org, tpm, estimated);
    }
    if let Some(refusal) = refusal(&limits, window, now, estimated) {
        let response = match kind {
            FakeKind::Groq => {
                let headers = groq_headers(&limits, window, now);
                groq_rate_limited(headers, &call.model, &org, &refusal)
            }
            FakeKind::Gemini => gemini_rate_limited(&call.model, &refusal),
        };
        state.rate_limited += 1;
        return response;
    }
    let completion_tokens = call.max_tokens.map_or(FAKE_COMPLETION_TOKENS, |max| {
        max.min(FAKE_COMPLETION_TOKENS)
    });
    window.push_back((now, call.prompt_tokens + completion_tokens));
    let content = format!("echo: {}", call.last_user);
    let (headers, body) = match kind {
        FakeKind::Groq => (
            groq_headers(&limits, window, now),
            groq_completion(&call.model, &content, call.prompt_tokens, completion_tokens),
        ),
        FakeKind::Gemini => (
            HeaderMap::new(),
            gemini_completion(&call.model, &content, call.prompt_tokens, completion_tokens),
        ),
    };
    *state.ok_calls.entry(key.to_owned()).or_default() += 1;
    (StatusCode::OK, headers, axum::Json(body)).into_response()
}

/// The first limit this request would break, daily limits first (the lasting news).
fn refusal(
    limits: &FakeLimits,
    window: &VecDeque<(Instant, u64)>,
    now: Instant,
    estimated: u64,
) -> Option<Refusal> {
    let in_minute: Vec<(Instant, u64)> = window
        .iter()
        .copied()
        .filter(|(at, _)| now.duration_since(*at) < MINUTE)
        .collect();
    let in_day: Vec<(Instant, u64)> = window.iter().copied().collect();
    let checks = [
        (Hit::Rpd, limits.rpd, &in_day, DAY),
        (Hit::Tpd, limits.tpd, &in_day, DAY),
        (Hit::Rpm, limits.rpm, &in_minute, MINUTE),
        (Hit::Tpm, limits.tpm, &in_minute, MINUTE),
    ];
    for (hit, limit, entries, span) in checks {
        let Some(limit) = limit else { continue };
        let (used, requested) = if hit.tokens() {
            (entries.iter().map(|(_, t)| t).sum::<u64>(), estimated)
        } else {
            (entries.len() as u64, 1)
        };
        if used + requested <= limit {
            continue;
        }
        // Walk from the oldest entry until enough has slid out for this request.
        let mut still_used = used;
        let mut wait = span;
        for (at, tokens) in entries.iter() {
            still_used -= if hit.tokens() { *tokens } else { 1 };
            if still_used + requested <= limit {
                wait = (*at + span).saturating_duration_since(now);
                break;
            }
        }
        return Some(Refusal {
            hit,
            limit,
            used,
            requested,
            wait,
        });
    }
    None
}

/// Groq's budget headers: `-requests` is the day's, `-tokens` the minute's.
fn groq_headers(limits: &FakeLimits, window: &VecDeque<(Instant, u64)>, now: Instant) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        headers.insert(name, HeaderValue::from_str(&value).expect("header value"));
    };
    if let Some(rpd) = limits.rpd {
        let used = window.len() as u64;
        let reset = window.front().map_or(Duration::ZERO, |(at, _)| {
            (*at + DAY).saturating_duration_since(now)
        });
        put("x-ratelimit-limit-requests", rpd.to_string());
        put(
            "x-ratelimit-remaining-requests",
            rpd.saturating_sub(used).to_string(),
        );
        put("x-ratelimit-reset-requests", go_duration(reset));
    }
    if let Some(tpm) = limits.tpm {
        let in_minute: Vec<&(Instant, u64)> = window
            .iter()
            .filter(|(at, _)| now.duration_since(*at) < MINUTE)
            .collect();
        let used: u64 = in_minute.iter().map(|(_, t)| t).sum();
        let reset = in_minute.first().map_or(Duration::ZERO, |(at, _)| {
            (*at + MINUTE).saturating_duration_since(now)
        });
        put("x-ratelimit-limit-tokens", tpm.to_string());
        put(
            "x-ratelimit-remaining-tokens",
            tpm.saturating_sub(used).to_string(),
        );
        put("x-ratelimit-reset-tokens", go_duration(reset));
    }
    headers
}

fn groq_completion(model: &str, content: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_730_241_104,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "queue_time": 0.01,
            "prompt_tokens": prompt,
            "prompt_time": 0.001,
            "completion_tokens": completion,
            "completion_time": 0.002,
            "total_tokens": prompt + completion,
            "total_time": 0.003
        },
        "system_fingerprint": "fp_fake",
        "x_groq": {"id": "req_fake"}
    })
}

fn gemini_completion(model: &str, content: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "candidates": [{
            "content": {"parts": [{"text": content}], "role": "model"},
            "finishReason": "STOP",
            "avgLogprobs": -0.05
        }],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": completion,
            "totalTokenCount": prompt + completion
        },
        "modelVersion": model,
        "responseId": "fake"
    })
}

fn groq_rate_limited(
    mut headers: HeaderMap,
    model: &str,
    org: &str,
    refusal: &Refusal,
) -> Response {
    let (what, period, abbr) = match refusal.hit {
        Hit::Rpm => ("requests", "minute", "RPM"),
        Hit::Rpd => ("requests", "day", "RPD"),
        Hit::Tpm => ("tokens", "minute", "TPM"),
        Hit::Tpd => ("tokens", "day", "TPD"),
    };
    let message = format!(
        "Rate limit reached for model `{model}` in organization `{org}` service tier `on_demand` \
         on {what} per {period} ({abbr}): Limit {}, Used {}, Requested {}. Please try again in {}. \
         Need more {what}? Upgrade to Dev Tier today at https://console.groq.com/settings/billing",
        refusal.limit,
        refusal.used,
        refusal.requested,
        go_duration(refusal.wait),
    );
    // Groq's retry-after is whole seconds, rounded up.
    let retry_after = refusal.wait.as_millis().div_ceil(1000).max(1);
    headers.insert(
        "retry-after",
        HeaderValue::from_str(&retry_after.to_string()).expect("header value"),
    );
    let body = json!({"error": {"message": message, "type": what, "code": "rate_limit_exceeded"}});
    (StatusCode::TOO_MANY_REQUESTS, headers, axum::Json(body)).into_response()
}

fn groq_too_large(
    headers: HeaderMap,
    model: &str,
    org: &str,
    tpm: u64,
    requested: u64,
) -> Response {
    let message = format!(
        "Request too large for model `{model}` in organization `{org}` service tier `on_demand` \
         on tokens per minute (TPM): Limit {tpm}, Requested {requested}, please reduce your message \
         size and try again. Need more tokens? Upgrade to Dev Tier today at \
         https://console.groq.com/settings/billing"
    );
    let body =
        json!({"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}});
    (StatusCode::PAYLOAD_TOO_LARGE, headers, axum::Json(body)).into_response()
}

fn gemini_rate_limited(model: &str, refusal: &Refusal) -> Response {
    let (metric, quota_id) = match refusal.hit {
        Hit::Rpm => (
            "generate_content_free_tier_requests",
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        ),
        Hit::Rpd => (
            "generate_content_free_tier_requests",
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        ),
        Hit::Tpm => (
            "generate_content_free_tier_input_token_count",
            "GenerateContentInputTokensPerModelPerMinute-FreeTier",
        ),
        Hit::Tpd => (
            "generate_content_free_tier_input_token_count",
            "GenerateContentInputTokensPerModelPerDay-FreeTier",
        ),
    };
    // Google says "0s" for a daily quota: the delay is no guide, the quota id is.
    let retry_delay = if refusal.hit.per_day() {
        "0s".to_owned()
    } else {
        format!("{}s", refusal.wait.as_millis().div_ceil(1000))
    };
    gemini_error(
        StatusCode::TOO_MANY_REQUESTS,
        "You exceeded your current quota, please check your plan and billing details. For more \
         information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        "RESOURCE_EXHAUSTED",
        json!([
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{
                    "quotaMetric": format!("generativelanguage.googleapis.com/{metric}"),
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": refusal.limit.to_string()
                }]
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"
                }]
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        ]),
    )
}

fn gemini_error(status: StatusCode, message: &str, code: &str, details: Value) -> Response {
    let mut error = json!({"code": status.as_u16(), "message": message, "status": code});
    if details.as_array().is_some_and(|d| !d.is_empty()) {
        error["details"] = details;
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn groq_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let mut error = json!({"message": message, "type": kind});
    if let Some(code) = code {
        error["code"] = json!(code);
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn unknown_key(kind: FakeKind) -> Response {
    match kind {
        FakeKind::Groq => groq_error(
            StatusCode::UNAUTHORIZED,
            "Invalid API Key",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        // Google answers a wrong key with 400 INVALID_ARGUMENT, not 401.
        FakeKind::Gemini => gemini_error(
            StatusCode::BAD_REQUEST,
            "API key not valid. Please pass a valid API key.",
            "INVALID_ARGUMENT",
            json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"}
            }]),
        ),
    }
}

fn missing_key(kind: FakeKind) -> Response {
    match kind {
        FakeKind::Groq => unknown_key(kind),
        FakeKind::Gemini => gemini_error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            "PERMISSION_DENIED",
            json!([]),
        ),
    }
}

fn bad_request(kind: FakeKind) -> Response {
    match kind {
        FakeKind::Groq => groq_error(
            StatusCode::BAD_REQUEST,
            "'messages.0' : the request was refused by the fake provider",
            "invalid_request_error",
            None,
        ),
        FakeKind::Gemini => gemini_error(
            StatusCode::BAD_REQUEST,
            "Request contains an invalid argument.",
            "INVALID_ARGUMENT",
            json!([]),
        ),
    }
}

fn not_found(kind: FakeKind, path: &str) -> Response {
    match kind {
        FakeKind::Groq => groq_error(
            StatusCode::NOT_FOUND,
            "Unknown request URL. Please check the URL for typos, or see the docs at https://console.groq.com/docs/",
            "invalid_request_error",
            Some("unknown_url"),
        ),
        FakeKind::Gemini => gemini_error(
            StatusCode::NOT_FOUND,
            &format!(
                "{path} is not found for API version v1beta, or is not supported for generateContent."
            ),
            "NOT_FOUND",
            json!([]),
        ),
    }
}

/// A scripted status, with the body the provider sends with it.
fn scripted(kind: FakeKind, status: u16, model: &str) -> Response {
    let code = StatusCode::from_u16(status).expect("a valid HTTP status");
    match (kind, status) {
        (_, 400) => bad_request(kind),
        (FakeKind::Groq, 401) => unknown_key(kind),
        (FakeKind::Groq, 413) => {
            groq_too_large(HeaderMap::new(), model, "org_01fakescripted", 6000, 12000)
        }
        (FakeKind::Groq, 429) => {
            let refusal = Refusal {
                hit: Hit::Rpm,
                limit: 30,
                used: 30,
                requested: 1,
                wait: Duration::from_secs(1),
            };
            groq_rate_limited(HeaderMap::new(), model, "org_01fakescripted", &refusal)
        }
        (FakeKind::Groq, 500) => {
            groq_error(code, "Internal Server Error", "internal_server_error", None)
        }
        (FakeKind::Groq, 503) => groq_error(
            code,
            &format!(
                "{model} is currently over capacity. Please try again and back off exponentially."
            ),
            "internal_server_error",
            Some("service_unavailable"),
        ),
        (FakeKind::Groq, _) => groq_error(
            code,
            code.canonical_reason().unwrap_or("error"),
            if status >= 500 {
                "internal_server_error"
            } else {
                "invalid_request_error"
            },
            None,
        ),
        (FakeKind::Gemini, 401) => gemini_error(
            code,
            "Request had invalid authentication credentials.",
            "UNAUTHENTICATED",
            json!([]),
        ),
        (FakeKind::Gemini, 403) => gemini_error(
            code,
            "Permission denied: Consumer has been suspended.",
            "PERMISSION_DENIED",
            json!([]),
        ),
        (FakeKind::Gemini, 429) => gemini_rate_limited(
            model,
            &Refusal {
                hit: Hit::Rpm,
                limit: 15,
                used: 15,
                requested: 1,
                wait: Duration::from_secs(1),
            },
        ),
        (FakeKind::Gemini, 503) => gemini_error(
            code,
            "The model is overloaded. Please try again later.",
            "UNAVAILABLE",
            json!([]),
        ),
        (FakeKind::Gemini, 504) => gemini_error(
            code,
            "Deadline expired before operation could complete.",
            "DEADLINE_EXCEEDED",
            json!([]),
        ),
        (FakeKind::Gemini, _) => gemini_error(
            code,
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            if status >= 500 {
                "INTERNAL"
            } else {
                "FAILED_PRECONDITION"
            },
            json!([]),
        ),
    }
}

/// A duration as Go prints it, the form Groq uses: `1.2s`, `9m19.008s`, `644ms`, `1h0m0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms % 3_600_000 / 60_000;
    let seconds_ms = ms % 60_000;
    let mut seconds = format!("{}.{:03}", seconds_ms / 1000, seconds_ms % 1000);
    while seconds.ends_with('0') {
        seconds.pop();
    }
    if seconds.ends_with('.') {
        seconds.pop();
    }
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keyrelay::config::{DailyReset, ProviderConfig, ProviderKind};
    use keyrelay::provider::{
        CallOutcome, ChatMessage, ChatRequest, Failure, LimitScope, ProviderClient,
    };
    use keyrelay::secret::Secret;

    use super::*;

    fn client(fake: &FakeProvider) -> ProviderClient {
        client_with_timeout(fake, Duration::from_secs(10))
    }

    fn client_with_timeout(fake: &FakeProvider, timeout: Duration) -> ProviderClient {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kind = match fake.kind() {
            FakeKind::Groq => ProviderKind::OpenAi,
            FakeKind::Gemini => ProviderKind::Gemini,
        };
        ProviderClient::new(&ProviderConfig {
            name: "fake".to_owned(),
            kind,
            base_url: fake.base_url(),
            daily_reset: DailyReset::Rolling,
            timeout,
            max_concurrency: keyrelay::config::DEFAULT_MAX_CONCURRENCY,
            models: BTreeMap::new(),
            keys: Vec::new(),
        })
        .expect("a client")
    }

    fn ask(model: &str, prompt: &str, max_tokens: u32) -> ChatRequest {
        ChatRequest {
            model: model.to_owned(),
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "Be brief.".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: prompt.to_owned(),
                },
            ],
            max_tokens: Some(max_tokens),
            temperature: None,
            top_p: None,
            stop: Vec::new(),
        }
    }

    fn rate_limited(outcome: &CallOutcome) -> (Option<Duration>, LimitScope) {
        match &outcome.result {
            Err(Failure::RateLimited {
                retry_after, scope, ..
            }) => (*retry_after, *scope),
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    const GROQ_KEY: &str = "gsk_fake_groq_key_1";
    const GEMINI_KEY: &str = "AIza_fake_gemini_key_1";
    const MODEL: &str = "llama-3.3-70b-versatile";

    #[tokio::test]
    async fn groq_answers_429_once_the_minute_is_spent() {
        let fake = FakeProvider::start(FakeKind::Groq).await;
        fake.add_key(GROQ_KEY, FakeLimits::unlimited().rpm(2).rpd(100).tpm(1000));
        let client = client(&fake);
        let key = Secret::new(GROQ_KEY);
        for n in 0..2_u64 {
            let outcome = client.chat(&key, &ask(MODEL, "Hola", 16)).await;
            let completion = outcome.result.expect("within the limits");
            assert_eq!(completion.content, "echo: Hola");
            assert_eq!(completion.usage.completion_tokens, FAKE_COMPLETION_TOKENS);
            assert_eq!(outcome.headers.limit_requests, Some(100));
            assert_eq!(outcome.headers.remaining_requests, Some(99 - n));
        }
        let outcome = client.chat(&key, &ask(MODEL, "Hola", 16)).await;
        let (retry_after, scope) = rate_limited(&outcome);
        assert_eq!(scope, LimitScope::Minute);
        let retry_after = retry_after.expect("a retry-after");
        assert!(
            retry_after > Duration::from_secs(50) && retry_after <= MINUTE,
            "{retry_after:?}"
        );
        assert_eq!((fake.calls(GROQ_KEY), fake.ok_calls(GROQ_KEY)), (3, 2));
        assert_eq!((fake.total_calls(), fake.rate_limited()), (3, 1));

        // A minute later the window has slid past both requests.
        fake.advance(MINUTE);
        let outcome = client.chat(&key, &ask(MODEL, "Hola", 16)).await;
        assert!(outcome.result.is_ok(), "{:?}", outcome.result);
    }

    #[tokio::test]
    async fn keys_of_one_account_share_its_day() {
        let fake = FakeProvider::start(FakeKind::Groq).await;
        let limits = FakeLimits::unlimited().rpd(1);
        fake.add_key_in_account("gsk_a_1", "acct", limits);
        fake.add_key_in_account("gsk_a_2", "acct", limits);
        let client = client(&fake);
        let first = client
            .chat(&Secret::new("gsk_a_1"), &ask(MODEL, "Hola", 16))
            .await;
        assert!(first.result.is_ok());
        let second = client
            .chat(&Secret::new("gsk_a_2"), &ask(MODEL, "Hola", 16))
            .await;
        assert_eq!(rate_limited(&second).1, LimitScope::Day);
    }

    #[tokio::test]
    async fn unknown_keys_are_refused_in_each_providers_way() {
        let groq = FakeProvider::start(FakeKind::Groq).await;
        let outcome = client(&groq)
            .chat(&Secret::new("gsk_nobody"), &ask(MODEL, "Hola", 16))
            .await;
        assert!(
            matches!(
                outcome.result,
                Err(Failure::KeyRejected { status: 401, .. })
            ),
            "{:?}",
            outcome.result
        );
        assert_eq!(groq.calls("gsk_nobody"), 1);

        let gemini = FakeProvider::start(FakeKind::Gemini).await;
        let outcome = client(&gemini)
            .chat(
                &Secret::new("AIza_nobody"),
                &ask("gemini-2.0-flash", "Hola", 16),
            )
            .await;
        assert!(
            matches!(
                outcome.result,
                Err(Failure::KeyRejected { status: 400, .. })
            ),
            "{:?}",
            outcome.result
        );
    }

    #[tokio::test]
    async fn gemini_serves_then_names_its_daily_quota() {
        let fake = FakeProvider::start(FakeKind::Gemini).await;
        fake.add_key(GEMINI_KEY, FakeLimits::unlimited().rpm(15).rpd(1));
        let client = client(&fake);
        let key = Secret::new(GEMINI_KEY);
        let outcome = client
            .chat(&key, &ask("gemini-2.0-flash", "¿Qué tal?", 16))
            .await;
        assert_eq!(outcome.result.expect("served").content, "echo: ¿Qué tal?");
        let outcome = client
            .chat(&key, &ask("gemini-2.0-flash", "¿Qué tal?", 16))
            .await;
        assert_eq!(
            rate_limited(&outcome),
            (Some(Duration::ZERO), LimitScope::Day)
        );
        for request in fake.recorded() {
            assert!(!request.uri().contains(GEMINI_KEY), "{}", request.uri());
            assert_eq!(request.header("x-goog-api-key"), Some(GEMINI_KEY));
            assert_eq!(
                request.body["systemInstruction"]["parts"][0]["text"],
                "Be brief."
            );
        }
    }

    #[tokio::test]
    async fn scripted_failures_then_size_and_content_refusals() {
        let fake = FakeProvider::start(FakeKind::Groq).await;
        fake.add_key(GROQ_KEY, FakeLimits::unlimited().tpm(100));
        fake.fail_with(GROQ_KEY, 500, 2);
        let client = client(&fake);
        let key = Secret::new(GROQ_KEY);
        for _ in 0..2 {
            let outcome = client.chat(&key, &ask(MODEL, "Hola", 16)).await;
            assert!(matches!(outcome.result, Err(Failure::Transient { .. })));
        }
        assert!(
            client
                .chat(&key, &ask(MODEL, "Hola", 16))
                .await
                .result
                .is_ok()
        );

        let outcome = client.chat(&key, &ask(MODEL, "Hola", 500)).await;
        assert!(
            matches!(outcome.result, Err(Failure::TooLarge { .. })),
            "{:?}",
            outcome.result
        );
        let prompt = format!("please {REJECT_MARKER}");
        let outcome = client.chat(&key, &ask(MODEL, &prompt, 16)).await;
        assert!(
            matches!(outcome.result, Err(Failure::Rejected { status: 400, .. })),
            "{:?}",
            outcome.result
        );
        assert_eq!(fake.rate_limited(), 0);
    }

    #[tokio::test]
    async fn always_delay_and_heal_script_a_key() {
        let fake = FakeProvider::start(FakeKind::Gemini).await;
        fake.add_key(GEMINI_KEY, FakeLimits::unlimited().tpd(1_000));
        let key = Secret::new(GEMINI_KEY);
        let request = ask("gemini-2.0-flash", "Hola", 16);

        fake.always(GEMINI_KEY, 503);
        for _ in 0..3 {
            let outcome = client(&fake).chat(&key, &request).await;
            assert!(matches!(outcome.result, Err(Failure::Transient { .. })));
        }
        fake.heal(GEMINI_KEY);
        fake.delay(GEMINI_KEY, Duration::from_millis(500));
        let slow = client_with_timeout(&fake, Duration::from_millis(100));
        let outcome = slow.chat(&key, &request).await;
        assert!(
            matches!(outcome.result, Err(Failure::Transient { ref detail }) if detail.starts_with("timed out")),
            "{:?}",
            outcome.result
        );
        let recorded = fake.recorded();
        assert_eq!(recorded.len(), 4);
        assert!(
            recorded
                .iter()
                .all(|r| r.method == "POST" && r.query.is_none())
        );
        assert_eq!(
            recorded[0].path,
            "/v1beta/models/gemini-2.0-flash:generateContent"
        );
    }

    #[test]
    fn go_durations_print_like_groq() {
        assert_eq!(go_duration(Duration::from_millis(1200)), "1.2s");
        assert_eq!(go_duration(Duration::from_millis(559_008)), "9m19.008s");
        assert_eq!(go_duration(Duration::from_millis(644)), "644ms");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }
}
