//! `Secret`: an API key or password that never prints. Its `Debug` and `Display`
//! say `[redacted]`, so a secret cannot reach a log line, a reply or a panic by accident.

use std::fmt;

/// A secret value. The only way to read it is [`Secret::expose`], called where it
/// goes on the wire (an HTTP header, the MQTT CONNECT packet) and nowhere else.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret, dropping the surrounding whitespace (`echo KEY > file` adds a newline).
    pub fn new(raw: &str) -> Self {
        Self(raw.trim().to_owned())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of this secret replaced, for provider error
    /// bodies that may echo the key back.
    pub fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.0, "[redacted]")
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_trims() {
        let s = Secret::new("  gsk_abc123\n");
        assert_eq!(s.expose(), "gsk_abc123");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.scrub("bad key gsk_abc123!"), "bad key [redacted]!");
    }
}
