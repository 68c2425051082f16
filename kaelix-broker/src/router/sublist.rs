//! The subscription index: exact topics in a hash table, patterns with
//! wildcards in a token trie with dedicated `*` and `>` slots.

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::HashMap;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use kaelix_core::Topic;
use smallvec::SmallVec;

use super::Subscriber;

/// The subscriptions of one topic or pattern position: most have one,
/// kept inline rather than in an allocation of its own (a million topics
/// with one subscriber each save a million small allocations).
type Subs = SmallVec<[Arc<Subscriber>; 1]>;

/// Every subscription, indexed for matching.
#[derive(Default)]
pub(crate) struct Sublist {
    /// Subscriptions to exact topics, one entry per topic, found by the
    /// pattern of the entry's first subscription (no entry is empty): the
    /// topic is not stored a second time as a key, which at a million
    /// topics is most of the index's memory (performance.md, "Memory").
    exact: HashTable<Subs>,
    hasher: foldhash::fast::RandomState,
    tree: Node,
    wildcards: usize,
}

#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Subs,
    /// Patterns whose `>` stands at this node's level.
    rest: Subs,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

impl Sublist {
    pub(crate) fn insert(&mut self, sub: Arc<Subscriber>) {
        if sub.pattern.is_literal() {
            let name = sub.pattern.as_str().as_bytes();
            let hash = self.hasher.hash_one(name);
            let hasher = &self.hasher;
            match self
                .exact
                .entry(hash, |s| same(s, name), |s| key_hash(hasher, s))
            {
                Entry::Occupied(mut entry) => entry.get_mut().push(sub),
                Entry::Vacant(entry) => {
                    entry.insert(smallvec::smallvec![sub]);
                }
            }
            return;
        }
        self.wildcards += 1;
        let mut node = &mut self.tree;
        let pattern = sub.pattern.clone();
        for token in pattern.tokens() {
            match token {
                ">" => {
                    node.rest.push(sub);
                    return;
                }
                "*" => node = node.star.get_or_insert_with(Box::default),
                literal => node = node.literal.entry(literal.into()).or_default(),
            }
        }
        node.here.push(sub);
    }

    /// Removes `sub`; returns whether it was present.
    pub(crate) fn remove(&mut self, sub: &Subscriber) -> bool {
        let removed = if sub.pattern.is_literal() {
            let name = sub.pattern.as_str().as_bytes();
            let hash = self.hasher.hash_one(name);
            let Ok(mut entry) = self.exact.find_entry(hash, |s| same(s, name)) else {
                return false;
            };
            let removed = take(entry.get_mut(), sub.id);
            if entry.get().is_empty() {
                entry.remove();
            }
            removed
        } else {
            let tokens: Vec<&str> = sub.pattern.tokens().collect();
            let removed = remove_from(&mut self.tree, &tokens, sub.id);
            if removed {
                self.wildcards -= 1;
            }
            removed
        };
        removed
    }

    /// Appends every subscription matching `topic` to `out`.
    pub(crate) fn matches(&self, topic: &Topic, out: &mut Vec<Arc<Subscriber>>) {
        let name = topic.as_bytes();
        if let Some(list) = self
            .exact
            .find(self.hasher.hash_one(name), |s| same(s, name))
        {
            out.extend(list.iter().cloned());
        }
        if self.wildcards > 0 {
            let tokens: smallvec::SmallVec<[&str; 8]> = topic.tokens().collect();
            collect(&self.tree, &tokens, out);
        }
    }

    /// Distinct exact topics subscribed to, and subscriptions with wildcards.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.exact.len(), self.wildcards)
    }

    /// Every subscription, in no particular order.
    pub(crate) fn all(&self) -> Vec<Arc<Subscriber>> {
        fn walk(node: &Node, out: &mut Vec<Arc<Subscriber>>) {
            out.extend(node.here.iter().cloned());
            out.extend(node.rest.iter().cloned());
            node.literal.values().for_each(|n| walk(n, out));
            if let Some(star) = &node.star {
                walk(star, out);
            }
        }
        let mut out: Vec<_> = self.exact.iter().flatten().cloned().collect();
        walk(&self.tree, &mut out);
        out
    }
}

/// Whether `subs` is the entry of the exact topic `name`.
fn same(subs: &Subs, name: &[u8]) -> bool {
    subs[0].pattern.as_str().as_bytes() == name
}

/// An exact entry's hash: its topic's, as [`Sublist::matches`] computes it.
fn key_hash(hasher: &foldhash::fast::RandomState, subs: &Subs) -> u64 {
    hasher.hash_one(subs[0].pattern.as_str().as_bytes())
}

fn take(list: &mut Subs, id: u64) -> bool {
    match list.iter().position(|s| s.id == id) {
        Some(at) => {
            list.swap_remove(at);
            true
        }
        None => false,
    }
}

fn remove_from(node: &mut Node, tokens: &[&str], id: u64) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return take(&mut node.here, id);
    };
    match *first {
        ">" => take(&mut node.rest, id),
        "*" => {
            let Some(star) = node.star.as_deref_mut() else {
                return false;
            };
            let removed = remove_from(star, rest, id);
            if star.is_empty() {
                node.star = None;
            }
            removed
        }
        literal => {
            let Some(child) = node.literal.get_mut(literal) else {
                return false;
            };
            let removed = remove_from(child, rest, id);
            if child.is_empty() {
                node.literal.remove(literal);
            }
            removed
        }
    }
}

fn collect(node: &Node, tokens: &[&str], out: &mut Vec<Arc<Subscriber>>) {
    let Some((first, rest)) = tokens.split_first() else {
        out.extend(node.here.iter().cloned());
        return;
    };
    // `>` needs at least one more token, which `first` is.
    out.extend(node.rest.iter().cloned());
    if let Some(child) = node.literal.get(*first) {
        collect(child, rest, out);
    }
    if let Some(star) = &node.star {
        collect(star, rest, out);
    }
}
