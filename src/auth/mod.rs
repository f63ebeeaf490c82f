//! Bearer-token authentication: HS256 JWTs with `sub`, `role` and `exp`
//! signed with `PODIUM_JWT_SECRET`, and, when one is configured, an identity
//! provider's RS256, ES256 and EdDSA tokens ([`idp`]).

pub mod idp;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use podium_domain::UserId;
use serde::{Deserialize, Serialize};

/// Shortest secret we accept: HS256 is only as strong as its key.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    exp: u64,
}

/// Who is calling, as proven by a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Why a token was refused; each becomes a 401 with this text as detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the Authorization header is missing; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// Signed with a key the identity provider's key set lacks (after a
    /// refetch, when one was allowed).
    #[error("the token is signed with key {0:?}, which the identity provider does not list")]
    UnknownKey(String),
}

/// Why jsonwebtoken refused a token.
fn refusal(err: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
        ErrorKind::ImmatureSignature => {
            AuthError::Invalid("the token is not valid yet (nbf)".into())
        }
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)".into()),
        _ => AuthError::Invalid(err.to_string()),
    }
}

/// Signs and checks tokens with one secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// The identity provider whose tokens are accepted too, if any.
    provider: Option<Arc<idp::IdentityProvider>>,
}

impl JwtKeys {
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_LEN,
            "PODIUM_JWT_SECRET must be at least {MIN_SECRET_LEN} bytes long"
        );
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token is refused before its `nbf` as after its `exp`.
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            provider: None,
        })
    }

    /// Accepts `provider`'s tokens besides HS256 ones.
    pub fn with_provider(mut self, provider: Arc<idp::IdentityProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// A token for `user_id` with `role`, valid for `ttl`.
    pub fn issue(&self, user_id: &UserId, role: Role, ttl: Duration) -> String {
        let exp = (SystemTime::now() + ttl)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: user_id.to_string(),
            role,
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }

    /// Checks a raw token with the keys at hand: HS256 against the secret,
    /// others against the identity provider's keys as last fetched.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(refusal)?;
        if header.alg != Algorithm::HS256 {
            return match &self.provider {
                Some(provider) => provider.verify(&header, token),
                None => Err(AuthError::Invalid(format!(
                    "{:?} tokens need an identity provider (PODIUM_JWKS_URL); this server takes HS256",
                    header.alg
                ))),
            };
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(refusal)?;
        let user_id = UserId::parse(data.claims.sub)
            .map_err(|err| AuthError::Invalid(format!("sub: {err}")))?;
        Ok(Principal {
            user_id,
            role: data.claims.role,
        })
    }

    /// [`Self::verify`], fetching the identity provider's keys again first
    /// when the token names a key not among them (at most once per the
    /// provider's minimum interval).
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        match (self.verify(token), &self.provider) {
            (Err(AuthError::UnknownKey(_)), Some(provider)) if provider.refresh().await => {
                self.verify(token)
            }
            (result, _) => result,
        }
    }

    /// [`Self::authenticate`] for an `Authorization` header.
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        self.authenticate(bearer(header)?).await
    }

    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        self.verify(bearer(header)?)
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::NotBearer)?;
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_it_issued_verifies_to_the_same_principal() {
        let keys = JwtKeys::new(SECRET).unwrap();
        let alice = UserId::parse("alice").unwrap();
        let token = keys.issue(&alice, Role::Admin, Duration::from_secs(60));
        let principal = keys
            .verify_header(Some(&format!("Bearer {token}")))
            .unwrap();
        assert_eq!(principal.user_id, alice);
        assert!(principal.is_admin());
    }

    #[test]
    fn another_secret_or_garbage_is_refused() {
        let keys = JwtKeys::new(SECRET).unwrap();
        let other = JwtKeys::new(&SECRET.replace('0', "x")).unwrap();
        let token = other.issue(
            &UserId::parse("a").unwrap(),
            Role::User,
            Duration::from_secs(60),
        );
        assert!(matches!(keys.verify(&token), Err(AuthError::Invalid(_))));
        assert!(matches!(keys.verify("abc"), Err(AuthError::Invalid(_))));
        assert_eq!(keys.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            keys.verify_header(Some("Basic x")),
            Err(AuthError::NotBearer)
        );
    }

    #[test]
    fn a_token_is_refused_before_its_not_before_time() {
        let keys = JwtKeys::new(SECRET).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |nbf: u64| {
            let claims = serde_json::json!({
                "sub": "alice", "role": "user", "exp": now + 3600, "nbf": nbf,
            });
            jsonwebtoken::encode(&Header::default(), &claims, &keys.encoding).unwrap()
        };
        assert!(
            keys.verify(&token(now + 600)).is_err(),
            "valid in ten minutes"
        );
        assert!(keys.verify(&token(now - 1)).is_ok());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(JwtKeys::new("short").is_err());
    }
}
