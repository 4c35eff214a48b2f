use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_core::Money;
use proptest::prelude::*;

use super::*;
use crate::test_support::raw;

const DAY: u64 = 86_400;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000 + secs)
}

fn budget(limit: u64, amount: u64) -> Charge {
    Charge {
        group: 0,
        key: "budget:key_a".into(),
        window: Window::Fixed {
            start: t(0),
            end: Some(t(DAY)),
        },
        unit: Unit::Nanodollars,
        limit,
        amount,
    }
}

fn tokens_per_minute(limit: u64, amount: u64) -> Charge {
    Charge {
        group: 0,
        key: "tpm:key_a".into(),
        window: Window::Rate {
            per: Duration::from_secs(60),
        },
        unit: Unit::Tokens,
        limit,
        amount,
    }
}

fn cost(nanos: u64) -> Actual {
    Actual {
        tokens: nanos,
        cost: Money::from_nanos(nanos),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    (dir, path)
}

fn used(b: &LedgerBackend, c: &Charge, now: Timestamp) -> u64 {
    b.memory().used(&c.key, c.window, c.limit, now).unwrap_or(0)
}

fn state_name(state: i64) -> String {
    match state {
        0 => "open",
        1 => "settled",
        2 => "released",
        _ => "unknown",
    }
    .into()
}

/// What the ledger at `path` holds for the budget of `budget()` charges, read by another
/// connection.
fn key_a_usage(path: &Path) -> LedgerUsage {
    Db::open(path)
        .unwrap()
        .ledger_usage("budget:key_a", t(0))
        .unwrap()
}

fn state(path: &Path, id: u64) -> Option<String> {
    raw(path)
        .query_row(
            "SELECT state FROM spend_reservations WHERE id = ?1",
            [id as i64],
            |r| r.get(0),
        )
        .ok()
        .map(state_name)
}

#[test]
fn reserve_resolves_only_once_its_rows_are_committed() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    rt.block_on(async {
        b.hold().await;
        let waiting = tokio::spawn(b.reserve(vec![budget(1000, 400)], t(5)));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        let rows: i64 = raw(&path)
            .query_row("SELECT COUNT(*) FROM spend_reservations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        b.resume();
        let r = waiting.await.unwrap().unwrap();
        // Checked from another connection: committed, not merely written.
        assert_eq!(state(&path, r.id).as_deref(), Some("open"));
        let conn = raw(&path);
        let text: String = conn
            .query_row(
                "SELECT charges FROM spend_reservations WHERE id = ?1",
                [r.id as i64],
                |row| row.get(0),
            )
            .unwrap();
        let charges = decode_charges(&conn, &text).unwrap();
        assert_eq!(charges.len(), 1);
        assert_eq!(
            (&*charges[0].counter, charges[0].amount),
            ("budget:key_a", 400)
        );
    });
}

#[test]
fn reservations_queued_together_share_one_commit() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    rt.block_on(async {
        b.hold().await;
        let before = b.hooks().commits.load(Ordering::Relaxed);
        let waiting: Vec<_> = (0..50)
            .map(|_| tokio::spawn(b.reserve(vec![budget(1000, 10)], t(5))))
            .collect();
        b.resume();
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(b.hooks().commits.load(Ordering::Relaxed), before + 1);
    });
    let rows: i64 = raw(&path)
        .query_row("SELECT COUNT(*) FROM spend_reservations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 50);
}

/// The write-ahead log's checkpoint sequence number (bytes 12..16 of its header): SQLite
/// adds one each time the log starts again from the beginning.
fn log_restarts(path: &Path) -> Option<u32> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let header = std::fs::read(wal).ok()?;
    Some(u32::from_be_bytes(header.get(12..16)?.try_into().ok()?))
}

#[test]
fn back_to_back_commits_still_let_the_log_start_again() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let mut first = None;
    let mut restarted = false;
    // No pause between commits: the checkpointer alone never finds the log all copied.
    for _ in 0..3_000 {
        let r = rt
            .block_on(b.reserve(vec![budget(u64::MAX / 2, 1)], t(5)))
            .unwrap();
        rt.block_on(b.settle(r, cost(1), t(5))).unwrap();
        let now = log_restarts(&path);
        let first = *first.get_or_insert(now);
        if b.hooks().tail_checkpoints.load(Ordering::Relaxed) > 0 && now > first {
            restarted = true;
            break;
        }
    }
    assert!(restarted, "the log never started again");
    // And nothing was lost on the way.
    rt.block_on(b.flush()).unwrap();
    drop(b);
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    assert!(used(&b, &budget(u64::MAX / 2, 0), t(5)) > 0);
}

