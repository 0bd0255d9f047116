//! Training text: the bundled corpus, or a user's plain-text files and JSON-lines files, tokenised
//! into one stream (documents separated by the tokeniser's end-of-text token, or a blank line for
//! bytes) and split into training and validation parts. Batches are windows drawn from the stream
//! at seeded random offsets: sequences packed to the context length, shuffled by the seed.

use std::path::{Path, PathBuf};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Milton's *Paradise Lost* (Project Gutenberg, public domain; see data/NOTICE.md).
pub const CORPUS: &str = include_str!("../data/paradise_lost.txt");

/// The share of the token stream held out for validation (its end).
pub const VALID_PERCENT: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data {path}, line {line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("data {0}: no text (a .txt/.md file, a .jsonl file with \"text\" fields, or a folder of them)")]
    NoText(PathBuf),
    #[error("data: {tokens} tokens give a {part} split too short for windows of {need} tokens")]
    TooShort {
        part: &'static str,
        tokens: usize,
        need: usize,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `"text"` field of each line of a JSON-lines file (blank lines skipped), as FLA's and
/// Hugging Face's datasets write them.
fn jsonl_documents(path: &Path) -> Result<Vec<String>, DataError> {
    let content = std::fs::read_to_string(path).map_err(io(path))?;
    let mut docs = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(_) => return Err(err("\"text\" is not a string".into())),
            None => return Err(err("no \"text\" field".into())),
        }
    }
    Ok(docs)
}

fn is_text(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("txt" | "md" | "jsonl")
    )
}

/// Files under `dir` (recursively) that hold text, in path order so a run is repeatable.
fn text_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io(dir)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            text_files(&path, out)?;
        } else if is_text(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The documents of `source`: the bundled corpus when `None`; a `.jsonl` file's `"text"` fields;
/// any other file whole; a folder's `.txt`, `.md` and `.jsonl` files, recursively.
pub fn documents(source: Option<&Path>) -> Result<Vec<String>, DataError> {
    let Some(path) = source else {
        return Ok(vec![CORPUS.to_string()]);
    };
    let files = if path.is_dir() {
        let mut files = Vec::new();
        text_files(path, &mut files)?;
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut docs = Vec::new();
    for file in &files {
        if file.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            docs.extend(jsonl_documents(file)?);
        } else {
            docs.push(std::fs::read_to_string(file).map_err(io(file))?);
        }
    }
    docs.retain(|d| !d.is_empty());
    if docs.is_empty() {
        return Err(DataError::NoText(path.to_path_buf()));
    }
    Ok(docs)
}

/// A tokenised corpus, split: the last `VALID_PERCENT`% of the stream is validation.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

/// `docs` tokenised into one stream, separated by the tokeniser's end-of-text token (a blank
/// line where it has none).
pub fn tokens(docs: &[String], tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let separator = match tokenizer.end_of_text() {
        Some(id) => vec![id],
        None => tokenizer.encode("\n\n")?,
    };
    let mut stream: Vec<u32> = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            stream.extend(separator.iter().map(|&t| t as u32));
        }
        stream.extend(tokenizer.encode(doc)?.into_iter().map(|t| t as u32));
    }
    Ok(stream)
}

impl Corpus {
    /// Tokenises `docs` into one stream and splits it; both parts must hold a window of
    /// `window` tokens.
    pub fn new(docs: &[String], tokenizer: &Tokenizer, window: usize) -> Result<Self, DataError> {
        let mut stream = tokens(docs, tokenizer)?;
        let split = stream.len() * (100 - VALID_PERCENT) / 100;
        let valid = stream.split_off(split);
        for (part, tokens) in [("training", stream.len()), ("validation", valid.len())] {
            if tokens <= window {
                return Err(DataError::TooShort {
                    part,
                    tokens,
                    need: window + 1,
                });
            }
        }
        Ok(Corpus {
            train: stream,
            valid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fla-data-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bundled_corpus_splits_its_bytes() {
        let docs = documents(None).unwrap();
        let c = Corpus::new(&docs, &Tokenizer::Bytes, 64).unwrap();
        assert_eq!(c.train.len() + c.valid.len(), CORPUS.len());
        assert_eq!(c.train.len(), CORPUS.len() * 95 / 100);
        assert_eq!(c.valid[0] as u8, CORPUS.as_bytes()[c.train.len()]);
    }

    #[test]
    fn folders_and_jsonl_files_are_read_in_order() {
        let dir = scratch("folder");
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("a.txt"), "first").unwrap();
        std::fs::write(
            dir.join("b/c.jsonl"),
            "{\"text\": \"second\", \"id\": 1}\n\n{\"text\": \"third\"}\n",
        )
        .unwrap();
        std::fs::write(dir.join("skip.bin"), [0u8, 1, 2]).unwrap();
        let docs = documents(Some(&dir)).unwrap();
        assert_eq!(docs, ["first", "second", "third"]);
        let c = Corpus::new(&docs, &Tokenizer::Bytes, 0).unwrap();
        let all: Vec<u8> = c.train.iter().chain(&c.valid).map(|&t| t as u8).collect();
        assert_eq!(all, b"first\n\nsecond\n\nthird");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_data_is_named() {
        let dir = scratch("bad");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
        match documents(Some(&bad)) {
            Err(DataError::Jsonl { line: 2, .. }) => {}
            other => panic!("expected a line-2 error, got {other:?}"),
        }
        std::fs::write(&bad, "not json\n").unwrap();
        assert!(matches!(
            documents(Some(&bad)),
            Err(DataError::Jsonl { line: 1, .. })
        ));
        let empty = scratch("empty");
        assert!(matches!(documents(Some(&empty)), Err(DataError::NoText(_))));
        assert!(matches!(
            documents(Some(&dir.join("missing.txt"))),
            Err(DataError::Io { .. })
        ));
        let short = vec!["a few bytes".to_string()];
        assert!(matches!(
            Corpus::new(&short, &Tokenizer::Bytes, 64),
            Err(DataError::TooShort { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&empty).ok();
    }
}
