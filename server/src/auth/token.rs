//! Token providers (etcd's `--auth-token`): what `Authenticate` hands out and how later
//! requests' tokens are turned back into user names.
//!
//! - [`SimpleTokens`] (`simple`, the default): etcd's format, 16 random letters, a dot and an
//!   index. They live in this member's memory only, with a TTL (`--auth-token-ttl`) renewed
//!   on every use: a client must send them to the member that issued them, and they are gone
//!   after a restart (etcd replicates the token through Raft instead; see
//!   docs/COMPATIBILITY.md). Deleting a user or changing its password, and disabling auth,
//!   revoke them.
//! - [`JwtTokens`] (`jwt,pub-key=...,priv-key=...,sign-method=RS256,ttl=5m`): signed tokens
//!   with etcd's claims (`username`, `revision`, `exp`), verifiable on every member holding
//!   the public key; they cannot be revoked before they expire (as in etcd).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{AuthError, Result};

/// Issues and checks tokens.
pub trait TokenProvider: Send + Sync {
    /// A new token for `user`; `revision` is the auth revision and `index` this member's
    /// applied Raft index when it was issued.
    ///
    /// Errors: `Internal` if the provider cannot sign (a JWT provider without a private key).
    fn assign(&self, user: &str, revision: u64, index: u64) -> Result<String>;
    /// The user a token stands for. Errors: `InvalidAuthToken` for an unknown, expired or
    /// forged token.
    fn user_of(&self, token: &str) -> Result<String>;
    /// Revokes every token of `user` (where the provider can).
    fn invalidate_user(&self, user: &str);
    /// Revokes every token (auth was disabled).
    fn invalidate_all(&self);
}

/// Builds the provider `--auth-token` names; `simple_ttl` is `--auth-token-ttl`.
///
/// Errors: `Config` for an unknown provider, option or signing method, or an unreadable key.
pub fn from_flag(spec: &str, simple_ttl: Duration) -> Result<Box<dyn TokenProvider>> {
    let mut parts = spec.split(',');
    match parts.next().unwrap_or_default() {
        "simple" | "" => Ok(Box::new(SimpleTokens::new(simple_ttl))),
        "jwt" => {
            let mut opts = HashMap::new();
            for p in parts {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| AuthError::Config(format!("option {p:?} is not key=value")))?;
                opts.insert(k.to_string(), v.to_string());
            }
            Ok(Box::new(JwtTokens::from_options(&opts)?))
        }
        other => Err(AuthError::Config(format!(
            "unknown token provider {other:?} (simple or jwt)"
        ))),
    }
}

/// etcd's simple tokens (see the module docs).
pub struct SimpleTokens {
    ttl: Duration,
    /// token → (user, expiry). Expired entries are dropped when met and on every assign.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// etcd's default `--auth-token-ttl`.
pub const DEFAULT_SIMPLE_TTL: Duration = Duration::from_secs(300);

/// Letters of a simple token (etcd: 16 of `[a-zA-Z]`).
const SIMPLE_TOKEN_LETTERS: usize = 16;

impl SimpleTokens {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // A panic while holding the map leaves it consistent (single inserts and removes).
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TokenProvider for SimpleTokens {
    fn assign(&self, user: &str, _revision: u64, index: u64) -> Result<String> {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut rng = rand::thread_rng();
        let prefix: String = (0..SIMPLE_TOKEN_LETTERS)
            .map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char)
            .collect();
        let token = format!("{prefix}.{index}");
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, (_, expiry)| *expiry > now);
        map.insert(token.clone(), (user.to_string(), now + self.ttl));
        Ok(token)
    }

    fn user_of(&self, token: &str) -> Result<String> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(token) {
            Some((user, expiry)) if *expiry > now => {
                *expiry = now + self.ttl;
                Ok(user.clone())
            }
            Some(_) => {
                map.remove(token);
                Err(AuthError::InvalidAuthToken)
            }
            None => Err(AuthError::InvalidAuthToken),
        }
    }

    fn invalidate_user(&self, user: &str) {
        self.lock().retain(|_, (u, _)| u != user);
    }

    fn invalidate_all(&self) {
        self.lock().clear();
    }
}

/// etcd's JWT claims.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// JWT tokens (see the module docs).
pub struct JwtTokens {
    algorithm: Algorithm,
    /// `None`: verify only (etcd allows a member without the private key).
    sign: Option<EncodingKey>,
    verify: DecodingKey,
    ttl: Duration,
}

/// etcd's default JWT lifetime.
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

impl JwtTokens {
    /// From `--auth-token jwt,...` options: `sign-method` (RS256/384/512, PS256/384/512,
    /// ES256/384), `pub-key`, `priv-key` (PEM files), `ttl` (a duration, default 5m).
    pub fn from_options(opts: &HashMap<String, String>) -> Result<Self> {
        for k in opts.keys() {
            if !["sign-method", "pub-key", "priv-key", "ttl"].contains(&k.as_str()) {
                return Err(AuthError::Config(format!("unknown jwt option {k:?}")));
            }
        }
        let method = opts
            .get("sign-method")
            .ok_or_else(|| AuthError::Config("jwt needs sign-method".into()))?;
        let algorithm: Algorithm = method
            .parse()
            .map_err(|_| AuthError::Config(format!("unknown sign-method {method:?}")))?;
        let family = match algorithm {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Family::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
            _ => {
                return Err(AuthError::Config(format!(
                    "sign-method {method} is not supported (RS*, PS*, ES256, ES384)"
                )))
            }
        };
        let read = |key: &str| -> Result<Vec<u8>> {
            let path = opts
                .get(key)
                .ok_or_else(|| AuthError::Config(format!("jwt needs {key}")))?;
            std::fs::read(Path::new(path))
                .map_err(|e| AuthError::Config(format!("{key} {path}: {e}")))
        };
        let bad =
            |key: &str, e: jsonwebtoken::errors::Error| AuthError::Config(format!("{key}: {e}"));
        let public = read("pub-key")?;
        let verify = match family {
            Family::Rsa => DecodingKey::from_rsa_pem(&public),
            Family::Ec => DecodingKey::from_ec_pem(&public),
        }
        .map_err(|e| bad("pub-key", e))?;
        let sign = if opts.contains_key("priv-key") {
            let private = read("priv-key")?;
            Some(
                match family {
                    Family::Rsa => EncodingKey::from_rsa_pem(&private),
                    Family::Ec => EncodingKey::from_ec_pem(&private),
                }
                .map_err(|e| bad("priv-key", e))?,
            )
        } else {
            None
        };
        let ttl = match opts.get("ttl") {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| AuthError::Config(format!("ttl {t:?}: {e}")))?,
            None => DEFAULT_JWT_TTL,
        };
        Ok(Self {
            algorithm,
            sign,
            verify,
            ttl,
        })
    }
}

