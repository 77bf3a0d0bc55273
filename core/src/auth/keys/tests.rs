//! Tests of the key files: the registry parses into the keys that verify (all active keys of a
//! device, no revoked one), every malformed line is refused with its line number, edits keep the
//! operator's comments, format → parse round-trips, and the signing-key file holds exactly a seed.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::auth::{seal_message, ChainHash, DeviceSigner};
use crate::event::Seq;

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn signer(name: &str, seed: u8) -> DeviceSigner {
    DeviceSigner::from_seed(device(name), [seed; 32])
}

fn line(name: &str, seed: u8, state: &str, added: u64) -> String {
    format!("{name} {} {state} {added}", super::super::hex(&signer(name, seed).public_key()))
}

/// Whether `keys` accepts a seal made by `signer`.
fn accepts(keys: &DeviceKeys, signer: &DeviceSigner) -> bool {
    let chain = ChainHash::genesis(&signer.device());
    let seal = signer.seal(Seq(1), &chain);
    keys.verifies(&signer.device(), &seal_message(&signer.device(), Seq(1), &chain), &seal.signature)
}

#[test]
fn active_keys_verify_and_revoked_ones_do_not() {
    let text = [
        REGISTRY_HEADER.trim_end().to_string(),
        String::new(),
        line("pump-7", 1, "revoked", 1_000),
        line("pump-7", 2, "active", 2_000),
        "  # rotated on site visit".to_string(),
        line("pump-7", 3, "active", 3_000),
        format!("meter-1\t{}  active\t4000", super::super::hex(&signer("meter-1", 4).public_key())),
        line("retired-9", 5, "revoked", 5_000),
    ]
    .join("\n");
    let keys = DeviceKeys::parse(&text).unwrap();
    // A rotation: the old and the new key of pump-7 both verify; the revoked one does not.
    assert!(accepts(&keys, &signer("pump-7", 2)));
    assert!(accepts(&keys, &signer("pump-7", 3)));
    assert!(!accepts(&keys, &signer("pump-7", 1)));
    assert!(accepts(&keys, &signer("meter-1", 4)));
    // A device whose keys are all revoked is unknown: its batches are refused.
    assert!(!keys.knows(&device("retired-9")));
    assert!(!accepts(&keys, &signer("retired-9", 5)));
    assert_eq!(keys.len(), 2);
    // Keys sign for their own device only.
    assert!(!accepts(&keys, &DeviceSigner::from_seed(device("meter-1"), [2; 32])));

    let registry = KeyRegistry::parse(&text).unwrap();
    let active: Vec<Millis> = registry.active(&device("pump-7")).map(|entry| entry.added).collect();
    assert_eq!(active, vec![Millis(2_000), Millis(3_000)]);
    assert_eq!(registry.entries().count(), 5);
}

#[test]
fn malformed_lines_are_refused_with_their_line_number() {
    let good = line("pump-7", 1, "active", 1);
    let key = super::super::hex(&signer("pump-7", 2).public_key());
    let cases: Vec<(String, RegistryError)> = vec![
        (format!("pump-7 {key} active"), RegistryError::Fields { line: 3, found: 3 }),
        (format!("pump-7 {key} active 5 extra"), RegistryError::Fields { line: 3, found: 5 }),
        (
            format!("pump/7 {key} active 5"),
            RegistryError::Device { line: 3, source: DeviceId::new("pump/7").unwrap_err() },
        ),
        (format!("pump-7 {} active 5", &key[..62]), RegistryError::KeyHex { line: 3 }),
        (format!("pump-7 {}zz active 5", &key[..62]), RegistryError::KeyHex { line: 3 }),
        // The identity point is a weak key; it would verify forged signatures.
        (format!("pump-7 01{} active 5", "0".repeat(62)), RegistryError::Key { line: 3, source: KeyError::Invalid }),
        (format!("pump-7 {key} Active 5"), RegistryError::State { line: 3 }),
        (format!("pump-7 {key} active -5"), RegistryError::Added { line: 3 }),
        (format!("pump-7 {key} active +5"), RegistryError::Added { line: 3 }),
        (format!("pump-7 {key} active 99999999999999999999"), RegistryError::Added { line: 3 }),
        (good.replace("active", "revoked"), RegistryError::Duplicate { line: 3, first_line: 2 }),
    ];
    for (bad, expected) in cases {
        let text = format!("# keys\n{good}\n{bad}\n");
        assert_eq!(KeyRegistry::parse(&text), Err(expected.clone()), "{bad:?}");
        assert_eq!(DeviceKeys::parse(&text).unwrap_err(), expected);
        // The message names the line.
        assert!(expected.to_string().starts_with("line 3:"), "{expected}");
    }
}

