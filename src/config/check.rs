//! Problems and where they are: the `Checker` that collects every problem with its
//! line and field, and the first pass that reads the TOML into the raw types while
//! reporting every unknown field and every value of the wrong type at once.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use super::raw::RawConfig;

/// One thing wrong with the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; `None` where the problem has no place in the file (a default that failed).
    pub line: Option<usize>,
    /// Where in the config, e.g. `providers[1].keys[0].secret_file`; empty for a syntax error.
    pub field: String,
    pub message: String,
}

impl Problem {
    fn render(&self, file: &Path, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{}", file.display());
        if let Some(line) = self.line {
            let _ = write!(out, ":{line}");
        }
        if !self.field.is_empty() {
            let _ = write!(out, ": {}", self.field);
        }
        let _ = write!(out, ": {}", self.message);
    }
}

pub(super) fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, problem) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        problem.render(path, &mut out);
    }
    out
}

/// Collects problems while the config is checked.
pub(super) struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
    /// Fields the type pass already reported and took out, so that the rules
    /// after it do not call them missing as well.
    pub(super) reported: HashSet<String>,
}

impl<'t> Checker<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Self {
            text,
            problems: Vec::new(),
            reported: HashSet::new(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        let before = &self.text.as_bytes()[..offset.min(self.text.len())];
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }

    pub(super) fn problem(
        &mut self,
        span: Option<Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) {
        let line = span.map(|span| self.line(span.start));
        self.problems.push(Problem {
            line,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn at<T>(&mut self, value: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.problem(Some(value.span()), field, message);
    }

    /// A required field is absent, unless the type pass already said what was wrong with it.
    pub(super) fn missing(&mut self, span: Range<usize>, field: &str, message: &str) {
        if !self.reported.contains(field) {
            self.problem(Some(span), field, message);
        }
    }

    pub(super) fn finish(mut self) -> Vec<Problem> {
        // Stable: problems on one line keep the order in which they were found.
        self.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        self.problems
    }
}

/// Parses the TOML and deserializes it, reporting every unknown field and every value of
/// the wrong type. Serde stops at the first of those, so each one found is reported,
/// taken out of the parsed document, and the rest deserialized again.
pub(super) fn read_raw(text: &str, check: &mut Checker<'_>) -> Option<RawConfig> {
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(e) => {
            check.problem(e.span(), "", e.message());
            return None;
        }
    };
    let span = document.span();
    let mut table = document.into_inner();
    loop {
        let attempt = toml::de::Deserializer::from(Spanned::new(span.clone(), table.clone()));
        let error = match RawConfig::deserialize(attempt) {
            Ok(raw) => return Some(raw),
            Err(error) => error,
        };
        let field = error
            .span()
            .and_then(|at| take_out(&mut table, &at, String::new()));
        match field {
            Some(field) => {
                check.problem(error.span(), &field, error.message());
                check.reported.insert(field);
            }
            None => {
                // Nothing to take out, so another pass would fail the same way.
                check.problem(error.span(), "", error.message());
                return None;
            }
        }
    }
}

/// Removes the entry whose key or value lies at `at` (the innermost one) and returns
/// its field path.
fn take_out(table: &mut DeTable<'_>, at: &Range<usize>, prefix: String) -> Option<String> {
    let contains = |span: Range<usize>| span.start <= at.start && at.end <= span.end;
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        let path = join_path(&prefix, key.get_ref());
        let inner = match value.get_mut() {
            toml::de::DeValue::Table(inner) => take_out(inner, at, path.clone()),
            toml::de::DeValue::Array(items) => {
                items
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, item)| match item.get_mut() {
                        toml::de::DeValue::Table(inner) => {
                            take_out(inner, at, format!("{path}[{i}]"))
                        }
                        _ => None,
                    })
            }
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        if contains(key.span()) || contains(value.span()) {
            hit = Some((key.get_ref().to_string(), path));
            break;
        }
    }
    let (key, path) = hit?;
    table.remove(key.as_str());
    Some(path)
}