enum Family {
    Rsa,
    Ec,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenProvider for JwtTokens {
    fn assign(&self, user: &str, revision: u64, _index: u64) -> Result<String> {
        let key = self
            .sign
            .as_ref()
            .ok_or_else(|| AuthError::Internal("no jwt private key (priv-key) to sign".into()))?;
        let claims = Claims {
            username: user.to_string(),
            revision,
            exp: unix_now() + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| AuthError::Internal(format!("signing a token: {e}")))
    }

    fn user_of(&self, token: &str) -> Result<String> {
        let mut v = Validation::new(self.algorithm);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<Claims>(token, &self.verify, &v)
            .map(|d| d.claims.username)
            .map_err(|_| AuthError::InvalidAuthToken)
    }

    fn invalidate_user(&self, _user: &str) {}

    fn invalidate_all(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_have_etcds_format_expire_and_are_revoked() {
        let t = SimpleTokens::new(Duration::from_millis(200));
        let a = t.assign("alice", 1, 42).expect("assign");
        let (letters, index) = a.split_once('.').expect("a dot");
        assert_eq!(letters.len(), 16);
        assert!(letters.chars().all(|c| c.is_ascii_alphabetic()));
        assert_eq!(index, "42");
        assert_eq!(t.user_of(&a), Ok("alice".to_string()));
        assert_eq!(t.user_of("forged.42"), Err(AuthError::InvalidAuthToken));
        // Use renews the TTL.
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.user_of(&a).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.user_of(&a).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.user_of(&a), Err(AuthError::InvalidAuthToken));

        let b = t.assign("bob", 1, 43).expect("assign");
        let c = t.assign("carol", 1, 44).expect("assign");
        t.invalidate_user("bob");
        assert!(t.user_of(&b).is_err());
        assert!(t.user_of(&c).is_ok());
        t.invalidate_all();
        assert!(t.user_of(&c).is_err());
    }

    #[test]
    fn bad_specs_are_refused() {
        let ttl = Duration::from_secs(1);
        assert!(from_flag("simple", ttl).is_ok());
        assert!(matches!(from_flag("oauth", ttl), Err(AuthError::Config(_))));
        assert!(matches!(
            from_flag("jwt,sign-method=RS256", ttl),
            Err(AuthError::Config(_))
        ));
        assert!(matches!(
            from_flag("jwt,sign-method=HS256,pub-key=x", ttl),
            Err(AuthError::Config(_))
        ));
        assert!(matches!(
            from_flag("jwt,nonsense", ttl),
            Err(AuthError::Config(_))
        ));
    }
}

#[cfg(test)]
mod jwt_tests {
    use super::*;

    fn keys(dir: &Path) -> (String, String) {
        let pair = rcgen::KeyPair::generate().expect("key pair");
        let private = dir.join("priv.pem");
        let public = dir.join("pub.pem");
        std::fs::write(&private, pair.serialize_pem()).expect("write");
        std::fs::write(&public, pair.public_key_pem()).expect("write");
        (public.display().to_string(), private.display().to_string())
    }

    #[test]
    fn jwt_tokens_verify_expire_and_refuse_forgeries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (public, private) = keys(dir.path());
        let spec = format!("jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=1s");
        let t = from_flag(&spec, Duration::from_secs(300)).expect("provider");
        let token = t.assign("alice", 7, 1).expect("sign");
        assert_eq!(t.user_of(&token), Ok("alice".to_string()));

        // A member with the public key only verifies the same token.
        let verifier = from_flag(
            &format!("jwt,pub-key={public},sign-method=ES256"),
            Duration::from_secs(300),
        )
        .expect("verify-only provider");
        assert_eq!(verifier.user_of(&token), Ok("alice".to_string()));
        assert!(matches!(
            verifier.assign("alice", 7, 1),
            Err(AuthError::Internal(_))
        ));

        // Signed by another key, or with the claims changed: refused.
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_private) = keys(other.path());
        let forger = from_flag(
            &format!("jwt,pub-key={public},priv-key={other_private},sign-method=ES256"),
            Duration::from_secs(300),
        )
        .expect("provider");
        let forged = forger.assign("root", 7, 1).expect("sign");
        assert_eq!(t.user_of(&forged), Err(AuthError::InvalidAuthToken));
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] = forged.split('.').nth(1).expect("a payload").to_string();
        assert_eq!(
            t.user_of(&parts.join(".")),
            Err(AuthError::InvalidAuthToken)
        );

        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(t.user_of(&token), Err(AuthError::InvalidAuthToken));
    }
}
