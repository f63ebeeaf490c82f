//! Leaderboard queries and stream: pages by offset or cursor, a user's
//! neighbours, and live `entry` events.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Datelike, SecondsFormat, SubsecRound, Utc};
use podium_domain::log::Change;
use podium_domain::UserId;
use podium_projections::collections;
use podium_projections::history::rank_history;
use podium_projections::leaderboard::{self, Page, PageStart, RankedEntry};
use podium_projections::ranking::{Entry, RankKey};
use podium_projections::windows::{self, Period, Window};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::catalog::published_definition;
use crate::auth::Principal;
use crate::http::cached::{self, JsonBody, Loaded};
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, ApiQuery};
use crate::http::pagination::{self, next_link};
use crate::http::sse::{self, CatchUp, Frames, StreamQuery, StreamSource};
use crate::http::AppState;
use crate::query::cache::CacheKey;

/// Most neighbours on each side of a user.
pub const MAX_RADIUS: u16 = 50;
const DEFAULT_RADIUS: u16 = 5;
/// Largest offset accepted (beyond any real leaderboard, within Postgres' bigint).
const MAX_OFFSET: u64 = 1 << 40;

/// Which of a test's boards a query reads.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct BoardQuery {
    /// `all` (default), `day`, `week` or `month` (UTC; weeks begin on Monday).
    window: Option<String>,
    /// A date `YYYY-MM-DD`, or an RFC 3339 time, inside the wanted period
    /// (default: the current one); not with `window=all`.
    period: Option<String>,
    /// An RFC 3339 time, not in the future: the all-time board as it stood
    /// then (only submissions made at or before it count). Not with a
    /// window other than `all`; not on streams.
    as_of: Option<String>,
}

/// Whose boards a query reads: a test's, or a collection's (the sum of each
/// user's bests over its tests).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Subject {
    Test(Uuid),
    Collection(Uuid),
}

impl Subject {
    /// The board of this subject in `window`'s period that holds `at`.
    fn board_at(self, window: Window, at: DateTime<Utc>) -> Uuid {
        match self {
            Self::Test(test) => windows::board_at(test, window, at),
            Self::Collection(collection) => collections::board_at(collection, window, at),
        }
    }

    /// The path of this subject's leaderboard.
    fn path(self) -> String {
        match self {
            Self::Test(test) => format!("/v1/tests/{test}/leaderboard"),
            Self::Collection(collection) => format!("/v1/collections/{collection}/leaderboard"),
        }
    }

    /// 404 unless the test is published or the collection exists.
    async fn exists(self, state: &AppState) -> Result<(), ApiError> {
        self.tests(state).await.map(|_| ())
    }

    /// The tests this subject's boards are made of (404 for a test that is
    /// not published, or a collection that does not exist).
    async fn tests(self, state: &AppState) -> Result<Vec<Uuid>, ApiError> {
        match self {
            Self::Test(test) => {
                published_definition(state, test).await?;
                Ok(vec![test])
            }
            Self::Collection(collection) => Ok(state
                .aggregates
                .collections
                .load(&collection.to_string())
                .await?
                .created
                .ok_or_else(|| ApiError::NotFound("no such collection".into()))?
                .test_ids),
        }
    }

    /// The board of this subject as of `at`, in rank order: a test's
    /// folded (or kept) from its submissions; a collection's composed from
    /// its tests' boards as of `at`.
    async fn board_as_of(
        self,
        state: &AppState,
        at: DateTime<Utc>,
        settled: bool,
    ) -> Result<Arc<Vec<Entry>>, ApiError> {
        let store = state.store.as_ref();
        let tests = match self {
            Self::Test(test) => return Ok(state.as_of.board(store, test, at, settled).await?),
            Self::Collection(_) => self.tests(state).await?,
        };
        let mut parts: HashMap<String, Vec<Entry>> = HashMap::new();
        for test in tests {
            for entry in state.as_of.board(store, test, at, settled).await?.iter() {
                parts
                    .entry(entry.user_id.clone())
                    .or_default()
                    .push(entry.clone());
            }
        }
        let mut board: Vec<Entry> = parts.values().filter_map(collections::compose).collect();
        board.sort_by(Entry::rank_cmp);
        Ok(Arc::new(board))
    }
}

/// Which subject an answer is about: `"test_id"` or `"collection_id"`.
#[derive(Serialize, ToSchema)]
enum SubjectView {
    #[serde(rename = "test_id")]
    Test(Uuid),
    #[serde(rename = "collection_id")]
    Collection(Uuid),
}

