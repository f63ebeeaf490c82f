//! The notification policy: a process manager that turns submissions into
//! notifications — `attempt_graded` for each, `personal_best` when a user
//! beats their best, `rank_overtaken` to those pushed down inside a test's
//! top 10. It issues `Notification` commands whose ids derive from the source
//! event, so a redelivered event creates nothing new.
//!
//! It keeps its own memory of bests (`policy_bests`) in its checkpointed
//! transaction, so its decisions follow the log alone.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use cqrs_es::{Aggregate, AggregateError};
use podium_domain::log::{Change, RecordedEvent};
use podium_domain::metadata::SYSTEM_ACTOR;
use podium_domain::notification::{
    Notification, NotificationCommand, NotificationContent, NotificationKind, NotificationMessage,
};
use podium_domain::{EventMetadata, UserId};
use podium_projections::ranking::{RankKey, Submission};
use podium_projections::{BoxError, ProjectionLogic};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::command::Aggregates;

pub const NAME: &str = "notification-policy";
/// How many places at the top of a test count for `rank_overtaken`.
pub const TOP: i64 = 10;
const NAMESPACE: Uuid = Uuid::from_u128(0x3b9e_11c4_27d5_4f08_a6e1_90c2_55d7_e1aa);

pub struct NotificationPolicy {
    aggregates: Arc<Aggregates>,
}

/// A notification the policy decided on, before it becomes a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub recipient: UserId,
    pub kind: NotificationKind,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
}

impl NotificationPolicy {
    pub fn new(aggregates: Arc<Aggregates>) -> Self {
        Self { aggregates }
    }
}

/// What `submission` notifies, given the bests in `memory` (which it
/// updates): the policy's decisions, pure but for the memory port.
pub async fn decide<M: PolicyMemory>(
    memory: &mut M,
    submission: &Submission,
) -> Result<Vec<Notice>, BoxError> {
    let Submission {
        test_id,
        ref user_id,
        attempt_id,
        score,
        max_score,
        correct,
        submitted_at,
    } = *submission;
    let link = Some(format!("/v1/attempts/{attempt_id}"));
    let recipient = UserId::parse(user_id.clone())?;
    let mut notices = vec![Notice {
        recipient: recipient.clone(),
        kind: NotificationKind::AttemptGraded,
        title: "Your attempt was graded".into(),
        body: format!("You scored {score} of {max_score} ({correct} correct)."),
        link: link.clone(),
    }];
    let previous = memory.best(test_id, user_id).await?;
    let improved = previous.is_none_or(|best| score > best);
    if !improved {
        return Ok(notices);
    }
    if let Some(best) = previous {
        notices.push(Notice {
            recipient,
            kind: NotificationKind::PersonalBest,
            title: "New personal best".into(),
            body: format!("You beat your best of {best} with {score} of {max_score}."),
            link: link.clone(),
        });
    }
    let before = memory.top(test_id).await?;
    memory
        .set_best(test_id, user_id, score, submitted_at)
        .await?;
    let after = memory.top(test_id).await?;
    for (old_index, other) in before.iter().enumerate() {
        if other == user_id {
            continue;
        }
        let new_index = after.iter().position(|u| u == other);
        if new_index.is_none_or(|i| i > old_index) {
            let new_rank = new_index.map_or(format!("below {TOP}"), |i| (i + 1).to_string());
            notices.push(Notice {
                recipient: UserId::parse(other.clone())?,
                kind: NotificationKind::RankOvertaken,
                title: "You were overtaken".into(),
                body: format!(
                    "{user_id} scored {score}: you moved from rank {} to {new_rank}.",
                    old_index + 1
                ),
                link: Some(format!("/v1/tests/{test_id}/leaderboard")),
            });
        }
    }
    Ok(notices)
}

