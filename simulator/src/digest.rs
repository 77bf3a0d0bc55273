//! `TraceDigest`: a running 64-bit FNV-1a hash of everything a run does (every frame sent and
//! delivered, every event recorded, every fault). Two runs with the same digest did the same
//! thing in the same order; a changed digest is the first sign a run is not reproducible.

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A running FNV-1a hash. Not cryptographic: it detects divergence, it does not resist forgery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceDigest {
    state: u64,
}

impl Default for TraceDigest {
    fn default() -> Self {
        Self { state: FNV_OFFSET }
    }
}

impl TraceDigest {
    /// A digest of nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mixes in bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.state ^= u64::from(*byte);
            self.state = self.state.wrapping_mul(FNV_PRIME);
        }
    }

    /// Mixes in a number.
    pub fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.state
    }
}

/// The FNV-1a hash of `bytes` alone.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut digest = TraceDigest::new();
    digest.bytes(bytes);
    digest.value()
}

/// A hash of an event's content (seq, clock stamp, event time, kind and body): what a device
/// made durable must reach the cloud with the same hash.
pub fn event_hash(event: &tidesync_core::event::Event) -> u64 {
    let mut digest = TraceDigest::new();
    digest.u64(event.id.seq.0);
    digest.u64(event.hlc.wall_ms);
    digest.u64(u64::from(event.hlc.logical));
    digest.u64(event.event_time.0);
    digest.u64(u64::from(event.kind().tag()));
    let mut body = Vec::new();
    event.payload.encode_body(&mut body);
    digest.bytes(&body);
    digest.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        // Test vectors of the FNV reference (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(hash_bytes(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash_bytes(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash_bytes(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn order_matters() {
        let mut first = TraceDigest::new();
        first.u64(1);
        first.u64(2);
        let mut second = TraceDigest::new();
        second.u64(2);
        second.u64(1);
        assert_ne!(first.value(), second.value());
    }
}
