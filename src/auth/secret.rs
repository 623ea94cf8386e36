//! What a user's `password` setting holds, and the hashing around it.
//!
//! A configured credential is one of three kinds, told apart by its shape
//! exactly as PostgreSQL tells apart what `ALTER ROLE … PASSWORD` stores:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` is a SCRAM
//! secret, `md5` followed by 32 lowercase hex digits is an md5 hash of
//! password + user name, anything else is a plaintext password.
//!
//! Every type here that holds key material has a redacting `Debug` and no
//! `Display`: the one way to print a secret is the explicit
//! [`ScramSecret::encode`] (used by `pgsluice hash-password`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Iterations of new secrets: PostgreSQL's `scram_iterations` default.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Largest iteration count accepted in a configured secret. Each login with
/// a plaintext password over `password` runs this many HMACs.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// A user's configured credential.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// Usable for every method, and for logging in to PostgreSQL.
    Plain(String),
    /// Serves `scram-sha-256` and `password` (and `md5`, which falls back to
    /// SCRAM as in PostgreSQL).
    Scram(ScramSecret),
    /// `md5` + hex(md5(password ‖ user)); serves `md5` and `password`.
    Md5(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Plain(<redacted>)",
            Self::Scram(_) => "Scram(<redacted>)",
            Self::Md5(_) => "Md5(<redacted>)",
        })
    }
}

impl Secret {
    /// Reads a configured `password` value. Errors describe the shape only,
    /// never echo the value.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("SCRAM-SHA-256$") {
            return ScramSecret::parse(s).map(Self::Scram);
        }
        if is_md5_hash(s) {
            return Ok(Self::Md5(s.to_owned()));
        }
        Ok(Self::Plain(s.to_owned()))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Plain(_) => "plaintext",
            Self::Scram(_) => "scram-sha-256",
            Self::Md5(_) => "md5",
        }
    }

    /// Checks a cleartext password (the `password` method).
    pub fn verify_password(&self, user: &str, given: &[u8]) -> bool {
        match self {
            Self::Plain(p) => constant_time_eq(p.as_bytes(), given),
            Self::Scram(s) => s.verify_password(given),
            Self::Md5(h) => {
                constant_time_eq(h.as_bytes(), md5_password_hash(given, user).as_bytes())
            }
        }
    }
}

fn is_md5_hash(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("md5")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A SCRAM-SHA-256 secret as PostgreSQL stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramSecret {
    pub fn parse(s: &str) -> Result<Self, String> {
        const SHAPE: &str = "a SCRAM secret must look like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>";
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or(SHAPE)?;
        let (params, keys) = rest.split_once('$').ok_or(SHAPE)?;
        let (iter, salt) = params.split_once(':').ok_or(SHAPE)?;
        let (stored, server) = keys.split_once(':').ok_or(SHAPE)?;
        let iterations: u32 = iter
            .parse()
            .ok()
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or_else(|| {
                format!("SCRAM secret: the iteration count must be 1..={MAX_ITERATIONS}")
            })?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or("SCRAM secret: the salt is not base64")?;
        let key = |k: &str, what: &str| -> Result<[u8; 32], String> {
            STANDARD
                .decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| format!("SCRAM secret: the {what} is not 32 bytes of base64"))
        };
        Ok(Self {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }

    /// The secret of `password` with this salt and iteration count.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let keys = ScramKeys::derive(password, salt, iterations);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&keys.client_key),
            server_key: keys.server_key,
        }
    }

    /// The config / `ALTER ROLE` form. Prints key material: only for
    /// `pgsluice hash-password`.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }

    pub fn verify_password(&self, given: &[u8]) -> bool {
        let keys = ScramKeys::derive(given, &self.salt, self.iterations);
        constant_time_eq(&sha256(&keys.client_key), &self.stored_key)
            & constant_time_eq(&keys.server_key, &self.server_key)
    }
}

