//! Integration tests: one binary of modules, against a real Mosquitto and fake providers.
