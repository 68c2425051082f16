//! Topic names and subscription patterns.
//!
//! A topic is a dot-separated list of tokens made of ASCII letters, digits,
//! `-` and `_`, at most [`Topic::MAX_LEN`] bytes long: `events.user.signup`.
//! A pattern may use `*` for exactly one token and a final `>` for one or
//! more tokens: `events.*.signup`, `events.>`.
//!
//! Both are backed by [`Bytes`] so that a name decoded from the wire is not
//! copied, and cloning one is a reference-count increment.

use std::fmt;
use std::hash::{Hash, Hasher};

use bytes::Bytes;

use crate::error::{Error, Result};

/// A validated topic name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Topic(Bytes);

/// A validated subscription pattern: a topic whose tokens may be `*` or a final `>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopicPattern(Bytes);

/// Which rule a name broke, if any.
fn check_token(token: &[u8]) -> std::result::Result<(), &'static str> {
    if token.is_empty() {
        return Err("empty token: names may not start or end with '.', nor contain '..'");
    }
    if token
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err("only ASCII letters, digits, '-', '_' and '.' between tokens are allowed")
    }
}

fn check_length(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("the name is empty")
    } else if name.len() > Topic::MAX_LEN {
        Err("longer than 255 bytes")
    } else {
        Ok(())
    }
}

fn check_topic(name: &[u8]) -> std::result::Result<(), &'static str> {
    check_length(name)?;
    name.split(|&b| b == b'.').try_for_each(check_token)
}

