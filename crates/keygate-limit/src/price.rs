//! What tokens and images cost: [`PriceTable`], with [`Price`] per million tokens and
//! [`ImagePrices`] per image.

use keygate_core::{ModelPattern, ModelPatternError, Money, Usage};

/// Input and output prices of a model, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Price of one million input (prompt) tokens.
    pub input_per_million: Money,
    /// Price of one million output (completion) tokens.
    pub output_per_million: Money,
}

impl Price {
    /// A price per million input and output tokens.
    pub const fn per_million(input: Money, output: Money) -> Self {
        Price {
            input_per_million: input,
            output_per_million: output,
        }
    }

    /// The cost of `usage`, rounded up to the nano-dollar.
    pub fn cost(&self, usage: Usage) -> Money {
        let part = |tokens: u64, per_million: Money| {
            let nanos = u128::from(tokens) * u128::from(per_million.as_nanos());
            u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX)
        };
        Money::from_nanos(
            part(usage.prompt_tokens, self.input_per_million)
                .saturating_add(part(usage.completion_tokens, self.output_per_million)),
        )
    }
}

/// The size an image request makes when it names none, unless its model's [`ImagePrices`]
/// say otherwise: OpenAI's default for `dall-e-2` and `dall-e-3`.
pub const DEFAULT_IMAGE_SIZE: &str = "1024x1024";

/// The quality an image request makes when it names none, unless its model's
/// [`ImagePrices`] say otherwise: what `dall-e-2` and `dall-e-3` make (their `auto`).
pub const DEFAULT_IMAGE_QUALITY: &str = "standard";

/// Why a key of an [`ImagePrices`] table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an image size and quality: {0:?} (expected SIZE or SIZE/QUALITY, such as \"1024x1024\" or \"1024x1024/hd\"; SIZE may be \"*\")"
)]
pub struct ImageKeyError(String);

/// What one image costs, by the size and quality a request asks for (per model pattern, in
/// a [`PriceTable`]).
///
/// A price is set for a key `SIZE` (every quality of that size) or `SIZE/QUALITY` (that
/// quality only); `SIZE` may be `*` (every size). A request is priced at the first of
/// `size/quality`, `size`, `*/quality`, `*` that has a price, where a size or quality the
/// request does not name is the table's default ([`DEFAULT_IMAGE_SIZE`],
/// [`DEFAULT_IMAGE_QUALITY`], or what [`with_default_size`](ImagePrices::with_default_size)
/// and [`with_default_quality`](ImagePrices::with_default_quality) set). Sizes and qualities
/// compare without regard to ASCII case. None of them matching: the image is unpriced.
///
/// A key without a quality prices every quality of its size, including ones the upstream may
/// add: give it the highest price of that size, or price each quality.
///
/// ```
/// use keygate_core::Money;
/// use keygate_limit::ImagePrices;
///
/// let dalle3 = ImagePrices::new()
///     .with_price("1024x1024", Money::parse("0.04")?)?
///     .with_price("1024x1024/hd", Money::parse("0.08")?)?;
/// assert_eq!(dalle3.price(None, None), Some(Money::parse("0.04")?));
/// assert_eq!(dalle3.price(Some("1024x1024"), Some("hd")), Some(Money::parse("0.08")?));
/// assert_eq!(dalle3.price(Some("1792x1024"), None), None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePrices {
    // (size, quality, price); `*` for any size, `None` for any quality.
    entries: Vec<(Box<str>, Option<Box<str>>, Money)>,
    default_size: Box<str>,
    default_quality: Box<str>,
}

impl Default for ImagePrices {
    fn default() -> Self {
        ImagePrices {
            entries: Vec::new(),
            default_size: DEFAULT_IMAGE_SIZE.into(),
            default_quality: DEFAULT_IMAGE_QUALITY.into(),
        }
    }
}

