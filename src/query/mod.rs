//! The query side below HTTP: the read-store port with its Postgres and
//! in-memory adapters, the query cache, the change hub that routes the
//! projections' change notifications to caches and streams, the rank index
//! that answers ranks from memory, and boards as of past instants. May use `ops` and `log`; answers in its own error type, never in HTTP's.

pub mod as_of;
pub mod cache;
pub mod changes;
pub mod rank_index;
pub mod store;
