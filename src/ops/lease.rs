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
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// The instances it shares its roles with, if it spreads them.
    roster: Option<Arc<Roster>>,
}

impl Lease {
    pub fn new(pool: PgPool, name: &str, ttl: Duration, owner: &str) -> Self {
        Self {
            pool,
            ttl,
            fence: Fence::new(name),
            owner: owner.into(),
            roster: None,
        }
    }

    /// Takes this lease only within the instance's share of the roles of
    /// `roster`, and hands it over when the instance holds more.
    pub fn on_roster(mut self, roster: &Arc<Roster>) -> Self {
        roster.roles.fetch_add(1, Ordering::Relaxed);
        self.roster = Some(roster.clone());
        self
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
    /// An instance that holds its share of the roles already ([`Roster`])
    /// takes a lapsed lease only once it has lapsed for a whole TTL: until
    /// then it is left to an instance below its share.
    pub async fn try_acquire(&self) -> Result<bool, sqlx::Error> {
        let grace_ms = match &self.roster {
            Some(roster) if roster.at_share() => self.ttl_ms(),
            _ => 0,
        };
        // A plain read first: the upsert below locks the row even when it
        // changes nothing, and a standby looking every fraction of a second
        // must not make the owner's transactions wait.
        let held: Option<bool> = sqlx::query_scalar(
            "SELECT CASE WHEN owner = $2 THEN false
                         ELSE expires_at + make_interval(secs => $3 / 1000.0) >= now() END
               FROM leases WHERE name = $1",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(grace_ms as f64)
        .fetch_optional(&self.pool)
        .await?;
        if held == Some(true) {
            self.fence.set_token(0);
            return Ok(false);
        }
        // Ours while it is live; once lapsed (or handed over), ours again
        // only as anyone's.
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases (name, owner, token, expires_at)
             VALUES ($1, $2, 1, now() + make_interval(secs => $3 / 1000.0))
             ON CONFLICT (name) DO UPDATE
                SET owner = EXCLUDED.owner, token = leases.token + 1,
                    expires_at = EXCLUDED.expires_at, acquired_at = now(), halted = NULL
              WHERE leases.expires_at + make_interval(secs => $4 / 1000.0) < now()
                 OR (leases.owner = EXCLUDED.owner AND leases.expires_at >= now())
             RETURNING token",
        )
        .bind(self.name())
        .bind(&*self.owner)
        .bind(self.ttl_ms() as f64)
        .bind(grace_ms as f64)
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

/// This instance among those that run the background roles: each takes at
/// most its share of them, ⌈roles / live instances⌉, and hands what it holds
/// beyond that over, one role at a time, so that the work spreads over the
/// instances (a backlog's relay, policy and rebuild on different machines)
/// instead of staying with whichever started first. An instance is live
/// while its row in `instances` is fresh: it renews it as often as a lease,
/// so a paused or killed instance stops counting when its leases lapse.
pub struct Roster {
    pool: PgPool,
    instance: Arc<str>,
    ttl: Duration,
    /// Roles whose leases this instance runs ([`Lease::on_roster`]).
    roles: AtomicUsize,
    /// Of those, the ones it holds now.
    held: AtomicUsize,
    /// Live instances, itself included, as last counted.
    live: AtomicUsize,
    /// When it last handed a role over.
    handed_over: Mutex<Option<Instant>>,
}

impl Roster {
    pub fn new(pool: PgPool, instance: &str, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            pool,
            instance: instance.into(),
            ttl,
            roles: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            live: AtomicUsize::new(1),
            handed_over: Mutex::new(None),
        })
    }

    /// How many roles this instance may hold: ⌈roles / live instances⌉.
    pub fn share(&self) -> usize {
        let live = self.live.load(Ordering::Relaxed).max(1);
        self.roles.load(Ordering::Relaxed).div_ceil(live)
    }

    /// Roles held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Live instances, itself included, as last counted.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn at_share(&self) -> bool {
        self.held() >= self.share()
    }

    /// Whether a role of this instance's should be handed over now: it holds
    /// more than its share, and it handed none over for half a TTL (the
    /// time another instance takes to pick one up).
    fn hand_over_one(&self) -> bool {
        let mut last = self.handed_over.lock().unwrap();
        let due = last.is_none_or(|at| at.elapsed() >= self.ttl / 2);
        if due && self.held() > self.share() {
            *last = Some(Instant::now());
            return true;
        }
        false
    }

