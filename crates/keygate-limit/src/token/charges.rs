//! Which counters a request is charged against, and the worst case it reserves.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use keygate_core::{Denial, LimitScope, Limits, Money, Principal, Stage, Timestamp, Usage};
use smallvec::SmallVec;

use super::{Config, Unpriced};
use crate::backend::{Charge, Exceeded, Unit, Window};
use crate::price::Price;
use crate::rate::{owner, scope_name};

/// What one charge is, for the refusal message.
#[derive(Clone, Copy)]
pub(super) struct Meta {
    pub(super) scope: LimitScope,
    pub(super) budget: bool,
}

/// What each charge is, in order.
pub(super) type Metas = SmallVec<[Meta; 4]>;

/// `scope␟owner␟part␟part…`, joined on the stack and copied once into its shared string.
pub(super) fn counter_key(scope: LimitScope, owner: &str, parts: &[&str]) -> Arc<str> {
    const SEP: &str = "\u{1f}";
    let pieces = [scope_name(scope), SEP, owner]
        .into_iter()
        .chain(parts.iter().flat_map(|p| [SEP, *p]));
    let mut buf = [0u8; 192];
    let mut len = 0;
    for piece in pieces.clone() {
        let Some(slot) = buf.get_mut(len..len + piece.len()) else {
            // Longer than the buffer (a very long pattern): on the heap.
            return pieces.collect::<String>().into();
        };
        slot.copy_from_slice(piece.as_bytes());
        len += piece.len();
    }
    // Only whole `&str`s were copied: always UTF-8.
    std::str::from_utf8(&buf[..len]).map_or_else(|_| pieces.collect::<String>().into(), Arc::from)
}

/// The counter a money budget of `owner` (a key id under [`LimitScope::Key`], a project id
/// under [`LimitScope::Project`]) is kept in, and the budget period that holds `now`: what the
/// token layer charges, and what `keygate spend show` reads back from a ledger.
pub fn budget_counter(
    scope: LimitScope,
    owner: &str,
    budget: &keygate_core::Budget,
    now: Timestamp,
) -> (crate::backend::CounterKey, Window) {
    let (start, end) = budget.period.window(now);
    let pattern = budget.model.as_ref().map_or("*", |p| p.as_str());
    let period = match budget.period {
        keygate_core::Period::Day => "day",
        keygate_core::Period::Week => "week",
        keygate_core::Period::Month => "month",
        _ => "lifetime",
    };
    (
        counter_key(scope, owner, &["budget", period, pattern]),
        Window::Fixed { start, end },
    )
}

/// Every charge that applies to a request of `model` estimated at `usage` and `cost`.
pub(super) fn charges(
    principal: &Principal,
    model: Option<&str>,
    tokens: u64,
    cost: Option<u64>,
    now: Timestamp,
) -> Result<(Vec<Charge>, Metas), ()> {
    let mut charges: Vec<Charge> = Vec::new();
    let mut metas: Metas = SmallVec::new();
    let mut push = |charge: Charge, meta: Meta| {
        // The same counter twice (two budgets of one period and pattern): the lower limit.
        if let Some(c) = charges.iter_mut().find(|c| c.key == charge.key) {
            c.limit = c.limit.min(charge.limit);
        } else {
            charges.push(charge);
            metas.push(meta);
        }
    };
    let group = crate::backend::group_of(&principal.project().id);
    let rate = |key, limit: u64| Charge {
        group,
        key,
        window: Window::Rate {
            per: Duration::from_secs(60),
        },
        unit: Unit::Tokens,
        limit,
        amount: tokens,
    };
    for (scope, limits) in principal.limits() {
        let owner = owner(principal, scope);
        let meta = Meta {
            scope,
            budget: false,
        };
        if let Some(tpm) = limits.tokens_per_minute {
            push(rate(counter_key(scope, owner, &["tpm"]), tpm.get()), meta);
        }
        if let Some(model) = model {
            for (pattern, l) in limits.for_model(model) {
                if let Some(tpm) = l.tokens_per_minute {
                    let key = counter_key(scope, owner, &["tpm", pattern]);
                    push(rate(key, tpm.get()), meta);
                }
            }
        }
        budgets(limits, model, |budget| {
            let Some(cost) = cost else {
                return Err(());
            };
            let (key, window) = budget_counter(scope, owner, budget, now);
            push(
                Charge {
                    group,
                    key,
                    window,
                    unit: Unit::Nanodollars,
                    limit: budget.amount.as_nanos(),
                    amount: cost,
                },
                Meta {
                    scope,
                    budget: true,
                },
            );
            Ok(())
        })?;
    }
    Ok((charges, metas))
}