#[test]
fn power_loss_durability_keeps_the_same_ledger() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_with(&path, t(5), Durability::PowerLoss).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    rt.block_on(b.settle(r, cost(123), t(6))).unwrap();
    drop(b);
    let b = LedgerBackend::open_at(&path, t(7)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(7)), 123);
}

#[test]
fn reserve_is_never_answered_at_once() {
    let (_dir, path) = temp();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    assert!(b.reserve_at_once(vec![budget(10, 1)], t(5)).is_err());
    assert_eq!(used(&b, &budget(10, 1), t(5)), 0);
}

#[test]
fn settled_spend_survives_a_restart_and_the_remainder_is_exact() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    assert!(b.end_at_once(r, Some(cost(150)), t(6)).is_none());
    drop(b);

    let b = LedgerBackend::open_at(&path, t(7)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(7)), 150);
    let usage = key_a_usage(&path);
    assert_eq!(
        usage,
        LedgerUsage {
            settled: 150,
            open_reserved: 0
        }
    );
    let too_much = rt.block_on(b.reserve(vec![budget(1000, 851)], t(8)));
    assert!(matches!(too_much, Err(ReserveError::Exceeded(_))));
    rt.block_on(b.reserve(vec![budget(1000, 850)], t(8)))
        .unwrap();
}

#[test]
fn a_reset_forgets_what_was_settled_durably_and_keeps_what_is_in_flight() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let settled = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    assert!(b.end_at_once(settled, Some(cost(300)), t(6)).is_none());
    // In flight across the reset: it keeps its hold, and settles after.
    let in_flight = rt
        .block_on(b.reserve(vec![budget(1000, 200)], t(6)))
        .unwrap();
    // A settlement still queued (not committed) when the reset comes counts before it.
    let queued = rt
        .block_on(b.reserve(vec![budget(1000, 100)], t(6)))
        .unwrap();
    assert!(b.end_at_once(queued, Some(cost(50)), t(6)).is_none());
    let taken = rt
        .block_on(b.reset_budget("budget:key_a", budget(0, 0).window))
        .unwrap();
    assert_eq!(taken, 350);
    assert_eq!(
        used(&b, &budget(1000, 0), t(7)),
        200,
        "only the hold in flight is left"
    );
    assert!(b.end_at_once(in_flight, Some(cost(120)), t(8)).is_none());
    assert_eq!(used(&b, &budget(1000, 0), t(8)), 120);
    // Another period's reset, or a rate window's, takes nothing.
    let other = Window::Fixed {
        start: t(DAY),
        end: Some(t(2 * DAY)),
    };
    assert_eq!(
        rt.block_on(b.reset_budget("budget:key_a", other)).unwrap(),
        0
    );
    assert_eq!(
        rt.block_on(b.reset_budget("tpm:key_a", tokens_per_minute(0, 0).window))
            .unwrap(),
        0
    );
    drop(b);
    // Durable: a restart rebuilds the counter without what the reset took.
    let b = LedgerBackend::open_at(&path, t(9)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(9)), 120);
    let usage = key_a_usage(&path);
    assert_eq!(usage.settled, 120);
    rt.block_on(b.reserve(vec![budget(1000, 880)], t(9)))
        .unwrap();
}

#[test]
fn many_counters_are_read_at_once_as_each_alone() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let other = |amount| Charge {
        key: "budget:key_b".into(),
        ..budget(1000, amount)
    };
    let settled = rt
        .block_on(b.reserve(vec![budget(1000, 400), other(50)], t(5)))
        .unwrap();
    assert!(b.end_at_once(settled, Some(cost(100)), t(6)).is_none());
    let _open = rt
        .block_on(b.reserve(vec![budget(1000, 70), other(30)], t(6)))
        .unwrap();
    rt.block_on(b.flush()).unwrap();
    let db = Db::open(&path).unwrap();
    let wanted = [
        ("budget:key_a", t(0)),
        ("budget:key_b", t(0)),
        ("budget:key_a", t(0)),
        ("budget:key_a", t(DAY)),
        ("budget:nobody", t(0)),
    ];
    let together = db.ledger_usages(&wanted).unwrap();
    let alone: Vec<LedgerUsage> = wanted
        .iter()
        .map(|(c, s)| db.ledger_usage(c, *s).unwrap())
        .collect();
    assert_eq!(together, alone);
    let usage = |settled, open_reserved| LedgerUsage {
        settled,
        open_reserved,
    };
    assert_eq!(
        together,
        [
            usage(100, 70),
            usage(100, 30),
            usage(100, 70),
            usage(0, 0),
            usage(0, 0)
        ]
    );
}

