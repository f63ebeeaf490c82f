//! Integration tests: the real server on a random port, its own fresh Postgres
//! database per test, driven over HTTP.

mod helpers;
mod nats;
mod postgres;

mod auth;
mod bad_input;
mod browser;
mod commands;
mod concurrency;
mod conformance;
mod delivery;
mod edges;
mod embedded;
mod fanout;
mod fuzz;
mod idempotency;
mod idp;
mod instances;
mod layout;
mod notifications;
mod observability;
mod openapi;
mod podiums;
mod queries;
mod rank_index;
mod read_models;
mod replica;
mod single_node;
mod sse;
mod stores;
mod streams;
mod writers;
