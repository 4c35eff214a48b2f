//! What tokens cost: [`PriceTable`].

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

/// Prices per model pattern. The most specific pattern wins: an exact name before any
/// wildcard, a longer prefix before a shorter one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    // Sorted most specific first.
    entries: Vec<(ModelPattern, Price)>,
}

impl PriceTable {
    /// An empty table (every model unpriced).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the price of models matching `pattern`.
    ///
    /// # Errors
    ///
    /// When `pattern` is not a model pattern.
    pub fn with_price(mut self, pattern: &str, price: Price) -> Result<Self, ModelPatternError> {
        let pattern = ModelPattern::new(pattern)?;
        self.entries.retain(|(p, _)| p.as_str() != pattern.as_str());
        self.entries.push((pattern, price));
        self.entries.sort_by_key(|(p, _)| {
            let s = p.as_str();
            let wildcard = s.ends_with('*');
            (wildcard, std::cmp::Reverse(s.len()))
        });
        Ok(self)
    }

    /// The price of `model`, if any pattern matches.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, price)| *price)
    }

    /// Whether no price is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
}
