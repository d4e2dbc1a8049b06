//! The join with retractions, per output kind: pairs (inner, left, full outer), semi and
//! anti joins, on `lk = rk` and optionally a residual condition.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::JoinType;
use datafusion::logical_expr::Operator as BinaryOp;
use datafusion::physical_expr::expressions::{binary, col};
use datafusion::physical_plan::PhysicalExpr;

use super::{JoinOp, JoinSpec};
use crate::changelog::Changelog;
use crate::ops::Operator;
use crate::test_util::{assert_changelog, changelog, concat_schemas, raw_rows, schema, step2};

fn left() -> SchemaRef {
    schema("lk:i64 a:utf8")
}

fn right() -> SchemaRef {
    schema("rk:i64 b:utf8")
}

/// Builds a residual condition over the combined schema.
type Residual = dyn Fn(&SchemaRef) -> Arc<dyn PhysicalExpr>;

/// A join of `left` and `right` on `lk = rk`, with `filter(combined schema)` as its
/// residual condition.
fn join_with(
    join_type: JoinType,
    left: SchemaRef,
    right: SchemaRef,
    nulls_equal: bool,
    filter: Option<&Residual>,
) -> JoinOp {
    let combined = concat_schemas(&left, &right);
    let output = match join_type {
        JoinType::LeftSemi | JoinType::LeftAnti => left.clone(),
        JoinType::RightSemi | JoinType::RightAnti => right.clone(),
        _ => combined.clone(),
    };
    JoinOp::try_new(JoinSpec {
        join_type,
        keys: [
            vec![col("lk", &left).unwrap()],
            vec![col("rk", &right).unwrap()],
        ],
        nulls_equal,
        filter: filter.map(|f| f(&combined)),
        inputs: [left, right],
        combined,
        output,
    })
    .unwrap()
}

fn join(join_type: JoinType) -> JoinOp {
    join_with(join_type, left(), right(), false, None)
}

/// One epoch: `l` and `r` are literals over the left and right schema.
fn feed(op: &mut JoinOp, l: &str, r: &str) -> Changelog {
    step2(op, changelog(&left(), l), changelog(&right(), r))
}

const NO_LEFT: &str = "lk a | w";
const NO_RIGHT: &str = "rk b | w";

#[track_caller]
fn assert_empty(out: &Changelog) {
    assert!(
        out.is_empty(),
        "expected no change, got {:?}",
        raw_rows(out)
    );
}

// Inner join.

/// Left (1,x) (2,y), right (1,p) (2,q): pairs x-p and y-q.
fn inner_seeded() -> JoinOp {
    let mut op = join(JoinType::Inner);
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | +1\n 2 y | +1",
        "rk b | w\n 1 p | +1\n 2 q | +1\n 3 r | +1",
    );
    assert_changelog(
        &out,
        "
        lk a rk b | w
        1  x 1  p | +1
        2  y 2  q | +1
        ",
    );
    op
}

#[test]
fn inner_join_pairs_rows_inserted_on_both_sides_in_one_epoch() {
    let mut op = inner_seeded();
    let out = feed(
        &mut op,
        "lk a | w\n 3 z | +1",
        "rk b | w\n 3 s | +1\n 2 t | +1",
    );
    assert_changelog(
        &out,
        "
        lk a rk b | w
        3  z 3  r | +1
        3  z 3  s | +1
        2  y 2  t | +1
        ",
    );
}

