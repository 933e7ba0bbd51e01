//! The `none` backend: no lights, for boxes without LEDs and for `auto` without GPIO.

use super::{LedBackend, LedError};
use crate::health::Lights;

/// Accepts every pattern and shows nothing.
#[derive(Debug, Default)]
pub struct NoLeds;

impl LedBackend for NoLeds {
    fn name(&self) -> &'static str {
        "none"
    }

    fn apply(&mut self, _lights: &Lights, _phase_on: bool) -> Result<(), LedError> {
        Ok(())
    }
}
