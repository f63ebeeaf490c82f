//! The `podium` binary's library, laid out by the stages of the data flow:
//!
//! ```text
//! http ──▶ command ──▶ events table ──▶ relay ──▶ NATS ──▶ projector ──▶ read models
//!  ▲                    (log)                                  │
//!  └──────────── query (store, cache, change hub) ◀────────────┘
//! ```
//!
//! | module | holds | may use |
//! |---|---|---|
//! | [`clock`], [`auth`] | the clock (system or manual), tokens and roles | nothing |
//! | [`config`] | the settings, parsed into types (budgets, proxies, origins) | `clock` |
//! | [`ops`] | pools, leases, metrics, logging, shutdown | `config` |
//! | [`log`] | the event log: Postgres tail and reader, in-memory log | `ops`, `clock` |
//! | [`command`] | aggregates' stores, the event repository, the notification policy, idempotency keys | `log`, `ops`, `clock` |
//! | [`query`] | read-store port and adapters, query cache, change hub | `log`, `ops` |
//! | [`ratelimit`] | the limiter, the window-store port and adapters | `ops`, `config`, `clock` |
//! | [`relay`] | the outbox relay: leadership, targets (JetStream, in-process) | `query`, `log`, `ops`, `config` |
//! | [`projector`] | the projection registry and runners (NATS, in-process), replay, period podiums | `relay`, `command`, `query`, `delivery`, `log`, `ops`, `config`, `clock` |
//! | [`delivery`] | email and webhook delivery: intake, dispatch, their stores, SMTP and HTTP senders | `ops`, `config` |
//! | [`http`] | router, errors, extractors, SSE, middleware, routes, OpenAPI | `auth`, `query`, `command`, `ratelimit`, `delivery`, `ops`, `config`, `clock` |
//! | [`cli`], [`app`] | the command line and the wiring of a running instance | everything |
//!
//! `main.rs` only parses the command line and calls [`cli::run`]; tests start
//! the same [`app::Application`] on port 0. A test (`tests/api/layout.rs`)
//! keeps the arrows of this table pointing one way.
#![forbid(unsafe_code)]

/// mimalloc keeps each size of allocation in pages of its own and gives a
/// page back to the system once it is empty: the buffers of a burst of
/// connections (16 KiB each while hyper holds them) are returned when the
/// connections close or their streams move to a writer. glibc's heap kept
/// them, pinned by the small long-lived allocations between them (16 KiB of
/// RSS per open stream instead of about 2). One allocator for the server,
/// the benchmarks and the tests.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod delivery;
pub mod http;
pub mod log;
pub mod ops;
pub mod projector;
pub mod query;
pub mod ratelimit;
pub mod relay;

pub use app::Application;
pub use config::Settings;