#[test]
fn inner_join_delete_retracts_the_rows_pairs() {
    let mut op = inner_seeded();
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 q2 | +1");
    assert_changelog(&out, "lk a rk b | w\n 1 x 1 q2 | +1");
    let out = feed(&mut op, "lk a | w\n 1 x | -1", NO_RIGHT);
    assert_changelog(
        &out,
        "
        lk a rk b  | w
        1  x 1  p  | -1
        1  x 1  q2 | -1
        ",
    );
    // Its former partners now join with nothing.
    assert_empty(&feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1"));
}

#[test]
fn inner_join_update_moves_a_row_between_keys() {
    let mut op = inner_seeded();
    let out = feed(&mut op, "lk a | w\n 1 x | -1\n 2 x | +1", NO_RIGHT);
    assert_changelog(
        &out,
        "
        lk a rk b | w
        1  x 1  p | -1
        2  x 2  q | +1
        ",
    );
}

#[test]
fn inner_join_changes_on_both_sides_in_one_epoch() {
    let mut op = inner_seeded();
    // x moves to key 2 while q moves to key 1: they never meet.
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | -1\n 2 x | +1",
        "rk b | w\n 2 q | -1\n 1 q | +1",
    );
    assert_changelog(
        &out,
        "
        lk a rk b | w
        1  x 1  p | -1
        2  y 2  q | -1
        ",
    );
    // Both sides delete their halves of a pair in one epoch: retracted once.
    let mut op = inner_seeded();
    let out = feed(&mut op, "lk a | w\n 2 y | -1", "rk b | w\n 2 q | -1");
    assert_changelog(&out, "lk a rk b | w\n 2 y 2 q | -1");
}

#[test]
fn inner_join_row_whose_weight_goes_to_zero_in_one_epoch_emits_nothing() {
    let mut op = inner_seeded();
    assert_empty(&feed(&mut op, "lk a | w\n 3 z | +1\n 3 z | -1", NO_RIGHT));
    // It was not kept (two left keys, three right keys): a new partner finds nothing.
    assert_eq!(op.state().entries, 5);
    assert_empty(&feed(&mut op, NO_LEFT, "rk b | w\n 3 s | +1"));
}

