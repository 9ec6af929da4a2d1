//! API-key checks as extractors: a handler that takes [`ApiKey`] or [`AdminKey`] runs only for
//! a request with the right `Authorization: Bearer <key>` header.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;

/// Proof that the request carries one of the configured API keys, or that none is configured.
pub struct ApiKey;

/// Proof that the request carries the admin key.
pub struct AdminKey;

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// Compares in time independent of where the first difference is, so response timing does not
/// reveal a key's prefix.
fn keys_equal(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut difference = a.len() ^ b.len();
    for (i, &byte) in b.iter().enumerate() {
        difference |= usize::from(byte ^ a.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let keys = &state.config.api_keys;
        if keys.is_empty() {
            return Ok(Self);
        }
        match bearer(parts) {
            Some(given) if keys.iter().any(|k| keys_equal(given, k)) => Ok(Self),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &state.config.admin_key else {
            return Err(ApiError::Forbidden {
                message: "admin routes are disabled: start the server with `--admin-key` (or `LLMDOCTOR_ADMIN_KEY`) to enable them".into(),
            });
        };
        match bearer(parts) {
            Some(given) if keys_equal(given, expected) => Ok(Self),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keys_equal;

    #[test]
    fn keys_equal_only_on_exact_match() {
        assert!(keys_equal("secret", "secret"));
        assert!(!keys_equal("secre", "secret"));
        assert!(!keys_equal("secrets", "secret"));
        assert!(!keys_equal("", "secret"));
    }
}
