//! A key's money budgets now: limit, spent, reserved, remaining, and when each resets.

use keygate::limit::backend::{Window, group_of};
use keygate::limit::budget_counter;
use keygate_core::{Budget, KeyRecord, LimitScope, Money, Period, ProjectRecord, Timestamp};
use keygate_store::DbError;
use serde::Serialize;

use crate::store::AdminStore;

/// One budget of a key or of its project, in its current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetUse {
    /// `key` or `project`: whose budget it is.
    pub scope: &'static str,
    /// The key's or project's id.
    pub owner: String,
    /// `day`, `week`, `month` or `lifetime` (periods are UTC).
    pub period: &'static str,
    /// The models it counts (`*`: all).
    pub model: String,
    /// The most that may be spent in one period.
    pub limit: Money,
    /// Settled in this period.
    pub spent: Money,
    /// Held by requests in flight (`None`: not known here).
    pub reserved: Option<Money>,
    /// What is left: limit − spent − reserved.
    pub remaining: Money,
    /// When this period began.
    pub period_start: Timestamp,
    /// When it ends and the budget is whole again (`None`: a lifetime budget).
    pub resets_at: Option<Timestamp>,
}

/// The name of a budget period.
pub fn period_name(period: Period) -> &'static str {
    match period {
        Period::Day => "day",
        Period::Week => "week",
        Period::Month => "month",
        _ => "lifetime",
    }
}

/// Every money budget of `key` and of its `project`, read from `store` at `now`.
pub(crate) async fn budgets(
    store: &AdminStore,
    key: &KeyRecord,
    project: Option<&ProjectRecord>,
    now: Timestamp,
) -> Result<Vec<BudgetUse>, DbError> {
    let group = group_of(&key.project);
    let scopes: [(LimitScope, &str, &[Budget]); 2] = [
        (LimitScope::Key, key.id.as_str(), &key.limits.budgets),
        (
            LimitScope::Project,
            &key.project,
            project.map_or(&[][..], |p| &p.limits.budgets),
        ),
    ];
    let mut out = Vec::new();
    for (scope, owner, list) in scopes {
        for budget in list {
            let (counter, window) = budget_counter(scope, owner, budget, now);
            let Window::Fixed { start, end } = window else {
                continue;
            };
            let (settled, held) = store.budget_usage(&counter, group, window).await?;
            let remaining = budget
                .amount
                .as_nanos()
                .saturating_sub(settled)
                .saturating_sub(held.unwrap_or(0));
            out.push(BudgetUse {
                scope: if scope == LimitScope::Key {
                    "key"
                } else {
                    "project"
                },
                owner: owner.to_owned(),
                period: period_name(budget.period),
                model: budget.model.as_ref().map_or("*", |m| m.as_str()).to_owned(),
                limit: budget.amount,
                spent: Money::from_nanos(settled),
                reserved: held.map(Money::from_nanos),
                remaining: Money::from_nanos(remaining),
                period_start: start,
                resets_at: end,
            });
        }
    }
    Ok(out)
}

/// Every money budget of the key `key_id` and of its project now (`None`: no such key): what
/// `GET /admin/v1/keys/{id}/spend` answers, for other tools on the same store (the CLI's
/// `spend show`).
///
/// # Errors
///
/// [`DbError`] when the store (or, on PostgreSQL, the shared counters) cannot be read.
pub async fn key_budgets(
    store: &AdminStore,
    key_id: &str,
    now: Timestamp,
) -> Result<Option<Vec<BudgetUse>>, DbError> {
    let Some(key) = store.key(key_id).await? else {
        return Ok(None);
    };
    let project = store.project(&key.record.project).await?;
    budgets(store, &key.record, project.as_ref(), now)
        .await
        .map(Some)
}

/// One budget a reset gave back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetReset {
    /// The models it counts (`*`: all).
    pub model: String,
    /// Its period.
    pub period: &'static str,
    /// When this period began.
    pub period_start: Timestamp,
    /// What no longer counts.
    pub given_back: Money,
}

/// Resets the key's own money budgets (those on `model` and of `period`, when given) in
/// their current periods; what each gave back. The project's budgets, shared by its keys,
/// are left alone.
pub(crate) async fn reset(
    store: &AdminStore,
    key: &KeyRecord,
    model: Option<&str>,
    period: Option<&str>,
    now: Timestamp,
) -> Result<Vec<BudgetReset>, DbError> {
    let group = group_of(&key.project);
    let mut out = Vec::new();
    for budget in &key.limits.budgets {
        let on = budget.model.as_ref().map_or("*", |m| m.as_str());
        if model.is_some_and(|m| m != on) || period.is_some_and(|p| p != period_name(budget.period))
        {
            continue;
        }
        let (counter, window) = budget_counter(LimitScope::Key, key.id.as_str(), budget, now);
        let Window::Fixed { start, .. } = window else {
            continue;
        };
        let taken = store.reset_budget(&counter, group, window).await?;
        out.push(BudgetReset {
            model: on.to_owned(),
            period: period_name(budget.period),
            period_start: start,
            given_back: Money::from_nanos(taken),
        });
    }
    Ok(out)
}
