//! The `file` backend: the pattern as one JSON object in a file, for tests and for boxes
//! whose lights another program draws (SPEC §5): `{"green": "on", "amber": "off", …}`.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::{LedBackend, LedError, Light};
use crate::health::{LightState, Lights};

/// Writes the configured lights' states to `path`.
#[derive(Debug)]
pub struct FileLeds {
    path: PathBuf,
    lights: Vec<Light>,
    /// The last JSON written, so blink phases and repeated patterns do not rewrite the file.
    last: Option<String>,
}

/// The file's content; lights that are not configured are left out.
#[derive(Serialize)]
struct Pattern {
    #[serde(skip_serializing_if = "Option::is_none")]
    green: Option<LightState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amber: Option<LightState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    red: Option<LightState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activity: Option<LightState>,
}

impl FileLeds {
    /// Nothing is written until the first pattern.
    pub fn new(path: PathBuf, lights: Vec<Light>) -> Self {
        FileLeds {
            path,
            lights,
            last: None,
        }
    }

    /// The JSON for `lights`: states, not blink phases.
    pub fn render(&self, lights: &Lights) -> String {
        let pick = |light: Light| self.lights.contains(&light).then(|| light.state_in(lights));
        let pattern = Pattern {
            green: pick(Light::Green),
            amber: pick(Light::Amber),
            red: pick(Light::Red),
            activity: pick(Light::Activity),
        };
        // Four optional unit variants: serde_json cannot fail on them.
        serde_json::to_string(&pattern).unwrap_or_else(|_| String::from("{}"))
    }

    /// Temp file beside the target, then rename: a reader sees the old pattern or the new
    /// one, never half of one.
    fn write_atomically(&self, json: &str) -> Result<(), LedError> {
        let io = |action, path: &PathBuf| {
            let path = path.clone();
            move |source| LedError::Io {
                action,
                path,
                source,
            }
        };
        let mut tmp_name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "leds.json".into());
        tmp_name.push(".tmp");
        let tmp = self.path.with_file_name(tmp_name);
        let mut file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        file.write_all(json.as_bytes())
            .map_err(io("writing", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(io("renaming onto", &self.path))
    }
}

impl LedBackend for FileLeds {
    fn name(&self) -> &'static str {
        "file"
    }

    fn apply(&mut self, lights: &Lights, _phase_on: bool) -> Result<(), LedError> {
        let json = self.render(lights);
        if self.last.as_deref() == Some(json.as_str()) {
            return Ok(());
        }
        self.write_atomically(&json)?;
        self.last = Some(json);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthState, lights};

    fn written(leds: &mut FileLeds, pattern: Lights) -> String {
        leds.apply(&pattern, false).unwrap();
        std::fs::read_to_string(&leds.path).unwrap()
    }

    #[test]
    fn writes_each_pattern_as_the_spec_shows() {
        let dir = tempfile::tempdir().unwrap();
        let mut leds = FileLeds::new(dir.path().join("leds.json"), Light::ALL.to_vec());
        let cases = [
            (
                lights(Some(HealthState::Healthy), true, true),
                r#"{"green":"on","amber":"off","red":"off","activity":"off"}"#,
            ),
            (
                lights(Some(HealthState::Degraded), true, true),
                r#"{"green":"on","amber":"on","red":"off","activity":"off"}"#,
            ),
            (
                lights(Some(HealthState::Exhausted), true, true),
                r#"{"green":"off","amber":"off","red":"on","activity":"off"}"#,
            ),
            (
                lights(Some(HealthState::Healthy), false, true),
                r#"{"green":"off","amber":"blink","red":"off","activity":"off"}"#,
            ),
            (
                lights(Some(HealthState::Healthy), true, false),
                r#"{"green":"off","amber":"off","red":"blink","activity":"off"}"#,
            ),
            (
                Lights::all_off(),
                r#"{"green":"off","amber":"off","red":"off","activity":"off"}"#,
            ),
        ];
        for (pattern, want) in cases {
            assert_eq!(written(&mut leds, pattern), want);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn only_configured_lights_appear() {
        let dir = tempfile::tempdir().unwrap();
        let mut leds = FileLeds::new(dir.path().join("leds.json"), vec![Light::Green, Light::Red]);
        assert_eq!(
            written(&mut leds, lights(Some(HealthState::Exhausted), true, true)),
            r#"{"green":"off","red":"on"}"#
        );
    }

    #[test]
    fn an_unwritable_place_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("leds.json");
        let mut leds = FileLeds::new(path, Light::ALL.to_vec());
        let err = leds
            .apply(&Lights::all_off(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing-dir"), "{err}");
    }
}
