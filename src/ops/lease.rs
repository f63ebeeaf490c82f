//! Leases: exactly one active owner, across every instance, for each
//! background role (the relay of a NATS prefix, each projection).
//!
//! A lease is a row in `leases` with an owner, a token and an expiry on the
//! database's clock. Its owner renews it several times per TTL; an owner that
//! stops renewing (paused, killed, cut off) loses it within one TTL, and a
//! standby polling for it takes it over, growing the token. Everything the
//! owner writes checks that token inside its transaction ([`Fence`]), so an
//! ex-owner that wakes up writes nothing. A session advisory lock would not
//! do: it lives as long as its TCP connection, which a paused process keeps.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use podium_nats::stopped_during;
use podium_projections::Fence;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A fresh name for an instance in lease rows: host, pid and a random part
/// (a restarted process with a recycled pid is someone else, and so is each
/// of several applications in one test process).
pub fn new_instance_id() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    let host = HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map_or_else(|| "unknown".into(), |h| h.trim().to_string())
    });
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &random[..8])
}

/// One role's lease, as held (or wanted) by this process.
#[derive(Clone)]
pub struct Lease {
    pool: PgPool,
    ttl: Duration,
    fence: Fence,
    /// The instance holding (or wanting) it.
    owner: Arc<str>,
}

impl Lease {
    pub fn new(pool: PgPool, name: &str, ttl: Duration, owner: &str) -> Self {
        Self {
            pool,
            ttl,
            fence: Fence::new(name),
            owner: owner.into(),
        }
    }

    pub fn name(&self) -> &str {
        self.fence.name()
    }

    /// The fence that writers of this role check.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }

    /// Takes the lease if it is free, lapsed, or already ours; true if held.
    pub async fn try_acquire(&self) -> Result<bool, sqlx::Error> {
        // A plain read first: the upsert below locks the row even when it
        // changes nothing, and a standby looking every fraction of a second
        // must not make the owner's transactions wait.
        let held: Option<bool> = sqlx::query_scalar(
            "SELECT expires_at >= now() AND owner <> $2 FROM leases WHERE name = $1",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .fetch_optional(&self.pool)
        .await?;
        if held == Some(true) {
            self.fence.set_token(0);
            return Ok(false);
        }
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases (name, owner, token, expires_at)
             VALUES ($1, $2, 1, now() + make_interval(secs => $3 / 1000.0))
             ON CONFLICT (name) DO UPDATE
                SET owner = EXCLUDED.owner, token = leases.token + 1,
                    expires_at = EXCLUDED.expires_at, acquired_at = now(), halted = NULL
              WHERE leases.expires_at < now() OR leases.owner = EXCLUDED.owner
             RETURNING token",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(self.ttl_ms() as f64)
        .fetch_optional(&self.pool)
        .await?;
        self.fence.set_token(token.unwrap_or(0));
        Ok(token.is_some())
    }

    /// Extends the lease; false if another instance has taken it. A lapsed
    /// lease that nobody took is still ours.
    pub async fn renew(&self) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $4 / 1000.0)
              WHERE name = $1 AND owner = $2 AND token = $3",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(self.fence.token())
        .bind(self.ttl_ms() as f64)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if !renewed {
            self.fence.set_token(0);
        }
        Ok(renewed)
    }

    /// Says on the lease row why its owner halted the role (every instance
    /// reads it there), while the lease is still ours.
    async fn note_halted(&self, reason: &str) {
        let noted = sqlx::query(
            "UPDATE leases SET halted = $4 WHERE name = $1 AND owner = $2 AND token = $3",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(self.fence.token())
        .bind(reason)
        .execute(&self.pool)
        .await;
        if let Err(err) = noted {
            tracing::warn!(lease = self.name(), %err, "cannot note that a role halted");
        }
    }

    /// Gives the lease up at once, so that a standby need not wait for it to
    /// lapse.
    pub async fn release(&self) {
        let token = self.fence.token();
        self.fence.set_token(0);
        if token == 0 {
            return;
        }
        let released = sqlx::query(
            "UPDATE leases SET expires_at = now() - interval '1 millisecond'
              WHERE name = $1 AND owner = $2 AND token = $3",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(token)
        .execute(&self.pool)
        .await;
        if let Err(err) = released {
            tracing::warn!(lease = self.name(), %err, "cannot release a lease; it will lapse");
        }
    }

    /// How often a standby looks for a lapsed lease.
    fn standby_poll(&self) -> Duration {
        (self.ttl / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// How often the owner renews: several times per TTL, so that one slow
    /// renewal does not lose it.
    fn renew_every(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(25))
    }
}

/// What a role reports when it returns.
#[derive(Debug)]
pub enum RoleExit {
    /// Told to stop (shutdown, or the lease was lost).
    Stopped,
    /// Fenced off by a new owner.
    Fenced,
    /// Cannot go on without an operator (an event dead-lettered with the stop
    /// policy, events missing from the stream): tried again after a long
    /// pause, in case the cause went away.
    Halted(String),
    /// Failed otherwise: restarted after a short pause.
    Failed(String),
}

/// A role's state in this process, for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct RoleStatus {
    state: AtomicU8,
    halted: std::sync::Mutex<Option<String>>,
    /// Ends a halted role's pause early (an operator acted).
    wake: tokio::sync::Notify,
}

/// What a role is doing in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleState {
    /// Another instance holds the lease; this one waits to take over.
    Standby,
    /// This instance holds the lease and runs the role.
    Running,
    /// Halted until an operator acts (see [`RoleStatus::halted`]).
    Halted,
}