fn check_pattern(name: &[u8]) -> std::result::Result<(), &'static str> {
    check_length(name)?;
    let mut tokens = name.split(|&b| b == b'.').peekable();
    while let Some(token) = tokens.next() {
        match token {
            b"*" => {}
            b">" if tokens.peek().is_none() => {}
            b">" => return Err("'>' may only be the last token"),
            _ => check_token(token)?,
        }
    }
    Ok(())
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Topic {
    /// The longest topic name, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `name` and copies it into a new topic.
    ///
    /// ```
    /// use kaelix_core::Topic;
    /// let topic = Topic::new("events.user.signup")?;
    /// assert_eq!(topic.as_str(), "events.user.signup");
    /// assert!(Topic::new("events..signup").is_err());
    /// # Ok::<(), kaelix_core::Error>(())
    /// ```
    pub fn new(name: impl AsRef<str>) -> Result<Topic> {
        let name = name.as_ref();
        Self::from_bytes(Bytes::copy_from_slice(name.as_bytes()))
    }

    /// Validates `name` without copying it.
    pub fn from_bytes(name: Bytes) -> Result<Topic> {
        match check_topic(&name) {
            Ok(()) => Ok(Topic(name)),
            Err(reason) => Err(Error::InvalidTopic {
                name: lossy(&name),
                reason,
            }),
        }
    }

    /// Validates a static name without copying it.
    pub fn from_static(name: &'static str) -> Result<Topic> {
        Self::from_bytes(Bytes::from_static(name.as_bytes()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Validation admits only ASCII, so this never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The name as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as shared bytes.
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// The dot-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.as_str().split('.')
    }

    /// The name length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a topic has at least one token. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TopicPattern {
    /// Validates a pattern.
    ///
    /// ```
    /// use kaelix_core::{Topic, TopicPattern};
    /// let pattern = TopicPattern::new("events.*.signup")?;
    /// assert!(pattern.matches(&Topic::new("events.user.signup")?));
    /// assert!(!pattern.matches(&Topic::new("events.user.login")?));
    /// assert!(TopicPattern::new("events.>")?.matches(&Topic::new("events.a.b")?));
    /// # Ok::<(), kaelix_core::Error>(())
    /// ```
    pub fn new(pattern: impl AsRef<str>) -> Result<TopicPattern> {
        Self::from_bytes(Bytes::copy_from_slice(pattern.as_ref().as_bytes()))
    }

    /// Validates a pattern without copying it.
    pub fn from_bytes(pattern: Bytes) -> Result<TopicPattern> {
        match check_pattern(&pattern) {
            Ok(()) => Ok(TopicPattern(pattern)),
            Err(reason) => Err(Error::InvalidPattern {
                pattern: lossy(&pattern),
                reason,
            }),
        }
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The pattern as shared bytes.
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// The dot-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.as_str().split('.')
    }

    /// True when the pattern has no wildcard and so names exactly one topic.
    pub fn is_literal(&self) -> bool {
        self.tokens().all(|t| t != "*" && t != ">")
    }

    /// The topic this pattern names, when it has no wildcard.
    pub fn as_topic(&self) -> Option<Topic> {
        self.is_literal().then(|| Topic(self.0.clone()))
    }

    /// Whether `topic` matches this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut names = topic.tokens();
        for token in self.tokens() {
            match token {
                ">" => return names.next().is_some(),
                "*" => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if names.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }
}

impl TopicPattern {
    /// Whether every topic `other` matches, this pattern matches too
    /// (`orders.>` covers `orders.eu.*`; `orders.*` does not cover
    /// `orders.>`).
    ///
    /// ```
    /// use kaelix_core::TopicPattern;
    /// let p = |s| TopicPattern::new(s).unwrap();
    /// assert!(p("orders.>").covers(&p("orders.eu.*")));
    /// assert!(!p("orders.*").covers(&p("orders.>")));
    /// assert!(p("orders.*").covers(&p("orders.new")));
    /// ```
    pub fn covers(&self, other: &TopicPattern) -> bool {
        let mut theirs = other.tokens();
        for mine in self.tokens() {
            let Some(their) = theirs.next() else {
                return false;
            };
            match (mine, their) {
                (">", _) => return true,
                (_, ">") => return false,
                ("*", _) => {}
                (_, "*") => return false,
                (a, b) if a != b => return false,
                _ => {}
            }
        }
        theirs.next().is_none()
    }

    /// Whether some topic matches both patterns (`orders.*.new` and
    /// `orders.eu.>` overlap on `orders.eu.new`).
    ///
    /// ```
    /// use kaelix_core::TopicPattern;
    /// let p = |s| TopicPattern::new(s).unwrap();
    /// assert!(p("orders.*.new").overlaps(&p("orders.eu.>")));
    /// assert!(!p("orders.*").overlaps(&p("audit.>")));
    /// assert!(!p("orders.*").overlaps(&p("orders.a.b")));
    /// ```
    pub fn overlaps(&self, other: &TopicPattern) -> bool {
        let mut mine = self.tokens();
        let mut theirs = other.tokens();
        loop {
            match (mine.next(), theirs.next()) {
                (None, None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
                (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
                (Some(a), Some(b)) if a != b => return false,
                _ => {}
            }
        }
    }
}

/// Validates a queue group name: one token of the topic alphabet.
pub fn check_group(group: &str) -> Result<()> {
    let invalid = |reason| Error::InvalidGroup {
        group: group.to_owned(),
        reason,
    };
    if group.len() > Topic::MAX_LEN {
        return Err(invalid("longer than 255 bytes"));
    }
    check_token(group.as_bytes()).map_err(invalid)
}

impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl Hash for TopicPattern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for Topic {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for TopicPattern {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<Topic> for TopicPattern {
    fn from(topic: Topic) -> Self {
        TopicPattern(topic.0)
    }
}

impl From<&Topic> for TopicPattern {
    fn from(topic: &Topic) -> Self {
        TopicPattern(topic.0.clone())
    }
}

impl std::str::FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TopicPattern::new(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}

impl TryFrom<&str> for TopicPattern {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        TopicPattern::new(s)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", self.as_str())
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicPattern({:?})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn covering_and_overlapping_agree_with_matching() {
        let p = |s: &str| TopicPattern::new(s).unwrap();
        let patterns = [
            ">", "a", "a.b", "a.*", "a.>", "*.b", "*.*", "a.b.c", "a.*.c", "*.>", "b.>", "a.b.>",
        ];
        let topics = [
            "a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "a.b.d", "b.c.d", "a.b.c.d",
        ];
        for x in patterns {
            for y in patterns {
                let (px, py) = (p(x), p(y));
                let matched_by = |q: &TopicPattern| {
                    topics
                        .iter()
                        .filter(|t| q.matches(&topic(t)))
                        .copied()
                        .collect::<Vec<_>>()
                };
                let (mx, my) = (matched_by(&px), matched_by(&py));
                // On these sample topics: covering implies containment,
                // a shared topic implies overlap.
                if px.covers(&py) {
                    assert!(my.iter().all(|t| mx.contains(t)), "{x} covers {y}");
                }
                if mx.iter().any(|t| my.contains(t)) {
                    assert!(px.overlaps(&py), "{x} overlaps {y}");
                }
                assert_eq!(px.overlaps(&py), py.overlaps(&px), "{x} {y} symmetric");
            }
        }
        assert!(p("a.>").covers(&p("a.b.>")));
        assert!(!p("a.b.>").covers(&p("a.>")));
        assert!(!p("a.*").covers(&p("a.>")));
        assert!(p(">").covers(&p("*.>")));
        assert!(!p("a.b").overlaps(&p("a.b.>")));
        assert!(p("a.*.c").overlaps(&p("*.b.>")));
    }

    #[test]
    fn valid_topics() {
        for name in ["a", "events.user.signup", "a-b_c.D9", &"x".repeat(255)] {
            assert_eq!(topic(name).as_str(), name);
        }
    }

    #[test]
    fn invalid_topics_say_so() {
        for name in [
            "",
            ".a",
            "a.",
            "a..b",
            "a b",
            "a.*",
            "a.>",
            "é",
            &"x".repeat(256),
        ] {
            let err = Topic::new(name).unwrap_err().to_string();
            assert!(
                err.starts_with("Topic name contains invalid characters"),
                "{name:?}: {err}"
            );
        }
    }

    #[test]
    fn patterns_validate() {
        for p in ["a", "*", ">", "a.*.c", "a.>", "*.*.>"] {
            TopicPattern::new(p).unwrap();
        }
        for p in ["", "a.>.b", "a..b", "a*", "a.b>", ">.a"] {
            assert!(TopicPattern::new(p).is_err(), "{p}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a.b", true),
            ("a.>", "a", false),
            (">", "a", true),
            ("*", "a.b", false),
            ("*.b.>", "x.b.c.d", true),
        ];
        for (pattern, name, expected) in cases {
            let pattern = TopicPattern::new(pattern).unwrap();
            assert_eq!(
                pattern.matches(&topic(name)),
                expected,
                "{pattern} ~ {name}"
            );
        }
    }

    #[test]
    fn groups() {
        check_group("workers").unwrap();
        assert!(check_group("a.b").is_err());
        assert!(check_group("").is_err());
    }
}
