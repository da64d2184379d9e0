//! The documentation as files: `docs/contract.md` publishes the shared contract
//! (`../shared/CONTRACT.md`, beside the repository) word for word before this
//! repository's additions, and every relative link in `README.md` and the book under
//! `docs/` leads to a file (and heading) that exists.

use std::path::{Path, PathBuf};

use crate::helpers::root;

/// The headings of a markdown text (lines starting with `#` outside fenced code), in
/// order, as written.
fn headings(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(line.trim_end());
        }
    }
    out
}

#[test]
fn docs_contract_md_begins_with_the_shared_contract_word_for_word() {
    let shared_path = root().join("../shared/CONTRACT.md");
    let Ok(shared) = std::fs::read_to_string(&shared_path) else {
        // A checkout without `../shared` (a clone on its own): hold the published
        // contract to its own outline instead, every section of revision 3 and the
        // additions, in order.
        let published = std::fs::read_to_string(root().join("docs/contract.md")).unwrap();
        let ours = headings(&published);
        let mut from = 0;
        for h in [
            "# The parity contract",
            "## 1. A dump directory",
            "## 2. The command line",
            "## 3. Known porting faults",
            "## 4. Scoped and parametrized faults",
            "## 5. LoRA adapters",
            "## 6. One training step",
            "## Repository additions",
        ] {
            let at = ours[from..].iter().position(|o| o.starts_with(h));
            let at = at
                .unwrap_or_else(|| panic!("docs/contract.md lacks {h:?} (or has it out of order)"));
            from += at + 1;
        }
        println!(
            "contract_doc: no shared contract at {}: the outline of docs/contract.md checked, not its words",
            shared_path.display()
        );
        return;
    };
    let published_path = root().join("docs/contract.md");
    let published = std::fs::read_to_string(&published_path)
        .unwrap_or_else(|e| panic!("{}: {e}", published_path.display()));

    // Every heading of the shared contract, in the same order.
    let ours = headings(&published);
    let mut from = 0;
    for h in headings(&shared) {
        let at = ours[from..].iter().position(|o| *o == h).unwrap_or_else(|| {
            panic!("docs/contract.md lacks the heading {h:?} of the shared contract (or has it out of order)")
        });
        from += at + 1;
    }

    // And the whole shared text, as its beginning.
    if !published.starts_with(&shared) {
        let line = shared
            .lines()
            .zip(published.lines())
            .position(|(a, b)| a != b)
            .map_or(shared.lines().count().min(published.lines().count()), |i| i);
        panic!(
            "docs/contract.md does not begin with {} (first difference at line {}: {:?} there, \
             {:?} here); copy the shared contract over the head of docs/contract.md, keeping \
             \"## Repository additions\" after it",
            shared_path.display(),
            line + 1,
            shared.lines().nth(line).unwrap_or("<end>"),
            published.lines().nth(line).unwrap_or("<end>"),
        );
    }
    let rest = &published[shared.len()..];
    assert!(
        rest.contains("\n## Repository additions\n"),
        "docs/contract.md holds no \"## Repository additions\" after the shared contract"
    );
}

/// The markdown files whose links are checked: the README and every page of the book.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let dir = root().join("docs");
    let mut book: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    book.sort();
    docs.extend(book);
    docs
}

/// `line` without its inline code spans (a link inside backticks is text).
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|c| *c == '`').count();
        let fence = &rest[start..start + ticks];
        match rest[start + ticks..].find(fence) {
            Some(end) => rest = &rest[start + ticks + end + ticks..],
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of the inline links and images (`[text](target)`) and of the reference
/// definitions (`[label]: target`) of a markdown text, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let line = without_code_spans(line);
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            if let Some(close) = trimmed.find("]:") {
                if let Some(target) = trimmed[close + 2..].split_whitespace().next() {
                    out.push(target.to_string());
                }
            }
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push(target.trim_matches(['<', '>']).to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits,
/// spaces, `-` and `_` kept), spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of every heading of the markdown file at `path`.
fn anchors(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for h in headings(&text) {
        let base = anchor(h);
        let n = seen.iter().filter(|s| **s == base).count();
        out.push(if n == 0 { base.clone() } else { format!("{base}-{n}") });
        seen.push(base);
    }
    out
}

#[test]
fn every_relative_link_in_the_readme_and_the_book_leads_to_an_existing_file_and_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text =
            std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        let dir = doc.parent().expect("a file has a folder");
        let name = doc.strip_prefix(root()).unwrap_or(&doc).display().to_string();
        for target in link_targets(&text) {
            let external = target.contains("://") || target.starts_with("mailto:");
            if external || target.is_empty() {
                continue;
            }
            checked += 1;
            let (file, fragment) = match target.split_once('#') {
                Some((f, frag)) => (f, Some(frag)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() { doc.clone() } else { dir.join(file) };
            if !path.exists() {
                broken.push(format!("{name}: {target}: no such file {}", path.display()));
                continue;
            }
            let is_markdown = path.extension().is_some_and(|x| x == "md");
            if let (Some(fragment), true) = (fragment, is_markdown) {
                if !anchors(&path).iter().any(|a| a == fragment) {
                    broken.push(format!("{name}: {target}: no heading #{fragment} there"));
                }
            }
        }
    }
    assert!(checked > 0, "no relative link found: the link scanner is broken");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The link checker itself: what it must see as a link, and what it must not.
#[test]
fn the_link_scanner_sees_links_but_not_code_and_spells_anchors_as_github_does() {
    let text = "See [a](a.md) and ![img](x/y.png \"t\").\n\
                Not `[b](b.md)` nor:\n```\n[c](c.md)\n```\n[ref]: d.md#e\n";
    assert_eq!(link_targets(text), ["a.md", "x/y.png", "d.md#e"]);
    assert_eq!(anchor("## Statistics first: `--summary-only`"), "statistics-first---summary-only");
    assert_eq!(anchor("## This repository's CI"), "this-repositorys-ci");
}
