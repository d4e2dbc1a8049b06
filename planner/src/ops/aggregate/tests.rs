//! The aggregate with retractions: count / sum (retractable accumulators) and min / max
//! (value multisets) per group, and a global aggregate.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::functions_aggregate::average::avg_udaf;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::min_max::{max_udaf, min_udaf};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::AggregateUDF;
use datafusion::physical_expr::aggregate::AggregateExprBuilder;
use datafusion::physical_expr::expressions::col;

use super::{AggregateCall, AggregateOp, Grouping};
use crate::changelog::Changelog;
use crate::ops::{Operator, StateControl};
use crate::test_util::{assert_changelog, changelog, held_epoch, raw_rows, schema, step};

/// `udaf(v)` over rows of `input`.
fn call(udaf: Arc<AggregateUDF>, name: &str, input: &SchemaRef) -> AggregateCall {
    let expr = AggregateExprBuilder::new(udaf, vec![col("v", input).unwrap()])
        .schema(input.clone())
        .alias(name)
        .build()
        .unwrap();
    AggregateCall {
        expr: Arc::new(expr),
        filter: None,
    }
}

fn calls(input: &SchemaRef) -> Vec<AggregateCall> {
    vec![
        call(count_udaf(), "n", input),
        call(sum_udaf(), "total", input),
        call(min_udaf(), "lo", input),
        call(max_udaf(), "hi", input),
    ]
}

fn input() -> SchemaRef {
    schema("k:utf8 v:i64")
}

/// `GROUP BY k`.
fn by_k(input: &SchemaRef) -> Grouping {
    Grouping {
        exprs: vec![col("k", input).unwrap()],
        sets: vec![vec![false]],
        grouping_id: None,
    }
}

/// `SELECT k, count(v) n, sum(v) total, min(v) lo, max(v) hi FROM t GROUP BY k`.
fn grouped() -> AggregateOp {
    let input = input();
    let grouping = by_k(&input);
    let output = schema("k:utf8 n:i64 total:i64 lo:i64 hi:i64");
    AggregateOp::try_new(output, grouping, calls(&input)).unwrap()
}

/// `SELECT count(v) n, sum(v) total, min(v) lo, max(v) hi FROM t`.
fn global() -> AggregateOp {
    let input = input();
    let grouping = Grouping {
        exprs: Vec::new(),
        sets: vec![Vec::new()],
        grouping_id: None,
    };
    let output = schema("n:i64 total:i64 lo:i64 hi:i64");
    AggregateOp::try_new(output, grouping, calls(&input)).unwrap()
}

fn feed(op: &mut AggregateOp, text: &str) -> crate::changelog::Changelog {
    step(op, changelog(&input(), text))
}

/// Groups a {1, 3, 5} and b {2}.
fn seeded() -> AggregateOp {
    let mut op = grouped();
    let out = feed(
        &mut op,
        "
        k v | w
        a 1 | +1
        a 3 | +1
        a 5 | +1
        b 2 | +1
        ",
    );
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | +1
        b 1 2     2  2  | +1
        ",
    );
    op
}

#[test]
fn inserts_emit_one_row_per_group_and_update_it() {
    let mut op = seeded();
    let out = feed(&mut op, "k v | w\n a 4 | +1\n c 7 | +1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 4 13    1  5  | +1
        c 1 7     7  7  | +1
        ",
    );
}

#[test]
fn delete_of_the_min_falls_back_to_the_next_value() {
    let mut op = seeded();
    let out = feed(&mut op, "k v | w\n a 1 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 2 8     3  5  | +1
        ",
    );
}

#[test]
fn delete_of_the_max_falls_back_to_the_next_value() {
    let mut op = seeded();
    let out = feed(&mut op, "k v | w\n a 5 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 2 4     1  3  | +1
        ",
    );
}

#[test]
fn delete_of_one_copy_of_the_min_keeps_it() {
    let mut op = seeded();
    feed(&mut op, "k v | w\n a 1 | +1");
    let out = feed(&mut op, "k v | w\n a 1 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 4 10    1  5  | -1
        a 3 9     1  5  | +1
        ",
    );
    // The last copy goes: now the min moves.
    let out = feed(&mut op, "k v | w\n a 1 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 2 8     3  5  | +1
        ",
    );
}

