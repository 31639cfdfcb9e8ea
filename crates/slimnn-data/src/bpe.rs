//! Byte-level BPE tokenizers (GPT-2 style) built from a GGUF file's vocabulary and merges, and
//! the ChatML chat template.
//!
//! GGUF files carry `tokenizer.ggml.tokens` (id order), `tokenizer.ggml.token_type` (3 =
//! control, 4 = user-defined: both matched as whole special tokens), `tokenizer.ggml.merges`
//! (`"a b"` pairs, by priority) and `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp applies.
//! The same pieces make a `tokenizers` pipeline: digits split one by one where the
//! pre-tokenizer asks for it (`smollm`, `starcoder`, ...), then GPT-2's byte-level split.

use crate::{DataError, Result};
use tokenizers::Tokenizer;

/// What the GGUF metadata says about the tokenizer.
pub struct BpeSpec<'a> {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is supported.
    pub model: &'a str,
    /// `tokenizer.ggml.pre`, or `None` for GPT-2's default.
    pub pre: Option<&'a str>,
    pub tokens: &'a [&'a str],
    pub token_types: &'a [i64],
    pub merges: &'a [&'a str],
}

/// Pre-tokenizers that split every digit before the byte-level split.
const DIGIT_SPLITTING: &[&str] = &["smollm", "starcoder", "refact", "command-r"];
const PLAIN: &[&str] = &["default", "gpt2", "gpt-2"];

/// A byte-level BPE tokenizer.
pub struct BpeTokenizer {
    inner: Tokenizer,
    vocab: usize,
}

impl BpeTokenizer {
    pub fn new(spec: &BpeSpec<'_>) -> Result<BpeTokenizer> {
        if spec.model != "gpt2" {
            return Err(DataError::Tokenizer(format!(
                "tokenizer model '{}' is not supported (slimnn builds byte-level BPE, 'gpt2')",
                spec.model
            )));
        }
        let digits = match spec.pre {
            None => false,
            Some(p) if PLAIN.contains(&p) => false,
            Some(p) if DIGIT_SPLITTING.contains(&p) => true,
            Some(p) => {
                return Err(DataError::Tokenizer(format!(
                    "pre-tokenizer '{p}' is not supported (known: {})",
                    [PLAIN, DIGIT_SPLITTING].concat().join(", ")
                )))
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> =
            spec.tokens.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::Value::from(i))).collect();
        let specials: Vec<serde_json::Value> = spec
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(spec.token_types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre = if digits {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]})
        } else {
            byte_level.clone()
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": specials,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": spec.merges},
        });
        let inner: Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| DataError::Tokenizer(format!("building the BPE tokenizer from the GGUF vocabulary: {e}")))?;
        Ok(BpeTokenizer { inner, vocab: spec.tokens.len() })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    /// The token string of one id (byte-level form, e.g. `Ġthe`).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Streams decoded text token by token: byte-level tokens may end inside a UTF-8 character,
/// so text is emitted only up to the last complete character.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder { ids: vec![], emitted: 0 }
    }

    /// Adds a token; returns the new text that is complete so far.
    pub fn push(&mut self, tok: &BpeTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        // A partial character decodes to U+FFFD; hold it back until it completes.
        let end = if text.ends_with('\u{FFFD}') { text.trim_end_matches('\u{FFFD}').len() } else { text.len() };
        if end <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let new = text[self.emitted..end].to_string();
        self.emitted = end;
        Ok(new)
    }
}

/// A chat template slimnn can render. Only ChatML (`<|im_start|>role\ncontent<|im_end|>\n`, the
/// template of SmolLM2, Qwen and others) is recognised: a full Jinja engine is out of scope, so
/// the metadata's template is inspected for ChatML markers and its default system prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// Inserted as the first message when the conversation has none (from the template).
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// Recognises a ChatML template in `tokenizer.chat_template`.
    pub fn from_metadata(template: &str) -> Result<ChatTemplate> {
        if !template.contains("<|im_start|>") || !template.contains("<|im_end|>") {
            return Err(DataError::Tokenizer(
                "the model's chat template is not ChatML; slimnn renders ChatML templates only".into(),
            ));
        }
        let marker = "<|im_start|>system\n";
        let default_system = template.find(marker).and_then(|i| {
            let rest = &template[i + marker.len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string())
        });
        Ok(ChatTemplate { default_system })
    }

    /// The prompt for one user message, ending with the assistant's turn opener.
    pub fn render_user(&self, user: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = &self.default_system {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> BpeTokenizer {
        // Bytes as GPT-2 maps them: 'Ġ' is the space.
        let tokens = [
            "<|endoftext|>",
            "h",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            "1",
            "2",
            "he",
            "ll",
            "hell",
            "hello",
            "Ġw",
            "<|im_start|>",
        ];
        let types = [3i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3];
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"];
        BpeTokenizer::new(&BpeSpec {
            model: "gpt2",
            pre: Some("smollm"),
            tokens: &tokens,
            token_types: &types,
            merges: &merges,
        })
        .unwrap()
    }

    #[test]
    fn merges_and_specials() {
        let t = toy();
        assert_eq!(t.encode("hello world").unwrap(), vec![14, 15, 4, 7, 3, 8]);
        assert_eq!(t.encode("<|im_start|>hello").unwrap(), vec![16, 14]);
        // Digits split one by one.
        assert_eq!(t.encode("12").unwrap(), vec![9, 10]);
        assert_eq!(t.decode(&[14, 15, 4, 7, 3, 8], true).unwrap(), "hello world");
    }

    #[test]
    fn unsupported_models_are_named() {
        let err = BpeTokenizer::new(&BpeSpec { model: "llama", pre: None, tokens: &[], token_types: &[], merges: &[] });
        assert!(err.err().unwrap().to_string().contains("'llama'"));
    }

    #[test]
    fn chatml_template() {
        let t = ChatTemplate::from_metadata("{{ '<|im_start|>system\nBe nice<|im_end|>\n' }}{{'<|im_start|>' + role}}")
            .unwrap();
        assert_eq!(
            t.render_user("Hi"),
            "<|im_start|>system\nBe nice<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::from_metadata("[INST] {{ content }} [/INST]").is_err());
    }
}