/// The keys a SCRAM client proves itself with. Recovered from a client's
/// proof, they let pgsluice answer a server holding the same secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramKeys {
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted = hi(&saslprep(password), salt, iterations);
        Self {
            iterations,
            salt: salt.to_vec(),
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// A new SCRAM secret for `password` with a random 16-byte salt, exactly
/// what PostgreSQL (and libpq's `PQencryptPasswordConn`) produce.
pub fn hash_password(password: &[u8]) -> String {
    postgres_protocol::password::scram_sha_256(password)
}

/// `md5` + hex(md5(password ‖ user)), PostgreSQL's stored md5 form.
pub fn md5_password_hash(password: &[u8], user: &str) -> String {
    postgres_protocol::password::md5(password, user)
}

/// What a client answers an md5 challenge with, from the stored hash:
/// `md5` + hex(md5(hex-part ‖ salt)).
pub fn md5_salted(stored_hash: &str, salt: [u8; 4]) -> String {
    let mut input = stored_hash.trim_start_matches("md5").as_bytes().to_vec();
    input.extend_from_slice(&salt);
    md5_hex(&input)
}

/// `md5` + the lower-case hex digest of `input`. Built by table, not with
/// `format!` per byte: that cost ~8,600 instructions a digest (callgrind,
/// `pgbench -C`). postgres-protocol has no function for this step alone
/// (its `md5_hash` starts from the password, not the stored hash).
fn md5_hex(input: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = md5::Md5::digest(input);
    let mut out = String::with_capacity(3 + 2 * digest.len());
    out.push_str("md5");
    for &b in digest.iter() {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// SASLprep when the password is valid UTF-8 and preparable; otherwise the
/// raw bytes, as PostgreSQL and libpq do.
fn saslprep(password: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(password) {
        Ok(s) => match stringprep::saslprep(s) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.to_vec(),
        },
        Err(_) => password.to_vec(),
    }
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (RFC 5802 `Hi`).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(password)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let mut first = mac.clone();
    first.update(salt);
    first.update(&[0, 0, 0, 1]);
    let mut prev: [u8; 32] = first.finalize().into_bytes().into();
    let mut out = prev;
    for _ in 1..iterations {
        let mut m = mac.clone();
        m.update(&prev);
        prev = m.finalize().into_bytes().into();
        for (o, p) in out.iter_mut().zip(prev) {
            *o ^= p;
        }
    }
    out
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        let scram = hash_password(b"pw");
        assert!(matches!(Secret::parse(&scram), Ok(Secret::Scram(_))));
        let md5 = md5_password_hash(b"pw", "u");
        assert!(matches!(Secret::parse(&md5), Ok(Secret::Md5(_))));
        assert!(matches!(Secret::parse("md5nothex"), Ok(Secret::Plain(_))));
        assert!(matches!(Secret::parse("hunter2"), Ok(Secret::Plain(_))));
        let err = Secret::parse("SCRAM-SHA-256$4096:c2FsdA==$abc:def").unwrap_err();
        assert!(err.contains("StoredKey") && !err.contains("abc"), "{err}");
        assert!(Secret::parse("SCRAM-SHA-256$0:c2FsdA==$a:b").is_err());
    }

    #[test]
    fn scram_secret_round_trips_and_verifies() {
        let text = hash_password("pässwörd".as_bytes());
        let s = ScramSecret::parse(&text).unwrap();
        assert_eq!(s.encode(), text);
        assert!(s.verify_password("pässwörd".as_bytes()));
        assert!(!s.verify_password(b"passwoerd"));
        assert_eq!(ScramSecret::derive(b"x", &s.salt, 4096).salt, s.salt);
    }

    #[test]
    fn md5_hash_matches_postgres() {
        // SELECT 'md5' || md5('pw' || 'auth_md5')
        assert_eq!(
            md5_password_hash(b"pw", "auth_md5"),
            "md52faa6830d5304d2819df6018487ff000"
        );
        let stored = md5_password_hash(b"pw", "u");
        let salt = [1, 2, 3, 4];
        assert_eq!(
            md5_salted(&stored, salt),
            postgres_protocol::authentication::md5_hash(b"u", b"pw", salt)
        );
        assert!(Secret::Md5(stored).verify_password("u", b"pw"));
    }

    #[test]
    fn debug_never_shows_key_material() {
        let text = hash_password(b"pw");
        let shown = format!(
            "{:?} {:?} {:?}",
            Secret::parse(&text).unwrap(),
            ScramSecret::parse(&text).unwrap(),
            Secret::Plain("hunter2".into())
        );
        let stored_b64 = text.split('$').nth(2).unwrap().split(':').next().unwrap();
        assert!(
            !shown.contains(stored_b64) && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
