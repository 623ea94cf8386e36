use super::*;
use crate::router::shard::SortKey;

fn desc(cols: &[(&str, u32, bool)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'T');
    b.put_i32(0);
    b.put_u16(cols.len() as u16);
    for (name, ty, binary) in cols {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u32(0);
        b.put_i16(0);
        b.put_u32(*ty);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(i16::from(*binary));
    }
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

fn text_row(vals: &[Option<&str>]) -> Bytes {
    data_row(
        &vals
            .iter()
            .map(|v| v.map(|s| s.as_bytes().to_vec()))
            .collect::<Vec<_>>(),
    )
}

fn texts(m: &Merged, ncols: usize) -> Vec<Vec<Option<String>>> {
    m.rows
        .iter()
        .map(|r| {
            let row = Row::parse(r.clone(), ncols).expect("row");
            (0..ncols)
                .map(|i| {
                    row.value(i)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .collect()
        })
        .collect()
}

fn plan() -> MergePlan {
    MergePlan {
        order_by: Vec::new(),
        limit: None,
        offset: None,
        columns: None,
    }
}

#[test]
fn order_by_merges_runs_then_offset_and_limit() {
    let d = desc(&[("id", oid::INT8, false), ("name", oid::TEXT, false)]);
    let fields = agree(&[(0, &d[..]), (1, &d[..])]).expect("agree");
    let shard0 = vec![
        text_row(&[Some("1"), Some("a")]),
        text_row(&[Some("5"), Some("b")]),
        text_row(&[None, Some("n")]),
    ];
    let shard1 = vec![
        text_row(&[Some("2"), Some("c")]),
        text_row(&[Some("10"), Some("d")]),
    ];
    let mut p = plan();
    p.order_by = vec![SortKey {
        column: 0,
        descending: false,
        nulls_first: false,
    }];
    p.offset = Some(1);
    p.limit = Some(3);
    let m = merge_rows(&p, &fields, vec![shard0.clone(), shard1.clone()], false).expect("merge");
    let ids: Vec<_> = texts(&m, 2).into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(
        ids,
        vec![Some("2".into()), Some("5".into()), Some("10".into())]
    );
    // Text order needs collation C.
    p.order_by[0].column = 1;
    let e = merge_rows(&p, &fields, vec![shard0.clone(), shard1.clone()], false).unwrap_err();
    assert_eq!(e.code, "0A000");
    assert!(e.message.contains("collation"), "{}", e.message);
    p.order_by[0].descending = true;
    let m = merge_rows(&p, &fields, vec![shard0, shard1], true).expect("merge");
    let names: Vec<_> = texts(&m, 2).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(
        names,
        vec![Some("d".into()), Some("c".into()), Some("b".into())]
    );
}

#[test]
fn aggregates_merge_with_and_without_group_by() {
    // count(*), sum(int4) -> int8, sum(int8) -> numeric, min, max
    let d = desc(&[
        ("count", oid::INT8, false),
        ("s4", oid::INT8, false),
        ("s8", oid::NUMERIC, false),
        ("lo", oid::INT4, false),
        ("hi", oid::INT4, false),
    ]);
    let fields = agree(&[(0, &d[..])]).expect("agree");
    let mut p = plan();
    p.columns = Some(vec![
        MergeColumn::Count,
        MergeColumn::Sum,
        MergeColumn::Sum,
        MergeColumn::Min,
        MergeColumn::Max,
    ]);
    let rows = vec![
        vec![text_row(&[
            Some("3"),
            Some("10"),
            Some("9223372036854775807"),
            Some("-4"),
            Some("7"),
        ])],
        vec![text_row(&[Some("0"), None, None, None, None])],
        vec![text_row(&[
            Some("2"),
            Some("-3"),
            Some("1"),
            Some("2"),
            Some("9"),
        ])],
    ];
    let m = merge_rows(&p, &fields, rows, false).expect("merge");
    assert_eq!(
        texts(&m, 5),
        vec![vec![
            Some("5".into()),
            Some("7".into()),
            Some("9223372036854775808".into()),
            Some("-4".into()),
            Some("9".into())
        ]]
    );
    // GROUP BY a key, ordered by it.
    let d = desc(&[("k", oid::INT4, true), ("n", oid::INT8, true)]);
    let fields = agree(&[(0, &d[..])]).expect("agree");
    let bin = |k: i32, n: i64| {
        data_row(&[
            Some(k.to_be_bytes().to_vec()),
            Some(n.to_be_bytes().to_vec()),
        ])
    };
    let mut p = plan();
    p.columns = Some(vec![MergeColumn::GroupKey, MergeColumn::Count]);
    p.order_by = vec![SortKey {
        column: 0,
        descending: true,
        nulls_first: true,
    }];
    let m = merge_rows(
        &p,
        &fields,
        vec![vec![bin(1, 2), bin(3, 1)], vec![bin(3, 4), bin(2, 1)]],
        false,
    )
    .expect("merge");
    let got: Vec<(i32, i64)> = m
        .rows
        .iter()
        .map(|r| {
            let row = Row::parse(r.clone(), 2).expect("row");
            (
                i32::from_be_bytes(row.value(0).expect("k").try_into().expect("4")),
                i64::from_be_bytes(row.value(1).expect("n").try_into().expect("8")),
            )
        })
        .collect();
    assert_eq!(got, vec![(3, 5), (2, 1), (1, 2)]);
}

#[test]
fn different_columns_or_unmergeable_types_are_refused() {
    let a = desc(&[("id", oid::INT8, false)]);
    let b = desc(&[("id", oid::INT4, false)]);
    let e = agree(&[(0, &a[..]), (2, &b[..])]).unwrap_err();
    assert!(e.message.contains("shard 0 and shard 2"), "{}", e.message);
    let d = desc(&[("j", 3802, false)]);
    let fields = agree(&[(0, &d[..])]).expect("agree");
    let mut p = plan();
    p.order_by = vec![SortKey {
        column: 0,
        descending: false,
        nulls_first: false,
    }];
    let e = merge_rows(&p, &fields, vec![vec![text_row(&[Some("{}")])]], true).unwrap_err();
    assert_eq!(e.code, "0A000");
    let mut p = plan();
    p.columns = Some(vec![MergeColumn::Sum]);
    let e = merge_rows(&p, &fields, vec![vec![text_row(&[Some("{}")])]], true).unwrap_err();
    assert!(e.message.contains("sum()"), "{}", e.message);
}
