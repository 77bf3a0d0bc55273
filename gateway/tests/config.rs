//! `gateway.toml`: the per-device rate limit defaults to core's (100 events/s, bursts of 100), 0
//! turns it off, and unknown keys are refused.
#![allow(clippy::unwrap_used)]

use tidesync_core::rate::RateLimit;
use tidesync_gateway::Config;

const BASE: &str = "gateway = \"site-1\"\nlisten = \"127.0.0.1:0\"\nspool = \"spool.db\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"gw.pem\"\nkey = \"gw.key\"\n";

fn load(text: &str) -> Result<Config, tidesync_gateway::config::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path)
}

#[test]
fn device_rate_limit_defaults_to_cores_and_can_be_set_or_turned_off() {
    let config = load(BASE).unwrap();
    assert_eq!(config.limits.device_rate(), RateLimit::DEVICE_DEFAULT);
    assert_eq!(config.limits.device_rate(), RateLimit { events_per_s: 100, burst_events: 100 });

    let config = load(&format!("{BASE}[limits]\ndevice_events_per_s = 500\ndevice_burst_events = 2000\n")).unwrap();
    assert_eq!(config.limits.device_rate(), RateLimit { events_per_s: 500, burst_events: 2_000 });
    // Setting one keeps the other's default.
    let config = load(&format!("{BASE}[limits]\ndevice_events_per_s = 10\n")).unwrap();
    assert_eq!(config.limits.device_rate(), RateLimit { events_per_s: 10, burst_events: 100 });

    let config = load(&format!("{BASE}[limits]\ndevice_events_per_s = 0\n")).unwrap();
    assert!(config.limits.device_rate().is_unlimited());

    assert!(load(&format!("{BASE}[limits]\ndevice_events_per_minute = 5\n")).is_err());
}
