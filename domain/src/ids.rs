//! Identifier newtypes whose constructors check their values.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An opaque user id: 1–128 characters of `A-Za-z0-9_.:@-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// Why a string is not a [`UserId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("user id must be 1 to 128 characters long")]
    Length,
    #[error("user id may only contain A-Z, a-z, 0-9 and _ . : @ -")]
    Charset,
}

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: impl Into<String>) -> Result<Self, UserIdError> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(UserIdError::Length);
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.:@-".contains(c);
        if !raw.chars().all(allowed) {
            return Err(UserIdError::Charset);
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<UserId> for String {
    fn from(value: UserId) -> Self {
        value.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(UserId::parse("alice.b-c_d:e@f9").is_ok());
        assert!(UserId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Length));
        assert_eq!(UserId::parse("x".repeat(129)), Err(UserIdError::Length));
        assert_eq!(UserId::parse("a b"), Err(UserIdError::Charset));
        assert_eq!(UserId::parse("é"), Err(UserIdError::Charset));
        assert!(serde_json::from_str::<UserId>("\"a/b\"").is_err());
    }
}
