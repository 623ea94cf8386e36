//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, both ways,
//! as pure state machines: SASL payload bytes in, payload bytes out. The
//! caller frames them into AuthenticationSASL* / SASLResponse messages.
//!
//! [`ScramServer`] checks a client against a [`ScramSecret`]. As PostgreSQL
//! does, it ignores the user name in client-first (the startup packet's
//! user counts) and supports no channel binding: gs2 headers `n,,` and
//! `y,,` are accepted, `p=…` is refused. A server built with
//! [`ScramServer::fake`] runs the whole exchange and fails at the proof, so
//! an unknown user looks exactly like a wrong password.
//!
//! [`ScramClient`] logs in to PostgreSQL with [`ScramKeys`] instead of a
//! password: the ClientKey recovered from a client's proof (pass-through).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::secret::{ScramKeys, ScramSecret, constant_time_eq, hmac, sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Raw bytes of the server's nonce part (PostgreSQL: 18).
pub const SERVER_NONCE_LEN: usize = 18;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client sent something that is not valid SCRAM (08P01).
    #[error("malformed SCRAM message ({0})")]
    Malformed(&'static str),
    /// Valid SCRAM we do not support (28000 / 0A000 territory).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The proof is wrong, or the user has no usable secret (28P01).
    #[error("SCRAM proof does not match")]
    BadProof,
}

/// What the server says after a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerStep {
    /// Send this server-first message in AuthenticationSASLContinue.
    Continue(Vec<u8>),
    /// The client proved itself: send this server-final message in
    /// AuthenticationSASLFinal. `keys` hold the recovered ClientKey.
    Done {
        server_final: Vec<u8>,
        keys: ScramKeys,
    },
    Failed(ScramError),
}

#[derive(Debug)]
enum ServerState {
    AwaitFirst,
    AwaitFinal {
        gs2_header: Vec<u8>,
        nonce: Vec<u8>,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
    },
    Finished,
}

/// One client's SCRAM exchange, pgsluice serving.
#[derive(Debug)]
pub struct ScramServer {
    secret: ScramSecret,
    /// False for the fake exchange of an unknown user (or one without a
    /// SCRAM-capable secret): every proof fails.
    real: bool,
    server_nonce: String,
    state: ServerState,
}

impl ScramServer {
    /// `server_nonce` must be printable ASCII without `,` (base64 of
    /// [`SERVER_NONCE_LEN`] random bytes in production; fixed in tests).
    pub fn new(secret: ScramSecret, server_nonce: String) -> Self {
        Self {
            secret,
            real: true,
            server_nonce,
            state: ServerState::AwaitFirst,
        }
    }

    /// An exchange that always fails at the proof, with this salt (derive it
    /// from the user name so it is stable per user).
    pub fn fake(salt: Vec<u8>, iterations: u32, server_nonce: String) -> Self {
        Self {
            secret: ScramSecret {
                iterations,
                salt,
                stored_key: [0; 32],
                server_key: [0; 32],
            },
            real: false,
            server_nonce,
            state: ServerState::AwaitFirst,
        }
    }

    /// Base64 of `raw` random bytes: a valid server nonce.
    pub fn nonce_from(raw: &[u8]) -> String {
        STANDARD.encode(raw)
    }

    pub fn on_message(&mut self, data: &[u8]) -> ServerStep {
        let r = match std::mem::replace(&mut self.state, ServerState::Finished) {
            ServerState::AwaitFirst => self.client_first(data),
            ServerState::AwaitFinal {
                gs2_header,
                nonce,
                client_first_bare,
                server_first,
            } => self.client_final(data, &gs2_header, &nonce, &client_first_bare, &server_first),
            ServerState::Finished => Err(ScramError::Malformed("exchange already finished")),
        };
        r.unwrap_or_else(ServerStep::Failed)
    }

