//! What the edge already read of each partition's broadcast subject, so
//! that resumes in the same partition share those reads.
//!
//! Every resume reads two subjects of the log: the user's own and the
//! partition's broadcast subject, which is the same for every user of the
//! partition. In a reconnect storm thousands of resumes read the same
//! broadcast range; a [`KnownRange`] remembers, for one subject, a
//! contiguous range of stream sequences in which every message is known
//! (kept here) and every gap is known empty, so a read inside it needs no
//! request, and a read past it asks only for what lies beyond.
//!
//! Only a message read proves anything: the next message on the subject
//! after a sequence, found at `m`, shows that nothing of the subject lies
//! between them, on whichever replica answered (a replica applies the
//! stream in order). "Not found" proves nothing (a follower may lag) and
//! is never learned. Entries are keyed by `epoch`, which changes when the
//! log does. Pure: no I/O, no clock.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Most messages kept per subject; older ones leave the range's front.
pub const KEEP: usize = 1024;

/// The answer to "the next message after `after`, up to `upto`".
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Known: this message, or none in the range.
    Known(Option<(u64, Bytes)>),
    /// Not known from this sequence on (nothing lies between `after` and
    /// it): the next message read from here is the answer; [`KnownRange::learn`] it.
    ReadFrom(u64),
}

/// One subject's known range: every message with a sequence in `lo..=hi`.
#[derive(Debug, Default)]
pub struct KnownRange {
    lo: u64,
    hi: u64,
    msgs: VecDeque<(u64, Bytes)>,
}

impl KnownRange {
    /// Looks up the first message with a sequence in `after + 1 ..= upto`.
    pub fn next(&self, after: u64, upto: u64) -> Lookup {
        let from = after + 1;
        if self.hi == 0 || from < self.lo || from > self.hi + 1 {
            return Lookup::ReadFrom(from);
        }
        let i = self.msgs.partition_point(|(seq, _)| *seq < from);
        match self.msgs.get(i) {
            Some((seq, _)) if *seq > upto => Lookup::Known(None),
            Some(m) => Lookup::Known(Some(m.clone())),
            None if upto <= self.hi => Lookup::Known(None),
            None => Lookup::ReadFrom(self.hi + 1),
        }
    }

    /// Takes in a read of the subject from `from`: the next message there,
    /// at `found.0` (whatever bound the reader had).
    pub fn learn(&mut self, from: u64, found: (u64, Bytes)) {
        if self.hi == 0 || from < self.lo || from > self.hi + 1 {
            // Not contiguous with what is known: start over from here.
            self.lo = from;
            self.hi = from - 1;
            self.msgs.clear();
        }
        if found.0 > self.hi {
            self.hi = found.0;
            self.msgs.push_back(found);
        }
        while self.msgs.len() > KEEP {
            if let Some((seq, _)) = self.msgs.pop_front() {
                self.lo = seq + 1;
            }
        }
    }
}

/// The known ranges of every broadcast subject this edge read, by epoch.
#[derive(Debug, Default)]
pub struct Broadcasts {
    ranges: HashMap<(String, String), KnownRange>,
    epoch: String,
}

impl Broadcasts {
    /// The range of `subject` in `epoch` (all ranges of another epoch are dropped).
    pub fn range(&mut self, epoch: &str, subject: &str) -> &mut KnownRange {
        if self.epoch != epoch {
            self.ranges.clear();
            self.epoch = epoch.to_string();
        }
        self.ranges.entry((epoch.to_string(), subject.to_string())).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> (u64, Bytes) {
        (seq, Bytes::from(seq.to_string()))
    }

    #[test]
    fn an_unknown_subject_is_read_and_then_answered_without_reading() {
        let mut r = KnownRange::default();
        assert_eq!(r.next(10, 100), Lookup::ReadFrom(11));
        r.learn(11, msg(40));
        assert_eq!(r.next(10, 100), Lookup::Known(Some(msg(40))));
        assert_eq!(r.next(20, 30), Lookup::Known(None), "nothing between 21 and 39");
        assert_eq!(r.next(20, 39), Lookup::Known(None), "40 is past upto");
        // After 40 nothing is known yet: read from 41.
        assert_eq!(r.next(40, 100), Lookup::ReadFrom(41));
        r.learn(41, msg(45));
        assert_eq!(r.next(40, 100), Lookup::Known(Some(msg(45))));
        assert_eq!(r.next(20, 50), Lookup::Known(Some(msg(40))));
    }

    #[test]
    fn a_message_past_upto_still_teaches_the_gap_before_it() {
        let mut r = KnownRange::default();
        r.learn(11, msg(120));
        assert_eq!(r.next(50, 100), Lookup::Known(None), "51..=100 holds nothing");
        assert_eq!(r.next(50, 150), Lookup::Known(Some(msg(120))));
        assert_eq!(r.next(120, 150), Lookup::ReadFrom(121));
    }

    #[test]
    fn a_read_before_the_range_or_after_a_gap_starts_over() {
        let mut r = KnownRange::default();
        r.learn(50, msg(60));
        assert_eq!(r.next(10, 100), Lookup::ReadFrom(11), "11..50 is not known");
        r.learn(11, msg(20));
        assert_eq!(r.next(10, 100), Lookup::Known(Some(msg(20))));
        assert_eq!(
            r.next(30, 100),
            Lookup::ReadFrom(31),
            "what was known after 50 was dropped"
        );
        let mut r = KnownRange::default();
        r.learn(1, msg(10));
        r.learn(20, msg(25));
        assert_eq!(r.next(5, 30), Lookup::ReadFrom(6), "11..19 is a gap");
    }

    #[test]
    fn the_range_keeps_a_bounded_number_of_messages() {
        let mut r = KnownRange::default();
        let mut from = 1;
        for seq in 1..=(KEEP as u64 + 10) {
            r.learn(from, msg(seq));
            from = seq + 1;
        }
        assert_eq!(r.msgs.len(), KEEP);
        assert_eq!(r.next(0, u64::MAX), Lookup::ReadFrom(1), "the oldest left the front");
        assert_eq!(r.next(10, u64::MAX), Lookup::Known(Some(msg(11))));
    }

    #[test]
    fn another_epoch_forgets_everything() {
        let mut b = Broadcasts::default();
        b.range("e1", "s").learn(1, msg(5));
        assert_eq!(b.range("e1", "s").next(0, 10), Lookup::Known(Some(msg(5))));
        assert_eq!(b.range("e2", "s").next(0, 10), Lookup::ReadFrom(1));
    }
}