#[test]
fn update_moves_a_row_between_groups() {
    let mut op = seeded();
    // The max of a becomes the max of b.
    let out = feed(&mut op, "k v | w\n a 5 | -1\n b 5 | +1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 2 4     1  3  | +1
        b 1 2     2  2  | -1
        b 2 7     2  5  | +1
        ",
    );
}

#[test]
fn group_whose_rows_go_to_zero_is_retracted_and_comes_back_fresh() {
    let mut op = seeded();
    let out = feed(&mut op, "k v | w\n b 2 | -1");
    assert_changelog(&out, "k n total lo hi | w\n b 1 2 2 2 | -1");
    // No trace of the old group: its min, max and sum start over.
    let out = feed(&mut op, "k v | w\n b 9 | +1");
    assert_changelog(&out, "k n total lo hi | w\n b 1 9 9 9 | +1");
}

#[test]
fn insert_and_delete_in_one_epoch_emit_nothing() {
    let mut op = seeded();
    let out = feed(
        &mut op,
        "k v | w\n c 7 | +1\n c 7 | -1\n a 1 | -1\n a 1 | +1",
    );
    assert!(out.is_empty(), "{:?}", raw_rows(&out));
    assert_eq!(op.state().entries, 2, "group c was not kept");
    let out = feed(&mut op, "k v | w\n c 2 | +1");
    assert_changelog(&out, "k n total lo hi | w\n c 1 2 2 2 | +1");
}

#[test]
fn empty_epoch_emits_nothing() {
    let mut op = seeded();
    let out = feed(&mut op, "k v | w");
    assert!(out.is_empty(), "{:?}", raw_rows(&out));
    assert_eq!(op.schema().fields().len(), out.schema().fields().len());
    // The global aggregate emits its row on the first step only.
    let mut op = global();
    assert_eq!(feed(&mut op, "k v | w").len(), 1);
    let out = feed(&mut op, "k v | w");
    assert!(out.is_empty(), "{:?}", raw_rows(&out));
}

#[test]
fn weights_count_as_copies() {
    let mut op = grouped();
    let out = feed(&mut op, "k v | w\n a 2 | +3\n a 8 | +1");
    assert_changelog(&out, "k n total lo hi | w\n a 4 14 2 8 | +1");
    let out = feed(&mut op, "k v | w\n a 2 | -2\n a 8 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 4 14    2  8  | -1
        a 1 2     2  2  | +1
        ",
    );
}

#[test]
fn nulls_count_as_rows_but_not_as_values() {
    let mut op = grouped();
    let out = feed(&mut op, "k v | w\n a null | +1\n a 4 | +1");
    assert_changelog(&out, "k n total lo hi | w\n a 1 4 4 4 | +1");
    // The last non-NULL value goes; the group stays (one row) with NULL aggregates.
    let out = feed(&mut op, "k v | w\n a 4 | -1");
    assert_changelog(
        &out,
        "
        k n total lo   hi   | w
        a 1 4     4    4    | -1
        a 0 null  null null | +1
        ",
    );
    let out = feed(&mut op, "k v | w\n a null | -1");
    assert_changelog(&out, "k n total lo hi | w\n a 0 null null null | -1");
}

#[test]
fn global_aggregate_starts_with_a_row_and_returns_to_it() {
    let mut op = global();
    let out = feed(&mut op, "k v | w");
    assert_changelog(&out, "n total lo hi | w\n 0 null null null | +1");
    let out = feed(&mut op, "k v | w\n a 3 | +1\n b 6 | +1");
    assert_changelog(
        &out,
        "
        n total lo   hi   | w
        0 null  null null | -1
        2 9     3    6    | +1
        ",
    );
    let out = feed(&mut op, "k v | w\n a 3 | -1");
    assert_changelog(
        &out,
        "
        n total lo hi | w
        2 9     3  6  | -1
        1 6     6  6  | +1
        ",
    );
    let out = feed(&mut op, "k v | w");
    assert!(out.is_empty(), "{:?}", raw_rows(&out));
    // The last row goes: the global row is back at its empty value, not retracted.
    let out = feed(&mut op, "k v | w\n b 6 | -1");
    assert_changelog(
        &out,
        "
        n total lo   hi   | w
        1 6     6    6    | -1
        0 null  null null | +1
        ",
    );
}