#[test]
fn released_reservations_count_nothing_after_a_restart() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    let id = r.id;
    rt.block_on(b.release(r, t(6))).unwrap();
    drop(b);
    assert_eq!(state(&path, id).as_deref(), Some("released"));
    let b = LedgerBackend::open_at(&path, t(7)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(7)), 0);
}

#[test]
fn a_reservation_left_open_by_a_crash_counts_at_its_reserved_amount() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    let id = r.id;
    rt.block_on(async {
        b.hold().await;
        // The settlement is queued but never committed.
        b.settle(r, cost(10), t(6)).await.unwrap();
    });
    assert_eq!(used(&b, &budget(1000, 0), t(6)), 10);
    b.crash();
    drop(b);
    assert_eq!(
        key_a_usage(&path),
        LedgerUsage {
            settled: 0,
            open_reserved: 400
        }
    );

    let b = LedgerBackend::open_at(&path, t(7)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(7)), 400);
    assert_eq!(state(&path, id).as_deref(), Some("settled"));
    assert_eq!(key_a_usage(&path).settled, 400);
}

#[test]
fn a_reservation_not_yet_committed_at_a_crash_fails_and_counts_nothing() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let result = rt.block_on(async {
        b.hold().await;
        let waiting = tokio::spawn(b.reserve(vec![budget(1000, 400)], t(5)));
        tokio::task::yield_now().await;
        b.crash();
        waiting.await.unwrap()
    });
    assert!(matches!(result, Err(ReserveError::Backend(_))));
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 0);
    drop(b);
    let b = LedgerBackend::open_at(&path, t(6)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(6)), 0);
}

#[test]
fn a_leader_cancelled_before_its_commit_hands_the_commit_over() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    rt.block_on(async {
        // Made, never polled: it leads the next commit, and is dropped before making it.
        let leader = b.reserve(vec![budget(1000, 400)], t(5));
        let follower = tokio::spawn(b.reserve(vec![budget(1000, 100)], t(5)));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!follower.is_finished(), "waits for the leader's commit");
        drop(leader);
        let r = follower.await.unwrap().unwrap();
        assert_eq!(state(&path, r.id).as_deref(), Some("open"));
    });
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 100);
}

#[test]
fn a_cancelled_reservation_gives_back_its_hold_and_its_rows() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    rt.block_on(b.hold());
    let waiting = b.reserve(vec![budget(1000, 400)], t(5));
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 400);
    drop(waiting);
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 0);
    b.resume();
    rt.block_on(b.flush()).unwrap();
    let states: Vec<String> = raw(&path)
        .prepare("SELECT state FROM spend_reservations")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|s| state_name(s.unwrap()))
        .collect();
    assert_eq!(states, ["released"]);
}

#[test]
fn a_rate_window_is_restored_with_everything_charged_in_its_last_period() {
    let (_dir, path) = temp();
    let rt = rt();
    let tpm = tokens_per_minute(600, 0);
    let b = LedgerBackend::open_at(&path, t(0)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![tokens_per_minute(600, 300)], t(0)))
        .unwrap();
    rt.block_on(b.settle(r, cost(200), t(1))).unwrap();
    // Still open at shutdown: restored at its reserved amount.
    rt.block_on(b.reserve(vec![tokens_per_minute(600, 100)], t(10)))
        .unwrap();
    drop(b);

    // In memory, 30 s would have drained 300 tokens; restored, nothing has drained.
    let b = LedgerBackend::open_at(&path, t(30)).unwrap();
    assert_eq!(used(&b, &tpm, t(30)), 300);
    // Drained from the restart on.
    assert_eq!(used(&b, &tpm, t(45)), 150);
    drop(b);

    // The charge of t(0) is a full period old: only the one of t(10) still counts.
    let b = LedgerBackend::open_at(&path, t(61)).unwrap();
    assert_eq!(used(&b, &tpm, t(61)), 100);
    drop(b);
    // Restored, a charge counts until the end of its bucket (1/64 of the period: 0.94 s
    // here) plus the period: the one of t(10) until t(70.3).
    let b = LedgerBackend::open_at(&path, t(70)).unwrap();
    assert_eq!(used(&b, &tpm, t(70)), 100);
    drop(b);
    let b = LedgerBackend::open_at(&path, t(71)).unwrap();
    assert_eq!(used(&b, &tpm, t(71)), 0);
}

#[test]
fn a_budget_period_that_ended_is_not_restored() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    rt.block_on(b.settle(r, cost(400), t(6))).unwrap();
    drop(b);
    let b = LedgerBackend::open_at(&path, t(DAY)).unwrap();
    assert!(b.memory().is_empty());
    // History is kept.
    let usage = key_a_usage(&path);
    assert_eq!(usage.settled, 400);
}