#[test]
fn inner_join_weights_multiply() {
    let mut op = join(JoinType::Inner);
    let out = feed(&mut op, "lk a | w\n 1 x | +2", "rk b | w\n 1 p | +3");
    assert_changelog(&out, "lk a rk b | w\n 1 x 1 p | +6");
    let out = feed(&mut op, "lk a | w\n 1 x | -1", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n 1 x 1 p | -3");
}

#[test]
fn join_empty_epoch_emits_nothing() {
    for join_type in [
        JoinType::Inner,
        JoinType::Left,
        JoinType::Full,
        JoinType::LeftSemi,
        JoinType::LeftAnti,
    ] {
        let mut op = join(join_type);
        let first = feed(
            &mut op,
            "lk a | w\n 1 x | +1\n 2 y | +1",
            "rk b | w\n 1 p | +1",
        );
        assert!(!first.is_empty(), "{join_type}: the first epoch has output");
        assert_empty(&feed(&mut op, NO_LEFT, NO_RIGHT));
    }
}

#[test]
fn null_keys_match_only_when_nulls_are_equal() {
    let mut op = join(JoinType::Inner);
    assert_empty(&feed(
        &mut op,
        "lk a | w\n null x | +1",
        "rk b | w\n null p | +1",
    ));
    let mut op = join_with(JoinType::Inner, left(), right(), true, None);
    let out = feed(&mut op, "lk a | w\n null x | +1", "rk b | w\n null p | +1");
    assert_changelog(&out, "lk a rk b | w\n null x null p | +1");
    // A left join pads a NULL key, and keeps it padded.
    let mut op = join(JoinType::Left);
    let out = feed(&mut op, "lk a | w\n null x | +1", "rk b | w\n null p | +1");
    assert_changelog(&out, "lk a rk b | w\n null x null null | +1");
    let out = feed(&mut op, "lk a | w\n null x | -1", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n null x null null | -1");
}

// Left and full outer joins.

#[test]
fn left_join_pads_a_row_until_its_first_match() {
    let mut op = join(JoinType::Left);
    let out = feed(&mut op, "lk a | w\n 1 x | +1", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n 1 x null null | +1");
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | +1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  x null null | -1
        1  x 1    p    | +1
        ",
    );
    // A second match adds a pair; the padding is gone already.
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 q | +1");
    assert_changelog(&out, "lk a rk b | w\n 1 x 1 q | +1");
}

#[test]
fn left_join_pads_again_when_the_last_match_goes() {
    let mut op = join(JoinType::Left);
    feed(
        &mut op,
        "lk a | w\n 1 x | +1",
        "rk b | w\n 1 p | +1\n 1 q | +1",
    );
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1");
    assert_changelog(&out, "lk a rk b | w\n 1 x 1 p | -1");
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 q | -1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  x 1    q    | -1
        1  x null null | +1
        ",
    );
    // The unmatched row is deleted: its padded row is retracted.
    let out = feed(&mut op, "lk a | w\n 1 x | -1", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n 1 x null null | -1");
}

#[test]
fn left_join_update_moves_a_match_between_keys() {
    let mut op = join(JoinType::Left);
    feed(
        &mut op,
        "lk a | w\n 1 x | +1\n 2 y | +1",
        "rk b | w\n 1 p | +1",
    );
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1\n 2 p | +1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  x 1    p    | -1
        1  x null null | +1
        2  y null null | -1
        2  y 2    p    | +1
        ",
    );
}

#[test]
fn left_join_match_arriving_with_the_row_or_leaving_in_one_epoch() {
    let mut op = join(JoinType::Left);
    // Row and match in one epoch: the pair only, no padding in between.
    let out = feed(&mut op, "lk a | w\n 3 z | +1", "rk b | w\n 3 r | +1");
    assert_changelog(&out, "lk a rk b | w\n 3 z 3 r | +1");
    // A match inserted and deleted in one epoch changes nothing.
    feed(&mut op, "lk a | w\n 1 x | +1", NO_RIGHT);
    assert_empty(&feed(&mut op, NO_LEFT, "rk b | w\n 1 p | +1\n 1 p | -1"));
    // And it was not kept: deleting x retracts its padding only.
    let out = feed(&mut op, "lk a | w\n 1 x | -1", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n 1 x null null | -1");
}

#[test]
fn left_join_padding_counts_copies() {
    let mut op = join(JoinType::Left);
    let out = feed(&mut op, "lk a | w\n 1 x | +2", NO_RIGHT);
    assert_changelog(&out, "lk a rk b | w\n 1 x null null | +2");
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | +1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  x null null | -2
        1  x 1    p    | +2
        ",
    );
}

#[test]
fn full_join_pads_both_sides() {
    let mut op = join(JoinType::Full);
    let out = feed(&mut op, "lk a | w\n 1 x | +1", "rk b | w\n 2 p | +1");
    assert_changelog(
        &out,
        "
        lk   a    rk   b    | w
        1    x    null null | +1
        null null 2    p    | +1
        ",
    );
    let out = feed(&mut op, "lk a | w\n 2 y | +1", NO_RIGHT);
    assert_changelog(
        &out,
        "
        lk   a    rk b | w
        null null 2  p | -1
        2    y    2  p | +1
        ",
    );
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 2 p | -1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        2  y 2    p    | -1
        2  y null null | +1
        ",
    );
}

#[test]
fn left_join_residual_condition_decides_what_matches() {
    let l = schema("lk:i64 a:i64");
    let r = schema("rk:i64 b:i64");
    let less = |s: &SchemaRef| {
        binary(col("a", s).unwrap(), BinaryOp::Lt, col("b", s).unwrap(), s).unwrap()
    };
    let mut op = join_with(JoinType::Left, l.clone(), r.clone(), false, Some(&less));
    let mut feed = |lt: &str, rt: &str| step2(&mut op, changelog(&l, lt), changelog(&r, rt));
    let out = feed("lk a | w\n 1 5 | +1", "rk b | w\n 1 3 | +1");
    assert_changelog(&out, "lk a rk b | w\n 1 5 null null | +1");
    let out = feed("lk a | w", "rk b | w\n 1 9 | +1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  5 null null | -1
        1  5 1    9    | +1
        ",
    );
    // The match is updated to a value the condition rejects.
    let out = feed("lk a | w", "rk b | w\n 1 9 | -1\n 1 4 | +1");
    assert_changelog(
        &out,
        "
        lk a rk   b    | w
        1  5 1    9    | -1
        1  5 null null | +1
        ",
    );
}

