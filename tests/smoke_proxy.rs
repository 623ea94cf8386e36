mod support;
use support::*;

#[tokio::test]
async fn select_through_pgsluice() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let row = c
        .query_one("SELECT 1::int4 + $1::int4", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}
