//! `ClientAuth` driven with whole wire messages, as the session feeds it.

use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;

use super::*;

fn key() -> FakeSaltKey {
    FakeSaltKey::from_bytes([7; 32])
}

fn nonces() -> Nonces {
    Nonces {
        md5_salt: [1, 2, 3, 4],
        scram_nonce: "fixedservernonce".into(),
    }
}

fn password_msg(pw: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frontend::password_message(pw, &mut out).unwrap();
    out.to_vec()
}

fn auth(method: Method, secret: Option<&Secret>) -> ClientAuth {
    ClientAuth::new(method, "app", secret.is_some(), secret, &key(), nonces())
}

/// Runs a whole exchange as a client knowing `password` would.
fn login(
    method: Method,
    secret: Option<&Secret>,
    password: &[u8],
) -> (AuthStep, Option<ServerCredential>) {
    let mut a = auth(method, secret);
    let mut out = BytesMut::new();
    let mut step = a.start(&mut out);
    let mut scram: Option<ScramSha256> = None;
    while step == AuthStep::Continue {
        let msg = std::mem::take(&mut out);
        assert_eq!(msg[0], b'R');
        let code = i32::from_be_bytes(msg[5..9].try_into().unwrap());
        let data = &msg[9..];
        let mut reply = BytesMut::new();
        match code {
            3 => frontend::password_message(password, &mut reply).unwrap(),
            5 => {
                let hash = postgres_protocol::authentication::md5_hash(
                    b"app",
                    password,
                    data.try_into().unwrap(),
                );
                frontend::password_message(hash.as_bytes(), &mut reply).unwrap();
            }
            10 => {
                assert_eq!(data, b"SCRAM-SHA-256\0\0");
                let s = ScramSha256::new(password, ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut reply).unwrap();
                scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().unwrap();
                s.update(data).unwrap();
                frontend::sasl_response(s.message(), &mut reply).unwrap();
            }
            other => panic!("unexpected request {other}"),
        }
        step = a.on_message(&reply, &mut out);
    }
    if step == AuthStep::Done && !out.is_empty() {
        // SASL final: the client checks the server's signature.
        scram.as_mut().unwrap().finish(&out[9..]).unwrap();
    }
    (step, a.learned().cloned())
}

