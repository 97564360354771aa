//! What a redrive was asked to move: recorded with the run when the redrive
//! starts ([`RunRecord::redrive`](crate::domain::RunRecord::redrive)), so
//! that whoever finishes an interrupted redrive moves what was asked for.

use crate::domain::ItemId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A redrive's scope: the failed items it moves back to the work queue.
///
/// Stored as JSON ([`RedriveScope::encode`]) in one field of the run's row.
/// An item is in scope when any of the `select` selections admits it; a
/// selection admits a failed item when every one of its selectors does
/// (none: every failed item). More selectors (a failure's reason or kind)
/// are more optional fields of [`Selection`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveScope {
    /// Names the redrive in the messages it sends back
    /// ([`WorkBody::redrive`](crate::wire::message::WorkBody::redrive) is
    /// `ID/PASS`): a dead letter that carries it was moved by this redrive
    /// already and failed again, so finishing the redrive leaves it where
    /// it is.
    pub id: String,
    pub select: Vec<Selection>,
}

/// One selection of failed items; its selectors all apply.
///
/// Unknown fields are refused rather than ignored: a build that does not
/// know a selector would otherwise widen the scope to items nobody asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Only these items (`redrive --item`); every failed item when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<BTreeSet<ItemId>>,
}

impl Selection {
    /// Every failed item of the run.
    pub fn all_failed() -> Self {
        Self::default()
    }

    /// The named items only.
    pub fn items(items: BTreeSet<ItemId>) -> Self {
        Self { items: Some(items) }
    }

    pub fn admits(&self, item: &ItemId) -> bool {
        self.items.as_ref().is_none_or(|i| i.contains(item))
    }

    fn is_all(&self) -> bool {
        self.items.is_none()
    }
}

impl RedriveScope {
    /// A new redrive of `selection`, with a fresh id.
    pub fn new(selection: Selection) -> Self {
        Self {
            id: format!("{:016x}", fastrand::u64(..)),
            select: vec![selection],
        }
    }

    /// A new redrive (a fresh id) of everything `self` or `other` selects:
    /// what a redrive started over an unfinished one moves.
    pub fn union(&self, other: &Self) -> Self {
        let mut select: Vec<Selection> = Vec::new();
        for s in self.select.iter().chain(&other.select) {
            if s.is_all() {
                // Every failed item: the other selections add nothing.
                select = vec![Selection::all_failed()];
                break;
            }
            match select.iter_mut().find(|t| t.items.is_some()) {
                // Item lists merge into one list.
                Some(t) => t
                    .items
                    .get_or_insert_with(BTreeSet::new)
                    .extend(s.items.iter().flatten().cloned()),
                None => select.push(s.clone()),
            }
        }
        Self {
            id: format!("{:016x}", fastrand::u64(..)),
            select,
        }
    }

    pub fn admits(&self, item: &ItemId) -> bool {
        self.select.iter().any(|s| s.admits(item))
    }

    /// The items the scope names, when it names them all; `None` when a
    /// selection takes every failed item.
    pub fn named_items(&self) -> Option<BTreeSet<ItemId>> {
        let mut all = BTreeSet::new();
        for s in &self.select {
            all.extend(s.items.as_ref()?.iter().cloned());
        }
        Some(all)
    }

    /// The stored form: compact JSON, the same for equal scopes (a ledger
    /// may compare stored scopes as strings).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a scope is plain data")
    }

    pub fn decode(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> BTreeSet<ItemId> {
        names.iter().map(|n| ItemId::new(*n).unwrap()).collect()
    }

    #[test]
    fn union_merges_item_lists_and_all_takes_over() {
        let a = RedriveScope::new(Selection::items(ids(&["a", "b"])));
        let b = RedriveScope::new(Selection::items(ids(&["c"])));
        let u = a.union(&b);
        assert_ne!(u.id, a.id);
        assert_eq!(u.select, vec![Selection::items(ids(&["a", "b", "c"]))]);
        assert_eq!(u.named_items(), Some(ids(&["a", "b", "c"])));
        let all = RedriveScope::new(Selection::all_failed());
        for u in [a.union(&all), all.union(&a)] {
            assert_eq!(u.select, vec![Selection::all_failed()]);
            assert_eq!(u.named_items(), None);
            assert!(u.admits(&ItemId::new("zzz").unwrap()));
        }
    }

    #[test]
    fn encode_round_trips_and_refuses_unknown_selectors() {
        let s = RedriveScope::new(Selection::items(ids(&["b", "a"])));
        let text = s.encode();
        assert_eq!(
            text,
            format!(r#"{{"id":"{}","select":[{{"items":["a","b"]}}]}}"#, s.id)
        );
        assert_eq!(RedriveScope::decode(&text).unwrap(), s);
        let all = RedriveScope::new(Selection::all_failed());
        assert_eq!(RedriveScope::decode(&all.encode()).unwrap(), all);
        let newer = r#"{"id":"x","select":[{"reasons":["timeout"]}]}"#;
        let err = RedriveScope::decode(newer).unwrap_err();
        assert!(err.to_string().contains("unknown field `reasons`"), "{err}");
    }
}