#[test]
fn edits_rotate_and_revoke_and_keep_the_comments() {
    let text = format!("{REGISTRY_HEADER}# site A\n{}\n", line("pump-7", 1, "active", 1_000));
    let mut registry = KeyRegistry::parse(&text).unwrap();
    // Rotation: a second active key.
    assert_eq!(registry.add(device("pump-7"), signer("pump-7", 2).public_key(), Millis(2_000)), Ok(true));
    assert_eq!(registry.add(device("pump-7"), signer("pump-7", 2).public_key(), Millis(9_000)), Ok(false));
    assert_eq!(registry.add(device("pump-7"), [0; 32], Millis(9_000)), Err(KeyError::Invalid));
    let keys = registry.device_keys();
    assert!(accepts(&keys, &signer("pump-7", 1)) && accepts(&keys, &signer("pump-7", 2)));

    // Revoke the old key only.
    assert_eq!(registry.revoke(&device("pump-7"), Some(&signer("pump-7", 1).public_key())), 1);
    let keys = registry.device_keys();
    assert!(!accepts(&keys, &signer("pump-7", 1)) && accepts(&keys, &signer("pump-7", 2)));
    // A revoked key cannot be added back.
    assert_eq!(registry.add(device("pump-7"), signer("pump-7", 1).public_key(), Millis(3_000)), Ok(false));
    assert!(!accepts(&registry.device_keys(), &signer("pump-7", 1)));

    // Revoke all the device's keys (its certificate was revoked).
    registry.add(device("meter-1"), signer("meter-1", 3).public_key(), Millis(4_000)).unwrap();
    assert_eq!(registry.revoke(&device("pump-7"), None), 1);
    assert_eq!(registry.revoke(&device("pump-7"), None), 0);
    let keys = registry.device_keys();
    assert!(!keys.knows(&device("pump-7")));
    assert!(accepts(&keys, &signer("meter-1", 3)));

    let written = registry.format();
    assert!(written.starts_with(&format!("{REGISTRY_HEADER}# site A\n")), "{written}");
    assert_eq!(KeyRegistry::parse(&written).unwrap(), registry);
    assert_eq!(written.lines().filter(|line| line.contains(" revoked ")).count(), 2);
}

#[test]
fn a_signing_key_file_holds_exactly_a_seed() {
    let seed: [u8; 32] = core::array::from_fn(|i| (i * 7 + 3) as u8);
    let text = format_seed(&seed);
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    assert!(text.trim_end().bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)));
    assert_eq!(parse_seed(&text), Ok(seed));
    assert_eq!(parse_seed(&text.to_uppercase()), Ok(seed));
    assert_eq!(parse_seed(""), Err(SeedError::Length { found_chars: 0 }));
    assert_eq!(parse_seed(&text[..63]), Err(SeedError::Length { found_chars: 63 }));
    assert_eq!(parse_seed(&format!("{}g\n", &text[..63])), Err(SeedError::NotHex));
    // The signer made from the file is the one whose public key the registry lists.
    let public = DeviceSigner::from_seed(device("pump-7"), parse_seed(&text).unwrap()).public_key();
    assert_eq!(public, DeviceSigner::from_seed(device("pump-7"), seed).public_key());
    // Errors never show the contents.
    let message = parse_seed(&format!("{}g", &text[..63])).unwrap_err().to_string();
    assert!(!message.contains(&text[..8]), "{message}");
}

#[test]
fn a_public_key_parses_from_hex_only_if_usable() {
    let public = signer("pump-7", 9).public_key();
    let text = super::super::hex(&public);
    assert_eq!(parse_public_key(&text), Ok(public));
    assert_eq!(parse_public_key(&format!(" {}\n", text.to_uppercase())), Ok(public));
    assert_eq!(parse_public_key(&text[..62]), Err(KeyError::Invalid));
    assert_eq!(parse_public_key(&format!("01{}", "0".repeat(62))), Err(KeyError::Invalid));
}

fn name_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

/// A registry file's lines: keys (from distinct seeds), comments and blank lines.
#[derive(Clone, Debug)]
enum GenLine {
    Key { name: String, seed: u8, revoked: bool, added: u64 },
    Comment(String),
    Blank(String),
}

fn line_strategy() -> impl Strategy<Value = GenLine> {
    prop_oneof![
        4 => (name_strategy(), any::<u8>(), any::<bool>(), any::<u64>())
            .prop_map(|(name, seed, revoked, added)| GenLine::Key { name, seed, revoked, added }),
        1 => "[ \t]{0,3}#[ -~]{0,40}".prop_map(GenLine::Comment),
        1 => "[ \t]{0,3}".prop_map(GenLine::Blank),
    ]
}

proptest! {
    // Ed25519 in a debug build costs milliseconds per key; 32 cases of up to 24 lines suffice for
    // a text format.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn format_then_parse_round_trips(lines in proptest::collection::vec(line_strategy(), 0..24)) {
        let mut seen = alloc::collections::BTreeSet::new();
        let mut text = String::new();
        let mut expected = Vec::new();
        for generated in &lines {
            match generated {
                GenLine::Key { name, seed, revoked, added } => {
                    // A key is listed once; the seed picks the key.
                    if !seen.insert(*seed) {
                        continue;
                    }
                    let entry = KeyEntry {
                        device: device(name),
                        public: DeviceSigner::from_seed(device(name), [*seed; 32]).public_key(),
                        state: if *revoked { KeyState::Revoked } else { KeyState::Active },
                        added: Millis(*added),
                    };
                    text.push_str(&entry.to_string());
                    expected.push((entry, *seed));
                }
                GenLine::Comment(comment) | GenLine::Blank(comment) => text.push_str(comment),
            }
            text.push('\n');
        }
        let registry = KeyRegistry::parse(&text).unwrap();
        let entries: Vec<KeyEntry> = expected.iter().map(|(entry, _)| *entry).collect();
        prop_assert_eq!(registry.entries().copied().collect::<Vec<_>>(), entries);
        let formatted = registry.format();
        prop_assert_eq!(&formatted, &text);
        prop_assert_eq!(KeyRegistry::parse(&formatted).unwrap(), registry.clone());
        // The keys that verify are exactly the active ones.
        let keys = registry.device_keys();
        for (entry, seed) in &expected {
            let signer = DeviceSigner::from_seed(entry.device, [*seed; 32]);
            prop_assert_eq!(accepts(&keys, &signer), entry.state == KeyState::Active);
        }
    }
}