/// The budgets of `limits` that apply to `model`; a per-model budget applies when the model is
/// not known (fail closed).
pub(super) fn budgets(
    limits: &Limits,
    model: Option<&str>,
    mut f: impl FnMut(&keygate_core::Budget) -> Result<(), ()>,
) -> Result<(), ()> {
    for budget in &limits.budgets {
        let applies = match (&budget.model, model) {
            (None, _) | (Some(_), None) => true,
            (Some(p), Some(m)) => p.matches(m),
        };
        if applies {
            f(budget)?;
        }
    }
    Ok(())
}

/// The largest output a request of `prompt` tokens may ask for to fit the counter `e` refused.
pub(super) fn output_that_fits(
    e: &Exceeded,
    meta: Meta,
    prompt: u64,
    price: Option<Price>,
) -> Option<u64> {
    if !meta.budget {
        return e.remaining.checked_sub(prompt);
    }
    let price = price?;
    let per_million = u128::from(price.output_per_million.as_nanos());
    if per_million == 0 {
        return None;
    }
    let left = e
        .remaining
        .checked_sub(price.cost(Usage::new(prompt, 0)).as_nanos())?;
    // `Price::cost` rounds each part up: ceil(o × p / 10⁶) ≤ left ⇔ o × p ≤ left × 10⁶.
    u64::try_from(u128::from(left) * 1_000_000 / per_million).ok()
}

/// The estimate and charges of a request of `prompt` tokens asking for up to `output`;
/// `Err`: the refusal of an unpriced model under a budget.
pub(super) fn plan<B>(
    config: &Config<B>,
    principal: &Principal,
    model: Option<&str>,
    price: Option<Price>,
    prompt: u64,
    output: u64,
    now: Timestamp,
) -> Result<(Usage, Vec<Charge>, Metas), Denial> {
    let estimate = Usage::new(prompt, output);
    let cost = match (price, config.unpriced) {
        (Some(p), _) => Some(p.cost(estimate).as_nanos()),
        (None, Unpriced::CountTokensOnly) => Some(0),
        (None, Unpriced::Deny) => None,
    };
    match charges(principal, model, estimate.total_tokens, cost, now) {
        Ok((charges, metas)) => Ok((estimate, charges, metas)),
        Err(()) => Err(Denial::new(
            Stage::TokenLimit,
            StatusCode::FORBIDDEN,
            "model_not_priced",
            "A spending budget applies to this key, but the model has no price.",
        )
        .with_param("model")),
    }
}

/// The estimate and charges of an image request priced per image: `count` images at `each`
/// (`None`: its size and quality have no price) and no tokens (images count no tokens unless
/// the upstream reports them); `Err`: the refusal of an unpriced image under a budget.
pub(super) fn plan_images<B>(
    config: &Config<B>,
    principal: &Principal,
    model: Option<&str>,
    each: Option<Money>,
    count: u64,
    now: Timestamp,
) -> Result<(Usage, Vec<Charge>, Metas), Denial> {
    let cost = match (each, config.unpriced) {
        (Some(each), _) => Some(each.as_nanos().saturating_mul(count)),
        (None, Unpriced::CountTokensOnly) => Some(0),
        (None, Unpriced::Deny) => None,
    };
    match charges(principal, model, 0, cost, now) {
        Ok((charges, metas)) => Ok((Usage::default(), charges, metas)),
        Err(()) => Err(Denial::new(
            Stage::TokenLimit,
            StatusCode::FORBIDDEN,
            "model_not_priced",
            "A spending budget applies to this key, but images of this size and quality have no price for this model.",
        )
        .with_param("size")),
    }
}

/// What a request may cost at most: the prompt, and the output per choice times the number of
/// choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WorstCase {
    pub(super) prompt: u64,
    /// The output cap of one choice (what is set on the forwarded request).
    pub(super) per_choice: u64,
    pub(super) choices: u64,
}

impl WorstCase {
    pub(super) fn output(&self) -> u64 {
        self.per_choice.saturating_mul(self.choices)
    }

    /// The largest cap per choice that fits `e`, the counter that refused.
    pub(super) fn fitting(&self, e: &Exceeded, meta: Meta, price: Option<Price>) -> Option<u64> {
        output_that_fits(e, meta, self.prompt, price).map(|total| total / self.choices.max(1))
    }
}
