//! Talking to LLM providers: one file per wire format. Each call's outcome is
//! classified here into what the rotator needs to decide (never a string to grep).

use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// A failed call, classified for the rotator. Every `detail` is scrubbed of secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// 429: this key (for this model) is out of budget for now.
    #[error("rate limited ({scope:?}): {detail}")]
    RateLimited {
        /// The wait the provider gave, from whichever signal it sent.
        retry_after: Option<Duration>,
        scope: LimitScope,
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
