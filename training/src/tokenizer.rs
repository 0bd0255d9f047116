//! Tokenisers of a run: bytes (the default: 256 ids, nothing to train or ship) or a Hugging Face
//! `tokenizer.json` through the `tokenizers` crate, either a user's (`--tokenizer FILE`) or one
//! trained here on the corpus (`fla-train bpe`, a byte-level BPE as GPT-2 and FLA's models use).
//! A model directory that holds a `tokenizer.json` is read with it; one without, with bytes.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The file name Hugging Face (and FLA's checkpoints on the hub) give a tokeniser.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The end-of-text token a BPE trained here carries (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: cannot write {path}: {message}")]
    Save { path: PathBuf, message: String },
    #[error("tokenizer: cannot encode the text: {0}")]
    Encode(String),
    #[error("tokenizer: cannot decode ids: {0}")]
    Decode(String),
    #[error("BPE training: {0}")]
    Train(String),
    #[error("BPE training: vocabulary size {0} is below the 256 byte symbols plus {END_OF_TEXT}")]
    VocabTooSmall(usize),
    #[error("tokenizer: id {id} is past the model's vocabulary of {vocab}")]
    IdOutOfRange { id: usize, vocab: usize },
}

/// How text becomes token ids.
pub enum Tokenizer {
    /// One id per UTF-8 byte.
    Bytes,
    /// A Hugging Face tokeniser (boxed: it is large next to `Bytes`).
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::Hf(t) => write!(f, "Tokenizer::Hf({} ids)", t.get_vocab_size(true)),
        }
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// The tokeniser a saved model was trained with: its directory's `tokenizer.json`, or bytes.
    pub fn for_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file = dir.join(TOKENIZER_FILE);
        if file.exists() {
            Self::from_file(&file)
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    /// Ids this tokeniser can produce (the model's `vocab_size` must cover them).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of `text`, without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(usize::from).collect()),
            Tokenizer::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                Ok(enc.get_ids().iter().map(|&i| i as usize).collect())
            }
        }
    }

    /// Text of `ids`; bytes that are not UTF-8 on their own are replaced (a generation can stop
    /// in the middle of a character).
    pub fn decode(&self, ids: &[usize]) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&i| i >= vocab) {
            return Err(TokenizerError::IdOutOfRange { id, vocab });
        }
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                t.decode(&ids, false)
                    .map_err(|e| TokenizerError::Decode(e.to_string()))
            }
        }
    }

    /// UTF-8 bytes the tokens of `ids` stand for (exactly `ids.len()` for bytes, even where
    /// they cut a character; decoded otherwise).
    pub fn byte_len(&self, ids: &[usize]) -> Result<usize, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(ids.len()),
            Tokenizer::Hf(_) => Ok(self.decode(ids)?.len()),
        }
    }

    /// The id of the end-of-text token, if the tokeniser has one.
    pub fn end_of_text(&self) -> Option<usize> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => ["<|endoftext|>", "</s>", "<eos>"]
                .iter()
                .find_map(|s| t.token_to_id(s))
                .map(|i| i as usize),
        }
    }

    /// Writes the tokeniser as a `tokenizer.json` at `path`; bytes need no file and write none.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        if let Tokenizer::Hf(t) = self {
            t.save(path, false).map_err(|e| TokenizerError::Save {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Writes the tokeniser into a model directory, so `fla-generate` and `fla-eval` read the
    /// model with it (and Hugging Face's `AutoTokenizer` does too).
    pub fn save_to_model_dir(&self, dir: &Path) -> Result<(), TokenizerError> {
        self.save(&dir.join(TOKENIZER_FILE))
    }

    /// Trains a byte-level BPE (GPT-2's scheme: every byte is a symbol, so any text encodes) of
    /// `vocab_size` ids on `texts`, with `<|endoftext|>` as its one special token.
    pub fn train_bpe<S: AsRef<str> + Send>(
        texts: impl Iterator<Item = S> + Send,
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        if vocab_size < 257 {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build();
        let train = |e: tokenizers::Error| TokenizerError::Train(e.to_string());
        // No prefix space: text is encoded as it is, and decoding gives it back unchanged.
        let byte_level = ByteLevel::new(false, true, true);
        let mut t =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(train)?;
        t.train(&mut trainer, texts).map_err(train)?;
        Ok(Tokenizer::Hf(Box::new(tokenizers::Tokenizer::from(t))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Of Man's first disobedience, and the fruit\n\
        Of that forbidden tree whose mortal taste\n\
        Brought death into the World, and all our woe,\n";

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("Eden é").unwrap();
        assert_eq!(ids.len(), 7, "é is two bytes");
        assert_eq!(t.decode(&ids).unwrap(), "Eden é");
        assert!(matches!(
            t.decode(&[300]),
            Err(TokenizerError::IdOutOfRange {
                id: 300,
                vocab: 256
            })
        ));
    }

    #[test]
    fn bpe_trains_merges_and_round_trips_any_text() {
        let texts = std::iter::repeat_n(TEXT, 20);
        let t = Tokenizer::train_bpe(texts, 300).unwrap();
        let vocab = t.vocab_size();
        assert!(vocab > 257 && vocab <= 300, "vocab {vocab}");
        let ids = t.encode(TEXT).unwrap();
        assert!(
            ids.len() < TEXT.len() * 2 / 3,
            "merges shorten the text: {} ids",
            ids.len()
        );
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        // Bytes never seen in training still encode (byte-level alphabet) and come back.
        let unseen = "Zürich ∑ 🙂";
        assert_eq!(t.decode(&t.encode(unseen).unwrap()).unwrap(), unseen);
        assert!(t.end_of_text().is_some());
        // Saved as tokenizer.json, read back the same.
        let dir = std::env::temp_dir().join(format!("fla-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        t.save_to_model_dir(&dir).unwrap();
        let back = Tokenizer::for_model_dir(&dir).unwrap();
        assert_eq!(back.encode(TEXT).unwrap(), ids);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_tokenizer_files_are_named() {
        assert!(matches!(
            Tokenizer::train_bpe(std::iter::once(TEXT), 100),
            Err(TokenizerError::VocabTooSmall(100))
        ));
        let path = std::env::temp_dir().join(format!("fla-bad-tok-{}.json", std::process::id()));
        std::fs::write(&path, "{not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&path).ok();
        assert!(matches!(
            Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")),
            Err(TokenizerError::Load { .. })
        ));
    }
}
