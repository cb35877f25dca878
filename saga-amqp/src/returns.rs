//! Returned messages matched to the publishes that sent them.
//!
//! lapin hands a returned message (mandatory, no queue) to whichever confirm of the channel it
//! completes next, which may belong to another publish on the same link. So a publish
//! registers its messages' ids before it sends them ([`Returns::begin`]); a publish that finds
//! another's return in its confirms notes it ([`Returns::note`]); and a publish takes the
//! returns noted for it when it has read its confirms ([`Returns::finish`]). Noting and
//! finishing happen under one lock, so a return noted after its publish finished is known to
//! be late, not lost: unless that publish reported the message unconfirmed (it will be
//! published again), it is kept for [`Returns::take_late`].

use std::collections::{HashMap, HashSet, VecDeque};

use tracing::warn;
use uuid::Uuid;

/// The most late returns kept for a taker; the oldest go first (with a warning) when nobody
/// takes them.
pub(crate) const LATE_KEPT: usize = 1024;

/// The most ids of messages reported unconfirmed that a link remembers.
const UNCONFIRMED_KEPT: usize = 4096;

/// What became of a return noted by another publish than its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noted {
    /// Its publish still runs, and takes it when it finishes.
    ForItsPublish,
    /// Its publish reported it unconfirmed, so it will be published again: dropped.
    Unconfirmed,
    /// Its publish had reported it confirmed: late.
    Late,
}

/// The returns of one link's publishes; `T` is what a late return is kept as.
#[derive(Debug)]
pub(crate) struct Returns<T> {
    /// The ids of the messages of the publishes still running, with how many publishes hold
    /// each (a message published again while its first publish runs).
    in_flight: HashMap<Uuid, u32>,
    /// Returns that reached another publish, for the running publish that sent them.
    noted: HashSet<Uuid>,
    /// Ids of messages finished publishes reported unconfirmed, oldest first.
    unconfirmed: VecDeque<Uuid>,
    /// Returns whose publish had finished without them.
    late: VecDeque<T>,
}

impl<T> Default for Returns<T> {
    fn default() -> Self {
        Self {
            in_flight: HashMap::new(),
            noted: HashSet::new(),
            unconfirmed: VecDeque::new(),
            late: VecDeque::new(),
        }
    }
}

impl<T> Returns<T> {
    /// A publish is about to send messages with these ids.
    pub(crate) fn begin(&mut self, ids: &[Uuid]) {
        for id in ids {
            *self.in_flight.entry(*id).or_default() += 1;
        }
    }

    /// The broker returned message `id`, and another publish's confirm carried it.
    pub(crate) fn note(&mut self, id: Uuid) -> Noted {
        if self.in_flight.contains_key(&id) {
            self.noted.insert(id);
            Noted::ForItsPublish
        } else if self.unconfirmed.contains(&id) {
            Noted::Unconfirmed
        } else {
            Noted::Late
        }
    }

    /// Keeps late returns (see [`Returns::note`]) for [`Returns::take_late`].
    pub(crate) fn keep_late(&mut self, items: impl IntoIterator<Item = T>) {
        for item in items {
            if self.late.len() >= LATE_KEPT {
                self.late.pop_front();
                warn!(
                    kept = LATE_KEPT,
                    "dropping the oldest late return: nobody takes them"
                );
            }
            self.late.push_back(item);
        }
    }

    /// The publish of `ids` has read its confirms (or given up), and reported `unconfirmed`
    /// (some of `ids`) unconfirmed: they are no longer in flight. Returns those of `ids` that
    /// other publishes noted as returned.
    pub(crate) fn finish(&mut self, ids: &[Uuid], unconfirmed: &[Uuid]) -> Vec<Uuid> {
        let mut taken = Vec::new();
        for id in ids {
            if let Some(count) = self.in_flight.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    self.in_flight.remove(id);
                }
            }
            if !self.noted.is_empty() && self.noted.remove(id) {
                taken.push(*id);
            }
        }
        for id in unconfirmed {
            if self.unconfirmed.len() >= UNCONFIRMED_KEPT {
                self.unconfirmed.pop_front();
            }
            self.unconfirmed.push_back(*id);
        }
        taken
    }

    /// Takes the late returns kept so far.
    pub(crate) fn take_late(&mut self) -> Vec<T> {
        self.late.drain(..).collect()
    }

    /// Whether no publish is running (for tests).
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.noted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    #[test]
    fn a_return_noted_while_its_publish_runs_is_taken_by_it() {
        let mut returns = Returns::<Uuid>::default();
        let (a, b) = (ids(3), ids(2));
        returns.begin(&a);
        returns.begin(&b);
        // b's confirm carried a's second message's return.
        assert_eq!(returns.note(a[1]), Noted::ForItsPublish);
        assert!(returns.finish(&b, &[]).is_empty());
        assert_eq!(returns.finish(&a, &[]), vec![a[1]]);
        assert!(returns.take_late().is_empty());
        assert!(returns.idle());
    }

    #[test]
    fn a_return_noted_after_its_publish_confirmed_it_is_late() {
        let mut returns = Returns::default();
        let (a, b) = (ids(1), ids(1));
        returns.begin(&a);
        returns.begin(&b);
        // a read its confirms first and found nothing; b's carried a's return.
        assert!(returns.finish(&a, &[]).is_empty());
        assert_eq!(returns.note(a[0]), Noted::Late);
        returns.keep_late([a[0]]);
        assert!(returns.finish(&b, &[]).is_empty());
        assert_eq!(returns.take_late(), vec![a[0]]);
        assert!(returns.take_late().is_empty(), "taken once");
        assert!(returns.idle());
    }

    #[test]
    fn a_return_noted_after_its_publish_reported_it_unconfirmed_is_dropped() {
        let mut returns = Returns::<Uuid>::default();
        let (a, b) = (ids(2), ids(1));
        returns.begin(&a);
        returns.begin(&b);
        // a gave up on its second message (it will be published again).
        assert!(returns.finish(&a, &a[1..]).is_empty());
        assert_eq!(returns.note(a[1]), Noted::Unconfirmed);
        assert_eq!(returns.note(a[0]), Noted::Late);
        assert!(returns.finish(&b, &[]).is_empty());
        assert!(returns.idle());
    }

    #[test]
    fn a_message_in_two_publishes_at_once_stays_in_flight_until_both_finish() {
        let mut returns = Returns::<Uuid>::default();
        let a = ids(1);
        returns.begin(&a);
        returns.begin(&a);
        assert!(returns.finish(&a, &[]).is_empty());
        assert_eq!(returns.note(a[0]), Noted::ForItsPublish);
        assert_eq!(returns.finish(&a, &[]), vec![a[0]]);
        assert!(returns.idle());
    }

    #[test]
    fn late_returns_nobody_takes_are_bounded() {
        let mut returns = Returns::default();
        returns.keep_late(0..LATE_KEPT + 10);
        let late = returns.take_late();
        assert_eq!(late.len(), LATE_KEPT);
        assert_eq!(late[0], 10, "the oldest went first");
    }
}
