//! What a request costs a budget: one request and an estimate of its tokens, made
//! before it is sent. This is keyrelay's one token estimator; the usage a provider
//! reports settles the difference afterwards.

use serde::{Deserialize, Serialize};

use crate::provider::{ChatRequest, LimitDimension};

/// Tokens assumed for the answer when a task gives no `max_tokens`: providers default
/// to the model's whole context, which would make any task look unaffordable; the
/// settled usage replaces this guess once the answer comes.
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// Tokens a chat format spends around each message (role, separators), whatever its text.
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 4;
/// Bytes of UTF-8 per token in the prompt estimate. Counting bytes rather than
/// characters errs on the high side for non-Latin scripts, which tokenise densely.
pub const BYTES_PER_TOKEN: u64 = 4;

/// The tokens a prompt of these message contents (one item per message) is estimated
/// to take: each message's UTF-8 bytes per [`BYTES_PER_TOKEN`], rounded up, plus
/// [`MESSAGE_OVERHEAD_TOKENS`]. The test providers count prompts with it too, so that
/// what they report is what keyrelay expected.
pub fn estimate_prompt_tokens<'a>(contents: impl IntoIterator<Item = &'a str>) -> u64 {
    contents
        .into_iter()
        .map(|text| (text.len() as u64).div_ceil(BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS)
        .fold(0, u64::saturating_add)
}

/// What one request costs a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
}

impl Cost {
    /// One request, and tokens = an estimate of the prompt plus the answer's
    /// `max_tokens` (or [`DEFAULT_MAX_TOKENS`]).
    pub fn estimate(request: &ChatRequest) -> Cost {
        let prompt = estimate_prompt_tokens(request.messages.iter().map(|m| m.content.as_str()));
        let answer = request.max_tokens.map_or(DEFAULT_MAX_TOKENS, u64::from);
        Cost {
            requests: 1,
            tokens: prompt.saturating_add(answer),
        }
    }

    pub(super) fn get(self, dim: Dim) -> u64 {
        match dim {
            Dim::Requests => self.requests,
            Dim::Tokens => self.tokens,
        }
    }

    pub(super) fn plus(self, other: Cost) -> Cost {
        Cost {
            requests: self.requests.saturating_add(other.requests),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }

    pub(super) fn minus(self, other: Cost) -> Cost {
        Cost {
            requests: self.requests.saturating_sub(other.requests),
            tokens: self.tokens.saturating_sub(other.tokens),
        }
    }

    pub(super) fn covers(self, other: Cost) -> bool {
        self.requests >= other.requests && self.tokens >= other.tokens
    }

    pub(super) fn is_zero(self) -> bool {
        self.requests == 0 && self.tokens == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dim {
    Requests,
    Tokens,
}

impl From<LimitDimension> for Dim {
    fn from(dimension: LimitDimension) -> Self {
        match dimension {
            LimitDimension::Requests => Dim::Requests,
            LimitDimension::Tokens => Dim::Tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::provider::ChatMessage;

    use super::*;

    #[test]
    fn estimate_counts_prompt_overhead_and_max_tokens() {
        let mut request = ChatRequest {
            model: "m".to_owned(),
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "abcde".to_owned(),
                },
                ChatMessage {
                    role: "user".to_owned(),
                    content: "ñ".repeat(4),
                },
            ],
            max_tokens: Some(100),
            temperature: None,
            top_p: None,
            stop: vec![],
        };
        // "abcde": 5 bytes → 2 tokens; "ññññ": 8 bytes → 2 tokens; 2 × overhead.
        let expected = 2 + 2 + 2 * MESSAGE_OVERHEAD_TOKENS + 100;
        assert_eq!(
            Cost::estimate(&request),
            Cost {
                requests: 1,
                tokens: expected
            }
        );
        request.max_tokens = None;
        assert_eq!(
            Cost::estimate(&request).tokens,
            expected - 100 + DEFAULT_MAX_TOKENS
        );
    }
}
