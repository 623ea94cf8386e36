//! COPY through the extended protocol, message by message, as libpq and
//! tokio-postgres send it: the server must stay with its client until the
//! Sync after CopyDone is answered.

mod support;

use std::time::Duration;

use support::TestProxy;
use support::raw::{Raw, message, query};

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

async fn collect_until_ready(c: &mut Raw) -> Vec<(char, String)> {
    let mut got = Vec::new();
    while let Some(m) = c.recv(Duration::from_secs(5)).await {
        got.push((m.tag as char, String::from_utf8_lossy(&m.body).into_owned()));
        if m.tag == b'Z' {
            break;
        }
    }
    got
}

#[tokio::test]
async fn extended_copy_keeps_its_server_until_the_final_sync() {
    let proxy =
        TestProxy::start("pool_size = 1\nmax_pool_size = 1\ncheckout_timeout = \"2s\"").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS copy_split; CREATE TABLE copy_split (x int)")
        .await
        .unwrap();
    drop(setup);

    let mut a = Raw::login(proxy.addr).await;
    // Parse/Bind/Execute/Sync for COPY FROM STDIN, as PQexecParams sends it.
    let mut batch = Vec::new();
    let mut p = cstr("");
    p.extend(cstr("COPY copy_split FROM STDIN"));
    p.extend(0i16.to_be_bytes());
    batch.extend(message(b'P', &p));
    let mut b = cstr("");
    b.extend(cstr(""));
    b.extend(0i16.to_be_bytes());
    b.extend(0i16.to_be_bytes());
    b.extend(0i16.to_be_bytes());
    batch.extend(message(b'B', &b));
    let mut e = cstr("");
    e.extend(0i32.to_be_bytes());
    batch.extend(message(b'E', &e));
    batch.extend(message(b'S', &[]));
    a.send(&batch).await;
    a.recv_until(b'G', Duration::from_secs(5))
        .await
        .expect("CopyInResponse");
    // CopyData + CopyDone now, the client's Sync only later.
    let mut copy = message(b'd', b"1\n");
    copy.extend(message(b'c', &[]));
    a.send(&copy).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another client wants the only server meanwhile: it must wait for it,
    // and must never see A's CommandComplete.
    let mut other = Raw::login(proxy.addr).await;
    other.send(&query("SELECT 42")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    a.send(&message(b'S', &[])).await;
    let got = collect_until_ready(&mut a).await;
    let tags: Vec<char> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, vec!['C', 'Z'], "A's answer after its Sync: {got:?}");
    assert!(got[0].1.starts_with("COPY 1"), "{got:?}");

    let got = collect_until_ready(&mut other).await;
    let tags: Vec<char> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags,
        vec!['T', 'D', 'C', 'Z'],
        "the other client's answer: {got:?}"
    );
    assert!(got[2].1.starts_with("SELECT 1"), "{got:?}");
}
