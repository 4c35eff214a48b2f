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

/// Whose budgets: a key's own, or its project's (shared by its keys).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner<'a> {
    pub(crate) scope: LimitScope,
    /// The key's or project's id.
    pub(crate) id: &'a str,
    /// The project (the counters' group).
    pub(crate) project: &'a str,
    pub(crate) budgets: &'a [Budget],
}

impl<'a> Owner<'a> {
    pub(crate) fn key(key: &'a KeyRecord) -> Self {
        Owner {
            scope: LimitScope::Key,
            id: key.id.as_str(),
            project: &key.project,
            budgets: &key.limits.budgets,
        }
    }

    pub(crate) fn project(project: &'a ProjectRecord) -> Self {
        Owner {
            scope: LimitScope::Project,
            id: &project.id,
            project: &project.id,
            budgets: &project.limits.budgets,
        }
    }

    fn scope_name(&self) -> &'static str {
        if self.scope == LimitScope::Key {
            "key"
        } else {
            "project"
        }
    }
}

/// Every money budget of `owners`, read from `store` at `now`.
pub(crate) async fn budgets_of(
    store: &AdminStore,
    owners: &[Owner<'_>],
    now: Timestamp,
) -> Result<Vec<BudgetUse>, DbError> {
    // Every counter first, read in one call, then the rows.
    let mut wanted = Vec::new();
    let mut rows = Vec::new();
    for owner in owners {
        let group = group_of(owner.project);
        for budget in owner.budgets {
            let (counter, window) = budget_counter(owner.scope, owner.id, budget, now);
            let Window::Fixed { start, end } = window else {
                continue;
            };
            wanted.push((counter, group, window));
            rows.push((owner, budget, start, end));
        }
    }
    let usages = store.budget_usages(wanted).await?;
    let mut out = Vec::with_capacity(rows.len());
    for ((owner, budget, start, end), (settled, held)) in rows.into_iter().zip(usages) {
        let remaining = budget
            .amount
            .as_nanos()
            .saturating_sub(settled)
            .saturating_sub(held.unwrap_or(0));
        out.push(BudgetUse {
            scope: owner.scope_name(),
            owner: owner.id.to_owned(),
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
    Ok(out)
}

/// Every money budget of `key` and of its `project`, read from `store` at `now`.
pub(crate) async fn budgets(
    store: &AdminStore,
    key: &KeyRecord,
    project: Option<&ProjectRecord>,
    now: Timestamp,
) -> Result<Vec<BudgetUse>, DbError> {
    let mut owners = vec![Owner::key(key)];
    owners.extend(project.map(Owner::project));
    budgets_of(store, &owners, now).await
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

/// Resets the money budgets of `owner` (those on `model` and of `period`, when given) in
/// their current periods; what each gave back.
pub(crate) async fn reset(
    store: &AdminStore,
    owner: Owner<'_>,
    model: Option<&str>,
    period: Option<&str>,
    now: Timestamp,
) -> Result<Vec<BudgetReset>, DbError> {
    let group = group_of(owner.project);
    let mut out = Vec::new();
    for budget in owner.budgets {
        let on = budget.model.as_ref().map_or("*", |m| m.as_str());
        if model.is_some_and(|m| m != on) || period.is_some_and(|p| p != period_name(budget.period))
        {
            continue;
        }
        let (counter, window) = budget_counter(owner.scope, owner.id, budget, now);
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
