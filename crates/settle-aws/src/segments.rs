//! Each run's item statuses as bitmaps: the rows the DynamoDB ledger's tally
//! is exact against.
//!
//! Why not the item rows themselves: DynamoDB bills a transactional write
//! twice, so committing every item row together with its run's tally costs
//! 2 write units an item, more than the whole cost target. Here an item row
//! is written on its own (1 unit), and the tally moves in one small
//! transaction per reducer batch together with the bitmap rows that record
//! which items it has counted. Results arrive in about the order they were
//! dispatched, so a batch of ~90 results touches one or two segments.
//!
//! A status only moves up (pending < failed < succeeded, see
//! `ItemRecord::apply`), so a segment records the highest status seen for
//! each item and the tally moves when, and only when, that rises. Raising to
//! a status already recorded is a no-op, which makes a replayed or
//! reordered commit count nothing twice.

use settle_core::domain::{ItemStatus, TallyDelta};

/// Items per segment row: 2 bits each fill 512 bytes, so a segment row
/// stays under 1 KB (one write unit, two in a transaction).
pub(crate) const SEGMENT_ITEMS: u64 = 2048;
/// The bitmap's length in bytes.
pub(crate) const SEGMENT_BYTES: usize = (SEGMENT_ITEMS / 4) as usize;

/// Which segment, and which slot in it, hold item `seq` of a run.
pub(crate) fn locate(seq: u64) -> (u64, usize) {
    (seq / SEGMENT_ITEMS, (seq % SEGMENT_ITEMS) as usize)
}

/// A status's rank: the order statuses move in.
pub(crate) fn rank(status: ItemStatus) -> u8 {
    match status {
        ItemStatus::Pending => 0,
        ItemStatus::Failed => 1,
        ItemStatus::Succeeded => 2,
    }
}

/// One segment's bitmap: 2 bits an item, the rank of its highest status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    bits: Vec<u8>,
}

impl Default for Segment {
    fn default() -> Self {
        Self {
            bits: vec![0; SEGMENT_BYTES],
        }
    }
}

impl Segment {
    /// From a stored bitmap; `None` if it has the wrong length.
    pub fn from_bytes(bits: &[u8]) -> Option<Self> {
        (bits.len() == SEGMENT_BYTES).then(|| Self {
            bits: bits.to_vec(),
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn get(&self, slot: usize) -> u8 {
        (self.bits[slot / 4] >> ((slot % 4) * 2)) & 0b11
    }

    /// Raises the slot to `rank` if it is lower; returns how the tally moves.
    pub fn raise(&mut self, slot: usize, rank: u8) -> TallyDelta {
        let old = self.get(slot);
        let mut delta = TallyDelta::default();
        if rank <= old {
            return delta;
        }
        let shift = (slot % 4) * 2;
        self.bits[slot / 4] = (self.bits[slot / 4] & !(0b11 << shift)) | (rank << shift);
        let count = |r: u8| i64::from(rank == r) - i64::from(old == r);
        delta.failed = count(1);
        delta.succeeded = count(2);
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_counts_each_status_change_once() {
        let mut s = Segment::default();
        let failed = rank(ItemStatus::Failed);
        let succeeded = rank(ItemStatus::Succeeded);
        let d = s.raise(5, failed);
        assert_eq!((d.succeeded, d.failed), (0, 1));
        assert_eq!(
            s.raise(5, failed),
            TallyDelta::default(),
            "a replay is free"
        );
        let d = s.raise(5, succeeded);
        assert_eq!((d.succeeded, d.failed), (1, -1), "failed, then redriven");
        assert_eq!(s.raise(5, failed), TallyDelta::default(), "never down");
        assert_eq!(s.raise(5, rank(ItemStatus::Pending)), TallyDelta::default());
        assert_eq!(
            (s.get(4), s.get(5), s.get(6)),
            (0, 2, 0),
            "neighbours untouched"
        );
    }

    #[test]
    fn every_slot_is_its_own() {
        let mut s = Segment::default();
        for slot in 0..SEGMENT_ITEMS as usize {
            s.raise(slot, (slot % 3) as u8);
        }
        for slot in 0..SEGMENT_ITEMS as usize {
            assert_eq!(s.get(slot), (slot % 3) as u8, "slot {slot}");
        }
        let back = Segment::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(Segment::from_bytes(&[0; 3]).is_none());
    }

    #[test]
    fn seqs_map_to_segments() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(SEGMENT_ITEMS - 1), (0, SEGMENT_ITEMS as usize - 1));
        assert_eq!(locate(SEGMENT_ITEMS), (1, 0));
        assert_eq!(locate(5 * SEGMENT_ITEMS + 7), (5, 7));
    }
}
