//! What `keyrelay check-config` prints: everything an operator checks, never a secret.

use std::fmt::{self, Write as _};

use super::{Config, RouteOrder, Target};

impl Config {
    /// What `keyrelay check-config` prints: everything an operator checks, never a secret.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> fmt::Result {
        let m = &self.mqtt;
        writeln!(out, "config: {}", self.source.display())?;
        writeln!(out, "node id: {}", self.node_id)?;
        writeln!(out, "state dir: {}", self.state_dir.display())?;
        writeln!(
            out,
            "log level: {}",
            self.log_level.as_str().to_ascii_lowercase()
        )?;
        if self.trust_unsynchronised_clock {
            writeln!(out, "clock: trusted before it is synchronised")?;
        }
        write!(
            out,
            "broker: {}:{} ({}",
            m.host,
            m.port,
            if m.tls { "tls" } else { "no tls" }
        )?;
        if let Some(username) = &m.username {
            write!(out, ", user {username}")?;
            if m.password.is_some() {
                write!(out, " with password")?;
            }
        }
        if let Some(ca) = &m.ca_file {
            write!(out, ", ca {}", ca.display())?;
        }
        if let Some(cert) = &m.client_cert_file {
            write!(out, ", client cert {}", cert.display())?;
        }
        writeln!(out, ")")?;
        writeln!(
            out,
            "topics: prefix {}, share group {}, payloads up to {} bytes",
            m.topic_prefix, m.share_group, m.max_payload_bytes
        )?;
        match &m.allowed_reply_prefixes {
            Some(prefixes) => writeln!(out, "reply topics: under {}", prefixes.join(", "))?,
            None => writeln!(
                out,
                "reply topics: any outside {}/ and $-topics",
                m.topic_prefix
            )?,
        }
        if m.homeassistant {
            writeln!(
                out,
                "home assistant: discovery under {}/",
                m.homeassistant_prefix
            )?;
        } else {
            writeln!(out, "home assistant: off")?;
        }
        if self.providers.is_empty() {
            writeln!(out, "providers: none")?;
        } else {
            writeln!(out, "providers:")?;
        }
        for p in &self.providers {
            writeln!(
                out,
                "  {} ({}, {}, daily reset {}, timeout {} s, up to {} in flight)",
                p.name,
                p.kind,
                p.base_url,
                p.daily_reset,
                p.timeout.as_secs(),
                p.max_concurrency
            )?;
            for (model, limits) in &p.models {
                writeln!(out, "    model {model}: {limits}")?;
            }
            for key in &p.keys {
                write!(out, "    key {} ({}", key.label, key.secret_source)?;
                if let Some(account) = &key.account {
                    write!(out, ", account {account}")?;
                }
                writeln!(out, ")")?;
            }
        }
        let auto: Vec<String> = self.routing.auto.iter().map(Target::to_string).collect();
        if auto.is_empty() {
            writeln!(out, "auto route: none")?;
        } else {
            writeln!(out, "auto route: {}", auto.join(", "))?;
        }
        let order = match self.routing.order {
            RouteOrder::Listed => "as listed",
            RouteOrder::ExpiringFirst => {
                "expiring_first (targets with a calendar daily reset first while they have budget)"
            }
        };
        writeln!(out, "route order: {order}")?;
        writeln!(
            out,
            "queue: up to {} tasks and {} bytes",
            self.routing.max_queue, self.routing.max_queue_bytes
        )?;
        let l = &self.leds;
        write!(out, "leds: {}", l.backend)?;
        let pins: Vec<String> = l
            .pins()
            .map(|(name, pin)| format!("{name} {pin}"))
            .collect();
        if !pins.is_empty() {
            write!(out, " ({})", pins.join(", "))?;
        }
        if let Some(chip) = &l.chip {
            write!(out, ", chip {}", chip.display())?;
        }
        if let Some(path) = &l.path {
            write!(out, ", file {}", path.display())?;
        }
        writeln!(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn the_summary_shows_what_an_operator_checks() {
        let f = fixture();
        let top = "[mqtt]\nurl = \"mqtts://broker.lan\"\nusername = \"relay\"";
        let rest = format!(
            "{}[leds]\nbackend = \"file\"\npath = \"/run/l.json\"\ngreen = 1\n",
            provider("gemini", "g1", "GEMINI_KEY")
        );
        let text = valid(&f.key, top, &rest)
            .replace("label = \"k1\"", "label = \"k1\"\naccount = \"acct-a\"");
        let summary = accept(&text, &f.env).summary();
        for needle in [
            "node id: pi-test",
            "broker: broker.lan:8883 (tls, user relay)",
            "groq (openai, https://api.groq.com/openai/v1, daily reset rolling, timeout 60 s, up to 16 in flight)",
            "model m: rpm 30",
            &format!("key k1 (file {}, account acct-a)", f.key.display()),
            "gemini (gemini, https://generativelanguage.googleapis.com/v1beta",
            "model gemini-2.0-flash: rpm 15",
            "key g1 (env GEMINI_KEY)",
            "auto route: groq/m, gemini/gemini-2.0-flash",
            "route order: as listed",
            "queue: up to 1000 tasks and 16777216 bytes",
            "home assistant: off",
            "leds: file (green 1), file /run/l.json",
        ] {
            assert!(summary.contains(needle), "{needle:?} not in\n{summary}");
        }
    }

    #[test]
    fn the_summary_shows_home_assistant_concurrency_and_the_route_order() {
        let f = fixture();
        let top = "[mqtt]\nhomeassistant = true\nhomeassistant_prefix = \"ha\"";
        let rest = "[routing]\norder = \"expiring_first\"\nmax_queue = 50\nmax_queue_bytes = 4096";
        let text = valid(&f.key, top, rest).replace("base_url", "max_concurrency = 3\nbase_url");
        let summary = accept(&text, &f.env).summary();
        for needle in [
            "home assistant: discovery under ha/",
            "timeout 60 s, up to 3 in flight)",
            "route order: expiring_first",
            "queue: up to 50 tasks and 4096 bytes",
        ] {
            assert!(summary.contains(needle), "{needle:?} not in\n{summary}");
        }
    }
}