impl From<Subject> for SubjectView {
    fn from(subject: Subject) -> Self {
        match subject {
            Subject::Test(test) => Self::Test(test),
            Subject::Collection(collection) => Self::Collection(collection),
        }
    }
}

/// The board a query chose: a test's or a collection's, in a window's period.
#[derive(Clone, Copy)]
pub(super) struct Board {
    pub subject: Subject,
    /// The board's own id: the test's for a test's `all`.
    pub id: Uuid,
    pub window: Window,
    pub period: Option<Period>,
}

impl BoardQuery {
    /// The board this query names, with the current period as of `now`
    /// unless it names another; 422 for an unknown window or a malformed
    /// period.
    pub(super) fn board(&self, subject: Subject, now: DateTime<Utc>) -> Result<Board, ApiError> {
        let window = match self.window.as_deref() {
            None => Window::All,
            Some(name) => Window::parse(name).ok_or_else(|| {
                pagination::invalid("window", "must be one of all, day, week, month")
            })?,
        };
        let at = match self.period.as_deref() {
            None => now,
            Some(_) if window == Window::All => {
                return Err(pagination::invalid(
                    "period",
                    "the all-time board has no periods; give a window (day, week, month)",
                ))
            }
            Some(text) => windows::parse_instant(text).ok_or_else(|| {
                pagination::invalid(
                    "period",
                    "must be a date YYYY-MM-DD or an RFC 3339 time inside the period",
                )
            })?,
        };
        Ok(Board::at(subject, window, at))
    }
}

impl BoardQuery {
    /// The instant `as_of` names for `board`, if any: 422 when malformed,
    /// after `now`, or with a window.
    fn as_of(&self, board: &Board, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, ApiError> {
        let Some(text) = self.as_of.as_deref() else {
            return Ok(None);
        };
        let at = DateTime::parse_from_rfc3339(text)
            .map_err(|_| {
                pagination::invalid(
                    "as_of",
                    "must be an RFC 3339 time, e.g. 2026-12-01T18:00:00Z",
                )
            })?
            .with_timezone(&Utc)
            // Times are kept to the microsecond: a finer instant names the
            // same board (and the same cached pages and cursors).
            .trunc_subsecs(6);
        if board.window != Window::All {
            return Err(pagination::invalid(
                "as_of",
                "a board as of a past time is an all-time board; leave out window",
            ));
        }
        if at > now {
            return Err(pagination::invalid("as_of", "must not be in the future"));
        }
        Ok(Some(at))
    }
}

impl Board {
    /// `subject`'s board in `window` for the period that holds `at`.
    fn at(subject: Subject, window: Window, at: DateTime<Utc>) -> Board {
        Board {
            subject,
            id: subject.board_at(window, at),
            window,
            period: window.period(at),
        }
    }

    /// The board of the same test and window whose period begins at `at`.
    fn following(&self, at: DateTime<Utc>) -> Board {
        Board::at(self.subject, self.window, at)
    }

    /// The query parameters that name this board in a link (none for `all`).
    fn link_params(&self) -> Vec<(&'static str, String)> {
        match self.period {
            Some(period) => vec![
                ("window", self.window.as_str().to_string()),
                ("period", period.start.format("%Y-%m-%d").to_string()),
            ],
            None => Vec::new(),
        }
    }
}

/// What every leaderboard answer says of its board.
#[derive(Serialize, ToSchema)]
struct WindowView {
    window: Window,
    /// When the period began; `null` for `all`.
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    period_start: Option<DateTime<Utc>>,
    /// When the period ends (the current period's reset); `null` for `all`.
    #[serde(serialize_with = "podium_domain::time::serialize_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    period_end: Option<DateTime<Utc>>,
}

impl From<&Board> for WindowView {
    fn from(board: &Board) -> Self {
        Self {
            window: board.window,
            period_start: board.period.map(|p| p.start),
            period_end: board.period.map(|p| p.end),
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tests/{test_id}/leaderboard", get(page))
        .route(
            "/v1/tests/{test_id}/leaderboard/users/{user_id}",
            get(around),
        )
        .route("/v1/tests/{test_id}/leaderboard/stream", get(stream))
        .route(
            "/v1/tests/{test_id}/leaderboard/users/{user_id}/history",
            get(history),
        )
        .route(
            "/v1/collections/{collection_id}/leaderboard",
            get(collection_page),
        )
        .route(
            "/v1/collections/{collection_id}/leaderboard/users/{user_id}",
            get(collection_around),
        )
        .route(
            "/v1/collections/{collection_id}/leaderboard/stream",
            get(collection_stream),
        )
}

/// This resource's operations in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    page,
    around,
    stream,
    history,
    collection_page,
    collection_around,
    collection_stream
))]
pub(super) struct Doc;