/// Every insert of a reservation fails from now on, as on a full disk (until the trigger
/// `full` is dropped).
fn fill_up(path: &Path) {
    raw(path)
        .execute_batch(
            "CREATE TRIGGER full BEFORE INSERT ON spend_reservations \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
        )
        .unwrap();
}

#[test]
fn a_failing_database_fails_reservations_closed_and_gives_the_memory_back() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    fill_up(&path);
    let result = rt.block_on(b.reserve(vec![budget(1000, 400)], t(5)));
    let Err(ReserveError::Backend(e)) = result else {
        panic!("expected a backend error, got {result:?}");
    };
    assert!(e.0.contains("spend ledger write failed"), "{e}");
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 0);
    assert!(rt.block_on(b.flush()).is_ok());
    // Nothing of it is left to end.
    assert!(lock(&b.shared.core.queue).open.is_empty());
}

#[test]
fn a_failed_commit_forgets_the_kinds_of_charge_it_added() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    fill_up(&path);
    // Its kind is added, then rolled back with the reservation.
    assert!(
        rt.block_on(b.reserve(vec![budget(1000, 400)], t(5)))
            .is_err()
    );
    raw(&path).execute_batch("DROP TRIGGER full").unwrap();
    // Named again, by a kind that is in the database: the open row can be read.
    rt.block_on(b.reserve(vec![budget(1000, 300)], t(5)))
        .unwrap();
    assert_eq!(key_a_usage(&path).open_reserved, 300);
    b.crash();
    drop(b);
    let b = LedgerBackend::open_at(&path, t(6)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(6)), 300);
}

/// The kinds of charge recorded, as (counter, limit).
fn kinds(path: &Path) -> Vec<(String, i64)> {
    raw(path)
        .prepare("SELECT counter, limit_amount FROM spend_charge_kinds ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn each_kind_of_charge_is_recorded_once_and_a_reservation_names_it_by_id() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    for _ in 0..3 {
        let r = rt
            .block_on(b.reserve(vec![budget(1000, 10), tokens_per_minute(500, 7)], t(5)))
            .unwrap();
        rt.block_on(b.settle(r, cost(5), t(5))).unwrap();
    }
    drop(b);
    // A restart forgets the ids it met, and finds them again.
    let b = LedgerBackend::open_at(&path, t(6)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 20)], t(6)))
        .unwrap();
    // A new limit is a new kind.
    let r2 = rt
        .block_on(b.reserve(vec![budget(2000, 30)], t(6)))
        .unwrap();
    rt.block_on(b.flush()).unwrap();
    assert_eq!(
        kinds(&path),
        [
            ("budget:key_a".to_owned(), 1000),
            ("tpm:key_a".to_owned(), 500),
            ("budget:key_a".to_owned(), 2000),
        ]
    );
    let text = |id: u64| -> String {
        raw(&path)
            .query_row(
                "SELECT charges FROM spend_reservations WHERE id = ?1",
                [id as i64],
                |row| row.get(0),
            )
            .unwrap()
    };
    assert_eq!(text(1), "1:10,2:7");
    assert_eq!(text(r.id), "1:20");
    assert_eq!(text(r2.id), "3:30");
    assert_eq!(key_a_usage(&path).open_reserved, 50);
    drop(b);
}

#[test]
fn a_version_6_ledger_is_migrated_and_its_open_json_rows_count_at_their_reserved_amount() {
    let (_dir, path) = temp();
    drop(LedgerBackend::open_at(&path, t(5)).unwrap());
    // Back to version 6: no kinds of charge, charges as JSON.
    crate::test_support::downgrade(&path, 6);
    let conn = raw(&path);
    let (start, end) = (t(0).as_unix_nanos(), t(DAY).as_unix_nanos());
    conn.execute(
        "INSERT INTO spend_reservations (id, at, state, charges) VALUES (41, ?1, 0, ?2)",
        params![
            t(4).as_unix_nanos() as i64,
            format!(
                "[{{\"counter\":\"budget:key_a\",\"window\":\"fixed\",\"start\":{start},\
                     \"end\":{end},\"per\":null,\"unit\":\"nanodollars\",\"limit\":1000,\
                     \"amount\":250}}]"
            )
        ],
    )
    .unwrap();
    drop(conn);
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    assert_eq!(
        Db::open(&path).unwrap().schema_version().unwrap(),
        crate::schema::SCHEMA_VERSION
    );
    assert_eq!(used(&b, &budget(1000, 0), t(5)), 250);
    assert_eq!(key_a_usage(&path).settled, 250);
    assert_eq!(state(&path, 41).as_deref(), Some("settled"));
    // New reservations follow it.
    let r = rt()
        .block_on(b.reserve(vec![budget(1000, 1)], t(5)))
        .unwrap();
    assert_eq!(r.id, 42);
}