/// `prefix.key`, with the key quoted as TOML would need it (model names hold dots).
pub(super) fn join_path(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::testing::*;
    use crate::config::*;

    #[test]
    fn a_broken_config_lists_every_problem_with_its_line() {
        let lines = [
            r#"node_id = "kitchen/pi""#,                                   // 1
            r#"log_level = "loud""#,                                       // 2
            r#"colour = "red""#,                                           // 3
            "[mqtt]",                                                      // 4
            r#"url = "http://broker""#,                                    // 5
            r#"topic_prefix = "$SYS""#,                                    // 6
            "[[providers]]",                                               // 7
            r#"name = "groq""#,                                            // 8
            r#"kind = "openia""#,                                          // 9
            r#"base_url = "https://api.groq.com/openai/v1""#,              // 10
            r#"daily_reset = "Mars/Olympus_Mons""#,                        // 11
            r#"[providers.models."llama-3.3-70b-versatile"]"#,             // 12
            "rpm = 0",                                                     // 13
            r#"tpd = "lots""#,                                             // 14
            "[[providers.keys]]",                                          // 15
            r#"label = "groq-1""#,                                         // 16
            r#"secret_env = "KEYRELAY_TEST_UNSET""#,                       // 17
            "[routing]",                                                   // 18
            r#"auto = ["groq/llama-3.3-70b-versatile", "openai/gpt-4o"]"#, // 19
            "[leds]",                                                      // 20
            r#"backend = "blinkenlights""#,                                // 21
        ];
        let text = lines.join("\n");
        let err = parse_in(
            &text,
            Path::new("/etc/keyrelay/broken.toml"),
            &FakeEnv::new(),
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let found: Vec<(Option<usize>, &str)> = problems
            .iter()
            .map(|p| (p.line, p.field.as_str()))
            .collect();
        let model = r#"providers[0].models."llama-3.3-70b-versatile""#;
        let rpm = format!("{model}.rpm");
        let tpd = format!("{model}.tpd");
        assert_eq!(
            found,
            [
                (Some(1), "node_id"),
                (Some(2), "log_level"),
                (Some(3), "colour"),
                (Some(5), "mqtt.url"),
                (Some(6), "mqtt.topic_prefix"),
                (Some(9), "providers[0].kind"),
                (Some(11), "providers[0].daily_reset"),
                (Some(13), rpm.as_str()),
                (Some(14), tpd.as_str()),
                (Some(17), "providers[0].keys[0].secret_env"),
                (Some(19), "routing.auto[1]"),
                (Some(21), "leds.backend"),
            ]
        );
        let shown = err.to_string();
        let shown: Vec<&str> = shown.lines().collect();
        assert_eq!(shown.len(), problems.len());
        assert!(
            shown[0].starts_with("/etc/keyrelay/broken.toml:1: node_id: must not contain /"),
            "{}",
            shown[0]
        );
        assert!(
            shown[2].starts_with("/etc/keyrelay/broken.toml:3: colour: unknown field `colour`")
        );
        assert!(
            shown[8]
                .contains(":14: providers[0].models.\"llama-3.3-70b-versatile\".tpd: invalid type")
        );
    }

    #[test]
    fn every_unknown_field_is_reported_at_once() {
        let f = fixture();
        let text = format!(
            "nodeid = \"x\"\n[mqtt]\npassword = \"p\"\n{}\nflavour = 1\n[routing]\nfallback = []\n[leds]\nblue = 4\n",
            valid(&f.key, "", "")
                .replace("rpm = 30\n", "rpm = 30\nrps = 1\n")
                .replace("label = \"k1\"\n", "label = \"k1\"\nweight = 2\n")
        );
        let problems = problems(&text, &f.env);
        let mut fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "leds.blue",
                "mqtt.password",
                "nodeid",
                "providers[0].keys[0].flavour",
                "providers[0].keys[0].weight",
                "providers[0].models.m.rps",
                "routing.fallback",
            ]
        );
        assert!(
            problems
                .iter()
                .all(|p| p.message.starts_with("unknown field"))
        );
        assert!(problems.iter().all(|p| p.line.is_some()));
    }

    #[test]
    fn values_of_the_wrong_type_are_all_reported_without_knock_on_problems() {
        let f = fixture();
        let text = valid(
            &f.key,
            "trust_unsynchronised_clock = \"yes\"",
            "[routing]\nmax_queue = -1\n",
        )
        .replace("name = \"groq\"", "name = 7")
        .replace("rpm = 30", "rpm = \"30\"")
        .replace("label = \"k1\"", "label = [\"k1\"]");
        let problems = problems(&text, &f.env);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "trust_unsynchronised_clock",
                "providers[0].name",
                "providers[0].models.m.rpm",
                "providers[0].keys[0].label",
                "routing.max_queue",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_its_line() {
        let env = FakeEnv::new();
        let found = problems("node_id = \"a\"\n\n[mqtt\nurl = 1\n", &env);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, Some(3));
        assert_eq!(found[0].field, "");
        let found = problems("x = 1\nnode_id = \n", &env);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, Some(2));
    }

    #[test]
    fn sections_of_the_wrong_shape_are_refused() {
        refused("mqtt = 5", &FakeEnv::new(), "mqtt", "invalid type");
        refused(
            "[providers]\nname = \"x\"",
            &FakeEnv::new(),
            "providers",
            "invalid type",
        );
        refused("routing = 5", &FakeEnv::new(), "routing", "invalid type");
        refused(
            "[[leds]]\ngreen = 1",
            &FakeEnv::new(),
            "leds",
            "invalid type",
        );
    }
}