#[test]
fn min_and_max_survive_a_checkpoint() {
    let mut op = seeded();
    let entries = op.checkpoint().unwrap().unwrap();
    let mut restored = grouped();
    restored
        .restore(
            entries
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect(),
        )
        .unwrap();
    let out = feed(&mut restored, "k v | w\n a 1 | -1\n a 5 | -1");
    assert_changelog(
        &out,
        "
        k n total lo hi | w
        a 3 9     1  5  | -1
        a 1 3     3  3  | +1
        ",
    );
    // The restored sum knows how many values it holds: with none left it is NULL.
    let out = feed(&mut restored, "k v | w\n b null | +1\n b 2 | -1");
    assert_changelog(
        &out,
        "
        k n total lo   hi   | w
        b 1 2     2    2    | -1
        b 0 null  null null | +1
        ",
    );
}

/// SUM over a float column after a retraction is the sum of the rows left, not a running
/// total that keeps the rounding of values that are gone (a float total says 0 here).
#[test]
fn float_sum_after_a_retraction_is_the_sum_of_the_rows_left() {
    let input = schema("k:utf8 v:f64");
    let grouping = Grouping {
        exprs: Vec::new(),
        sets: vec![Vec::new()],
        grouping_id: None,
    };
    let calls = vec![call(sum_udaf(), "total", &input)];
    let mut op = AggregateOp::try_new(schema("total:f64"), grouping, calls).unwrap();
    step(&mut op, changelog(&input, "k v | w"));
    step(
        &mut op,
        changelog(&input, "k v | w\n a 1e20 | +1\n b 1 | +1"),
    );
    let out = step(&mut op, changelog(&input, "k v | w\n a 1e20 | -1"));
    assert_changelog(&out, "total | w\n 1e20 | -1\n 1 | +1");
}

/// The same for AVG: 0.1, 0.2 and 0.3, less 0.1 and 0.3, is 0.2 (a float total says
/// 0.20000000000000007).
#[test]
fn float_avg_after_a_retraction_is_the_average_of_the_rows_left() {
    let input = schema("k:utf8 v:f64");
    let grouping = Grouping {
        exprs: Vec::new(),
        sets: vec![Vec::new()],
        grouping_id: None,
    };
    let calls = vec![call(avg_udaf(), "mean", &input)];
    let mut op = AggregateOp::try_new(schema("mean:f64"), grouping, calls).unwrap();
    step(
        &mut op,
        changelog(&input, "k v | w\n a 0.1 | +1\n b 0.2 | +1\n c 0.3 | +1"),
    );
    let out = step(
        &mut op,
        changelog(&input, "k v | w\n a 0.1 | -1\n c 0.3 | -1"),
    );
    assert_changelog(&out, "mean | w\n 0.19999999999999998 | -1\n 0.2 | +1");
}

/// `sum(DISTINCT v) s`: evaluated from the group's multiset, so its results are held back
/// during a large epoch (`StateControl::Hold`).
fn distinct_sum_call(input: &SchemaRef) -> AggregateCall {
    let expr = AggregateExprBuilder::new(sum_udaf(), vec![col("v", input).unwrap()])
        .schema(input.clone())
        .alias("s")
        .distinct()
        .build()
        .unwrap();
    AggregateCall {
        expr: Arc::new(expr),
        filter: None,
    }
}

/// `SELECT k, sum(DISTINCT v) s FROM t GROUP BY k`.
fn distinct_sum() -> AggregateOp {
    let input = input();
    let calls = vec![distinct_sum_call(&input)];
    AggregateOp::try_new(schema("k:utf8 s:i64"), by_k(&input), calls).unwrap()
}

#[test]
fn held_results_are_released_at_the_end_as_the_epochs_net_change() {
    let empty = || Changelog::empty(input());
    for budget in [1, usize::MAX] {
        let mut op = distinct_sum();
        let out = feed(&mut op, "k v | w\n a 1 | +1\n b 2 | +1\n c 9 | +1");
        assert_eq!(out.len(), 3);
        op.control(StateControl::Hold).unwrap();
        // The epoch's steps: nothing is emitted, the state follows every row.
        assert!(feed(&mut op, "k v | w\n a 3 | +1\n b 2 | -1").is_empty());
        assert!(feed(&mut op, "k v | w\n a 4 | +1\n a 3 | +1").is_empty());
        assert_eq!(op.control(StateControl::Held).unwrap(), 2);
        assert_eq!(op.control(StateControl::Release(budget)).unwrap(), 2);
        let mut released = Vec::new();
        for _ in 0..3 {
            released.extend(raw_rows(&step(&mut op, empty())));
            if op.control(StateControl::Held).unwrap() == 0 {
                break;
            }
        }
        released.sort();
        let want = [("a 1", -1), ("a 8", 1), ("b 2", -1)];
        let want: Vec<(String, i64)> = want.iter().map(|(r, w)| (r.to_string(), *w)).collect();
        assert_eq!(released, want, "budget {budget}");
        assert_eq!(op.control(StateControl::Held).unwrap(), 0);
        // Past the release, results are emitted at every step again.
        let out = feed(&mut op, "k v | w\n b 5 | +1");
        assert_changelog(&out, "k s | w\n b 5 | +1");
    }
}