/// An entry as the API shows it. On a test's board: the user's best score
/// and `attempts`; on a collection's: the sum of their bests over its tests,
/// of those tests' maximum scores, and `tests_taken`.
#[derive(Serialize, ToSchema)]
struct EntryView<'a> {
    rank: u64,
    user_id: &'a str,
    score: u32,
    max_score: u32,
    /// When the score was first reached.
    #[serde(serialize_with = "podium_domain::time::serialize")]
    achieved_at: DateTime<Utc>,
    /// Submitted attempts (a test's board only).
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    /// Tests of the collection the user has submitted (a collection's board only).
    #[serde(skip_serializing_if = "Option::is_none")]
    tests_taken: Option<u32>,
}

impl<'a> EntryView<'a> {
    fn of(subject: Subject) -> impl Fn(&'a RankedEntry) -> Self {
        move |ranked| {
            let e = &ranked.entry;
            let collection = matches!(subject, Subject::Collection(_));
            Self {
                rank: ranked.rank,
                user_id: &e.user_id,
                score: e.best_score,
                max_score: e.max_score,
                achieved_at: e.achieved_at,
                attempts: (!collection).then_some(e.attempts),
                tests_taken: collection.then_some(e.attempts),
            }
        }
    }
}

/// The user a path names; 400 when the id is malformed.
fn path_user(raw: String) -> Result<UserId, ApiError> {
    UserId::parse(raw)
        .map_err(|err| ApiError::BadRequest(format!("invalid user id in the path: {err}")))
}

/// Where the next page starts: after `key`, with moves since `since`.
#[derive(Serialize, Deserialize)]
struct Cursor {
    #[serde(rename = "lb")]
    test_id: Uuid,
    since: u64,
    score: u32,
    at: DateTime<Utc>,
    user: String,
    /// The instant of an `as_of` board.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    as_of: Option<DateTime<Utc>>,
}

impl Cursor {
    /// Cursors are in the client's hands: every field must be one a page
    /// could have made (400 otherwise, never a database error).
    fn check(&self) -> Result<(), ApiError> {
        let year = self.at.year();
        let sane = i32::try_from(self.score).is_ok()
            && i64::try_from(self.since).is_ok()
            && UserId::parse(self.user.clone()).is_ok()
            && (1970..=9999).contains(&year);
        if sane {
            Ok(())
        } else {
            Err(pagination::malformed())
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page of this leaderboard.
    cursor: Option<String>,
    /// Start at rank `offset + 1` (not with `cursor`).
    offset: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct LeaderboardPage<'a> {
    #[serde(flatten)]
    subject: SubjectView,
    #[serde(flatten)]
    window: WindowView,
    /// The instant of an `as_of` board (absent otherwise).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "podium_domain::time::serialize_option"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    as_of: Option<DateTime<Utc>>,
    total: u64,
    entries: Vec<EntryView<'a>>,
    next_cursor: Option<String>,
}

/// A page of the leaderboard, by cursor (walks see every entry once while
/// scores change) or by offset.
#[utoipa::path(get, path = "/v1/tests/{test_id}/leaderboard", tag = "leaderboards",
    params(("test_id" = Uuid, Path), PageQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = LeaderboardPage, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Malformed or foreign cursor (`invalid-cursor`), or one too old (`cursor-expired`)"),
        (status = 422, description = "`limit` outside 1–200, cursor and offset together, an unknown `window`, a malformed `period`, or an `as_of` that is malformed, in the future or with a window"),
        (status = 404, description = "No such test"),
    ))]
async fn page(
    State(state): State<AppState>,
    _: Principal,
    ApiPath(test_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<PageQuery>,
    ApiQuery(chosen): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    page_of(state, Subject::Test(test_id), query, chosen).await
}

/// A page of a collection's leaderboard (each user's sum of best scores
/// over its tests), by cursor or by offset, as for a test.
#[utoipa::path(get, path = "/v1/collections/{collection_id}/leaderboard", tag = "collections",
    params(("collection_id" = Uuid, Path), PageQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = LeaderboardPage, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Malformed or foreign cursor (`invalid-cursor`), or one too old (`cursor-expired`)"),
        (status = 422, description = "`limit` outside 1–200, cursor and offset together, an unknown `window`, a malformed `period`, or an `as_of` that is malformed, in the future or with a window"),
        (status = 404, description = "No such collection"),
    ))]