/// Whether `s` can be a size or quality: one non-empty token of visible characters, no `/`.
fn is_part(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

impl ImagePrices {
    /// No prices; the defaults [`DEFAULT_IMAGE_SIZE`] and [`DEFAULT_IMAGE_QUALITY`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) the price of one image of `key`: `SIZE` (any quality) or
    /// `SIZE/QUALITY`, `SIZE` being `*` for any size.
    ///
    /// # Errors
    ///
    /// When `key` is not of that form (empty parts, spaces, a `*` quality, more than one `/`).
    pub fn with_price(mut self, key: &str, price: Money) -> Result<Self, ImageKeyError> {
        let bad = || ImageKeyError(key.to_owned());
        let (size, quality) = match key.split_once('/') {
            Some((size, quality)) => (size, Some(quality)),
            None => (key, None),
        };
        if !is_part(size) || quality.is_some_and(|q| !is_part(q) || q == "*") {
            return Err(bad());
        }
        let same = |s: &str, q: Option<&str>| {
            s.eq_ignore_ascii_case(size)
                && match (q, quality) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => false,
                }
        };
        self.entries.retain(|(s, q, _)| !same(s, q.as_deref()));
        self.entries
            .push((size.into(), quality.map(Into::into), price));
        Ok(self)
    }

    /// The size priced for a request that names none (default [`DEFAULT_IMAGE_SIZE`]; `auto`
    /// for `gpt-image-1`, whose API default it is).
    pub fn with_default_size(mut self, size: &str) -> Self {
        self.default_size = size.into();
        self
    }

    /// The quality priced for a request that names none (default [`DEFAULT_IMAGE_QUALITY`];
    /// `auto` for `gpt-image-1`).
    pub fn with_default_quality(mut self, quality: &str) -> Self {
        self.default_quality = quality.into();
        self
    }

    /// The size priced for a request that names none.
    pub fn default_size(&self) -> &str {
        &self.default_size
    }

    /// The quality priced for a request that names none.
    pub fn default_quality(&self) -> &str {
        &self.default_quality
    }

    /// The price of one image of `size` and `quality` (`None`: as the request named none),
    /// if one is set.
    pub fn price(&self, size: Option<&str>, quality: Option<&str>) -> Option<Money> {
        let size = size.unwrap_or(&self.default_size);
        let quality = quality.unwrap_or(&self.default_quality);
        let find = |s: &str, q: Option<&str>| {
            self.entries.iter().find_map(|(es, eq, price)| {
                let q_ok = match (eq, q) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => false,
                };
                (q_ok && es.eq_ignore_ascii_case(s)).then_some(*price)
            })
        };
        find(size, Some(quality))
            .or_else(|| find(size, None))
            .or_else(|| find("*", Some(quality)))
            .or_else(|| find("*", None))
    }

    /// Whether no price is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Prices per model pattern: per million tokens ([`Price`]) and per image ([`ImagePrices`]),
/// each looked up on its own. The most specific pattern wins: an exact name before any
/// wildcard, a longer prefix before a shorter one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    // Each sorted most specific first.
    entries: Vec<(ModelPattern, Price)>,
    images: Vec<(ModelPattern, ImagePrices)>,
}

/// Adds (or replaces) `value` under `pattern`, keeping `entries` most specific first.
fn insert_sorted<T>(entries: &mut Vec<(ModelPattern, T)>, pattern: ModelPattern, value: T) {
    entries.retain(|(p, _)| p.as_str() != pattern.as_str());
    entries.push((pattern, value));
    entries.sort_by_key(|(p, _)| {
        let s = p.as_str();
        let wildcard = s.ends_with('*');
        (wildcard, std::cmp::Reverse(s.len()))
    });
}

impl PriceTable {
    /// An empty table (every model unpriced).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the price per million tokens of models matching `pattern`.
    ///
    /// # Errors
    ///
    /// When `pattern` is not a model pattern.
    pub fn with_price(mut self, pattern: &str, price: Price) -> Result<Self, ModelPatternError> {
        insert_sorted(&mut self.entries, ModelPattern::new(pattern)?, price);
        Ok(self)
    }

    /// Adds (or replaces) the prices per image of models matching `pattern`. An image request
    /// to such a model reserves `n` × the price of its size and quality (see the token layer);
    /// a size and quality without a price is unpriced, whatever token price the model has.
    ///
    /// ```
    /// use keygate_core::Money;
    /// use keygate_limit::{ImagePrices, PriceTable};
    ///
    /// let table = PriceTable::new().with_image_prices(
    ///     "dall-e-2",
    ///     ImagePrices::new()
    ///         .with_price("256x256", Money::parse("0.016")?)?
    ///         .with_price("1024x1024", Money::parse("0.02")?)?,
    /// )?;
    /// let prices = table.image_prices("dall-e-2").unwrap();
    /// assert_eq!(prices.price(Some("256x256"), None), Some(Money::parse("0.016")?));
    /// assert!(table.image_prices("dall-e-3").is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When `pattern` is not a model pattern.
    pub fn with_image_prices(
        mut self,
        pattern: &str,
        prices: ImagePrices,
    ) -> Result<Self, ModelPatternError> {
        insert_sorted(&mut self.images, ModelPattern::new(pattern)?, prices);
        Ok(self)
    }