impl RoleStatus {
    pub fn state(&self) -> RoleState {
        match self.state.load(Ordering::Relaxed) {
            1 => RoleState::Running,
            2 => RoleState::Halted,
            _ => RoleState::Standby,
        }
    }

    /// Tries a halted role again now rather than after its pause.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Why the role halted, while it is halted.
    pub fn halted(&self) -> Option<String> {
        self.halted.lock().unwrap().clone()
    }

    fn set(&self, state: RoleState) {
        let code = match state {
            RoleState::Standby => 0,
            RoleState::Running => 1,
            RoleState::Halted => 2,
        };
        self.state.store(code, Ordering::Relaxed);
        if state != RoleState::Halted {
            *self.halted.lock().unwrap() = None;
        }
    }

    fn halt(&self, reason: String) {
        *self.halted.lock().unwrap() = Some(reason);
        self.set(RoleState::Halted);
    }
}

/// How long a halted role waits before it is tried again.
const HALTED_RETRY: Duration = Duration::from_secs(30);

/// Runs `role` whenever this process holds `lease`, until `stop` is
/// cancelled: waits as a standby, renews the lease while the role runs, and
/// starts the role again after it fails. The role is given a stop token (a
/// child of `stop`) that is also cancelled when the lease is lost.
pub async fn supervise<F, Fut>(
    lease: Lease,
    status: Arc<RoleStatus>,
    stop: CancellationToken,
    mut role: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = RoleExit>,
{
    loop {
        if !wait_for(&lease, &status, &stop).await {
            return;
        }
        tracing::info!(
            role = lease.name(),
            owner = &*lease.owner,
            "took over the lease"
        );
        status.set(RoleState::Running);
        let role_stop = stop.child_token();
        // The heartbeat runs beside the role in this task (so that it ends
        // with it, however it ends), and tells it to stop if the lease is lost.
        let running = role(role_stop.clone());
        tokio::pin!(running);
        let exit = tokio::select! {
            exit = &mut running => exit,
            () = heartbeat(&lease, &stop) => {
                role_stop.cancel();
                running.await
            }
        };
        let pause = match exit {
            RoleExit::Stopped | RoleExit::Fenced => None,
            RoleExit::Failed(reason) => {
                tracing::error!(role = lease.name(), reason, "a role failed; restarting it");
                Some(Duration::from_secs(1))
            }
            RoleExit::Halted(reason) => {
                tracing::error!(role = lease.name(), reason, "a role halted");
                lease.note_halted(&reason).await;
                status.halt(reason);
                Some(HALTED_RETRY)
            }
        };
        if stop.is_cancelled() {
            lease.release().await;
            status.set(RoleState::Standby);
            return;
        }
        if let Some(pause) = pause {
            // Keep the lease through the pause: another instance would fail
            // the same way.
            let stopped = tokio::select! {
                stopped = stopped_during(pause, &stop) => stopped,
                () = heartbeat(&lease, &stop) => stop.is_cancelled(),
                () = status.wake.notified() => false,
            };
            if stopped {
                lease.release().await;
                status.set(RoleState::Standby);
                return;
            }
        } else {
            tracing::info!(role = lease.name(), "lost the lease; standing by");
            status.set(RoleState::Standby);
        }
    }
}

/// Waits until the lease is ours (true) or `stop` is cancelled (false).
async fn wait_for(lease: &Lease, status: &RoleStatus, stop: &CancellationToken) -> bool {
    loop {
        match lease.try_acquire().await {
            Ok(true) => return true,
            Ok(false) => {
                if status.state() != RoleState::Halted {
                    status.set(RoleState::Standby);
                }
            }
            Err(err) => tracing::warn!(role = lease.name(), %err, "cannot look at the lease"),
        }
        if stopped_during(lease.standby_poll(), stop).await {
            return false;
        }
    }
}

/// Renews `lease` until `stop` is cancelled or the lease is lost. While the
/// database is unreachable it keeps trying: nobody else can take the lease
/// then, and the fence guards every write should someone have taken it
/// meanwhile.
async fn heartbeat(lease: &Lease, stop: &CancellationToken) {
    loop {
        if stopped_during(lease.renew_every(), stop).await {
            return;
        }
        match lease.renew().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(role = lease.name(), "another instance took the lease over");
                return;
            }
            Err(err) => {
                tracing::warn!(role = lease.name(), %err, "cannot renew the lease; retrying")
            }
        }
    }
}
