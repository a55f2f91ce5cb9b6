//! The subscriptions of one gateway's MQTT clients, as a tree of topic
//! levels, so that finding who a publish goes to costs the depth of its
//! topic rather than the number of subscriptions.
//!
//! Matching follows MQTT 3.1.1 (4.7): `+` matches one level, `#` the level
//! it follows and everything below (`a/#` matches `a`), and a topic starting
//! with `$` is not matched by a filter starting with a wildcard. A client
//! whose filters overlap gets the message once, at the highest QoS of its
//! matching subscriptions (3.3.5).

use std::collections::HashMap;
use std::hash::Hash;

use rumqttc::QoS;

/// Subscriptions of subscribers `K` (a connection number, say).
#[derive(Debug)]
pub(crate) struct Subscriptions<K> {
    root: Node<K>,
}

#[derive(Debug)]
struct Node<K> {
    children: HashMap<Box<str>, Node<K>>,
    plus: Option<Box<Node<K>>>,
    /// Filters that end at this level.
    exact: HashMap<K, QoS>,
    /// Filters with `#` after this level.
    hash: HashMap<K, QoS>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            plus: None,
            exact: HashMap::new(),
            hash: HashMap::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

impl<K> Default for Subscriptions<K> {
    fn default() -> Self {
        Self {
            root: Node::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> Subscriptions<K> {
    /// Adds or replaces `subscriber`'s subscription to `filter`, which must
    /// be a valid filter (`rumqttc::mqttbytes::valid_filter`). Returns
    /// whether it is new.
    pub(crate) fn insert(&mut self, filter: &str, subscriber: K, qos: QoS) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => return node.hash.insert(subscriber, qos).is_none(),
                "+" => node = node.plus.get_or_insert_with(Box::default),
                _ => node = node.children.entry(level.into()).or_default(),
            }
        }
        node.exact.insert(subscriber, qos).is_none()
    }

    /// Removes `subscriber`'s subscription to `filter`; returns whether
    /// there was one.
    pub(crate) fn remove(&mut self, filter: &str, subscriber: K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        remove(&mut self.root, &levels, subscriber)
    }

    /// Every subscriber of `topic`, each once, with the highest QoS of its
    /// matching filters.
    pub(crate) fn matching(&self, topic: &str) -> HashMap<K, QoS> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut found = HashMap::new();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, &mut found);
        found
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.root.is_empty()
    }
}

/// Whether `filter` matches `topic`, straight from the spec: the rule for
/// one filter, which the tree applies to all at once.
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

fn remove<K: Eq + Hash>(node: &mut Node<K>, levels: &[&str], subscriber: K) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        return node.exact.remove(&subscriber).is_some();
    };
    match *level {
        "#" => node.hash.remove(&subscriber).is_some(),
        "+" => {
            let Some(child) = node.plus.as_deref_mut() else {
                return false;
            };
            let removed = remove(child, rest, subscriber);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        }
        _ => {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            let removed = remove(child, rest, subscriber);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn collect<K: Clone + Eq + Hash>(
    node: &Node<K>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    found: &mut HashMap<K, QoS>,
) {
    // Wildcards at the first level do not match `$` topics.
    let wildcards = depth > 0 || !dollar;
    let mut add = |subscribers: &HashMap<K, QoS>| {
        for (subscriber, qos) in subscribers {
            found
                .entry(subscriber.clone())
                .and_modify(|best| {
                    if *qos > *best {
                        *best = *qos;
                    }
                })
                .or_insert(*qos);
        }
    };
    if wildcards {
        add(&node.hash);
    }
    let Some(level) = levels.get(depth) else {
        add(&node.exact);
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, levels, depth + 1, dollar, found);
    }
    if let (true, Some(plus)) = (wildcards, node.plus.as_deref()) {
        collect(plus, levels, depth + 1, dollar, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILTERS: &[&str] = &[
        "#", "+", "+/+", "/+", "+/", "a", "a/#", "a/+", "a/b", "a/+/c", "a/b/#", "+/b/#", "/#",
        "$SYS/#", "$SYS/+", "+/+/+", "a//b", "a/+/+/#", "$x", "",
    ];
    const TOPICS: &[&str] = &[
        "a", "a/b", "a/b/c", "a/c/c", "/", "/a", "a/", "a//b", "b/b/b", "$SYS/x", "$SYS",
        "$SYS/x/y", "$x", "x/$y", "a/b/c/d",
    ];

    #[test]
    fn the_tree_agrees_with_the_spec_for_every_filter_and_topic() {
        for filter in FILTERS.iter().filter(|f| !f.is_empty()) {
            let mut subscriptions = Subscriptions::default();
            subscriptions.insert(filter, 1u32, QoS::AtLeastOnce);
            for topic in TOPICS {
                assert_eq!(
                    subscriptions.matching(topic).contains_key(&1),
                    matches(filter, topic),
                    "filter {filter:?}, topic {topic:?}"
                );
            }
        }
    }

    #[test]
    fn spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn overlapping_filters_deliver_once_at_the_highest_qos() {
        let mut subscriptions = Subscriptions::default();
        subscriptions.insert("a/#", 1u32, QoS::AtMostOnce);
        subscriptions.insert("a/+", 1, QoS::ExactlyOnce);
        subscriptions.insert("a/b", 1, QoS::AtLeastOnce);
        subscriptions.insert("a/b", 2, QoS::AtMostOnce);
        let found = subscriptions.matching("a/b");
        assert_eq!(found.len(), 2);
        assert_eq!(found[&1], QoS::ExactlyOnce);
        assert_eq!(found[&2], QoS::AtMostOnce);
    }

    #[test]
    fn a_repeated_subscribe_replaces_the_qos() {
        let mut subscriptions = Subscriptions::default();
        assert!(subscriptions.insert("a/b", 1u32, QoS::ExactlyOnce));
        assert!(!subscriptions.insert("a/b", 1, QoS::AtMostOnce));
        assert_eq!(subscriptions.matching("a/b")[&1], QoS::AtMostOnce);
    }

    #[test]
    fn removing_every_filter_leaves_an_empty_tree() {
        let mut subscriptions = Subscriptions::default();
        for (i, filter) in FILTERS.iter().filter(|f| !f.is_empty()).enumerate() {
            subscriptions.insert(filter, i, QoS::AtMostOnce);
        }
        assert!(!subscriptions.remove("a/b/c", 0), "never subscribed");
        assert!(!subscriptions.remove("a/b", 0), "someone else's");
        for (i, filter) in FILTERS.iter().filter(|f| !f.is_empty()).enumerate() {
            assert!(subscriptions.remove(filter, i), "{filter}");
            assert!(!subscriptions.matching_any(filter, i));
        }
        assert!(subscriptions.is_empty());
        assert!(subscriptions.matching("a/b").is_empty());
    }

    impl<K: Clone + Eq + Hash> Subscriptions<K> {
        /// Whether any topic in `TOPICS` still reaches `subscriber`.
        fn matching_any(&self, _filter: &str, subscriber: K) -> bool {
            TOPICS
                .iter()
                .any(|topic| self.matching(topic).contains_key(&subscriber))
        }
    }
}
