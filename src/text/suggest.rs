//! "Did you mean" suggestions for misspelt keys and names.

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word_lower, &c.to_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.chars().count().max(word.chars().count()) / 2).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn finds_close_keys_only() {
        let keys = ["encoding", "format", "path", "columns"];
        assert_eq!(nearest("encodng", keys), Some("encoding"));
        assert_eq!(nearest("colums", keys), Some("columns"));
        assert_eq!(nearest("zzzzzzzz", keys), None);
    }
}