    /// Keeps this instance's row fresh and counts the live instances, as
    /// often as a lease is renewed, until `stop` is cancelled; then removes
    /// the row, so that the others' shares grow at once.
    pub async fn keep_present(self: Arc<Self>, stop: CancellationToken) {
        let gone = sqlx::query("DELETE FROM instances WHERE seen_until < now() - interval '1 day'")
            .execute(&self.pool)
            .await;
        if let Err(err) = gone {
            tracing::debug!(%err, "cannot forget long-gone instances");
        }
        let every = (self.ttl / 4).max(Duration::from_millis(25));
        let mut failing = false;
        loop {
            let others: Result<i64, sqlx::Error> = sqlx::query_scalar(
                "WITH seen AS (
                    INSERT INTO instances (id, seen_until)
                    VALUES ($1, now() + make_interval(secs => $2 / 1000.0))
                    ON CONFLICT (id) DO UPDATE SET seen_until = EXCLUDED.seen_until)
                 SELECT count(*) FROM instances WHERE seen_until >= now() AND id <> $1",
            )
            .bind(&*self.instance)
            .bind(self.ttl.as_millis() as f64)
            .fetch_one(&self.pool)
            .await;
            match others {
                Ok(others) => {
                    let live = others as usize + 1;
                    if self.live.swap(live, Ordering::Relaxed) != live {
                        tracing::info!(
                            live,
                            share = self.share(),
                            held = self.held(),
                            "instances sharing the roles"
                        );
                    }
                    failing = false;
                }
                Err(err) if !failing => {
                    tracing::warn!(%err, "cannot say this instance is live; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
            if stopped_during(every, &stop).await {
                break;
            }
        }
        let left = sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(&*self.instance)
            .execute(&self.pool)
            .await;
        if let Err(err) = left {
            tracing::warn!(%err, "cannot remove this instance's row; it will lapse");
        }
    }
}

/// A role's lease as counted in its instance's [`Roster`]: held from when it
/// is taken until it is let go (or the role's supervisor ends).
struct Counted<'a> {
    roster: Option<&'a Roster>,
    holding: bool,
}

impl<'a> Counted<'a> {
    fn new(lease: &'a Lease) -> Self {
        Self {
            roster: lease.roster.as_deref(),
            holding: false,
        }
    }

    fn take(&mut self) {
        if let (Some(roster), false) = (self.roster, self.holding) {
            roster.held.fetch_add(1, Ordering::Relaxed);
        }
        self.holding = true;
    }

    fn let_go(&mut self) {
        if let (Some(roster), true) = (self.roster, self.holding) {
            roster.held.fetch_sub(1, Ordering::Relaxed);
        }
        self.holding = false;
    }

    /// Resolves when this role should be handed over to spread the roles.
    async fn hand_over_due(&self, stop: &CancellationToken, every: Duration) {
        let Some(roster) = self.roster else {
            return std::future::pending().await;
        };
        while !stopped_during(every, stop).await {
            if roster.hand_over_one() {
                return;
            }
        }
        std::future::pending().await
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.let_go();
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
    let mut counted = Counted::new(&lease);
    loop {
        if !wait_for(&lease, &status, &stop).await {
            return;
        }
        counted.take();
        tracing::info!(
            role = lease.name(),
            owner = &*lease.owner,
            "took over the lease"
        );
        status.set(RoleState::Running);
        let role_stop = stop.child_token();
        // The heartbeat runs beside the role in this task (so that it ends
        // with it, however it ends), and tells it to stop if the lease is
        // lost, or if the role is to go to an instance below its share.
        let running = role(role_stop.clone());
        tokio::pin!(running);
        let mut handing_over = false;
        let exit = tokio::select! {
            exit = &mut running => exit,
            () = heartbeat(&lease, &stop) => {
                role_stop.cancel();
                running.await
            }
            () = counted.hand_over_due(&stop, lease.renew_every()) => {
                handing_over = true;
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
        if stop.is_cancelled() || handing_over {
            lease.release().await;
            counted.let_go();
            status.set(RoleState::Standby);
            if stop.is_cancelled() {
                return;
            }
            tracing::info!(
                role = lease.name(),
                "handed the lease over to spread the roles; standing by"
            );
            continue;
        }
        if let Some(pause) = pause {
            // Keep the lease through the pause: another instance would fail
            // the same way.
            let (stopped, lost) = tokio::select! {
                stopped = stopped_during(pause, &stop) => (stopped, false),
                () = heartbeat(&lease, &stop) => (stop.is_cancelled(), !stop.is_cancelled()),
                () = status.wake.notified() => (false, false),
            };
            if lost {
                counted.let_go();
            }
            if stopped {
                lease.release().await;
                counted.let_go();
                status.set(RoleState::Standby);
                return;
            }
        } else {
            tracing::info!(role = lease.name(), "lost the lease; standing by");
            counted.let_go();
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