fn secrets() -> [(&'static str, Secret); 3] {
    [
        ("plain", Secret::Plain("s3cret".into())),
        ("scram", Secret::parse(&hash_password(b"s3cret")).unwrap()),
        (
            "md5",
            Secret::Md5(secret::md5_password_hash(b"s3cret", "app")),
        ),
    ]
}

/// Every method × stored kind × right/wrong password, against PostgreSQL's
/// rules: an md5 hash cannot serve SCRAM; md5 against a SCRAM secret runs
/// SCRAM.
#[test]
fn method_by_secret_matrix() {
    for method in [Method::ScramSha256, Method::Md5, Method::Password] {
        for (kind, secret) in secrets() {
            let servable = !(method == Method::ScramSha256 && kind == "md5");
            let (good, learned) = login(method, Some(&secret), b"s3cret");
            assert_eq!(
                good == AuthStep::Done,
                servable,
                "{method:?}/{kind}: {good:?}"
            );
            if servable {
                let expect_learned = match (method, kind) {
                    (Method::Password, _) => "password",
                    (_, "scram") | (Method::ScramSha256, _) => "scram",
                    _ => "none",
                };
                let got = match learned {
                    Some(ServerCredential::Password(p)) => {
                        assert_eq!(p, "s3cret");
                        "password"
                    }
                    Some(ServerCredential::Scram(_)) => "scram",
                    _ => "none",
                };
                assert_eq!(got, expect_learned, "{method:?}/{kind}");
            }
            let (bad, _) = login(method, Some(&secret), b"wrong");
            assert_eq!(
                bad,
                AuthStep::Failed(AuthFailure::bad_password("app")),
                "{method:?}/{kind}"
            );
        }
    }
}

#[test]
fn unknown_user_fails_like_a_wrong_password() {
    for method in [Method::ScramSha256, Method::Md5, Method::Password] {
        let (step, _) = login(method, None, b"anything");
        assert_eq!(step, AuthStep::Failed(AuthFailure::bad_password("app")));
    }
}

#[test]
fn fake_salt_is_stable_per_user_and_differs_between_users() {
    let k = key();
    assert_eq!(k.salt_for("ghost"), k.salt_for("ghost"));
    assert_ne!(k.salt_for("ghost"), k.salt_for("ghost2"));
    assert_ne!(
        k.salt_for("ghost"),
        FakeSaltKey::from_bytes([8; 32]).salt_for("ghost")
    );
}

/// The exact bytes of the requests pgsluice sends.
#[test]
fn recorded_requests() {
    let mut out = BytesMut::new();
    assert_eq!(
        auth(Method::Password, None).start(&mut out),
        AuthStep::Continue
    );
    assert_eq!(&out[..], &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
    out.clear();
    auth(Method::Md5, None).start(&mut out);
    assert_eq!(&out[..], &[b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4]);
    out.clear();
    auth(Method::ScramSha256, None).start(&mut out);
    assert_eq!(&out[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
}

#[test]
fn scram_protocol_errors() {
    let secret = Secret::parse(&hash_password(b"pw")).unwrap();
    let mut out = BytesMut::new();
    // A mechanism we did not offer.
    let mut a = auth(Method::ScramSha256, Some(&secret));
    a.start(&mut out);
    let mut msg = BytesMut::new();
    frontend::sasl_initial_response(
        "SCRAM-SHA-256-PLUS",
        b"p=tls-server-end-point,,n=,r=x",
        &mut msg,
    )
    .unwrap();
    let AuthStep::Failed(f) = a.on_message(&msg, &mut out) else {
        panic!()
    };
    assert_eq!(f.code, "08P01");
    // Channel binding requested.
    let mut a = auth(Method::ScramSha256, Some(&secret));
    a.start(&mut out);
    msg.clear();
    frontend::sasl_initial_response(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=x", &mut msg)
        .unwrap();
    let AuthStep::Failed(f) = a.on_message(&msg, &mut out) else {
        panic!()
    };
    assert!(f.message.contains("channel binding"), "{f:?}");
    // A password message where SASL was expected.
    let mut a = auth(Method::ScramSha256, Some(&secret));
    a.start(&mut out);
    assert!(matches!(
        a.on_message(&password_msg(b"pw"), &mut out),
        AuthStep::Failed(_)
    ));
    // Another tag.
    let mut a = auth(Method::Password, Some(&secret));
    a.start(&mut out);
    assert!(matches!(
        a.on_message(b"Q\0\0\0\x05\0", &mut out),
        AuthStep::Failed(_)
    ));
}

#[test]
fn trust_reject_and_cert() {
    let mut out = BytesMut::new();
    let s = Secret::Plain("x".into());
    assert_eq!(
        auth(Method::Trust, Some(&s)).start(&mut out),
        AuthStep::Done
    );
    assert!(matches!(
        auth(Method::Trust, None).start(&mut out),
        AuthStep::Failed(_)
    ));
    let AuthStep::Failed(f) = auth(Method::Reject, Some(&s)).start(&mut out) else {
        panic!()
    };
    assert_eq!(f.code, "28000");
    let AuthStep::Failed(f) = auth(Method::Cert, Some(&s)).start(&mut out) else {
        panic!()
    };
    assert!(f.message.contains("TLS"), "{f:?}");
}

#[test]
fn long_password() {
    let pw = "p".repeat(1000);
    for (step, _) in [
        login(
            Method::Password,
            Some(&Secret::Plain(pw.clone())),
            pw.as_bytes(),
        ),
        login(
            Method::ScramSha256,
            Some(&Secret::parse(&hash_password(pw.as_bytes())).unwrap()),
            pw.as_bytes(),
        ),
    ] {
        assert_eq!(step, AuthStep::Done);
    }
}

#[test]
fn derived_secrets_are_remembered_per_password_and_salt() {
    let salt = [7u8; 16];
    let first = derive_cached(b"secret-one", &salt, 4096);
    assert!(first == ScramSecret::derive(b"secret-one", &salt, 4096));
    // Remembered: the same result again.
    assert!(derive_cached(b"secret-one", &salt, 4096) == first);
    // A changed password, salt or iteration count is derived afresh.
    assert!(
        derive_cached(b"secret-two", &salt, 4096)
            == ScramSecret::derive(b"secret-two", &salt, 4096)
    );
    assert!(
        derive_cached(b"secret-one", &[8u8; 16], 4096)
            == ScramSecret::derive(b"secret-one", &[8u8; 16], 4096)
    );
    assert!(
        derive_cached(b"secret-one", &salt, 4097)
            == ScramSecret::derive(b"secret-one", &salt, 4097)
    );
    // Logins with a plaintext password still succeed, and fail with a wrong one.
    let plain = Secret::Plain("pw".into());
    assert_eq!(
        login(Method::ScramSha256, Some(&plain), b"pw").0,
        AuthStep::Done
    );
    assert_eq!(
        login(Method::ScramSha256, Some(&plain), b"pw").0,
        AuthStep::Done
    );
    assert!(matches!(
        login(Method::ScramSha256, Some(&plain), b"wrong").0,
        AuthStep::Failed(_)
    ));
}
