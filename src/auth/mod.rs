//! Client authentication as a pure state machine: fed the client's messages,
//! it says what to send back and when the client is in. No I/O here, so every
//! method is testable with recorded exchanges; SCRAM, md5 and certificates
//! slot in as further variants.

use bytes::BytesMut;

use crate::protocol::{self, sqlstate};

/// What the session should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send the bytes written to `out` and wait for the client's next
    /// authentication message (tag `p`).
    Continue,
    /// The client is authenticated.
    Done,
    /// Refuse the client with this error.
    Failed(AuthFailure),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    pub code: &'static str,
    pub message: String,
}

impl AuthFailure {
    fn bad_password(user: &str) -> Self {
        Self {
            code: sqlstate::INVALID_PASSWORD,
            message: format!("password authentication failed for user \"{user}\""),
        }
    }
}

/// One client's authentication exchange.
#[derive(Debug)]
pub enum ClientAuth {
    /// No proof asked; the user must still be configured.
    Trust { user: String, known: bool },
    /// Cleartext password compared with the configured one. Unknown users go
    /// through the same exchange and fail the same way as a wrong password,
    /// so user names cannot be probed.
    Cleartext {
        user: String,
        expected: Option<String>,
        asked: bool,
    },
}

impl ClientAuth {
    /// Writes the first request to `out` (if any) and says what next.
    pub fn start(&mut self, out: &mut BytesMut) -> AuthStep {
        match self {
            Self::Trust { known: true, .. } => AuthStep::Done,
            Self::Trust { user, known: false } => AuthStep::Failed(AuthFailure {
                code: sqlstate::INVALID_AUTHORIZATION,
                message: format!("role \"{user}\" does not exist"),
            }),
            Self::Cleartext { asked, .. } => {
                protocol::authentication_cleartext_password(out);
                *asked = true;
                AuthStep::Continue
            }
        }
    }

    /// Feeds one whole client message (header included).
    pub fn on_message(&mut self, msg: &[u8], _out: &mut BytesMut) -> AuthStep {
        match self {
            Self::Trust { .. } => protocol_failure("unexpected message during authentication"),
            Self::Cleartext {
                user,
                expected,
                asked,
            } => {
                if !*asked || msg.first() != Some(&b'p') {
                    return protocol_failure("expected a password message");
                }
                let body = protocol::body(msg);
                let Some(given) = body.strip_suffix(&[0]) else {
                    return protocol_failure("malformed password message");
                };
                match expected {
                    Some(exp) if constant_time_eq(exp.as_bytes(), given) => AuthStep::Done,
                    _ => AuthStep::Failed(AuthFailure::bad_password(user)),
                }
            }
        }
    }
}

fn protocol_failure(message: &str) -> AuthStep {
    AuthStep::Failed(AuthFailure {
        code: sqlstate::PROTOCOL_VIOLATION,
        message: message.to_owned(),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password_msg(pw: &str) -> Vec<u8> {
        let mut v = vec![b'p'];
        v.extend_from_slice(&((pw.len() + 5) as i32).to_be_bytes());
        v.extend_from_slice(pw.as_bytes());
        v.push(0);
        v
    }

    fn cleartext(expected: Option<&str>) -> ClientAuth {
        ClientAuth::Cleartext {
            user: "app".into(),
            expected: expected.map(str::to_owned),
            asked: false,
        }
    }

    #[test]
    fn cleartext_accepts_only_the_right_password() {
        let mut out = BytesMut::new();
        let mut a = cleartext(Some("s3cret"));
        assert_eq!(a.start(&mut out), AuthStep::Continue);
        assert_eq!(&out[..], &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        assert_eq!(
            a.on_message(&password_msg("s3cret"), &mut out),
            AuthStep::Done
        );
        let mut b = cleartext(Some("s3cret"));
        b.start(&mut out);
        let AuthStep::Failed(f) = b.on_message(&password_msg("nope"), &mut out) else {
            panic!("accepted a wrong password")
        };
        assert_eq!(f.code, "28P01");
    }

    #[test]
    fn unknown_user_fails_like_a_wrong_password() {
        let mut out = BytesMut::new();
        let mut a = cleartext(None);
        assert_eq!(a.start(&mut out), AuthStep::Continue);
        let AuthStep::Failed(f) = a.on_message(&password_msg("anything"), &mut out) else {
            panic!("accepted an unknown user")
        };
        assert_eq!(f, AuthFailure::bad_password("app"));
    }

    #[test]
    fn trust_needs_a_configured_user() {
        let mut out = BytesMut::new();
        let mut known = ClientAuth::Trust {
            user: "a".into(),
            known: true,
        };
        assert_eq!(known.start(&mut out), AuthStep::Done);
        let mut unknown = ClientAuth::Trust {
            user: "b".into(),
            known: false,
        };
        assert!(matches!(unknown.start(&mut out), AuthStep::Failed(_)));
    }
}
