//! Tokens from an external identity provider: RS256, ES256 and EdDSA JWTs
//! checked against the provider's JSON Web Key Set.
//!
//! The key set comes from `PODIUM_JWKS_URL`, or from the `jwks_uri` that
//! `PODIUM_OIDC_ISSUER/.well-known/openid-configuration` names. It is fetched
//! at start and again when a token names a key (`kid`) the set lacks, at most
//! once per `PODIUM_JWKS_MIN_REFETCH_MS` (10 s), so a flood of made-up kids
//! cannot make Podium hammer the provider. A fetch that fails keeps the last
//! good set: known keys verify through an outage of the provider, unknown
//! ones are refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use podium_domain::UserId;
use serde_json::{Map, Value};

use super::{AuthError, Principal, Role};

/// Where the provider is and what its tokens must say.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub source: KeySource,
    /// The `iss` its tokens must carry, if set (an OIDC issuer's own by
    /// default).
    pub issuer: Option<String>,
    /// The `aud` its tokens must carry, if set.
    pub audience: Option<String>,
    /// The claim that says `admin`: a string, or an array holding it; a
    /// dotted path reaches into objects (`realm_access.roles`).
    pub role_claim: String,
    /// The shortest time between two fetches of the key set.
    pub min_refetch: Duration,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    /// The JWKS document itself.
    Jwks(String),
    /// An OIDC issuer, whose discovery document names the JWKS.
    Oidc(String),
}

/// One verifying key of the set.
struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The provider's keys, as last fetched.
pub struct IdentityProvider {
    settings: ProviderSettings,
    client: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, Key>>>,
    /// When the key set was last asked for (whatever came of it).
    fetched: tokio::sync::Mutex<Option<Instant>>,
}

/// How long one fetch of the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl IdentityProvider {
    /// A provider with no keys yet; [`Self::refresh`] fetches them.
    pub fn new(settings: ProviderSettings) -> Self {
        Self {
            settings,
            client: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .expect("an HTTP client with a timeout builds"),
            keys: RwLock::new(Arc::default()),
            fetched: tokio::sync::Mutex::new(None),
        }
    }

    /// Fetches the key set unless one was fetched less than the minimum
    /// interval ago; true if a fetch was made and succeeded. A failed fetch
    /// keeps the keys there were.
    pub async fn refresh(&self) -> bool {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < self.settings.min_refetch) {
            return false;
        }
        *fetched = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched the identity provider's keys");
                *self.keys.write().unwrap() = Arc::new(keys);
                true
            }
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "cannot fetch the identity provider's keys; keeping the last ones"
                );
                false
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, Key>> {
        let url = match &self.settings.source {
            KeySource::Jwks(url) => url.clone(),
            KeySource::Oidc(issuer) => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let document: Value = self
                    .client
                    .get(&discovery)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                document["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("{discovery} names no jwks_uri"))?
                    .to_string()
            }
        };
        let set: JwkSet = self
            .client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let Some(algorithm) = algorithm_of(jwk) else {
                tracing::warn!(kid, "skipping a key of an algorithm Podium does not take");
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid, Key { algorithm, key });
                }
                Err(err) => tracing::warn!(kid, %err, "skipping a malformed key"),
            }
        }
        Ok(keys)
    }

    /// Checks a token signed with one of the provider's keys. A key the
    /// set lacks is [`AuthError::UnknownKey`]: worth a [`Self::refresh`].
    pub fn verify(&self, header: &Header, token: &str) -> Result<Principal, AuthError> {
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| AuthError::Invalid("the token names no key (kid)".into()))?;
        let keys = self.keys.read().unwrap().clone();
        let key = keys
            .get(kid)
            .ok_or_else(|| AuthError::UnknownKey(kid.to_string()))?;
        if key.algorithm != header.alg {
            return Err(AuthError::Invalid(format!(
                "key {kid} is for {:?}, the token says {:?}",
                key.algorithm, header.alg
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        let mut required = vec!["exp", "sub"];
        required.extend(self.settings.issuer.as_ref().map(|_| "iss"));
        required.extend(self.settings.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 30;
        match &self.settings.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(super::refusal)?;
        // `nbf` is checked with the leeway above; a token from the future
        // beyond it is refused there. Belt and braces for `iat` too far ahead.
        if let Some(iat) = data.claims.get("iat").and_then(Value::as_u64) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if iat > now + validation.leeway {
                return Err(AuthError::Invalid(
                    "the token was issued in the future".into(),
                ));
            }
        }
        let sub = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let user_id =
            UserId::parse(sub).map_err(|err| AuthError::Invalid(format!("sub: {err}")))?;
        let role = if claims_admin(&data.claims, &self.settings.role_claim) {
            Role::Admin
        } else {
            Role::User
        };
        Ok(Principal { user_id, role })
    }
}

/// Which algorithm a key verifies: its `alg` when it says, else what its
/// type implies; `None` for what Podium does not take (HS*, RSA-PSS, other
/// curves).
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => Some(implied),
        Some(_) => None,
    }
}

/// Whether the claim at `path` (dotted) says `admin`: the string itself, or
/// an array holding it.
fn claims_admin(claims: &Map<String, Value>, path: &str) -> bool {
    let mut parts = path.split('.');
    let first = parts.next().unwrap_or_default();
    let mut value = claims.get(first);
    for part in parts {
        value = value.and_then(|v| v.get(part));
    }
    match value {
        Some(Value::String(role)) => role == "admin",
        Some(Value::Array(roles)) => roles.iter().any(|r| r == "admin"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_role_claim_is_found_by_its_path_as_a_string_or_in_an_array() {
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert!(claims_admin(&claims(json!({"role": "admin"})), "role"));
        assert!(!claims_admin(&claims(json!({"role": "user"})), "role"));
        assert!(!claims_admin(&claims(json!({})), "role"));
        assert!(claims_admin(
            &claims(json!({"realm_access": {"roles": ["x", "admin"]}})),
            "realm_access.roles"
        ));
        assert!(!claims_admin(
            &claims(json!({"realm_access": {"roles": ["x"]}})),
            "realm_access.roles"
        ));
        assert!(claims_admin(
            &claims(json!({"groups": ["admin"]})),
            "groups"
        ));
    }
}
