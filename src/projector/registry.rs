//! The one list of Podium's projections. The NATS workers, the relay's
//! in-process target and `podium replay` all take their projections from
//! here, so a projection added here is run, fenced and rebuildable
//! everywhere. (The embedded mode keeps the same read models in memory,
//! [`podium_projections::memory::MemoryModels`], and runs the same policy.)

use std::sync::Arc;

use podium_projections::attempts::{self, AttemptsFold, AttemptsProjection};
use podium_projections::catalog::{self, CatalogProjection};
use podium_projections::feed::{self, FeedFold, FeedProjection};
use podium_projections::fold::Fold;
use podium_projections::leaderboard::{self, LeaderboardFold, LeaderboardProjection, LiveBoards};
use podium_projections::{Generation, ProjectionLogic};

use crate::command::policy::NotificationPolicy;
use crate::command::Aggregates;

/// A read model that `podium serve` keeps and `podium replay` can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModel {
    Leaderboard,
    Feed,
    Attempts,
    Catalog,
}

impl ReadModel {
    /// Every read model, in the order they are applied.
    pub const ALL: [Self; 4] = [Self::Leaderboard, Self::Feed, Self::Attempts, Self::Catalog];

    /// The live projection's name (its checkpoint's).
    pub fn name(self) -> &'static str {
        match self {
            Self::Leaderboard => leaderboard::NAME,
            Self::Feed => feed::NAME,
            Self::Attempts => attempts::NAME,
            Self::Catalog => catalog::NAME,
        }
    }

    /// Its live tables.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Leaderboard => &leaderboard::TABLES,
            Self::Feed => &feed::TABLES,
            Self::Attempts => &attempts::TABLES,
            Self::Catalog => &catalog::TABLES,
        }
    }

    /// Its fold for rebuilds, if it has one: the read model computed in
    /// memory and written with COPY (the others rebuild through their
    /// set-wise projection).
    pub fn fold(self) -> Option<Box<dyn Fold>> {
        match self {
            Self::Leaderboard => Some(Box::new(LeaderboardFold::default())),
            Self::Attempts => Some(Box::new(AttemptsFold::default())),
            Self::Feed => Some(Box::new(FeedFold::default())),
            Self::Catalog => None,
        }
    }

    /// Hands its projection for `generation` (the live tables or their
    /// `__next` copies) to `to`.
    pub fn register_into<R: Register>(self, generation: Generation, to: &mut R) {
        match self {
            Self::Leaderboard => to.register(LeaderboardProjection::new(generation)),
            Self::Feed => to.register(FeedProjection::new(generation)),
            Self::Attempts => to.register(AttemptsProjection::new(generation)),
            Self::Catalog => to.register(CatalogProjection::new(generation)),
        }
    }
}

/// What runs projections: given each one's logic in turn.
pub trait Register {
    fn register<L: ProjectionLogic>(&mut self, logic: L);
}

/// What live projections act through besides their tables.
#[derive(Clone)]
pub struct LiveParts {
    /// Where the notification policy's commands go.
    pub aggregates: Arc<Aggregates>,
    /// This instance's rank index, which the leaderboard ranks what it
    /// announces with where it can.
    pub boards: Option<Arc<dyn LiveBoards>>,
}

/// Every projection a deployment keeps live: the read models, then the
/// notification policy.
pub fn live(parts: LiveParts, to: &mut impl Register) {
    for model in ReadModel::ALL {
        match model {
            ReadModel::Leaderboard => to.register(
                LeaderboardProjection::new(Generation::Live).ranking_with(parts.boards.clone()),
            ),
            other => other.register_into(Generation::Live, to),
        }
    }
    to.register(NotificationPolicy::new(parts.aggregates));
}
