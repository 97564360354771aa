//! A Bloom filter of item ids, so that a load checks an id against the
//! ones before it only when it might repeat one (see `store::source::load_items`):
//! the items table then needs no index on the id, whose upkeep was a third
//! of a load's time on the writer thread.
//!
//! Grows in layers, each twice the size of the one before, so that it
//! needs no item count up front: 10 bits per id for a false-positive rate
//! of about 1% per full layer, rounded up to a power of two per layer
//! (10M ids: 30 MiB, the only memory of a load that grows with its size).
//! A false positive only costs a check; there are no false negatives.

/// Ids the first layer is sized for.
const FIRST_CAPACITY: usize = 1 << 20;
/// Bits per id: with [`HASHES`] hashes, about 1% false positives when full.
const BITS_PER_ID: usize = 10;
const HASHES: u64 = 7;

#[derive(Debug)]
pub(crate) struct Seen {
    /// Full layers, then the one being filled.
    layers: Vec<Layer>,
}

#[derive(Debug)]
struct Layer {
    words: Vec<u64>,
    capacity: usize,
    len: usize,
}

impl Layer {
    fn new(capacity: usize) -> Self {
        let bits = (capacity * BITS_PER_ID).next_power_of_two();
        Self {
            words: vec![0; bits / 64],
            capacity,
            len: 0,
        }
    }

    /// The bit positions of a hash pair (Kirsch-Mitzenmacher double hashing).
    fn bits(&self, (h1, h2): (u64, u64)) -> impl Iterator<Item = usize> {
        let mask = (self.words.len() * 64 - 1) as u64;
        (0..HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    fn contains(&self, h: (u64, u64)) -> bool {
        self.bits(h)
            .all(|b| self.words[b / 64] & (1 << (b % 64)) != 0)
    }

    fn insert(&mut self, h: (u64, u64)) {
        // `bits` borrows nothing of `self`: its iterator owns the mask.
        for b in self.bits(h) {
            self.words[b / 64] |= 1 << (b % 64);
        }
        self.len += 1;
    }
}

/// Two independent-enough 64-bit hashes of `id`: FNV-1a, then SplitMix64
/// finalisers of it (ids are short; this needs no dependency and is fast).
fn hashes(id: &[u8]) -> (u64, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in id {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let h1 = mix(h);
    // Odd, so that the HASHES positions differ.
    let h2 = mix(h1 ^ 0x9e37_79b9_7f4a_7c15) | 1;
    (h1, h2)
}

impl Seen {
    pub(crate) fn new() -> Self {
        Self {
            layers: vec![Layer::new(FIRST_CAPACITY)],
        }
    }

    /// Whether `id` may have been recorded (always true if it was).
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.contains_hashes(hashes(id.as_bytes()))
    }

    fn contains_hashes(&self, h: (u64, u64)) -> bool {
        self.layers.iter().any(|l| l.contains(h))
    }

    /// Records `id`; returns whether it may have been recorded before
    /// (always true if it was).
    pub(crate) fn insert(&mut self, id: &str) -> bool {
        let h = hashes(id.as_bytes());
        let maybe = self.contains_hashes(h);
        let last = self.layers.last().expect("at least one layer");
        if last.len >= last.capacity {
            let capacity = last.capacity * 2;
            self.layers.push(Layer::new(capacity));
        }
        self.layers
            .last_mut()
            .expect("at least one layer")
            .insert(h);
        maybe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_id_is_always_reported_and_new_ones_rarely() {
        let mut seen = Seen::new();
        let n = FIRST_CAPACITY + FIRST_CAPACITY / 2; // two layers
        let mut false_positives = 0;
        for i in 0..n {
            if seen.insert(&format!("item-{i}")) {
                false_positives += 1;
            }
        }
        assert_eq!(seen.layers.len(), 2, "the first full, the second half");
        for i in (0..n).step_by(997) {
            assert!(seen.insert(&format!("item-{i}")), "item-{i} forgotten");
        }
        // About 1% per full layer at most.
        let rate = false_positives as f64 / n as f64;
        assert!(rate < 0.02, "false-positive rate {rate}");
    }

    /// The figures docs/performance.md quotes: false alarms and memory for
    /// a load of distinct ids. Build-independent, so a debug build will do:
    /// `cargo test -p settle-embedded --lib bloom::tests::figures -- --ignored --nocapture`
    /// (`SETTLE_BLOOM_IDS` sets the count, 10M by default).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn figures() {
        let n: usize = std::env::var("SETTLE_BLOOM_IDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000_000);
        let mut seen = Seen::new();
        let mut false_alarms = 0u64;
        for i in 0..n {
            false_alarms += u64::from(seen.insert(&format!("user-{i:08}")));
        }
        let bytes: usize = seen.layers.iter().map(|l| l.words.len() * 8).sum();
        println!(
            "{n} distinct ids: {false_alarms} false alarms ({:.3}%), {} layers, {:.1} MiB",
            false_alarms as f64 * 100.0 / n as f64,
            seen.layers.len(),
            bytes as f64 / (1 << 20) as f64
        );
    }

    #[test]
    fn similar_ids_are_told_apart() {
        let mut seen = Seen::new();
        assert!(!seen.insert("a"));
        assert!(!seen.insert("b"));
        assert!(!seen.insert("ab"));
        assert!(!seen.insert("ba"));
        assert!(!seen.insert(""));
        assert!(seen.insert("ab"));
    }
}
