//! Partitions: several `hearth-consumers` processes (on one machine or
//! several) share the homes, each home handled by exactly one of them.
//!
//! A home's events must reach one state machine in stream order, so the
//! homes, not the events, are shared out: process `I` of `N`
//! (`--partition I/N`) handles the homes whose name hashes to it (XXH3, the
//! same on every machine and version) and runs each rule on its own durable
//! consumer, `<rule>-<I>of<N>` (e.g. `hearth-lights-1of2`), which acknowledges
//! other homes' events without handing them to the rule. Every process
//! reads every event of its rules' filters: reading and skipping is cheap
//! next to handling, and no NATS feature newer than 2.9 is needed.
//!
//! Changing `N`: stop every process, start them with the new `N`. The new
//! consumers start where the furthest consumer of the old partitioning
//! stopped, so the events that came while they were down are handled
//! (handlers are idempotent). The old consumers stay until removed
//! (`nats consumer rm HEARTH_EVENTS hearth-lights-1of2`); they are logged at
//! start.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64;

/// Which homes this process handles: partition `index + 1` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    index: u32,
    count: u32,
}

impl Default for Partition {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Partition {
    /// Every home: one process.
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };
    /// The most partitions.
    pub const MAX: u32 = 1024;

    /// Partition `number` (1-based) of `count`.
    pub fn new(number: u32, count: u32) -> Result<Self, PartitionError> {
        if count == 0 || count > Self::MAX {
            return Err(PartitionError(format!(
                "the number of partitions must be between 1 and {}, not {count}",
                Self::MAX
            )));
        }
        if number == 0 || number > count {
            return Err(PartitionError(format!(
                "partition {number} of {count} does not exist: number them 1 to {count}"
            )));
        }
        Ok(Self {
            index: number - 1,
            count,
        })
    }

    pub fn is_whole(self) -> bool {
        self.count == 1
    }

    /// Whether this partition handles `home`.
    pub fn owns(self, home: &str) -> bool {
        self.count == 1 || xxh3_64(home.as_bytes()) % u64::from(self.count) == u64::from(self.index)
    }

    /// Whether this partition handles the event stored on `subject`
    /// (`hearth.evt.<home>.…`); one whose home cannot be read is taken, so
    /// that the rule decides what becomes of it.
    pub fn owns_subject(self, subject: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        subject
            .split('.')
            .nth(2)
            .and_then(|token| hearth_proto::subject::decode_token(token).ok())
            .is_none_or(|home| self.owns(&home))
    }

    /// The durable consumer name of rule `name` in this partition.
    pub fn durable(self, name: &str) -> String {
        format!("{name}{}", self.suffix())
    }

    /// The rule's name of `durable`, this partition's consumer of it.
    pub fn rule_of(self, durable: &str) -> &str {
        durable.strip_suffix(&self.suffix()).unwrap_or(durable)
    }

    /// What [`Partition::durable`] appends: nothing for the whole,
    /// `-<I>of<N>` otherwise.
    fn suffix(self) -> String {
        if self.count == 1 {
            String::new()
        } else {
            format!("-{}of{}", self.index + 1, self.count)
        }
    }

    /// How many partitions `consumer` says rule `name` was shared in: 1
    /// for `<name>`, `N` for `<name>-<I>of<N>`; `None` for another rule's
    /// consumer.
    pub fn count_of(name: &str, consumer: &str) -> Option<u32> {
        match consumer.strip_prefix(name)? {
            "" => Some(1),
            rest => {
                let (i, n) = rest.strip_prefix('-')?.split_once("of")?;
                i.parse::<u32>().ok()?;
                n.parse().ok()
            }
        }
    }

    /// How many partitions the homes are shared in.
    pub fn count(self) -> u32 {
        self.count
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// A `--partition` that is not `I/N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PartitionError(String);

impl FromStr for Partition {
    type Err = PartitionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (number, count) = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)))
            .ok_or_else(|| {
                PartitionError(format!(
                    "{text:?} is not a partition: write I/N, e.g. 1/2 for the first of two"
                ))
            })?;
        Self::new(number, count)
    }
}

#[cfg(test)]
mod tests {
    use super::Partition;

    #[test]
    fn every_home_has_exactly_one_partition_and_they_share_the_homes() {
        for count in 1..=5u32 {
            let partitions: Vec<_> = (1..=count)
                .map(|n| Partition::new(n, count).unwrap())
                .collect();
            let mut owned = vec![0usize; count as usize];
            for home in 0..1000 {
                let home = format!("home-{home}");
                let owners: Vec<_> = partitions.iter().filter(|p| p.owns(&home)).collect();
                assert_eq!(owners.len(), 1, "{home} in {count}");
                owned[partitions.iter().position(|p| p.owns(&home)).unwrap()] += 1;
            }
            // Shared out, not all on one: each has at least half its share.
            assert!(
                owned.iter().all(|n| *n >= 1000 / count as usize / 2),
                "{owned:?}"
            );
        }
    }

    #[test]
    fn the_hash_is_stable_across_machines_and_versions() {
        // XXH3 is specified; a change here would move homes between
        // partitions on upgrade.
        let two = |n| Partition::new(n, 2).unwrap();
        let firsts: Vec<_> = ["home", "cabin", "flat-2", "Flat 2.1"]
            .iter()
            .map(|home| two(1).owns(home))
            .collect();
        let expected: Vec<_> = ["home", "cabin", "flat-2", "Flat 2.1"]
            .iter()
            .map(|home| xxhash_rust::xxh3::xxh3_64(home.as_bytes()) % 2 == 0)
            .collect();
        assert_eq!(firsts, expected);
    }

    #[test]
    fn subjects_are_judged_by_their_home_token() {
        let first = Partition::new(1, 2).unwrap();
        let home = (0..100)
            .map(|n| format!("Flat {n}.1"))
            .find(|home| first.owns(home))
            .unwrap();
        let token = hearth_proto::subject::encode_token(&home);
        assert!(first.owns_subject(&format!("hearth.evt.{token}.hall.motion.pir")));
        assert!(!Partition::new(2, 2)
            .unwrap()
            .owns_subject(&format!("hearth.evt.{token}.hall.motion.pir")));
        assert!(first.owns_subject("not-an-event"));
        assert!(Partition::WHOLE.owns_subject("hearth.evt.anything.a.b.c"));
    }

    #[test]
    fn parsing_names_and_refusals() {
        let p: Partition = "2/3".parse().unwrap();
        assert_eq!(p.to_string(), "2/3");
        assert_eq!(p.durable("hearth-lights"), "hearth-lights-2of3");
        assert_eq!(Partition::WHOLE.durable("hearth-lights"), "hearth-lights");
        assert_eq!(p.rule_of("hearth-lights-2of3"), "hearth-lights");
        assert_eq!(Partition::WHOLE.rule_of("hearth-lights"), "hearth-lights");
        for bad in ["0/2", "3/2", "1/0", "x", "1-2", "1/2000"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
        let count = |consumer| Partition::count_of("hearth-lights", consumer);
        assert_eq!(count("hearth-lights"), Some(1));
        assert_eq!(count("hearth-lights-1of2"), Some(2));
        assert_eq!(count("hearth-lightsx"), None);
        assert_eq!(count("hearth-lights-extra"), None);
        assert_eq!(count("hearth-security-1of2"), None);
    }
}
