//! The `sysfs` backend: LEDs the kernel already knows, by name under `/sys/class/leds`
//! (a Pi's own `ACT` and `PWR`, or `gpio-leds` from a device-tree overlay).

use std::path::{Path, PathBuf};

use super::{LedBackend, LedError, Light};
use crate::health::Lights;

/// Where the kernel lists its LEDs.
pub const SYS_CLASS_LEDS: &str = "/sys/class/leds";

#[derive(Debug)]
struct SysfsLed {
    light: Light,
    /// `<base>/<name>/brightness`.
    brightness: PathBuf,
    /// What "on" is written as: the LED's `max_brightness`.
    on: String,
    /// The last value written, so blinking other lights does not rewrite this one.
    lit: Option<bool>,
}

/// The configured LEDs, their kernel triggers switched off.
#[derive(Debug)]
pub struct SysfsLeds {
    leds: Vec<SysfsLed>,
}

impl SysfsLeds {
    /// Takes over each named LED under `base` (normally [`SYS_CLASS_LEDS`]; tests pass a
    /// directory laid out the same way): writes `none` to its `trigger`, so the kernel stops
    /// driving it (the Pi's `ACT` follows SD card activity by default), and reads its
    /// `max_brightness`.
    pub fn open(base: &Path, names: &[(Light, String)]) -> Result<Self, LedError> {
        let mut leds = Vec::with_capacity(names.len());
        for (light, name) in names {
            // A name is one directory entry: never a way out of `base`.
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(LedError::BadPin {
                    light: light.name(),
                    pin: format!("{name:?}"),
                    why: "not an LED name under /sys/class/leds",
                });
            }
            let dir = base.join(name);
            if !dir.is_dir() {
                return Err(LedError::BadPin {
                    light: light.name(),
                    pin: format!("{name:?}"),
                    why: "no such LED under /sys/class/leds (ls /sys/class/leds lists them)",
                });
            }
            write(&dir.join("trigger"), "none")?;
            let max_path = dir.join("max_brightness");
            let on = match std::fs::read_to_string(&max_path) {
                Ok(max) if !max.trim().is_empty() => max.trim().to_string(),
                Ok(_) => "1".to_string(),
                // Every LED class device has the file; a missing one only means "1 is on".
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "1".to_string(),
                Err(source) => {
                    return Err(LedError::Io {
                        action: "reading",
                        path: max_path,
                        source,
                    });
                }
            };
            leds.push(SysfsLed {
                light: *light,
                brightness: dir.join("brightness"),
                on,
                lit: None,
            });
        }
        Ok(SysfsLeds { leds })
    }
}

fn write(path: &Path, value: &str) -> Result<(), LedError> {
    std::fs::write(path, value).map_err(|source| LedError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}

impl LedBackend for SysfsLeds {
    fn name(&self) -> &'static str {
        "sysfs"
    }

    fn apply(&mut self, lights: &Lights, phase_on: bool) -> Result<(), LedError> {
        for led in &mut self.leds {
            let lit = led.light.is_lit(lights, phase_on);
            if led.lit == Some(lit) {
                continue;
            }
            write(&led.brightness, if lit { &led.on } else { "0" })?;
            led.lit = Some(lit);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::LightState;
    use std::fs;

    /// A directory shaped like /sys/class/leds with one LED.
    fn fake_led(base: &Path, name: &str, max: &str) {
        let dir = base.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("trigger"), "none [mmc0] timer heartbeat").unwrap();
        fs::write(dir.join("brightness"), "0").unwrap();
        fs::write(dir.join("max_brightness"), max).unwrap();
    }

    fn read(base: &Path, name: &str, file: &str) -> String {
        fs::read_to_string(base.join(name).join(file)).unwrap()
    }

    #[test]
    fn takes_the_leds_from_their_triggers_and_toggles_brightness() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        fake_led(base, "ACT", "255\n");
        fake_led(base, "PWR", "1\n");
        let mut leds = SysfsLeds::open(
            base,
            &[
                (Light::Green, "ACT".to_string()),
                (Light::Red, "PWR".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(read(base, "ACT", "trigger"), "none");
        assert_eq!(read(base, "PWR", "trigger"), "none");

        let green = Lights {
            green: LightState::On,
            ..Lights::all_off()
        };
        leds.apply(&green, true).unwrap();
        assert_eq!(read(base, "ACT", "brightness"), "255");
        assert_eq!(read(base, "PWR", "brightness"), "0");

        let red_blink = Lights {
            red: LightState::Blink,
            ..Lights::all_off()
        };
        leds.apply(&red_blink, true).unwrap();
        assert_eq!(read(base, "ACT", "brightness"), "0");
        assert_eq!(read(base, "PWR", "brightness"), "1");
        leds.apply(&red_blink, false).unwrap();
        assert_eq!(read(base, "PWR", "brightness"), "0");

        leds.apply(&Lights::all_off(), false).unwrap();
        assert_eq!(read(base, "ACT", "brightness"), "0");
    }

    #[test]
    fn an_unknown_or_escaping_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = SysfsLeds::open(dir.path(), &[(Light::Green, "ACT".to_string())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such LED"), "{err}");
        let err = SysfsLeds::open(dir.path(), &[(Light::Red, "../etc".to_string())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[leds] red"), "{err}");
    }
}
