//! Tests of loading the signing key: a good file gives the key the registry lists; a missing,
//! damaged or wrong-length file is a typed error that never shows the secret.

use tidesync_core::auth::{format_seed, DeviceSigner};

use super::*;

fn write(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn a_key_file_loads_into_the_listed_key_and_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let seed = [0x5a; 32];
    let good = write(&dir, "good.sign.key", format_seed(&seed).as_bytes());
    let key = SigningKey::load(&good).unwrap();
    let device = DeviceId::new("pump-7").unwrap();
    assert_eq!(key.public_key(), DeviceSigner::from_seed(device, seed).public_key());
    assert_eq!(key.signer(device).public_key(), key.public_key());
    assert_eq!(key.public_hex().len(), 64);

    let missing = dir.path().join("nope.sign.key");
    assert!(matches!(SigningKey::load(&missing), Err(SigningKeyError::Missing { path }) if path == missing));

    let secret_hex = format_seed(&seed);
    let short = write(&dir, "short.sign.key", &secret_hex.as_bytes()[..40]);
    let error = SigningKey::load(&short).unwrap_err();
    assert!(
        matches!(&error, SigningKeyError::Corrupt { source: SeedError::Length { found_chars: 40 }, .. }),
        "{error:?}"
    );
    let not_hex = write(&dir, "bad.sign.key", format!("{}xy\n", &secret_hex[..62]).as_bytes());
    let error = SigningKey::load(&not_hex).unwrap_err();
    assert!(matches!(&error, SigningKeyError::Corrupt { source: SeedError::NotHex, .. }), "{error:?}");
    let binary = write(&dir, "binary.sign.key", &[0xff; 64]);
    assert!(matches!(SigningKey::load(&binary), Err(SigningKeyError::Corrupt { .. })));

    // Neither errors nor Debug show the secret.
    for shown in [format!("{error} {error:?}"), format!("{key:?}")] {
        assert!(!shown.contains(&secret_hex[..16]), "{shown}");
    }
    assert!(format!("{key:?}").contains(&key.public_hex()));
}