/// The floor the ledger holds, and the ids it lists below it.
fn floor(path: &Path) -> (u64, Vec<u64>) {
    let conn = raw(path);
    let floor: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'spend_open_floor'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let old = conn
        .prepare("SELECT id FROM spend_open_old ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|id| id.unwrap() as u64)
        .collect();
    (floor as u64, old)
}

/// Reserves and settles `n` times (each in its own commit).
fn churn(b: &LedgerBackend, rt: &tokio::runtime::Runtime, n: usize) {
    for _ in 0..n {
        let r = rt
            .block_on(b.reserve(vec![budget(1_000_000, 1)], t(5)))
            .unwrap();
        rt.block_on(b.settle(r, cost(1), t(5))).unwrap();
    }
    rt.block_on(b.flush()).unwrap();
}

#[test]
fn the_floor_moves_past_ended_reservations_and_lists_one_left_open_for_long() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    assert_eq!(floor(&path), (1, vec![]));
    churn(&b, &rt, 10);
    let (moved, old) = floor(&path);
    assert!(moved > 5 && moved <= 11, "floor {moved}");
    assert!(old.is_empty());

    // A long stream: open while many more come and go.
    let long = rt
        .block_on(b.reserve(vec![budget(1_000_000, 500)], t(5)))
        .unwrap();
    churn(&b, &rt, 10);
    let (moved, old) = floor(&path);
    assert!(moved > long.id, "floor {moved}, open {}", long.id);
    assert_eq!(old, vec![long.id]);
    // Still counted while the floor is past it.
    assert_eq!(key_a_usage(&path).open_reserved, 500);

    // Killed: the next open finds it, and counts it at its reserved amount.
    b.crash();
    drop(b);
    let b = LedgerBackend::open_at(&path, t(6)).unwrap();
    assert_eq!(used(&b, &budget(1_000_000, 0), t(6)), 20 + 500);
    assert_eq!(state(&path, long.id).as_deref(), Some("settled"));
    // Nothing open: the floor is the next id, and nothing is listed.
    let r = rt
        .block_on(b.reserve(vec![budget(1_000_000, 1)], t(6)))
        .unwrap();
    assert_eq!(floor(&path), (r.id, vec![]));
}

#[test]
fn an_end_lost_in_a_failed_commit_holds_its_row_open_past_the_floor() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1_000_000, 300)], t(5)))
        .unwrap();
    let id = r.id;
    // Every settlement fails to be written from now on.
    raw(&path)
        .execute_batch(
            "CREATE TRIGGER full BEFORE UPDATE ON spend_reservations \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
        )
        .unwrap();
    rt.block_on(b.settle(r, cost(100), t(5))).unwrap();
    assert!(rt.block_on(b.flush()).is_err());
    raw(&path).execute_batch("DROP TRIGGER full").unwrap();
    assert_eq!(state(&path, id).as_deref(), Some("open"));

    churn(&b, &rt, 10);
    let (moved, old) = floor(&path);
    assert!(moved > id, "floor {moved}");
    assert_eq!(old, vec![id]);
    drop(b);
    // Found at the next open, and counted at what it reserved.
    let b = LedgerBackend::open_at(&path, t(6)).unwrap();
    assert_eq!(used(&b, &budget(1_000_000, 0), t(6)), 10 + 300);
}

#[test]
fn the_floor_stays_at_an_end_queued_but_not_yet_written() {
    // Queued while the commit that looks at the floor was under way: its row is still open.
    let queue = Mutex::new(Queue {
        ops: vec![Op::End {
            id: 19,
            reserved_at: 0,
            at: 0,
            charges: Vec::new(),
            actual: None,
        }],
        open: [(21, 0)].into_iter().collect(),
        next_id: 22,
        ..Queue::default()
    });
    let mut floor = Floor::at(1);
    let moved = floor.look(&queue).unwrap();
    assert_eq!(
        moved,
        Moved {
            floor: 19,
            old: vec![]
        }
    );
    // Once old, listed instead.
    lock(&queue).next_id = 40;
    let moved = floor.look(&queue).unwrap();
    assert_eq!(
        moved,
        Moved {
            floor: 40,
            old: vec![19, 21]
        }
    );
}

