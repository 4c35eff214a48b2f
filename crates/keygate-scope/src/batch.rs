//! Batch input files: JSON Lines of requests, each naming the model it will run on. Read at
//! upload so a batch made from the file runs only models the uploading key may use.

use std::sync::Arc;

use keygate_core::facts::scan_json;

/// Why a batch input file was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchError {
    /// A line is not a JSON object (strictly: no duplicate keys), or has no `body.model`
    /// string. The line number, from 1.
    BadLine(usize),
}

/// The models the requests of a batch input file name, sorted and each once.
pub(crate) fn batch_models(content: &[u8]) -> Result<Vec<Arc<str>>, BatchError> {
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        body: Body<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        model: std::borrow::Cow<'a, str>,
    }
    let mut models: Vec<Arc<str>> = Vec::new();
    for (i, line) in content.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // Strict first (the same scanner as request bodies: duplicate keys at any depth are
        // refused), then the one nested field.
        scan_json(line).map_err(|_| BatchError::BadLine(i + 1))?;
        let parsed: Line<'_> =
            serde_json::from_slice(line).map_err(|_| BatchError::BadLine(i + 1))?;
        let model = parsed.body.model;
        if let Err(at) = models.binary_search_by(|m| (**m).cmp(&*model)) {
            models.insert(at, Arc::from(&*model));
        }
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lines_model_is_collected_once() {
        let file = b"{\"custom_id\":\"1\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"gpt-4o-mini\",\"messages\":[]}}\r\n\n{\"custom_id\":\"2\",\"body\":{\"model\":\"gpt-4o\"}}\n{\"custom_id\":\"3\",\"body\":{\"model\":\"gpt-4o-mini\"}}\n";
        let models = batch_models(file).unwrap();
        assert_eq!(
            models.iter().map(|m| &**m).collect::<Vec<_>>(),
            ["gpt-4o", "gpt-4o-mini"]
        );
    }

    #[test]
    fn a_line_without_a_model_or_ambiguous_is_refused_with_its_number() {
        assert_eq!(
            batch_models(b"{\"body\":{\"model\":\"a\"}}\n{\"body\":{}}\n"),
            Err(BatchError::BadLine(2))
        );
        assert_eq!(
            batch_models(b"{\"body\":{\"model\":\"a\",\"model\":\"b\"}}"),
            Err(BatchError::BadLine(1))
        );
        assert_eq!(batch_models(b"not json"), Err(BatchError::BadLine(1)));
    }
}
