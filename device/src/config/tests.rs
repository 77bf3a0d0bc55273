//! Tests of the config file format.

use super::*;

#[test]
fn a_minimal_file_takes_every_default() {
    let config: Config = toml::from_str("device_id = \"pump-7\"\n").unwrap();
    assert_eq!(config.device_id.as_str(), "pump-7");
    assert_eq!(config.ledger, LedgerConfig::default());
    assert_eq!(config.ledger.synchronous, Synchronous::Full);
    assert_eq!(config.ledger.full_policy, FullPolicy::Refuse);
}

#[test]
fn a_written_config_reads_back_equal() {
    let mut config = Config::new(DeviceId::new("pump-7").unwrap());
    config.ledger.full_policy = FullPolicy::DropOldest;
    config.ledger.budget_bytes = 4096;
    config.uplink.linger_ms = 900_000;
    let text = toml::to_string_pretty(&config).unwrap();
    assert!(text.contains("linger_ms = 900000"), "{text}");
    assert!(text.contains("full_policy = \"drop-oldest\""), "{text}");
    assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
}

#[test]
fn unknown_keys_and_bad_names_are_refused() {
    assert!(toml::from_str::<Config>("device_id = \"pump-7\"\nbudget = 3\n").is_err());
    assert!(toml::from_str::<Config>("device_id = \"pump 7\"\n").is_err());
}