#[test]
fn the_open_rows_are_found_without_reading_the_history() {
    let (_dir, path) = temp();
    drop(LedgerBackend::open_at(&path, t(5)).unwrap());
    let plan: Vec<String> = raw(&path)
        .prepare(&format!("EXPLAIN QUERY PLAN {OPEN_ROWS}"))
        .unwrap()
        .query_map([], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(
        plan.contains("SEARCH spend_reservations USING INTEGER PRIMARY KEY (rowid>?)"),
        "{plan}"
    );
    assert!(!plan.contains("SCAN spend_reservations"), "{plan}");
}

#[test]
fn a_reservation_naming_an_unrecorded_kind_is_refused_at_open() {
    let (_dir, path) = temp();
    drop(LedgerBackend::open_at(&path, t(5)).unwrap());
    raw(&path)
        .execute(
            "INSERT INTO spend_reservations (id, at, state, charges) VALUES (1, 0, 0, '99:5')",
            [],
        )
        .unwrap();
    let e = LedgerBackend::open_at(&path, t(5)).unwrap_err();
    assert!(e.to_string().contains("kind of charge"), "{e}");
}

#[test]
fn an_ended_reservation_is_forgotten_and_ending_it_again_writes_nothing() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt
        .block_on(b.reserve(vec![budget(1000, 400)], t(5)))
        .unwrap();
    assert_eq!(lock(&b.shared.core.queue).open.len(), 1);
    let again = r.clone();
    rt.block_on(b.settle(r, cost(150), t(6))).unwrap();
    assert!(lock(&b.shared.core.queue).open.is_empty());
    // A replay is dropped before it is queued; the settled amount stands.
    rt.block_on(b.hold());
    b.end(again, Some(cost(400)), t(7));
    assert!(lock(&b.shared.core.queue).ops.is_empty());
    b.resume();
    drop(b);
    assert_eq!(key_a_usage(&path).settled, 150);
}

#[test]
fn ids_keep_growing_across_restarts() {
    let (_dir, path) = temp();
    let rt = rt();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let first = rt.block_on(b.reserve(vec![budget(1000, 1)], t(5))).unwrap();
    let second = rt.block_on(b.reserve(vec![budget(1000, 1)], t(5))).unwrap();
    assert!(second.id > first.id);
    drop(b);
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let third = rt.block_on(b.reserve(vec![budget(1000, 1)], t(5))).unwrap();
    assert!(third.id > second.id);
}