    /// The price per million tokens of `model`, if any pattern matches.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, price)| *price)
    }

    /// The prices per image of `model`, if any pattern with image prices matches.
    pub fn image_prices(&self, model: &str) -> Option<&ImagePrices> {
        self.images
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, prices)| prices)
    }

    /// Whether no price is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.images.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_price_wins_and_cost_rounds_up() {
        let table = PriceTable::new()
            .with_price(
                "gpt-4o*",
                Price::per_million(Money::from_dollars(5), Money::from_dollars(15)),
            )
            .unwrap()
            .with_price(
                "gpt-4o-mini",
                Price::per_million(Money::from_micros(150_000), Money::from_micros(600_000)),
            )
            .unwrap();
        let mini = table.price("gpt-4o-mini").unwrap();
        assert_eq!(mini.input_per_million, Money::from_micros(150_000));
        assert_eq!(
            table.price("gpt-4o-2024").unwrap().input_per_million,
            Money::from_dollars(5)
        );
        assert_eq!(table.price("o1"), None);
        // 1000 in at $0.15/M = 150_000 nanos; 1 out at $0.60/M = 600 nanos.
        assert_eq!(mini.cost(Usage::new(1000, 1)), Money::from_nanos(150_600));
        let odd = Price::per_million(Money::from_nanos(1), Money::ZERO);
        assert_eq!(odd.cost(Usage::new(1, 0)), Money::from_nanos(1));
    }

    fn money(s: &str) -> Money {
        Money::parse(s).unwrap()
    }

    #[test]
    fn an_image_is_priced_by_size_and_quality_with_fallbacks_and_defaults() {
        let p = ImagePrices::new()
            .with_price("1024x1024", money("0.04"))
            .unwrap()
            .with_price("1024x1024/hd", money("0.08"))
            .unwrap()
            .with_price("1792x1024/HD", money("0.12"))
            .unwrap();
        // Named: the exact size and quality, compared without case.
        assert_eq!(p.price(Some("1024x1024"), Some("hd")), Some(money("0.08")));
        assert_eq!(p.price(Some("1792X1024"), Some("hd")), Some(money("0.12")));
        // A quality without its own price: the size's.
        assert_eq!(
            p.price(Some("1024x1024"), Some("standard")),
            Some(money("0.04"))
        );
        // Unnamed: the defaults, 1024x1024 and standard.
        assert_eq!(p.price(None, None), Some(money("0.04")));
        assert_eq!(p.price(None, Some("hd")), Some(money("0.08")));
        // A size with no price for that quality and no fallback: unpriced.
        assert_eq!(p.price(Some("1792x1024"), None), None);
        assert_eq!(p.price(Some("512x512"), Some("hd")), None);
        // `*` is every size; replacing a key keeps one price for it.
        let p = p
            .with_price("*/hd", money("0.2"))
            .unwrap()
            .with_price("*", money("0.1"))
            .unwrap()
            .with_price("1024X1024", money("0.05"))
            .unwrap();
        assert_eq!(p.price(Some("512x512"), Some("hd")), Some(money("0.2")));
        assert_eq!(p.price(Some("512x512"), None), Some(money("0.1")));
        assert_eq!(p.price(None, None), Some(money("0.05")));
        // Other defaults (gpt-image-1 makes `auto` unless told).
        let auto = ImagePrices::new()
            .with_price("auto/auto", money("0.25"))
            .unwrap()
            .with_default_size("auto")
            .with_default_quality("auto");
        assert_eq!(auto.price(None, None), Some(money("0.25")));
        assert_eq!(auto.price(Some("1024x1024"), None), None);
    }

    #[test]
    fn image_price_keys_must_be_a_size_and_an_optional_quality() {
        for bad in [
            "",
            "/hd",
            "1024x1024/",
            "1024x1024/hd/x",
            "1024 x 1024",
            "1024x1024/*",
        ] {
            let e = ImagePrices::new().with_price(bad, Money::ZERO).unwrap_err();
            assert!(e.to_string().contains("SIZE/QUALITY"), "{bad}: {e}");
        }
    }

    #[test]
    fn image_prices_are_looked_up_apart_from_token_prices() {
        let table = PriceTable::new()
            .with_price(
                "gpt-image-*",
                Price::per_million(Money::from_dollars(5), Money::from_dollars(40)),
            )
            .unwrap()
            .with_image_prices(
                "gpt-image-1",
                ImagePrices::new().with_price("*", money("0.25")).unwrap(),
            )
            .unwrap()
            .with_image_prices("*", ImagePrices::new().with_price("*", money("1")).unwrap())
            .unwrap();
        assert!(!table.is_empty());
        let image = |m: &str| table.image_prices(m).and_then(|p| p.price(None, None));
        assert_eq!(image("gpt-image-1"), Some(money("0.25")));
        assert_eq!(image("dall-e-2"), Some(money("1")));
        assert!(table.price("gpt-image-1").is_some());
        assert!(table.price("dall-e-2").is_none());
        assert!(
            !PriceTable::new()
                .with_image_prices("x", ImagePrices::new())
                .unwrap()
                .is_empty()
        );
    }
}