impl ProjectionLogic for NotificationPolicy {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, _aggregate_type: &str, event_type: &str) -> bool {
        Submission::is(event_type)
    }

    /// Its notifications are events, written in the batch's transaction.
    fn writes_events(&self) -> bool {
        true
    }

    /// Decides a whole batch in memory, from the bests it can touch (read in
    /// one statement), then writes the new bests and creates every
    /// notification it decided on (one statement) in the same transaction as
    /// its checkpoint: a batch notifies all of its notifications or none, in
    /// the order decided, and a redelivered event finds its notifications
    /// there.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut submissions = Vec::new();
        for event in events {
            if let Some(submission) = Submission::of(event)? {
                submissions.push((event, submission));
            }
        }
        let keys = submissions
            .iter()
            .map(|(_, submission)| (submission.test_id, submission.user_id.clone()));
        let mut memory = Preloaded::load(conn, keys.collect()).await?;
        let mut commands = Vec::new();
        for (event, submission) in submissions {
            commands.extend(issues(event, decide(&mut memory, &submission).await?)?);
        }
        let commands = commands
            .into_iter()
            .map(|issue| (issue.id.to_string(), issue.command, issue.metadata))
            .collect();
        let notifications = crate::command::created::<Notification>(commands).await?;
        memory.store(conn, &notifications).await?;
        Ok(Vec::new())
    }
}

/// A notification the policy has decided on.
struct Issue {
    id: Uuid,
    command: NotificationCommand,
    metadata: EventMetadata,
}

impl NotificationPolicy {
    /// Decides what `event` notifies with the bests in `memory`, and issues
    /// those notifications. If one cannot be issued, `memory` is as it was
    /// before the event: deciding again (the event is retried) notifies the
    /// same, personal best and overtaken included.
    pub async fn handle(
        &self,
        memory: &mut MemoryBests,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        let Some(submission) = Submission::of(event)? else {
            return Ok(());
        };
        let (test_id, user_id) = (submission.test_id, submission.user_id.as_str());
        let before = memory.key(test_id, user_id).cloned();
        let issued = async {
            for command in issues(event, decide(memory, &submission).await?)? {
                self.issue(command).await?;
            }
            Ok::<(), BoxError>(())
        }
        .await;
        if issued.is_err() {
            memory.restore(test_id, user_id, before);
        }
        issued
    }
}

/// The commands that create `notices`, decided on `event`.
fn issues(event: &RecordedEvent, notices: Vec<Notice>) -> Result<Vec<Issue>, BoxError> {
    // Ids derive from the kind, the source event and the recipient:
    // deciding on the same event again creates nothing new.
    let mut commands = Vec::with_capacity(notices.len());
    for notice in notices {
        let source = format!("{}:{}:{}", notice.kind, event.identity(), notice.recipient);
        let notification_id = Uuid::new_v5(&NAMESPACE, source.as_bytes());
        let message =
            NotificationMessage::new(notice.kind, notice.title, notice.body, notice.link)?;
        let command = NotificationCommand::CreateNotification {
            notification_id,
            content: NotificationContent {
                recipient: notice.recipient,
                message,
            },
            now: event.recorded_at,
        };
        let metadata = EventMetadata {
            actor: SYSTEM_ACTOR.to_string(),
            request_id: event.identity(),
            recorded_at: crate::clock::now(),
        };
        commands.push(Issue {
            id: notification_id,
            command,
            metadata,
        });
    }
    Ok(commands)
}

impl NotificationPolicy {
    /// Issues one decided notification.
    async fn issue(&self, issue: Issue) -> Result<(), BoxError> {
        match self
            .aggregates
            .notifications
            .execute(&issue.id.to_string(), issue.command, issue.metadata)
            .await
        {
            // Another delivery of the same event created it meanwhile.
            Ok(()) | Err(AggregateError::AggregateConflict) => Ok(()),
            // The store's own error, so that its kind (a lost connection is
            // retried, bad data is not) can be told.
            Err(
                AggregateError::DatabaseConnectionError(err) | AggregateError::UnexpectedError(err),
            ) => Err(err),
            Err(err) => Err(Box::new(err)),
        }
    }
}

/// What the policy remembers: each user's best per test, in rank order.
pub trait PolicyMemory: Send {
    /// `user_id`'s best score on `test_id`, if any.
    fn best(
        &mut self,
        test_id: Uuid,
        user_id: &str,
    ) -> impl Future<Output = Result<Option<u32>, BoxError>> + Send;

    /// The users in the test's top 10, best first.
    fn top(&mut self, test_id: Uuid) -> impl Future<Output = Result<Vec<String>, BoxError>> + Send;