    fn client_first(&mut self, data: &[u8]) -> Result<ServerStep, ScramError> {
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = split_attr(data);
        match flag {
            b"n" | b"y" => {}
            f if f.starts_with(b"p=") => {
                return Err(ScramError::Unsupported(
                    "channel binding is not supported (pgsluice has no TLS yet); use SCRAM-SHA-256 without channel binding",
                ));
            }
            _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
        }
        let rest = rest.ok_or(ScramError::Malformed("client-first-message too short"))?;
        let (authzid, bare) = split_attr(rest);
        if !authzid.is_empty() {
            return Err(ScramError::Unsupported(
                "client uses authorization identity, but it is not supported",
            ));
        }
        let bare = bare.ok_or(ScramError::Malformed("client-first-message too short"))?;
        let gs2_header = data[..data.len() - bare.len()].to_vec();

        let (user, rest) = split_attr(bare);
        if user.starts_with(b"m=") {
            return Err(ScramError::Unsupported(
                "client requires an unsupported SCRAM extension",
            ));
        }
        if !user.starts_with(b"n=") {
            return Err(ScramError::Malformed("expected attribute \"n\""));
        }
        let (r, _extensions) = split_attr(rest.ok_or(ScramError::Malformed("missing nonce"))?);
        let client_nonce = r
            .strip_prefix(b"r=")
            .ok_or(ScramError::Malformed("expected attribute \"r\""))?;
        if client_nonce.is_empty() || !client_nonce.iter().all(|b| is_nonce_char(*b)) {
            return Err(ScramError::Malformed("invalid nonce"));
        }

        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(self.server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                STANDARD.encode(&self.secret.salt),
                self.secret.iterations
            )
            .as_bytes(),
        );
        self.state = ServerState::AwaitFinal {
            gs2_header,
            nonce,
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
        };
        Ok(ServerStep::Continue(server_first))
    }

    fn client_final(
        &mut self,
        data: &[u8],
        gs2_header: &[u8],
        nonce: &[u8],
        client_first_bare: &[u8],
        server_first: &[u8],
    ) -> Result<ServerStep, ScramError> {
        let (c, rest) = split_attr(data);
        let cbind = c
            .strip_prefix(b"c=")
            .ok_or(ScramError::Malformed("expected attribute \"c\""))?;
        let cbind = STANDARD
            .decode(cbind)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if cbind != gs2_header {
            return Err(ScramError::Malformed(
                "channel binding data does not match the gs2 header",
            ));
        }
        let (r, mut rest) = split_attr(rest.ok_or(ScramError::Malformed("missing nonce"))?);
        if r.strip_prefix(b"r=") != Some(nonce) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        // Extensions, then the proof, which must come last.
        let proof = loop {
            let (attr, next) = split_attr(rest.ok_or(ScramError::Malformed("missing proof"))?);
            if let Some(p) = attr.strip_prefix(b"p=") {
                if next.is_some() {
                    return Err(ScramError::Malformed("garbage after the proof"));
                }
                break p;
            }
            rest = next;
        };
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("malformed proof"))?;
        let without_proof = &data[..data.len() - proof_len(data)];

        let auth_message = auth_message(client_first_bare, server_first, without_proof);
        let signature = hmac(&self.secret.stored_key, &auth_message);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let matches = constant_time_eq(&sha256(&client_key), &self.secret.stored_key);
        if !(matches && self.real) {
            return Err(ScramError::BadProof);
        }
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(
            STANDARD
                .encode(hmac(&self.secret.server_key, &auth_message))
                .as_bytes(),
        );
        Ok(ServerStep::Done {
            server_final,
            keys: ScramKeys {
                iterations: self.secret.iterations,
                salt: self.secret.salt.clone(),
                client_key,
                server_key: self.secret.server_key,
            },
        })
    }
}

/// Length of the trailing `,p=…` of a client-final message whose last
/// attribute is known to be the proof.
fn proof_len(data: &[u8]) -> usize {
    data.iter()
        .rposition(|b| *b == b',')
        .map_or(data.len(), |i| data.len() - i)
}

fn auth_message(client_first_bare: &[u8], server_first: &[u8], client_final: &[u8]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(client_first_bare.len() + server_first.len() + client_final.len() + 2);
    m.extend_from_slice(client_first_bare);
    m.push(b',');
    m.extend_from_slice(server_first);
    m.push(b',');
    m.extend_from_slice(client_final);
    m
}

/// Splits at the first `,`: (attribute, rest after the comma if any).
fn split_attr(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|b| *b == b',') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E.
fn is_nonce_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// Why logging in to a server with [`ScramKeys`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("malformed SCRAM message from the server ({0})")]
    Malformed(&'static str),
    #[error(
        "the server's SCRAM secret has a different salt or iteration count than pgsluice's, so the client's key cannot be passed through; give this user a server_password"
    )]
    OtherSecret,
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    #[error("SCRAM exchange out of order")]
    OutOfOrder,
}

/// A client-first message without channel binding or user name (PostgreSQL
/// takes the user from the startup message), with `nonce`.
pub fn client_first(nonce: &str) -> Vec<u8> {
    format!("n,,n=,r={nonce}").into_bytes()
}

/// A server-first message: the combined nonce, the salt and the
/// iteration count of the server's secret.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    pub nonce: &'a [u8],
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl<'a> ServerFirst<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ClientError> {
        let (r, rest) = split_attr(data);
        let nonce = r
            .strip_prefix(b"r=")
            .ok_or(ClientError::Malformed("nonce"))?;
        let (s, rest) = split_attr(rest.ok_or(ClientError::Malformed("salt"))?);
        let salt = s
            .strip_prefix(b"s=")
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(ClientError::Malformed("salt"))?;
        let (i, _) = split_attr(rest.ok_or(ClientError::Malformed("iterations"))?);
        let iterations: u32 = i
            .strip_prefix(b"i=")
            .and_then(|i| std::str::from_utf8(i).ok())
            .and_then(|i| i.parse().ok())
            .filter(|i| *i > 0)
            .ok_or(ClientError::Malformed("iterations"))?;
        Ok(Self {
            nonce,
            salt,
            iterations,
        })
    }
}