/// `SELECT k, count(v) n, sum(v) total, min(v) lo, sum(DISTINCT v) s FROM t GROUP BY k`:
/// retractable, multiset and held aggregates in one.
fn mixed_held() -> AggregateOp {
    let input = input();
    let calls = vec![
        call(count_udaf(), "n", &input),
        call(sum_udaf(), "total", &input),
        call(min_udaf(), "lo", &input),
        distinct_sum_call(&input),
    ];
    let output = schema("k:utf8 n:i64 total:i64 lo:i64 s:i64");
    AggregateOp::try_new(output, by_k(&input), calls).unwrap()
}

#[test]
fn held_groups_evicted_between_steps_take_deltas_and_release_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(millrace_storage::Store::open(dir.path()).unwrap());
    let tier = millrace_storage::StateTier::new(store, 7, true);
    let steps = [
        "k v | w\n a 3 | +1\n b 2 | -1\n d 6 | +1",
        "k v | w\n a 1 | -1\n a 4 | +1\n d 7 | +1\n c 9 | -1",
        "k v | w\n a 4 | +1\n d 6 | -1\n b 8 | +1",
    ];
    let mut released = Vec::new();
    for evicting in [false, true] {
        let mut op = mixed_held();
        if evicting {
            op.attach(&tier.location(0, 0));
        }
        let first = feed(
            &mut op,
            "k v | w\n a 1 | +1\n a 5 | +1\n b 2 | +1\n c 9 | +1",
        );
        assert_eq!(first.len(), 3);
        let (out, fetched) = held_epoch(&mut op, &input(), &steps, evicting);
        // Every group changed after its eviction: none was read back.
        assert_eq!(fetched, 0);
        if evicting {
            // Groups a, b, c once each, and each delta piece once: one per group and step
            // that changed it (a and d 3, b 2, c 1).
            assert_eq!(op.state().counters.fetched, 3 + 9);
        }
        released.push(out);
    }
    let want = [
        ("a 2 6 1 6", -1),
        ("a 4 16 3 12", 1),
        ("b 1 2 2 2", -1),
        ("b 1 8 8 8", 1),
        ("c 1 9 9 9", -1),
        ("d 1 7 7 7", 1),
    ];
    let want: Vec<(String, i64)> = want.iter().map(|(r, w)| (r.to_string(), *w)).collect();
    assert_eq!(released[0], want, "held in memory");
    assert_eq!(released[1], want, "held with deltas of evicted groups");
}

#[test]
fn an_epoch_touching_many_groups_releases_the_oldest_past_the_held_key_bytes() {
    let mut op = distinct_sum();
    op.control(StateControl::Hold).unwrap();
    let n = 150_000usize;
    let text: String = std::iter::once("k v | w".to_string())
        .chain((0..n).map(|i| format!("g{i} {i} | +1")))
        .collect::<Vec<_>>()
        .join("\n");
    let early = feed(&mut op, &text);
    let held = op.control(StateControl::Held).unwrap() as usize;
    // The oldest groups came out at once, each with its final result; the rest are held
    // within the bound on their keys.
    assert!(
        early.len() > 10_000 && held < n,
        "{} released, {held} held",
        early.len()
    );
    assert_eq!(early.len() + held, n);
    assert!(op.state().bytes as usize >= held * 64);
    let mut rows = raw_rows(&early);
    op.control(StateControl::Release(usize::MAX)).unwrap();
    rows.extend(raw_rows(&step(&mut op, Changelog::empty(input()))));
    assert_eq!(op.control(StateControl::Held).unwrap(), 0);
    rows.sort();
    let mut want: Vec<(String, i64)> = (0..n).map(|i| (format!("g{i} {i}"), 1)).collect();
    want.sort();
    assert_eq!(rows, want);
}
