//! The `[leds]` section: the backend and the lights it can drive.

use std::path::Path;

use toml::Spanned;

use super::super::check::Checker;
use super::super::raw::RawLeds;
use super::super::{LedBackendKind, LedConfig, LedPin};

pub(super) fn build_leds(
    raw: Option<Spanned<RawLeds>>,
    base: &Path,
    c: &mut Checker<'_>,
) -> LedConfig {
    let (span, raw) = match raw {
        Some(raw) => (Some(raw.span()), raw.into_inner()),
        None => (None, RawLeds::default()),
    };
    let backend = match &raw.backend {
        Some(name) => LedBackendKind::ALL
            .into_iter()
            .find(|b| b.as_str() == name.get_ref())
            .unwrap_or_else(|| {
                let known: Vec<&str> = LedBackendKind::ALL.iter().map(|b| b.as_str()).collect();
                c.at(
                    name,
                    "leds.backend",
                    format!("unknown backend {:?}: {}", name.get_ref(), known.join(", ")),
                );
                LedBackendKind::None
            }),
        None => LedBackendKind::Auto,
    };

    let path = raw.path.map(|p| base.join(p.into_inner()));
    if backend == LedBackendKind::File && path.is_none() {
        c.problem(
            span.clone(),
            "leds.path",
            "missing: backend \"file\" needs the path of its JSON file",
        );
    }

    let mut seen: Vec<(LedPin, &str)> = Vec::new();
    let mut pin = |value: Option<Spanned<LedPin>>, name: &'static str| {
        let value = value?;
        let field = format!("leds.{name}");
        let why = match (backend, value.get_ref()) {
            (
                LedBackendKind::Auto | LedBackendKind::Rppal | LedBackendKind::Gpiochip,
                LedPin::Name(_),
            ) => Some(format!(
                "backend {backend} takes a GPIO line number (BCM pin or line offset), not a name"
            )),
            (LedBackendKind::Sysfs, LedPin::Line(_)) => Some(
                "backend sysfs takes the name of an LED under /sys/class/leds, not a number"
                    .to_owned(),
            ),
            (_, LedPin::Name(n)) if n.is_empty() => Some("must not be empty".to_owned()),
            _ => None,
        };
        if let Some(why) = why {
            c.at(&value, &field, why);
        } else if let Some((_, first)) = seen.iter().find(|(p, _)| p == value.get_ref()) {
            c.at(&value, &field, format!("is the same light as leds.{first}"));
        }
        seen.push((value.get_ref().clone(), name));
        Some(value.into_inner())
    };
    let green = pin(raw.green, "green");
    let amber = pin(raw.amber, "amber");
    let red = pin(raw.red, "red");
    let activity = pin(raw.activity, "activity");

    LedConfig {
        backend,
        chip: raw.chip.map(|chip| base.join(chip.into_inner())),
        green,
        amber,
        red,
        activity,
        path,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::testing::*;
    use crate::config::*;

    #[test]
    fn leds_need_a_known_backend_and_pins_it_can_use() {
        let env = FakeEnv::new();
        refused(
            "[leds]\nbackend = \"neopixel\"",
            &env,
            "leds.backend",
            "unknown backend \"neopixel\"",
        );
        refused(
            "[leds]\nbackend = \"file\"",
            &env,
            "leds.path",
            "needs the path",
        );
        refused(
            "[leds]\nbackend = \"rppal\"\ngreen = \"ACT\"",
            &env,
            "leds.green",
            "line number",
        );
        refused("[leds]\nred = \"PWR\"", &env, "leds.red", "line number");
        refused(
            "[leds]\nbackend = \"sysfs\"\nred = 22",
            &env,
            "leds.red",
            "name of an LED",
        );
        refused("[leds]\ngreen = -1", &env, "leds.green", "invalid value");
        refused(
            "[leds]\ngreen = 17\nred = 17",
            &env,
            "leds.red",
            "same light as leds.green",
        );

        let config = accept(
            "[leds]\nbackend = \"sysfs\"\ngreen = \"ACT\"\nred = \"PWR\"",
            &env,
        );
        assert_eq!(config.leds.backend, LedBackendKind::Sysfs);
        assert_eq!(config.leds.green, Some(LedPin::Name("ACT".into())));
        let config = accept(
            "[leds]\nbackend = \"file\"\npath = \"/run/keyrelay/leds.json\"\ngreen = 1",
            &env,
        );
        assert_eq!(
            config.leds.path,
            Some(PathBuf::from("/run/keyrelay/leds.json"))
        );
        let config = accept(
            "[leds]\nbackend = \"gpiochip\"\nchip = \"/dev/gpiochip4\"\ngreen = 5",
            &env,
        );
        assert_eq!(config.leds.chip, Some(PathBuf::from("/dev/gpiochip4")));
        assert_eq!(config.leds.green, Some(LedPin::Line(5)));
        assert_eq!(
            accept("[leds]\nbackend = \"none\"", &env).leds.backend,
            LedBackendKind::None
        );
    }
}
