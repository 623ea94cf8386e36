use std::path::Path;

use rcgen::{CertificateParams, DnType, KeyPair};

use super::*;

fn cert_with_cn(cn: &str) -> (String, String, Vec<u8>) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pgsluice tests");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn common_name_is_read_from_the_subject() {
    let (_, _, der) = cert_with_cn("alice@example");
    assert_eq!(common_name(&der).as_deref(), Some("alice@example"));
}

#[test]
fn common_name_of_garbage_is_none() {
    assert_eq!(common_name(b""), None);
    assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    let (_, _, der) = cert_with_cn("x");
    for cut in [1, 10, der.len() / 2] {
        assert_eq!(common_name(&der[..der.len() - cut]), None);
    }
}

#[test]
fn loads_a_matching_certificate_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = cert_with_cn("localhost");
    let settings = TlsSettings {
        client_mode: ClientTlsMode::Require,
        client_cert_file: Some(write(dir.path(), "c.pem", &cert)),
        client_key_file: Some(write(dir.path(), "k.pem", &key)),
        server_mode: ServerTlsMode::VerifyFull,
        server_ca_file: Some(write(dir.path(), "ca.pem", &cert)),
        ..TlsSettings::default()
    };
    let ctx = TlsContext::load(&settings).unwrap();
    assert!(ctx.acceptor.is_some() && ctx.connector.is_some());
}

#[test]
fn bad_files_name_the_setting_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = cert_with_cn("localhost");
    let (_, other_key, _) = cert_with_cn("other");
    let cert_file = write(dir.path(), "c.pem", &cert);
    let base = TlsSettings {
        client_mode: ClientTlsMode::Require,
        client_cert_file: Some(cert_file.clone()),
        client_key_file: Some(write(dir.path(), "k.pem", &key)),
        server_mode: ServerTlsMode::Disable,
        ..TlsSettings::default()
    };
    let missing = TlsSettings {
        client_cert_file: Some(dir.path().join("nope.pem")),
        ..base.clone()
    };
    let e = TlsContext::load(&missing).unwrap_err();
    assert_eq!(e.key, "tls.client_cert_file");
    assert!(e.file.ends_with("nope.pem"), "{e}");

    let not_pem = TlsSettings {
        client_key_file: Some(write(dir.path(), "garbage.pem", "hello")),
        ..base.clone()
    };
    let e = TlsContext::load(&not_pem).unwrap_err();
    assert_eq!(e.key, "tls.client_key_file");
    assert!(e.to_string().contains("garbage.pem"), "{e}");

    let mismatch = TlsSettings {
        client_key_file: Some(write(dir.path(), "other.pem", &other_key)),
        ..base.clone()
    };
    let e = TlsContext::load(&mismatch).unwrap_err();
    assert_eq!(e.key, "tls.client_key_file");

    let no_ca = TlsSettings {
        client_mode: ClientTlsMode::VerifyCa,
        ..base.clone()
    };
    assert_eq!(
        TlsContext::load(&no_ca).unwrap_err().key,
        "tls.client_ca_file"
    );

    let key_as_ca = TlsSettings {
        server_mode: ServerTlsMode::VerifyCa,
        server_ca_file: Some(write(dir.path(), "k2.pem", &key)),
        ..base
    };
    assert_eq!(
        TlsContext::load(&key_as_ca).unwrap_err().key,
        "tls.server_ca_file"
    );
}

#[test]
fn cert_map_maps_or_passes_through() {
    let mut s = TlsSettings::default();
    s.cert_map
        .insert("alice.example.com".into(), "alice".into());
    assert_eq!(s.user_for_cn("alice.example.com"), "alice");
    assert_eq!(s.user_for_cn("bob"), "bob");
}
