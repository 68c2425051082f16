//! The subscription index: exact topics in a hash map, patterns with
//! wildcards in a token trie with dedicated `*` and `>` slots.

use std::sync::Arc;

use foldhash::HashMap;
use kaelix_core::Topic;

use super::Subscriber;

/// Every subscription, indexed for matching.
#[derive(Default)]
pub(crate) struct Sublist {
    exact: HashMap<Topic, Vec<Arc<Subscriber>>>,
    tree: Node,
    wildcards: usize,
}

#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Vec<Arc<Subscriber>>,
    /// Patterns whose `>` stands at this node's level.
    rest: Vec<Arc<Subscriber>>,
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
        if let Some(topic) = sub.pattern.as_topic() {
            self.exact.entry(topic).or_default().push(sub);
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
        let removed = if let Some(topic) = sub.pattern.as_topic() {
            let Some(list) = self.exact.get_mut(&topic) else {
                return false;
            };
            let removed = take(list, sub.id);
            if list.is_empty() {
                self.exact.remove(&topic);
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
        if let Some(list) = self.exact.get(topic) {
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
        let mut out: Vec<_> = self.exact.values().flatten().cloned().collect();
        walk(&self.tree, &mut out);
        out
    }
}

fn take(list: &mut Vec<Arc<Subscriber>>, id: u64) -> bool {
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