async fn collection_page(
    State(state): State<AppState>,
    _: Principal,
    ApiPath(collection_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<PageQuery>,
    ApiQuery(chosen): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    page_of(state, Subject::Collection(collection_id), query, chosen).await
}

async fn page_of(
    state: AppState,
    subject: Subject,
    query: PageQuery,
    chosen: BoardQuery,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let board = chosen.board(subject, now)?;
    let as_of = chosen.as_of(&board, now)?;
    let limit = pagination::limit(query.limit)?;
    let (start, key) = match (&query.cursor, query.offset) {
        (Some(_), Some(_)) => {
            return Err(pagination::invalid(
                "offset",
                "give either a cursor or an offset, not both",
            ))
        }
        (Some(raw), None) => {
            let cursor: Cursor = pagination::decode(raw)?;
            if cursor.test_id != board.id || cursor.as_of != as_of {
                return Err(pagination::foreign());
            }
            cursor.check()?;
            let start = PageStart::After {
                key: RankKey {
                    score: cursor.score,
                    achieved_at: cursor.at,
                    user_id: cursor.user,
                },
                since: cursor.since,
            };
            (start, raw.clone())
        }
        (None, offset) => {
            let offset = offset.unwrap_or(0);
            if offset > MAX_OFFSET {
                return Err(pagination::invalid(
                    "offset",
                    format!("must be at most {MAX_OFFSET}"),
                ));
            }
            (PageStart::Offset(offset), format!("offset:{offset}"))
        }
    };
    let listing = Listing {
        board,
        start,
        limit,
        by_offset: query.offset.is_some(),
    };
    if let Some(at) = as_of {
        // A board as of a settled instant never changes: its pages are
        // answered from the query cache like the live board's.
        let settled = state.as_of.settled(state.store.as_ref(), at, now).await?;
        // A collection's past board follows its tests as they are now (a
        // test added later changes it): composed afresh each time, from its
        // tests' boards, which are kept once settled.
        if !settled || matches!(subject, Subject::Collection(_)) {
            let loaded = load_as_of_page(&state, listing, at, settled).await?;
            return Ok((&loaded.answer?).into_response());
        }
        let key = CacheKey::LeaderboardPage {
            test_id: board.id,
            start: format!("as_of:{}:{key}", at.timestamp_micros()),
            limit: limit as u16,
        };
        let load = load_as_of_page(&state, listing, at, true);
        let body = cached::get_or_load(&state.cache, key, load).await?;
        return Ok((&body).into_response());
    }
    let key = CacheKey::LeaderboardPage {
        test_id: board.id,
        start: key,
        limit: limit as u16,
    };
    let body = cached::get_or_load(&state.cache, key, load_page(&state, listing)).await?;
    Ok((&body).into_response())
}

/// What a page request asks for.
struct Listing {
    board: Board,
    start: PageStart,
    limit: i64,
    /// Whether the client pages by offset (its links then do too).
    by_offset: bool,
}

impl Listing {
    /// The answer that `page` of this board (as of `as_of`, if given) is,
    /// its cursor continuing from checkpoint `since`.
    fn body(
        &self,
        page: &Page,
        since: u64,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<JsonBody, ApiError> {
        let next_cursor = next_cursor(self.board.id, page, since, as_of);
        let link = self.next_link(next_cursor.as_ref(), as_of);
        let subject = self.board.subject;
        let view = LeaderboardPage {
            subject: subject.into(),
            window: WindowView::from(&self.board),
            as_of,
            total: page.total,
            entries: page.entries.iter().map(EntryView::of(subject)).collect(),
            next_cursor,
        };
        JsonBody::new(&view, link)
    }

    /// The link to the page after this one, which `next_cursor` starts.
    fn next_link(
        &self,
        next_cursor: Option<&String>,
        as_of: Option<DateTime<Utc>>,
    ) -> Option<HeaderValue> {
        let cursor = next_cursor?;
        let mut params = vec![("limit", self.limit.to_string())];
        match self.start {
            PageStart::Offset(offset) if self.by_offset => {
                params.push(("offset", (offset + self.limit as u64).to_string()))
            }
            _ => params.push(("cursor", cursor.clone())),
        }
        params.extend(self.board.link_params());
        if let Some(at) = as_of {
            params.push(("as_of", at.to_rfc3339_opts(SecondsFormat::AutoSi, true)));
        }
        next_link(&self.board.subject.path(), &params)
    }
}

async fn load_page(state: &AppState, listing: Listing) -> Result<Loaded, ApiError> {
    let Listing {
        board,
        start,
        limit,
        ..
    } = &listing;
    let (seq, page) = state
        .store
        .leaderboard_page(board.id, start, *limit)
        .await?;
    let page = match page {
        Ok(page) => page,
        Err(horizon) => {
            // Cached pages may carry such cursors: read them afresh.
            state
                .hub
                .mark_stale(leaderboard::TOPIC, &board.id.to_string(), horizon);
            let expired = ApiError::BadCursor {
                kind: "cursor-expired",
                detail:
                    "the cursor is too old to continue exactly; start again from the first page"
                        .into(),
            };
            return Ok(Loaded {
                answer: Err(expired),
                seq,
            });
        }
    };
    if page.total == 0 {
        if let Err(err) = board.subject.exists(state).await {
            return Ok(Loaded {
                answer: Err(err),
                seq,
            });
        }
    }
    Ok(Loaded {
        answer: listing.body(&page, seq, None),
        seq,
    })
}

/// A page of the all-time board as of `at`, folded (or kept) in memory. It
/// reflects no checkpoint: a settled instant's answer never goes stale (and
/// an unsettled one's is not cached).
async fn load_as_of_page(
    state: &AppState,
    listing: Listing,
    at: DateTime<Utc>,
    settled: bool,
) -> Result<Loaded, ApiError> {
    let subject = listing.board.subject;
    let entries = subject.board_as_of(state, at, settled).await?;
    if entries.is_empty() {
        if let Err(err) = subject.exists(state).await {
            return Ok(Loaded {
                answer: Err(err),
                seq: u64::MAX,
            });
        }
    }
    let from = match &listing.start {
        PageStart::Offset(offset) => usize::try_from(*offset).unwrap_or(usize::MAX),
        PageStart::After { key, .. } => entries.partition_point(|e| e.rank_key() <= *key),
    };
    let ranked = ranked(&entries, from, listing.limit as usize);
    let page = Page {
        total: entries.len() as u64,
        more: from.saturating_add(ranked.len()) < entries.len(),
        entries: ranked,
    };
    Ok(Loaded {
        answer: listing.body(&page, 0, Some(at)),
        seq: u64::MAX,
    })
}

/// `count` entries of `entries` (a whole board in rank order) from index
/// `from`, with their ranks.
fn ranked(entries: &[Entry], from: usize, count: usize) -> Vec<RankedEntry> {
    entries
        .iter()
        .enumerate()
        .skip(from)
        .take(count)
        .map(|(i, entry)| RankedEntry {
            rank: i as u64 + 1,
            entry: entry.clone(),
        })
        .collect()
}

/// The cursor after `page` of board `board_id` (as of `as_of`, if given).
fn next_cursor(
    board_id: Uuid,
    page: &Page,
    since: u64,
    as_of: Option<DateTime<Utc>>,
) -> Option<String> {
    let last = page.entries.last().filter(|_| page.more)?;
    Some(pagination::encode(&Cursor {
        test_id: board_id,
        since,
        score: last.entry.best_score,
        at: last.entry.achieved_at,
        user: last.entry.user_id.clone(),
        as_of,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AroundQuery {
    /// Entries on each side, 0–50, default 5.
    radius: Option<u16>,
}

#[derive(Serialize, ToSchema)]
struct AroundView<'a> {
    #[serde(flatten)]
    subject: SubjectView,
    #[serde(flatten)]
    window: WindowView,
    /// The instant of an `as_of` board (absent otherwise).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "podium_domain::time::serialize_option"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    as_of: Option<DateTime<Utc>>,
    total: u64,
    entry: EntryView<'a>,
    above: Vec<EntryView<'a>>,
    below: Vec<EntryView<'a>>,
}

/// A user's entry with the entries ranked just above and below.
#[utoipa::path(get, path = "/v1/tests/{test_id}/leaderboard/users/{user_id}", tag = "leaderboards",
    params(("test_id" = Uuid, Path), ("user_id" = String, Path), AroundQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AroundView),
        (status = 400, description = "Malformed id"),
        (status = 404, description = "The user has no entry"),
        (status = 422, description = "`radius` above 50, an unknown `window`, a malformed `period`, or an `as_of` that is malformed, in the future or with a window"),
    ))]
async fn around(
    State(state): State<AppState>,
    _: Principal,
    ApiPath((test_id, user_id)): ApiPath<(Uuid, String)>,
    ApiQuery(query): ApiQuery<AroundQuery>,
    ApiQuery(chosen): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    around_of(state, Subject::Test(test_id), user_id, query, chosen).await
}

/// A user's entry on a collection's leaderboard with the entries ranked
/// just above and below.
#[utoipa::path(get, path = "/v1/collections/{collection_id}/leaderboard/users/{user_id}", tag = "collections",
    params(("collection_id" = Uuid, Path), ("user_id" = String, Path), AroundQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = AroundView),
        (status = 400, description = "Malformed id"),
        (status = 404, description = "The user has no entry"),
        (status = 422, description = "`radius` above 50, an unknown `window`, a malformed `period`, or an `as_of` that is malformed, in the future or with a window"),
    ))]
