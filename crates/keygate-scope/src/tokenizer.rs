//! [`OpenAiTokenizer`]: exact prompt token counts for OpenAI's model families.

use keygate_core::facts::TokenCounter;

/// The encoding a model family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    O200k,
    Cl100k,
}

/// The encoding of `model`, by family; `None` for models of other makers (their prompts are
/// bounded by their byte count).
fn encoding(model: &str) -> Option<Encoding> {
    // Fine-tuned models (`ft:gpt-4o-mini:org::id`) tokenize as their base.
    let base = model.strip_prefix("ft:").unwrap_or(model);
    const O200K: [&str; 9] = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "chatgpt-4o",
        "o1",
        "o3",
        "o4",
        "gpt-oss",
    ];
    const CL100K: [&str; 4] = [
        "gpt-4",
        "gpt-3.5",
        "text-embedding-3",
        "text-embedding-ada-002",
    ];
    let family = |prefix: &str| {
        base.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', ':', '.']))
    };
    if O200K.iter().any(|p| family(p)) {
        Some(Encoding::O200k)
    } else if CL100K.iter().any(|p| family(p)) {
        Some(Encoding::Cl100k)
    } else {
        None
    }
}

/// Counts tokens with OpenAI's own encodings (`o200k_base` for the GPT-4o, GPT-4.1, GPT-5 and
/// o-series families, `cl100k_base` for GPT-4, GPT-3.5 and the embedding models), built into
/// the binary: nothing is downloaded at run time. About 50 MB/s of text on one core.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiTokenizer;

impl TokenCounter for OpenAiTokenizer {
    fn knows(&self, model: &str) -> bool {
        encoding(model).is_some()
    }

    fn count(&self, model: &str, text: &str) -> u64 {
        let n = match encoding(model) {
            Some(Encoding::O200k) => bpe_openai::o200k_base().count(text),
            Some(Encoding::Cl100k) => bpe_openai::cl100k_base().count(text),
            // Not a model this counter knows: a token a byte bounds it.
            None => text.len(),
        };
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_map_to_their_encodings() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "o3-mini",
            "gpt-5",
            "ft:gpt-4o-mini:acme::x",
        ] {
            assert_eq!(encoding(m), Some(Encoding::O200k), "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
        ] {
            assert_eq!(encoding(m), Some(Encoding::Cl100k), "{m}");
        }
        for m in ["llama-3-70b", "claude-3", "gpt-4omega", "o1x", "mistral"] {
            assert_eq!(encoding(m), None, "{m}");
        }
    }

    #[test]
    fn counts_are_exact_and_never_above_the_byte_bound() {
        let t = OpenAiTokenizer;
        assert_eq!(t.count("gpt-4o", "Hello, world!"), 4);
        for text in [
            "Hello, world!",
            "日本語のテキストです。",
            "ǅ🦀 x\u{0}y",
            "     ",
        ] {
            for m in ["gpt-4o", "gpt-4"] {
                assert!(t.count(m, text) <= text.len() as u64, "{m} {text:?}");
            }
        }
    }
}
