//! The layers a request passes through before its handler: idempotency
//! keys, rate limits, request metrics. Each talks to a port (the
//! idempotency store, the rate limiter, the metrics registry), never to SQL.

pub mod idempotency;
pub mod limits;
pub mod observe;
