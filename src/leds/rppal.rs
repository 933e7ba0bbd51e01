//! The `rppal` backend: BCM pins through the Raspberry Pi OS kernel's `/dev/gpiomem`.
//! Other kernels (Debian's own arm64 one) have no `/dev/gpiomem`: that is `gpiochip`'s job.

use ::rppal::gpio::{Gpio, OutputPin};

use super::{LedBackend, LedError, Light};
use crate::health::Lights;

/// One output pin per configured light.
#[derive(Debug)]
pub struct RppalLeds {
    pins: Vec<(Light, OutputPin)>,
}

impl RppalLeds {
    /// Claims each BCM pin as an output, low (dark). Off a Pi rppal answers `UnknownModel`;
    /// on a Pi without `/dev/gpiomem` access, an I/O or permission error.
    pub fn open(pins: &[(Light, u32)]) -> Result<Self, LedError> {
        let gpio = Gpio::new().map_err(|cause| LedError::RppalUnavailable { cause })?;
        let mut outputs = Vec::with_capacity(pins.len());
        for &(light, number) in pins {
            let bcm = u8::try_from(number).map_err(|_| LedError::BadPin {
                light: light.name(),
                pin: number.to_string(),
                why: "not a BCM GPIO number",
            })?;
            let pin = gpio.get(bcm).map_err(|cause| match cause {
                ::rppal::gpio::Error::PinNotAvailable(_) => LedError::BadPin {
                    light: light.name(),
                    pin: number.to_string(),
                    why: "this Pi has no such BCM GPIO pin",
                },
                cause => LedError::RppalUnavailable { cause },
            })?;
            // Dropping an OutputPin puts the pin back to an input (rppal's reset_on_drop),
            // which leaves the LED dark even after a crash.
            outputs.push((light, pin.into_output_low()));
        }
        Ok(RppalLeds { pins: outputs })
    }
}

impl LedBackend for RppalLeds {
    fn name(&self) -> &'static str {
        "rppal"
    }

    fn apply(&mut self, lights: &Lights, phase_on: bool) -> Result<(), LedError> {
        for (light, pin) in &mut self.pins {
            if light.is_lit(lights, phase_on) {
                pin.set_high();
            } else {
                pin.set_low();
            }
        }
        Ok(())
    }
}