    /// Records a new best.
    fn set_best(
        &mut self,
        test_id: Uuid,
        user_id: &str,
        score: u32,
        achieved_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The bests a batch can touch, read from `policy_bests` before it and
/// written back after it, inside the policy's checkpointed transaction: each
/// test's top 10 and the bests of the batch's users. Bests only rise, so the
/// first 10 of what is loaded stay the test's top 10 while the batch runs.
struct Preloaded {
    bests: MemoryBests,
    /// Bests the batch changed.
    changed: std::collections::HashSet<(Uuid, String)>,
}

impl Preloaded {
    /// Reads the bests the submissions of users `keys` (test, user) can touch.
    /// Each is looked up by its key (`LIMIT 1` keeps the lookups from being
    /// turned into a join, which a plan made while the table was small
    /// would go on hashing by a scan of the whole table).
    async fn load(conn: &mut PgConnection, keys: Vec<(Uuid, String)>) -> Result<Self, BoxError> {
        let mut loaded = Self {
            bests: MemoryBests::default(),
            changed: Default::default(),
        };
        if keys.is_empty() {
            return Ok(loaded);
        }
        let mut tests: Vec<Uuid> = keys.iter().map(|(t, _)| *t).collect();
        tests.sort();
        tests.dedup();
        let (key_tests, key_users): (Vec<Uuid>, Vec<String>) = keys.into_iter().unzip();
        let rows: Vec<(Uuid, String, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT p.test_id, p.user_id, p.best_score, p.achieved_at
               FROM UNNEST($1::uuid[]) t(test_id)
               CROSS JOIN LATERAL (
                    SELECT * FROM policy_bests b WHERE b.test_id = t.test_id
                     ORDER BY best_score DESC, achieved_at, user_id LIMIT $2) p
             UNION
             SELECT b.test_id, b.user_id, b.best_score, b.achieved_at
               FROM UNNEST($3::uuid[], $4::text[]) k(test_id, user_id)
               CROSS JOIN LATERAL (
                    SELECT * FROM policy_bests b
                     WHERE b.test_id = k.test_id AND b.user_id = k.user_id LIMIT 1) b",
        )
        .bind(&tests)
        .bind(TOP)
        .bind(&key_tests)
        .bind(&key_users)
        .fetch_all(&mut *conn)
        .await?;
        for (test, user, score, achieved_at) in rows {
            loaded
                .bests
                .set_best(test, &user, score as u32, achieved_at)
                .await?;
        }
        Ok(loaded)
    }

    /// Writes the changed bests back and creates `notifications`, in one
    /// statement: the batch's transaction takes its id (and holds readers of
    /// the log back) for as short a time as it can.
    async fn store(
        &self,
        conn: &mut PgConnection,
        notifications: &[SerializedEvent],
    ) -> Result<(), BoxError> {
        if self.changed.is_empty() && notifications.is_empty() {
            return Ok(());
        }
        let changed: Vec<(Uuid, &RankKey)> = self
            .changed
            .iter()
            .filter_map(|(test, user)| Some((*test, self.bests.key(*test, user)?)))
            .collect();
        let sql = crate::command::insert_events_sql(
            "WITH bests AS (
                INSERT INTO policy_bests (test_id, user_id, best_score, achieved_at)
                SELECT * FROM UNNEST($8::uuid[], $9::text[], $10::int[], $11::timestamptz[])
                ON CONFLICT (test_id, user_id) DO UPDATE
                   SET best_score = EXCLUDED.best_score, achieved_at = EXCLUDED.achieved_at)",
        );
        crate::command::bind_events(sqlx::query(&sql), Notification::TYPE, notifications)
            .bind(changed.iter().map(|(t, _)| *t).collect::<Vec<_>>())
            .bind(
                changed
                    .iter()
                    .map(|(_, k)| k.user_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                changed
                    .iter()
                    .map(|(_, k)| k.score as i32)
                    .collect::<Vec<_>>(),
            )
            .bind(
                changed
                    .iter()
                    .map(|(_, k)| k.achieved_at)
                    .collect::<Vec<_>>(),
            )
            .execute(conn)
            .await?;
        Ok(())
    }
}

impl PolicyMemory for Preloaded {
    async fn best(&mut self, test_id: Uuid, user_id: &str) -> Result<Option<u32>, BoxError> {
        self.bests.best(test_id, user_id).await
    }

    async fn top(&mut self, test_id: Uuid) -> Result<Vec<String>, BoxError> {
        self.bests.top(test_id).await
    }

    async fn set_best(
        &mut self,
        test_id: Uuid,
        user_id: &str,
        score: u32,
        achieved_at: DateTime<Utc>,
    ) -> Result<(), BoxError> {
        self.changed.insert((test_id, user_id.to_string()));
        self.bests
            .set_best(test_id, user_id, score, achieved_at)
            .await
    }
}

/// The bests in memory (the embedded mode), ordered as the leaderboard.
#[derive(Default)]
pub struct MemoryBests {
    tests: std::collections::HashMap<Uuid, Bests>,
}

#[derive(Default)]
struct Bests {
    by_user: std::collections::HashMap<String, RankKey>,
    order: std::collections::BTreeSet<RankKey>,
}

impl MemoryBests {
    fn key(&self, test_id: Uuid, user_id: &str) -> Option<&RankKey> {
        self.tests.get(&test_id)?.by_user.get(user_id)
    }

    /// Puts `user_id`'s best on `test_id` back to `key` (none: no best).
    fn restore(&mut self, test_id: Uuid, user_id: &str, key: Option<RankKey>) {
        let bests = self.tests.entry(test_id).or_default();
        if let Some(current) = bests.by_user.remove(user_id) {
            bests.order.remove(&current);
        }
        if let Some(key) = key {
            bests.order.insert(key.clone());
            bests.by_user.insert(user_id.to_string(), key);
        }
    }
}

impl PolicyMemory for MemoryBests {
    async fn best(&mut self, test_id: Uuid, user_id: &str) -> Result<Option<u32>, BoxError> {
        Ok(self
            .tests
            .get(&test_id)
            .and_then(|t| t.by_user.get(user_id))
            .map(|key| key.score))
    }

    async fn top(&mut self, test_id: Uuid) -> Result<Vec<String>, BoxError> {
        Ok(self
            .tests
            .get(&test_id)
            .map(|t| {
                t.order
                    .iter()
                    .take(TOP as usize)
                    .map(|k| k.user_id.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn set_best(
        &mut self,
        test_id: Uuid,
        user_id: &str,
        score: u32,
        achieved_at: DateTime<Utc>,
    ) -> Result<(), BoxError> {
        let bests = self.tests.entry(test_id).or_default();
        let key = RankKey {
            score,
            achieved_at,
            user_id: user_id.to_string(),
        };
        if let Some(old) = bests.by_user.insert(user_id.to_string(), key.clone()) {
            bests.order.remove(&old);
        }
        bests.order.insert(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    const TEST: Uuid = Uuid::from_u128(7);

    fn submission(user: &str, score: u32, minute: i64) -> Submission {
        Submission {
            test_id: TEST,
            user_id: user.to_string(),
            attempt_id: Uuid::from_u128(minute as u128),
            score,
            max_score: 40,
            correct: score,
            submitted_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(minute),
        }
    }

    fn kinds(notices: &[Notice]) -> Vec<(String, NotificationKind)> {
        notices
            .iter()
            .map(|n| (n.recipient.to_string(), n.kind))
            .collect()
    }

    #[tokio::test]
    async fn every_submission_is_graded_and_only_a_beaten_best_is_a_personal_best() {
        let mut memory = MemoryBests::default();
        let first = decide(&mut memory, &submission("alice", 5, 1))
            .await
            .unwrap();
        assert_eq!(
            kinds(&first),
            [("alice".into(), NotificationKind::AttemptGraded)]
        );
        assert_eq!(first[0].body, "You scored 5 of 40 (5 correct).");
        assert_eq!(
            first[0].link.as_deref(),
            Some("/v1/attempts/00000000-0000-0000-0000-000000000001")
        );

        for (score, minute) in [(4, 2), (5, 3)] {
            let lower = decide(&mut memory, &submission("alice", score, minute)).await;
            assert_eq!(
                kinds(&lower.unwrap()),
                [("alice".into(), NotificationKind::AttemptGraded)],
                "{score} does not beat 5"
            );
        }

        let better = decide(&mut memory, &submission("alice", 7, 4))
            .await
            .unwrap();
        assert_eq!(
            kinds(&better),
            [
                ("alice".into(), NotificationKind::AttemptGraded),
                ("alice".into(), NotificationKind::PersonalBest),
            ]
        );
        assert_eq!(better[1].body, "You beat your best of 5 with 7 of 40.");
        assert_eq!(memory.best(TEST, "alice").await.unwrap(), Some(7));
    }

    #[tokio::test]
    async fn those_pushed_down_inside_the_top_ten_are_told_where_they_went() {
        let mut memory = MemoryBests::default();
        // u01 (40), u02 (38) … u12 (18): the top 10 is u01 … u10.
        for n in 1..=12u32 {
            let user = format!("u{n:02}");
            decide(&mut memory, &submission(&user, 42 - 2 * n, n.into()))
                .await
                .unwrap();
        }
        let newcomer = decide(&mut memory, &submission("x", 37, 100))
            .await
            .unwrap();
        let told: Vec<(String, NotificationKind)> = kinds(&newcomer);
        let mut expected = vec![("x".to_string(), NotificationKind::AttemptGraded)];
        // u03 … u10 move down one place; u01 and u02 stay ahead; u11 and u12
        // were never in the top 10.
        for n in 3..=10 {
            expected.push((format!("u{n:02}"), NotificationKind::RankOvertaken));
        }
        assert_eq!(told, expected);
        assert_eq!(newcomer[1].body, "x scored 37: you moved from rank 3 to 4.");
        assert_eq!(
            newcomer[8].body,
            "x scored 37: you moved from rank 10 to below 10."
        );
        assert_eq!(
            newcomer[1].link.as_deref(),
            Some("/v1/tests/00000000-0000-0000-0000-000000000007/leaderboard")
        );

        // A tie ranks the earlier best first: y's 37 stays behind x's.
        let tie = decide(&mut memory, &submission("y", 37, 101))
            .await
            .unwrap();
        let passed: Vec<String> = kinds(&tie)
            .into_iter()
            .filter(|(_, kind)| *kind == NotificationKind::RankOvertaken)
            .map(|(user, _)| user)
            .collect();
        assert_eq!(passed, ["u03", "u04", "u05", "u06", "u07", "u08", "u09"]);
        assert_eq!(
            memory.top(TEST).await.unwrap()[..4],
            ["u01", "u02", "x", "y"]
        );
    }

    /// The notifications the in-memory log holds, as JSON.
    fn notified(log: &crate::log::memory::MemLog) -> Vec<String> {
        log.read_after(0, usize::MAX)
            .iter()
            .filter(|e| e.event_type == "NotificationCreated")
            .map(|e| e.payload.to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_notification_that_cannot_be_issued_leaves_the_best_to_decide_again() {
        use crate::command::{Aggregates, Repository};
        use crate::log::memory::MemLog;
        let metrics = crate::ops::metrics::Metrics::new();
        let log = Arc::new(MemLog::in_memory());
        let working = Arc::new(Aggregates::with_metrics(
            &Repository::Embedded(log.clone()),
            &metrics,
        ));
        // A store that cannot be reached: every command fails.
        let nowhere = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://podium@127.0.0.1:1/nowhere")
            .unwrap();
        let failing = Arc::new(Aggregates::with_metrics(
            &Repository::Postgres(nowhere),
            &metrics,
        ));
        let mut memory = MemoryBests::default();
        let first = submission("alice", 5, 1);
        NotificationPolicy::new(working.clone())
            .handle(&mut memory, &first.recorded(1))
            .await
            .unwrap();
        let better = submission("alice", 9, 2).recorded(2);
        let failed = NotificationPolicy::new(failing)
            .handle(&mut memory, &better)
            .await;
        assert!(failed.is_err());
        assert_eq!(memory.best(TEST, "alice").await.unwrap(), Some(5));
        // The retry decides as the first try did.
        NotificationPolicy::new(working)
            .handle(&mut memory, &better)
            .await
            .unwrap();
        assert_eq!(memory.best(TEST, "alice").await.unwrap(), Some(9));
        let kinds = notified(&log);
        assert!(
            kinds.iter().any(|k| k.contains("personal_best")),
            "{kinds:?}"
        );
    }
}