async fn collection_around(
    State(state): State<AppState>,
    _: Principal,
    ApiPath((collection_id, user_id)): ApiPath<(Uuid, String)>,
    ApiQuery(query): ApiQuery<AroundQuery>,
    ApiQuery(chosen): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    around_of(
        state,
        Subject::Collection(collection_id),
        user_id,
        query,
        chosen,
    )
    .await
}

async fn around_of(
    state: AppState,
    subject: Subject,
    user_id: String,
    query: AroundQuery,
    chosen: BoardQuery,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let board = chosen.board(subject, now)?;
    let as_of = chosen.as_of(&board, now)?;
    let user = path_user(user_id)?;
    let radius = query.radius.unwrap_or(DEFAULT_RADIUS);
    if radius > MAX_RADIUS {
        return Err(pagination::invalid(
            "radius",
            format!("must be between 0 and {MAX_RADIUS}"),
        ));
    }
    if let Some(at) = as_of {
        return as_of_around(&state, board, user, radius, (at, now)).await;
    }
    let key = CacheKey::Around {
        test_id: board.id,
        user_id: user.to_string(),
        radius,
    };
    let body =
        cached::get_or_load(&state.cache, key, load_around(&state, board, user, radius)).await?;
    Ok((&body).into_response())
}

async fn load_around(
    state: &AppState,
    board: Board,
    user: UserId,
    radius: u16,
) -> Result<Loaded, ApiError> {
    let around = state
        .store
        .around(board.id, user.as_str(), i64::from(radius))
        .await?;
    let seq = around.checkpoint;
    let Some(entry) = &around.entry else {
        let missing = ApiError::NotFound(format!("{user} has no entry on this leaderboard"));
        return Ok(Loaded {
            answer: Err(missing),
            seq,
        });
    };
    let view_of = EntryView::of(board.subject);
    let view = AroundView {
        subject: board.subject.into(),
        window: WindowView::from(&board),
        as_of: None,
        total: around.total,
        entry: view_of(entry),
        above: around.above.iter().map(&view_of).collect(),
        below: around.below.iter().map(&view_of).collect(),
    };
    Ok(Loaded {
        answer: JsonBody::new(&view, None),
        seq,
    })
}

