//! Integration tests: one binary of modules, against a real Mosquitto, fake providers
//! speaking each provider's wire format, and the real `keyrelay` binary.

mod appliance;
mod budget;
mod e2e;
mod fake_provider;
mod harness;