#[test]
fn a_reservation_without_charges_is_not_tracked() {
    let (_dir, path) = temp();
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    let r = rt().block_on(b.reserve(Vec::new(), t(5))).unwrap();
    assert_eq!(r.id, 0);
    drop(b);
    let rows: i64 = raw(&path)
        .query_row("SELECT COUNT(*) FROM spend_reservations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

#[test]
fn writing_an_operation_twice_has_no_second_effect() {
    let (_dir, path) = temp();
    let db = Db::open(&path).unwrap();
    let reserved = MemoryBackend::new()
        .reserve_now(vec![budget(1000, 400)], t(5))
        .unwrap()
        .charges;
    let reserve = |amount: u64| {
        let mut charges = reserved.clone();
        charges[0].amount = amount;
        Op::Reserve {
            id: 7,
            at: 1,
            charges,
            ack: oneshot::channel().0,
        }
    };
    let settle = |actual: u64| Op::End {
        id: 7,
        reserved_at: 1,
        at: 2,
        charges: reserved.clone(),
        actual: Some(cost(actual)),
    };
    let release = Op::End {
        id: 7,
        reserved_at: 1,
        at: 3,
        charges: reserved.clone(),
        actual: None,
    };
    let mut prune = 0;
    let mut kinds = Kinds::default();
    write(
        db.conn(),
        &[reserve(400), settle(150)],
        &mut prune,
        &mut kinds,
        None,
    )
    .unwrap();
    write(
        db.conn(),
        &[reserve(999), settle(300), release],
        &mut prune,
        &mut kinds,
        None,
    )
    .unwrap();
    assert_eq!(state(&path, 7).as_deref(), Some("settled"));
    assert_eq!(
        db.ledger_usage("budget:key_a", t(0)).unwrap(),
        LedgerUsage {
            settled: 150,
            open_reserved: 0
        }
    );
}

#[test]
fn a_version_1_database_gains_the_ledger() {
    let (_dir, path) = temp();
    let conn = raw(&path);
    conn.execute_batch(crate::schema::MIGRATIONS[0].sql)
        .unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    let b = LedgerBackend::open_at(&path, t(5)).unwrap();
    rt().block_on(b.reserve(vec![budget(10, 1)], t(5))).unwrap();
    drop(b);
    assert_eq!(
        Db::open(&path).unwrap().schema_version().unwrap(),
        crate::schema::SCHEMA_VERSION
    );
}

#[test]
fn a_version_3_ledger_is_carried_over_with_its_spend() {
    let (_dir, path) = temp();
    let conn = raw(&path);
    for m in &crate::schema::MIGRATIONS[..3] {
        conn.execute_batch(m.sql).unwrap();
    }
    conn.pragma_update(None, "user_version", 3).unwrap();
    let ns = |secs: u64| t(secs).as_unix_nanos() as i64;
    // Reservation 1: settled at 150 of a budget and 200 tokens; 2: still open (400 and
    // 100 reserved); 3: released.
    conn.execute_batch(&format!(
        "INSERT INTO ledger VALUES (1, {a}, 'settled', {a}), (2, {b}, 'open', NULL), \
                                   (3, {b}, 'released', {b});
         INSERT INTO ledger_charges VALUES
           (1, 0, 'budget:key_a', 'fixed', {a}, {s}, {e}, NULL, 'nanodollars', 1000, 400, 150),
           (1, 1, 'tpm:key_a', 'rate', {a}, NULL, {a_end}, {per}, 'tokens', 600, 300, 200),
           (2, 0, 'budget:key_a', 'fixed', {b}, {s}, {e}, NULL, 'nanodollars', 1000, 400, NULL),
           (2, 1, 'tpm:key_a', 'rate', {b}, NULL, {b_end}, {per}, 'tokens', 600, 100, NULL),
           (3, 0, 'budget:key_a', 'fixed', {b}, {s}, {e}, NULL, 'nanodollars', 1000, 999, 0);",
        s = ns(0),
        e = ns(DAY),
        a = ns(1),
        b = ns(10),
        a_end = ns(61),
        b_end = ns(70),
        per = 60_000_000_000_i64,
    ))
    .unwrap();
    drop(conn);

    assert_eq!(
        key_a_usage(&path),
        LedgerUsage {
            settled: 150,
            open_reserved: 400
        }
    );
    let b = LedgerBackend::open_at(&path, t(30)).unwrap();
    assert_eq!(used(&b, &budget(1000, 0), t(30)), 550);
    assert_eq!(used(&b, &tokens_per_minute(600, 0), t(30)), 300);
    // New ids follow the old ones.
    let r = rt()
        .block_on(b.reserve(vec![budget(1000, 1)], t(30)))
        .unwrap();
    assert_eq!(r.id, 4);
    drop(b);
    assert_eq!(state(&path, 1).as_deref(), Some("settled"));
    assert_eq!(state(&path, 2).as_deref(), Some("settled"));
    assert_eq!(state(&path, 3).as_deref(), Some("released"));
    let old: i64 = raw(&path)
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('ledger', 'ledger_charges')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
}

/// One step of a gateway's life, as the crash property test plays it.
#[derive(Debug, Clone)]
enum Action {
    Reserve(u64),
    /// Settle an open reservation at a percentage of what it holds.
    Settle(usize, u64),
    Release(usize),
    /// The writer stops taking operations: what follows is queued, not committed.
    Hold,
    Resume,
    /// Killed: what is queued is lost.
    Crash,
    /// Stopped gracefully and started again.
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (1..=40u64).prop_map(Action::Reserve),
        3 => (any::<usize>(), 0..=100u64).prop_map(|(i, p)| Action::Settle(i, p)),
        2 => any::<usize>().prop_map(Action::Release),
        1 => Just(Action::Hold),
        1 => Just(Action::Resume),
        1 => Just(Action::Crash),
        1 => Just(Action::Restart),
    ]
}

/// What the ledger knows of one reservation.
#[derive(Debug, Default)]
struct Record {
    amount: u64,
    /// Its rows are committed.
    durable: bool,
    /// Its end is committed: the actual amount (0 once released).
    ended: Option<u64>,
}

impl Record {
    /// What the reservation counts for after a restart.
    fn counts(&self) -> u64 {
        if self.durable {
            self.ended.unwrap_or(self.amount)
        } else {
            0
        }
    }
}

/// A gateway process and what the test knows of it.
struct Process {
    backend: LedgerBackend,
    open: Vec<(usize, Reservation)>,
    waiting: Vec<(
        usize,
        tokio::task::JoinHandle<Result<Reservation, ReserveError>>,
    )>,
    queued_ends: Vec<(usize, u64)>,
    held: bool,
}

const LIMIT: u64 = 100;
const NOW: u64 = 5;

impl Process {
    fn start(path: &Path) -> Process {
        Process {
            backend: LedgerBackend::open_at(path, t(NOW)).unwrap(),
            open: Vec::new(),
            waiting: Vec::new(),
            queued_ends: Vec::new(),
            held: false,
        }
    }

    fn resume(&mut self, rt: &tokio::runtime::Runtime, records: &mut [Record]) {
        if !self.held {
            return;
        }
        self.backend.resume();
        for (i, waiting) in self.waiting.drain(..) {
            match rt.block_on(waiting).unwrap() {
                Ok(r) => {
                    records[i].durable = true;
                    self.open.push((i, r));
                }
                Err(ReserveError::Exceeded(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        rt.block_on(self.backend.flush()).unwrap();
        for (i, amount) in self.queued_ends.drain(..) {
            records[i].ended = Some(amount);
        }
        self.held = false;
    }
}

fn used_now(b: &LedgerBackend) -> u64 {
    used(b, &budget(LIMIT, 0), t(NOW))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Whatever is reserved, settled, released, and wherever the process is killed, the
    /// spend the ledger holds (settled plus open) never exceeds the budget, and after each
    /// restart the counter holds exactly what the ledger says was spent.
    #[test]
    fn a_budget_is_never_overspent_across_crashes_and_restarts(
        actions in prop::collection::vec(action(), 1..40),
    ) {
        let (_dir, path) = temp();
        let rt = rt();
        let reader = Db::open(&path).unwrap();
        let mut records: Vec<Record> = Vec::new();
        let mut p = Process::start(&path);
        let restart = |p: Process, records: &mut [Record]| -> Result<Process, TestCaseError> {
            drop(p);
            for r in records.iter_mut().filter(|r| r.durable && r.ended.is_none()) {
                // Settled at its reserved amount by the next open.
                r.ended = Some(r.amount);
            }
            let p = Process::start(&path);
            let expected: u64 = records.iter().map(Record::counts).sum();
            prop_assert_eq!(used_now(&p.backend), expected);
            Ok(p)
        };
        for action in actions {
            match action {
                Action::Reserve(amount) => {
                    let future = p.backend.reserve(vec![budget(LIMIT, amount)], t(NOW));
                    let i = records.len();
                    records.push(Record { amount, ..Record::default() });
                    if p.held {
                        p.waiting.push((i, rt.spawn(future)));
                    } else {
                        match rt.block_on(future) {
                            Ok(r) => {
                                records[i].durable = true;
                                p.open.push((i, r));
                            }
                            Err(ReserveError::Exceeded(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                Action::Settle(n, percent) if !p.open.is_empty() => {
                    let (i, r) = p.open.swap_remove(n % p.open.len());
                    let actual = records[i].amount * percent / 100;
                    rt.block_on(p.backend.settle(r, cost(actual), t(NOW))).unwrap();
                    if p.held {
                        p.queued_ends.push((i, actual));
                    } else {
                        records[i].ended = Some(actual);
                    }
                }
                Action::Release(n) if !p.open.is_empty() => {
                    let (i, r) = p.open.swap_remove(n % p.open.len());
                    rt.block_on(p.backend.release(r, t(NOW))).unwrap();
                    if p.held {
                        p.queued_ends.push((i, 0));
                    } else {
                        records[i].ended = Some(0);
                    }
                }
                Action::Hold if !p.held => {
                    rt.block_on(p.backend.hold());
                    p.held = true;
                }
                Action::Resume => p.resume(&rt, &mut records),
                Action::Crash => {
                    if !p.held {
                        rt.block_on(p.backend.hold());
                    }
                    p.backend.crash();
                    for (_, waiting) in p.waiting.drain(..) {
                        let result = rt.block_on(waiting).unwrap();
                        prop_assert!(result.is_err());
                    }
                    p = restart(p, &mut records)?;
                }
                Action::Restart => {
                    p.resume(&rt, &mut records);
                    p = restart(p, &mut records)?;
                }
                _ => {}
            }
            prop_assert!(used_now(&p.backend) <= LIMIT);
            let usage = reader.ledger_usage("budget:key_a", t(0)).unwrap();
            prop_assert!(usage.settled + usage.open_reserved <= LIMIT);
        }

        // A graceful shutdown: after it, exactly the rest of the budget is left.
        p.resume(&rt, &mut records);
        for (i, r) in std::mem::take(&mut p.open) {
            rt.block_on(p.backend.release(r, t(NOW))).unwrap();
            records[i].ended = Some(0);
        }
        let p = restart(p, &mut records)?;
        let spent: u64 = records.iter().map(Record::counts).sum();
        let usage = reader.ledger_usage("budget:key_a", t(0)).unwrap();
        prop_assert_eq!(usage, LedgerUsage { settled: spent, open_reserved: 0 });
        let rest = LIMIT - spent;
        if rest > 0 {
            prop_assert!(rt.block_on(p.backend.reserve(vec![budget(LIMIT, rest)], t(NOW))).is_ok());
        }
        let over = rt.block_on(p.backend.reserve(vec![budget(LIMIT, 1)], t(NOW)));
        prop_assert!(matches!(over, Err(ReserveError::Exceeded(_))));
    }
}
