//! Real text corpora fetched by `scripts/fetch-assets.sh`.

use crate::{DataError, Result};
use std::path::Path;

#[derive(serde::Deserialize)]
struct Chapter {
    text: String,
}

/// Sentences of Moby-Dick (`assets/moby-dick/*.json`), in chapter file order: whitespace
/// collapsed, split after `.`, `!` or `?`, keeping those of `min_words..=max_words` words.
pub fn moby_dick_sentences(dir: &Path, min_words: usize, max_words: usize) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| DataError::File {
            path: dir.display().to_string(),
            msg: format!("{e} (run scripts/fetch-assets.sh)"),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| DataError::File { path: f.display().to_string(), msg: e.to_string() })?;
        let ch: Chapter = serde_json::from_str(&text)
            .map_err(|e| DataError::File { path: f.display().to_string(), msg: e.to_string() })?;
        let flat = ch.text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut start = 0;
        for (i, c) in flat.char_indices() {
            if matches!(c, '.' | '!' | '?') && flat[i + 1..].starts_with(' ') {
                let s = flat[start..=i].trim();
                let words = s.split(' ').count();
                if (min_words..=max_words).contains(&words) {
                    out.push(s.to_string());
                }
                start = i + 1;
            }
        }
    }
    Ok(out)
}
