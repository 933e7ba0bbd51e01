//! The `gpiochip` backend: line offsets through the kernel's GPIO character device
//! (`/dev/gpiochipN`), which every current kernel has, Debian's own arm64 one included.

use std::path::Path;

use gpiocdev::Request;
use gpiocdev::line::Value;

use super::{LedBackend, LedError, Light};
use crate::health::Lights;

/// The chip used when `[leds] chip` is not set: the SoC's own GPIO on a Raspberry Pi.
pub const DEFAULT_CHIP: &str = "/dev/gpiochip0";

/// The name the lines carry in `gpioinfo` while keyrelay holds them.
const CONSUMER: &str = "keyrelay";

/// One request holding every configured line as an output.
#[derive(Debug)]
pub struct GpiochipLeds {
    /// `None` when no light is configured: the chip was checked, nothing is held.
    request: Option<Request>,
    lines: Vec<(Light, u32)>,
}

impl GpiochipLeds {
    /// Requests each line offset of `chip` as an output, inactive (dark).
    pub fn open(chip: &Path, lines: &[(Light, u32)]) -> Result<Self, LedError> {
        let unavailable = |cause| LedError::GpiochipUnavailable {
            chip: chip.to_path_buf(),
            cause,
        };
        let request = if lines.is_empty() {
            // Nothing to hold, but an explicit choice of this backend must still fail where
            // there is no GPIO chip.
            gpiocdev::Chip::from_path(chip).map_err(unavailable)?;
            None
        } else {
            let offsets: Vec<u32> = lines.iter().map(|&(_, offset)| offset).collect();
            Some(
                Request::builder()
                    .on_chip(chip)
                    .with_consumer(CONSUMER)
                    .with_lines(&offsets)
                    .as_output(Value::Inactive)
                    .request()
                    .map_err(unavailable)?,
            )
        };
        Ok(GpiochipLeds {
            request,
            lines: lines.to_vec(),
        })
    }
}

impl LedBackend for GpiochipLeds {
    fn name(&self) -> &'static str {
        "gpiochip"
    }

    fn apply(&mut self, lights: &Lights, phase_on: bool) -> Result<(), LedError> {
        let Some(request) = &self.request else {
            return Ok(());
        };
        for &(light, offset) in &self.lines {
            let value = if light.is_lit(lights, phase_on) {
                Value::Active
            } else {
                Value::Inactive
            };
            request
                .set_value(offset, value)
                .map_err(|source| LedError::GpioLine { offset, source })?;
        }
        Ok(())
    }
}
