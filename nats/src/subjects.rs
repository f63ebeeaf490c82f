//! Subject and stream names under one prefix (default `podium`).
//!
//! - `<prefix>.events.<aggregate>.<event>`: the log, in stream `<PREFIX>_EVENTS`.
//! - `<prefix>.dlq.<projection>`: dead letters, in stream `<PREFIX>_DLQ`.
//! - `<prefix>.changed.<topic>.<key>`: core NATS "changed" notifications.

/// The names used by one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` must be a valid subject token: letters, digits, `-` and `_`.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let valid = !prefix.is_empty()
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!(
                "NATS prefix {prefix:?} must be letters, digits, '-' or '_'"
            ));
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn stream_name(&self, suffix: &str) -> String {
        format!(
            "{}_{suffix}",
            self.prefix.to_ascii_uppercase().replace('-', "_")
        )
    }

    pub fn events_stream(&self) -> String {
        self.stream_name("EVENTS")
    }

    pub fn dead_letter_stream(&self) -> String {
        self.stream_name("DLQ")
    }

    /// Every event subject: the one filter all projections consume with.
    pub fn all_events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// The aggregate and event types an event subject names (as tokens:
    /// Podium's own types are unchanged by [`token`]); `None` for any other
    /// subject.
    pub fn event_kind<'s>(&self, subject: &'s str) -> Option<(&'s str, &'s str)> {
        let kind = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".events.")?;
        kind.split_once('.')
            .filter(|(aggregate, event)| !aggregate.is_empty() && !event.contains('.'))
    }

    pub fn event(&self, aggregate_type: &str, event_type: &str) -> String {
        format!(
            "{}.events.{}.{}",
            self.prefix,
            token(aggregate_type),
            token(event_type)
        )
    }

    pub fn all_dead_letters(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    pub fn dead_letter(&self, projection: &str) -> String {
        format!("{}.dlq.{}", self.prefix, token(projection))
    }

    /// `<prefix>.changed.<topic>.<key>`, e.g. `podium.changed.leaderboard.<test id>`.
    pub fn changed(&self, topic: &str, key: &str) -> String {
        format!("{}.changed.{}.{}", self.prefix, token(topic), token(key))
    }

    /// Every change notification.
    pub fn every_change(&self) -> String {
        format!("{}.changed.>", self.prefix)
    }

    /// Every change notification of `topic`.
    pub fn all_changed(&self, topic: &str) -> String {
        format!("{}.changed.{}.>", self.prefix, token(topic))
    }
}

/// Makes a string safe as one subject token: `.`, `*`, `>` and whitespace
/// would split or widen the subject, so they become `_`.
fn token(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_names_under_the_prefix() {
        let s = Subjects::new("t-1").unwrap();
        assert_eq!(s.events_stream(), "T_1_EVENTS");
        assert_eq!(
            s.event("Attempt", "AttemptSubmitted"),
            "t-1.events.Attempt.AttemptSubmitted"
        );
        assert_eq!(
            s.changed("feed", "alice@x.org"),
            "t-1.changed.feed.alice@x_org"
        );
        assert_eq!(s.dead_letter("leaderboard"), "t-1.dlq.leaderboard");
    }

    #[test]
    fn an_event_subject_names_its_kind() {
        let s = Subjects::new("t-1").unwrap();
        let subject = s.event("Attempt", "AttemptSubmitted");
        assert_eq!(
            s.event_kind(&subject),
            Some(("Attempt", "AttemptSubmitted"))
        );
        for other in [
            "t-1.events.Attempt",
            "t-1.events..AttemptSubmitted",
            "t-1.events.Attempt.AttemptSubmitted.more",
            "t-2.events.Attempt.AttemptSubmitted",
            "t-1.changed.leaderboard.x",
            "t-10.events.Attempt.AttemptSubmitted",
        ] {
            assert_eq!(s.event_kind(other), None, "{other}");
        }
    }

    #[test]
    fn refuses_prefixes_that_are_not_one_token() {
        assert!(Subjects::new("a.b").is_err());
        assert!(Subjects::new("").is_err());
        assert!(Subjects::new("a>").is_err());
    }
}