/// `user`'s entry and neighbours on the all-time board as of `at`.
async fn as_of_around(
    state: &AppState,
    board: Board,
    user: UserId,
    radius: u16,
    (at, now): (DateTime<Utc>, DateTime<Utc>),
) -> Result<Response, ApiError> {
    let settled = state.as_of.settled(state.store.as_ref(), at, now).await?;
    let entries = board.subject.board_as_of(state, at, settled).await?;
    let Some(index) = entries.iter().position(|e| e.user_id == user.as_str()) else {
        return Err(ApiError::NotFound(format!(
            "{user} had no entry on this leaderboard at {at}"
        )));
    };
    let radius = usize::from(radius);
    let first = index.saturating_sub(radius);
    let (above, mine, below) = (
        ranked(&entries, first, index - first),
        ranked(&entries, index, 1),
        ranked(&entries, index + 1, radius),
    );
    let view_of = EntryView::of(board.subject);
    let view = AroundView {
        subject: board.subject.into(),
        window: WindowView::from(&board),
        as_of: Some(at),
        total: entries.len() as u64,
        entry: view_of(&mine[0]),
        above: above.iter().map(&view_of).collect(),
        below: below.iter().map(&view_of).collect(),
    };
    Ok((&JsonBody::new(&view, None)?).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// 1–200, default 50.
    limit: Option<i64>,
    /// A `next_cursor` of a previous page of this history.
    cursor: Option<String>,
}

/// Where the next page of a user's history on a board starts: after the
/// attempt `id` submitted at `at`.
#[derive(Serialize, Deserialize)]
struct HistoryCursor {
    #[serde(rename = "history")]
    board: Uuid,
    user: String,
    at: DateTime<Utc>,
    id: Uuid,
}

#[derive(Serialize, ToSchema)]
struct HistoryItemView {
    attempt_id: Uuid,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    #[schema(value_type = String, format = DateTime)]
    submitted_at: DateTime<Utc>,
    score: u32,
    /// The user's best score on the board right after this attempt.
    best_score: u32,
    /// The user's rank on the board right after this attempt.
    rank: u64,
}

#[derive(Serialize, ToSchema)]
struct RankHistoryView {
    test_id: Uuid,
    user_id: String,
    #[serde(flatten)]
    window: WindowView,
    /// Newest first.
    items: Vec<HistoryItemView>,
    next_cursor: Option<String>,
}

/// A user's rank history on a test's board: for each of their submitted
/// attempts (in the window's period, when one is given), newest first, their
/// best score and rank right after it was recorded. Folded from every
/// submission on the board, so it covers attempts of any age.
#[utoipa::path(get, path = "/v1/tests/{test_id}/leaderboard/users/{user_id}/history", tag = "leaderboards",
    params(("test_id" = Uuid, Path), ("user_id" = String, Path), HistoryQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = RankHistoryView, headers(("link" = String, description = "`<…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Malformed user id, or a malformed or foreign cursor (`invalid-cursor`)"),
        (status = 404, description = "No such test, or the user has no attempt on that board"),
        (status = 422, description = "`limit` outside 1–200, an unknown `window`, a malformed `period`, or an `as_of` (a history covers every attempt)"),
    ))]
