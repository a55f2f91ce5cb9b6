//! Who may publish and subscribe to what: `[[auth.acl]]` rules.
//!
//! ```toml
//! [[auth.acl]]
//! user = "*"                                  # every client
//! publish = ["hearth/+/+/%c/#"]               # its own device topics
//! subscribe = ["hearth/+/+/%c/set"]           # its own commands
//!
//! [[auth.acl]]
//! user = "homeassistant"
//! publish = ["#"]
//! subscribe = ["#"]
//! ```
//!
//! Without rules everything is allowed. With rules, a client may do only
//! what a rule for it (`user = "*"` or its username) allows. `%u` in a
//! pattern is the client's username and `%c` its client id; a pattern whose
//! `%u` or `%c` would be empty or contain `/`, `+` or `#` allows nothing, so
//! that nobody widens their rights by choosing a name.
//!
//! Subscribing to a filter needs a `subscribe` pattern covering the whole
//! filter (`sensors/#` covers `sensors/+/temp`, not the other way round),
//! and each message is checked again on its way out, against the topic it
//! has: retained messages and those kept in a persistent session included.

use serde::Deserialize;

/// One `[[auth.acl]]` rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// A username, or `*` for every client (anonymous ones included).
    pub user: String,
    /// Topic patterns the client may publish to (MQTT filter syntax).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns the client may subscribe to and receive from.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Who a client is, for the rules.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who<'a> {
    pub(crate) username: Option<&'a str>,
    pub(crate) client_id: &'a str,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    pub(crate) fn new(rules: Vec<AclRule>) -> Self {
        Self { rules }
    }

    pub(crate) fn rules(&self) -> usize {
        self.rules.len()
    }

    pub(crate) fn can_publish(&self, who: Who<'_>, topic: &str) -> bool {
        self.allows(
            who,
            |rule| &rule.publish,
            |pattern| topic_matches(pattern, topic),
        )
    }

    pub(crate) fn can_subscribe(&self, who: Who<'_>, filter: &str) -> bool {
        self.allows(
            who,
            |rule| &rule.subscribe,
            |pattern| covers(pattern, filter),
        )
    }

    pub(crate) fn can_receive(&self, who: Who<'_>, topic: &str) -> bool {
        self.allows(
            who,
            |rule| &rule.subscribe,
            |pattern| topic_matches(pattern, topic),
        )
    }

    fn allows(
        &self,
        who: Who<'_>,
        patterns: impl Fn(&AclRule) -> &Vec<String>,
        matches: impl Fn(&str) -> bool,
    ) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        self.rules
            .iter()
            .filter(|rule| rule.user == "*" || Some(rule.user.as_str()) == who.username)
            .flat_map(|rule| patterns(rule).iter())
            .filter_map(|pattern| substitute(pattern, who))
            .any(|pattern| matches(&pattern))
    }
}

/// The pattern with `%u` and `%c` filled in; `None` when a name it needs is
/// missing or could act as a wildcard.
fn substitute(pattern: &str, who: Who<'_>) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_owned());
    }
    let safe = |name: &str| !name.is_empty() && !name.contains(['/', '+', '#']);
    let mut out = pattern.to_owned();
    if out.contains("%u") {
        let username = who.username.filter(|u| safe(u))?;
        out = out.replace("%u", username);
    }
    if out.contains("%c") {
        if !safe(who.client_id) {
            return None;
        }
        out = out.replace("%c", who.client_id);
    }
    Some(out)
}

/// Whether `pattern` (a filter) matches `topic`. Unlike subscriptions,
/// a leading wildcard in a rule also covers `$` topics: rules are about
/// rights, not about what a `#` subscriber wants to see.
fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for level in pattern.split('/') {
        if level == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether every topic `filter` matches is matched by `pattern`.
fn covers(pattern: &str, filter: &str) -> bool {
    let mut levels = filter.split('/');
    for level in pattern.split('/') {
        if level == "#" {
            return true;
        }
        match levels.next() {
            Some("#") => return false,
            Some("+") if level != "+" => return false,
            Some(f) if level == "+" || level == f => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: &str, publish: &[&str], subscribe: &[&str]) -> AclRule {
        AclRule {
            user: user.into(),
            publish: publish.iter().map(|s| (*s).into()).collect(),
            subscribe: subscribe.iter().map(|s| (*s).into()).collect(),
        }
    }

    fn who<'a>(username: Option<&'a str>, client_id: &'a str) -> Who<'a> {
        Who {
            username,
            client_id,
        }
    }

    #[test]
    fn no_rules_allow_everything() {
        let acl = Acl::default();
        assert_eq!(acl.rules(), 0);
        assert!(acl.can_publish(who(None, "x"), "any/topic"));
        assert!(acl.can_subscribe(who(None, "x"), "#"));
    }

    #[test]
    fn a_device_publishes_under_its_own_topics_only() {
        let acl = Acl::new(vec![
            rule("*", &["hearth/+/+/%c/#"], &["hearth/+/+/%c/set"]),
            rule("ha", &["#"], &["#"]),
        ]);
        let lamp = who(Some("lamp"), "lamp");
        assert!(acl.can_publish(lamp, "hearth/home/hall/lamp/light"));
        assert!(!acl.can_publish(lamp, "hearth/home/hall/pir/motion"));
        assert!(acl.can_subscribe(lamp, "hearth/home/hall/lamp/set"));
        assert!(acl.can_subscribe(lamp, "hearth/+/+/lamp/set"));
        assert!(!acl.can_subscribe(lamp, "hearth/+/+/+/set"));
        assert!(!acl.can_subscribe(lamp, "#"));
        assert!(acl.can_receive(lamp, "hearth/home/hall/lamp/set"));
        assert!(!acl.can_receive(lamp, "hearth/home/hall/pir/set"));
        let ha = who(Some("ha"), "homeassistant");
        assert!(acl.can_subscribe(ha, "#"));
        assert!(acl.can_publish(ha, "$anything/x"));
    }

    #[test]
    fn names_cannot_widen_a_pattern() {
        let acl = Acl::new(vec![rule("*", &["devices/%c/#", "users/%u/#"], &[])]);
        assert!(!acl.can_publish(who(None, "+"), "devices/x/state"));
        assert!(!acl.can_publish(who(None, "#"), "devices/x/state"));
        assert!(!acl.can_publish(who(None, "a/b"), "devices/a/b/state"));
        assert!(
            !acl.can_publish(who(None, "c1"), "users//x"),
            "anonymous has no %u"
        );
        assert!(acl.can_publish(who(Some("kim"), "c1"), "users/kim/x"));
        assert!(acl.can_publish(who(None, "c1"), "devices/c1/state"));
    }

    #[test]
    fn rules_apply_to_their_user_and_star_to_all() {
        let acl = Acl::new(vec![
            rule("alice", &["a/#"], &[]),
            rule("*", &["public"], &[]),
        ]);
        assert!(acl.can_publish(who(Some("alice"), "c"), "a/b"));
        assert!(!acl.can_publish(who(Some("bob"), "c"), "a/b"));
        assert!(acl.can_publish(who(Some("bob"), "c"), "public"));
        assert!(acl.can_publish(who(None, "c"), "public"));
    }

    #[test]
    fn covering_is_about_every_topic_of_the_filter() {
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(covers("#", "+/x/#"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+/c", "a/+/d"));
        assert!(!covers("a", "a/b"));
    }
}
