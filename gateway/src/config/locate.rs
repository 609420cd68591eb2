//! Turns a byte offset or a [`KeyPath`] into a `line:col` of the config text, so that every
//! message names the place to fix.

use super::{KeyPath, Seg};

/// Parses the document for spans only when a path must be located: a valid config never
/// pays for the second parse (which, for a large point list, costs megabytes).
pub struct Locator<'a> {
    text: &'a str,
    doc: std::cell::OnceCell<Option<toml_edit::Document<String>>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            doc: std::cell::OnceCell::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// The place of the deepest part of `path` that exists in the document: the value itself
    /// when it is there, else the table that should hold it.
    pub fn locate(&self, path: &KeyPath) -> (usize, usize) {
        let doc = self
            .doc
            .get_or_init(|| toml_edit::Document::parse(self.text.to_owned()).ok());
        let Some(doc) = doc else { return (1, 1) };
        let mut item = doc.as_item();
        let mut best: Option<usize> = None;
        for seg in &path.0 {
            let next = match seg {
                Seg::Key(k) => item.get(k.as_str()),
                Seg::Index(i) => item.get(*i),
            };
            let Some(next) = next else { break };
            item = next;
            if let Some(span) = item.span() {
                best = Some(span.start);
            }
        }
        best.map_or((1, 1), |o| self.line_col(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_values_and_falls_back_to_the_parent() {
        let text = "[gateway]\nid = \"x\"\n\n[[sources]]\nid = \"a\"\npolicy = \"p\"\n";
        let l = Locator::new(text);
        let p = KeyPath::root().key("sources").idx(0).key("policy");
        assert_eq!(l.locate(&p), (6, 10));
        let missing = KeyPath::root().key("sources").idx(0).key("nope");
        assert_eq!(l.locate(&missing).0, 4);
        assert_eq!(l.line_col(text.find("id = \"x\"").unwrap()), (2, 1));
    }
}