async fn history(
    State(state): State<AppState>,
    _: Principal,
    ApiPath((test_id, user_id)): ApiPath<(Uuid, String)>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
    ApiQuery(chosen): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let board = chosen.board(Subject::Test(test_id), now)?;
    if chosen.as_of.is_some() {
        return Err(pagination::invalid(
            "as_of",
            "a history covers every attempt; leave out as_of",
        ));
    }
    let user = path_user(user_id)?;
    let limit = pagination::limit(query.limit)? as usize;
    let after = match &query.cursor {
        None => None,
        Some(raw) => {
            let cursor: HistoryCursor = pagination::decode(raw)?;
            if cursor.board != board.id || cursor.user != user.as_str() {
                return Err(pagination::foreign());
            }
            Some((cursor.at, cursor.id))
        }
    };
    published_definition(&state, test_id).await?;
    let until = board.period.map_or(now, |period| {
        (period.end - chrono::Duration::microseconds(1)).min(now)
    });
    let since = board.period.map(|period| period.start);
    let submissions = state
        .as_of
        .submitted_between(state.store.as_ref(), test_id, since, until)
        .await?;
    let mut items = rank_history(submissions, user.as_str());
    if items.is_empty() {
        return Err(ApiError::NotFound(format!(
            "{user} has no attempt on this leaderboard"
        )));
    }
    items.reverse();
    let from = after.map_or(0, |cursor| {
        items.partition_point(|item| (item.submitted_at, item.attempt_id) >= cursor)
    });
    let page = &items[from..items.len().min(from.saturating_add(limit))];
    let next_cursor = page
        .last()
        .filter(|_| from + page.len() < items.len())
        .map(|last| {
            pagination::encode(&HistoryCursor {
                board: board.id,
                user: user.to_string(),
                at: last.submitted_at,
                id: last.attempt_id,
            })
        });
    let link = next_cursor.as_ref().and_then(|cursor| {
        let mut params = vec![("limit", limit.to_string()), ("cursor", cursor.clone())];
        params.extend(board.link_params());
        next_link(
            &format!("/v1/tests/{test_id}/leaderboard/users/{user}/history"),
            &params,
        )
    });
    let view = RankHistoryView {
        test_id,
        user_id: user.to_string(),
        window: WindowView::from(&board),
        items: page
            .iter()
            .map(|item| HistoryItemView {
                attempt_id: item.attempt_id,
                submitted_at: item.submitted_at,
                score: item.score,
                best_score: item.best_score,
                rank: item.rank,
            })
            .collect(),
        next_cursor,
    };
    Ok((&JsonBody::new(&view, link)?).into_response())
}

/// `entry` events of one board.
struct Entries {
    state: AppState,
    board: Board,
}