#[derive(Debug)]
enum ClientState {
    AwaitServerFirst,
    AwaitServerFinal { auth_message: Vec<u8> },
    Finished,
}

/// pgsluice logging in to PostgreSQL with SCRAM keys: a client's, passed
/// through, or derived from a password once per server secret (see
/// `backend::login::Credentials`).
#[derive(Debug)]
pub struct ScramClient {
    keys: ScramKeys,
    nonce: String,
    state: ClientState,
}

impl ScramClient {
    /// `nonce`: printable ASCII without `,`.
    pub fn new(keys: ScramKeys, nonce: String) -> Self {
        Self {
            keys,
            nonce,
            state: ClientState::AwaitServerFirst,
        }
    }

    /// The client-first message (for SASLInitialResponse).
    pub fn client_first(&self) -> Vec<u8> {
        client_first(&self.nonce)
    }

    /// Reads server-first; returns client-final.
    pub fn on_server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        if !matches!(self.state, ClientState::AwaitServerFirst) {
            return Err(ClientError::OutOfOrder);
        }
        self.state = ClientState::Finished;
        let first = ServerFirst::parse(data)?;
        let nonce = Some(first.nonce)
            .filter(|n| n.starts_with(self.nonce.as_bytes()) && n.len() > self.nonce.len())
            .ok_or(ClientError::Malformed("nonce"))?;
        if first.salt != self.keys.salt || first.iterations != self.keys.iterations {
            return Err(ClientError::OtherSecret);
        }
        let mut without_proof = b"c=biws,r=".to_vec();
        without_proof.extend_from_slice(nonce);
        let client_first_bare = format!("n=,r={}", self.nonce);
        let auth_message = auth_message(client_first_bare.as_bytes(), data, &without_proof);
        let signature = hmac(&sha256(&self.keys.client_key), &auth_message);
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        let mut out = without_proof;
        out.extend_from_slice(b",p=");
        out.extend_from_slice(STANDARD.encode(proof).as_bytes());
        self.state = ClientState::AwaitServerFinal { auth_message };
        Ok(out)
    }

    /// Checks the server's signature.
    pub fn on_server_final(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let ClientState::AwaitServerFinal { auth_message } =
            std::mem::replace(&mut self.state, ClientState::Finished)
        else {
            return Err(ClientError::OutOfOrder);
        };
        let (v, _) = split_attr(data);
        let verifier = v
            .strip_prefix(b"v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or(ClientError::Malformed("server-final-message"))?;
        if !constant_time_eq(&verifier, &hmac(&self.keys.server_key, &auth_message)) {
            return Err(ClientError::BadServerSignature);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Password "pencil" with the salt and iterations of RFC 7677 §3.
    fn rfc_secret() -> ScramSecret {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramSecret::derive(b"pencil", &salt, 4096)
    }

    /// The RFC 7677 §3 exchange, replayed byte for byte with its nonces.
    #[test]
    fn recorded_rfc7677_exchange() {
        let mut s = ScramServer::new(rfc_secret(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        // The RFC's client sends its user name; PostgreSQL (and we) ignore it.
        let step = s.on_message(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(
            step,
            ServerStep::Continue(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
                    .to_vec()
            )
        );
        let step = s.on_message(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        let ServerStep::Done { server_final, keys } = step else {
            panic!("rejected the RFC's proof: {step:?}")
        };
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()
        );
        assert_eq!(
            keys.client_key,
            ScramKeys::derive(b"pencil", &keys.salt, 4096).client_key
        );
    }

    fn client_final_with(
        proof_of: &[u8],
        first: &str,
        server_first: &[u8],
        cbind: &str,
    ) -> Vec<u8> {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let nonce = &server_first[2..server_first.find(",s=").unwrap()];
        let salt = STANDARD
            .decode(
                &server_first
                    [server_first.find(",s=").unwrap() + 3..server_first.find(",i=").unwrap()],
            )
            .unwrap();
        let keys = ScramKeys::derive(proof_of, &salt, 4096);
        let without = format!("c={cbind},r={nonce}");
        let bare = &first[first.find("n=").unwrap()..];
        let am = auth_message(bare.as_bytes(), server_first.as_bytes(), without.as_bytes());
        let sig = hmac(&sha256(&keys.client_key), &am);
        let mut p = keys.client_key;
        for (a, b) in p.iter_mut().zip(sig) {
            *a ^= b;
        }
        format!("{without},p={}", STANDARD.encode(p)).into_bytes()
    }

    #[test]
    fn wrong_password_and_fake_exchange_fail_alike() {
        let first = "n,,n=,r=abc";
        let mut s = ScramServer::new(rfc_secret(), "XYZ".into());
        let ServerStep::Continue(sf) = s.on_message(first.as_bytes()) else {
            panic!()
        };
        assert_eq!(
            s.on_message(&client_final_with(b"pen", first, &sf, "biws")),
            ServerStep::Failed(ScramError::BadProof)
        );
        let salt = rfc_secret().salt;
        let mut f = ScramServer::fake(salt.clone(), 4096, "XYZ".into());
        let ServerStep::Continue(sf2) = f.on_message(first.as_bytes()) else {
            panic!()
        };
        assert_eq!(sf, sf2, "a fake server-first must look like a real one");
        assert_eq!(
            f.on_message(&client_final_with(b"pencil", first, &sf2, "biws")),
            ServerStep::Failed(ScramError::BadProof)
        );
    }

    #[test]
    fn y_flag_accepted_p_refused_and_cbind_checked() {
        let first = "y,,n=,r=abc";
        let mut s = ScramServer::new(rfc_secret(), "XYZ".into());
        let ServerStep::Continue(sf) = s.on_message(first.as_bytes()) else {
            panic!()
        };
        // c= must echo "y,," (eSws), not "n,," (biws).
        let mut s2 = ScramServer::new(rfc_secret(), "XYZ".into());
        s2.on_message(first.as_bytes());
        assert!(matches!(
            s2.on_message(&client_final_with(b"pencil", first, &sf, "biws")),
            ServerStep::Failed(ScramError::Malformed(_))
        ));
        assert!(matches!(
            s.on_message(&client_final_with(b"pencil", first, &sf, "eSws")),
            ServerStep::Done { .. }
        ));
        let mut p = ScramServer::new(rfc_secret(), "XYZ".into());
        assert!(matches!(
            p.on_message(b"p=tls-server-end-point,,n=,r=abc"),
            ServerStep::Failed(ScramError::Unsupported(_))
        ));
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            &b""[..],
            b"n",
            b"n,",
            b"n,,",
            b"n,a=me,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=a\x01b",
            b"x,,n=,r=abc",
        ] {
            let mut s = ScramServer::new(rfc_secret(), "XYZ".into());
            assert!(
                matches!(s.on_message(bad), ServerStep::Failed(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut s = ScramServer::new(rfc_secret(), "XYZ".into());
        s.on_message(b"n,,n=,r=abc");
        assert!(matches!(
            s.on_message(b"c=biws,r=abcXYW,p=AAAA"),
            ServerStep::Failed(ScramError::Malformed("nonce does not match"))
        ));
        assert!(matches!(s.on_message(b"again"), ServerStep::Failed(_)));
    }

    /// pgsluice's client talking to pgsluice's server: pass-through works
    /// with the recovered keys, and only against the same secret.
    #[test]
    fn client_with_recovered_keys_logs_in() {
        let keys = ScramKeys::derive(b"pencil", &rfc_secret().salt, 4096);
        let mut c = ScramClient::new(keys.clone(), "clientnonce".into());
        let mut s = ScramServer::new(rfc_secret(), "servernonce".into());
        let ServerStep::Continue(sf) = s.on_message(&c.client_first()) else {
            panic!()
        };
        let cf = c.on_server_first(&sf).unwrap();
        let ServerStep::Done { server_final, .. } = s.on_message(&cf) else {
            panic!()
        };
        c.on_server_final(&server_final).unwrap();

        let other = ScramSecret::derive(b"pencil", b"othersalt", 4096);
        let mut c = ScramClient::new(keys, "clientnonce".into());
        let mut s = ScramServer::new(other, "servernonce".into());
        let ServerStep::Continue(sf) = s.on_message(&c.client_first()) else {
            panic!()
        };
        assert_eq!(c.on_server_first(&sf), Err(ClientError::OtherSecret));
    }

    #[test]
    fn postgres_protocol_client_logs_in() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let salt = b"0123456789abcdef".to_vec();
        let secret = ScramSecret::derive(b"pw", &salt, 4096);
        for (pw, ok) in [(&b"pw"[..], true), (b"px", false)] {
            let mut c = ScramSha256::new(pw, ChannelBinding::unsupported());
            let mut s = ScramServer::new(secret.clone(), "srv".into());
            let ServerStep::Continue(sf) = s.on_message(c.message()) else {
                panic!()
            };
            c.update(&sf).unwrap();
            match s.on_message(c.message()) {
                ServerStep::Done { server_final, .. } if ok => c.finish(&server_final).unwrap(),
                ServerStep::Failed(ScramError::BadProof) if !ok => {}
                other => panic!("{other:?}"),
            }
        }
    }
}