// Semi and anti joins.

#[test]
fn semi_join_emits_a_row_once_while_it_has_matches() {
    let mut op = join(JoinType::LeftSemi);
    assert_empty(&feed(&mut op, "lk a | w\n 1 x | +1", NO_RIGHT));
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | +1\n 1 q | +1");
    assert_changelog(&out, "lk a | w\n 1 x | +1");
    assert_empty(&feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1"));
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 q | -1");
    assert_changelog(&out, "lk a | w\n 1 x | -1");
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | +1");
    assert_changelog(&out, "lk a | w\n 1 x | +1");
    let out = feed(&mut op, "lk a | w\n 1 x | -1", NO_RIGHT);
    assert_changelog(&out, "lk a | w\n 1 x | -1");
}

#[test]
fn semi_join_update_moves_a_match_between_keys() {
    let mut op = join(JoinType::LeftSemi);
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | +1\n 2 y | +2",
        "rk b | w\n 1 p | +1",
    );
    assert_changelog(&out, "lk a | w\n 1 x | +1");
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1\n 2 p | +1");
    assert_changelog(
        &out,
        "
        lk a | w
        1  x | -1
        2  y | +2
        ",
    );
    // A matched row inserted and deleted in one epoch: nothing.
    assert_empty(&feed(&mut op, "lk a | w\n 2 z | +1\n 2 z | -1", NO_RIGHT));
}

#[test]
fn anti_join_emits_rows_without_a_match() {
    let mut op = join(JoinType::LeftAnti);
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | +1\n 2 y | +1",
        "rk b | w\n 1 p | +1",
    );
    assert_changelog(&out, "lk a | w\n 2 y | +1");
    // y gains a match: it leaves; x loses its last one: it comes back.
    let out = feed(&mut op, NO_LEFT, "rk b | w\n 1 p | -1\n 2 p | +1");
    assert_changelog(
        &out,
        "
        lk a | w
        1  x | +1
        2  y | -1
        ",
    );
    let out = feed(&mut op, "lk a | w\n 1 x | -1\n 3 z | +2", NO_RIGHT);
    assert_changelog(
        &out,
        "
        lk a | w
        1  x | -1
        3  z | +2
        ",
    );
    // A second match changes nothing; a match inserted and deleted at once neither.
    assert_empty(&feed(
        &mut op,
        NO_LEFT,
        "rk b | w\n 2 q | +1\n 3 s | +1\n 3 s | -1",
    ));
}

#[test]
fn right_semi_and_anti_joins_emit_right_rows() {
    let mut op = join(JoinType::RightSemi);
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | +1",
        "rk b | w\n 1 p | +1\n 2 q | +1",
    );
    assert_changelog(&out, "rk b | w\n 1 p | +1");
    let out = feed(&mut op, "lk a | w\n 1 x | -1\n 2 x | +1", NO_RIGHT);
    assert_changelog(&out, "rk b | w\n 1 p | -1\n 2 q | +1");

    let mut op = join(JoinType::RightAnti);
    let out = feed(
        &mut op,
        "lk a | w\n 1 x | +1",
        "rk b | w\n 1 p | +1\n 2 q | +1",
    );
    assert_changelog(&out, "rk b | w\n 2 q | +1");
    let out = feed(&mut op, "lk a | w\n 1 x | -1\n 2 x | +1", NO_RIGHT);
    assert_changelog(&out, "rk b | w\n 1 p | +1\n 2 q | -1");
}