impl StreamSource for Entries {
    fn kind(&self) -> &'static str {
        "leaderboard"
    }

    async fn catch_up(&self, after: Option<u64>) -> Result<CatchUp, ApiError> {
        let (seq, changed) = self
            .state
            .store
            .leaderboard_changed_since(self.board.id, after, sse::CATCH_UP_LIMIT)
            .await?;
        let mut caught = CatchUp::at(seq);
        let Some(changed) = changed else {
            caught.resync();
            return Ok(caught);
        };
        for (seq, ranked) in &changed {
            let e = &ranked.entry;
            let data = json!({
                "user_id": e.user_id,
                "score": e.best_score,
                "rank": ranked.rank,
                // The rank before this change is not kept in the read model.
                "previous_rank": null,
                "attempts": e.attempts,
            });
            caught.push(*seq, "entry", &data);
        }
        Ok(caught)
    }

    fn render(change: &Change, out: &mut Frames) {
        if podium_projections::leaderboard::is_resync(change) {
            let reason = json!({"reason": "too many changes at once; reload"});
            return out.json(change.seq, "resync", &reason);
        }
        out.json(change.seq, "entry", &change.data);
    }

    /// A windowed stream says first which period it follows: a client
    /// that reconnects after the period changed learns so before the new
    /// period's entries.
    fn opening(&self, out: &mut Frames) {
        if self.board.period.is_some() {
            if let Ok(view) = serde_json::to_value(WindowView::from(&self.board)) {
                out.json_without_id("period", &view);
            }
        }
    }

    fn ends_at(&self) -> Option<DateTime<Utc>> {
        self.board.period.map(|period| period.end)
    }

    fn next(&self) -> Option<sse::Next<Self>> {
        let end = self.ends_at()?;
        let board = self.board.following(end);
        let mut announce = Frames::default();
        let view = serde_json::to_value(WindowView::from(&board)).ok()?;
        announce.json(0, "period", &view);
        Some(sse::Next {
            source: Entries {
                state: self.state.clone(),
                board,
            },
            key: board.id.to_string(),
            announce,
        })
    }
}

/// Server-Sent Events: `entry` `{"user_id", "score", "rank", "previous_rank",
/// "attempts"}` for each changed entry; `resync` when a resume missed too
/// much, or when one batch of the projection changed more than 100 entries of
/// the board (a backlog being worked off): reload then. Ids are log seqs;
/// resume with `Last-Event-ID`. With a `window`, the stream follows the
/// current period's board: it opens with `period` `{"window",
/// "period_start", "period_end"}` (no id), and when the period ends (within
/// a second) it sends `period` for the new one with id 0, then the new
/// period's entries so far, and goes on with it.
#[utoipa::path(get, path = "/v1/tests/{test_id}/leaderboard/stream", tag = "leaderboards",
    params(("test_id" = Uuid, Path), ("last-event-id" = Option<String>, Header), crate::http::sse::StreamQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", headers(("cache-control" = String, description = "no-cache"), ("x-accel-buffering" = String, description = "no"))),
        (status = 400, description = "Malformed id or Last-Event-ID"),
        (status = 404, description = "No such test"),
        (status = 422, description = "An unknown `window`, or a `period` or `as_of` (streams follow the current board)"),
        (status = 429, description = "Too many open streams"),
    ))]
async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(test_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    ApiQuery(board): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    stream_of(state, headers, Subject::Test(test_id), query, board).await
}

/// Server-Sent Events of a collection's leaderboard, as for a test's: `entry`
/// `{"user_id", "score", "rank", "previous_rank", "attempts"}` (`score`: the
/// sum of the user's bests; `attempts`: the tests they have taken), `resync`,
/// and with a `window`, `period`.
#[utoipa::path(get, path = "/v1/collections/{collection_id}/leaderboard/stream", tag = "collections",
    params(("collection_id" = Uuid, Path), ("last-event-id" = Option<String>, Header), crate::http::sse::StreamQuery, BoardQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", headers(("cache-control" = String, description = "no-cache"), ("x-accel-buffering" = String, description = "no"))),
        (status = 400, description = "Malformed id or Last-Event-ID"),
        (status = 404, description = "No such collection"),
        (status = 422, description = "An unknown `window`, or a `period` or `as_of` (streams follow the current board)"),
        (status = 429, description = "Too many open streams"),
    ))]
async fn collection_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(collection_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    ApiQuery(board): ApiQuery<BoardQuery>,
) -> Result<Response, ApiError> {
    stream_of(
        state,
        headers,
        Subject::Collection(collection_id),
        query,
        board,
    )
    .await
}

async fn stream_of(
    state: AppState,
    headers: HeaderMap,
    subject: Subject,
    query: StreamQuery,
    board: BoardQuery,
) -> Result<Response, ApiError> {
    let principal = query.caller(&state, &headers).await?;
    if board.period.is_some() {
        return Err(pagination::invalid(
            "period",
            "streams follow the current period; read a past period's pages instead",
        ));
    }
    if board.as_of.is_some() {
        return Err(pagination::invalid(
            "as_of",
            "streams follow the board as it is; read a past board's pages instead",
        ));
    }
    let board = board.board(subject, state.clock.now())?;
    let last_event_id = query.last_event_id(&headers)?;
    subject.exists(&state).await?;
    let key = board.id.to_string();
    let source = Entries {
        state: state.clone(),
        board,
    };
    sse::open(
        &state,
        principal.user_id.as_str(),
        source,
        leaderboard::TOPIC,
        &key,
        last_event_id,
    )
    .await
}
