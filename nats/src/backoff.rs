//! Exponential backoff between retries, cut short by a stop signal: the one
//! retry schedule of the relay and the projection workers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays that double from `base` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            next: base,
        }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.base;
    }

    /// The delay before retry number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(16);
        (self.base * 2u32.pow(doublings)).min(self.max)
    }

    /// The next delay, doubling the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Waits the next delay; true if `stop` was cancelled (before or meanwhile).
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        stopped_during(delay, stop).await
    }
}

/// Waits `duration`; true if `stop` was cancelled before or meanwhile.
pub async fn stopped_during(duration: Duration, stop: &CancellationToken) -> bool {
    stop.run_until_cancelled(tokio::time::sleep(duration))
        .await
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let delays: Vec<u64> = (0..5)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.delay(1), Duration::from_millis(100));
        assert_eq!(backoff.delay(3), Duration::from_millis(400));
        assert_eq!(backoff.delay(60), Duration::from_millis(700));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_at_once() {
        let stop = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move { backoff.wait(&stop).await }
        });
        stop.cancel();
        assert!(waiting.await.unwrap(), "the wait reports the stop");
        assert!(stopped_during(Duration::from_secs(3600), &stop).await);
        let running = CancellationToken::new();
        assert!(!stopped_during(Duration::from_millis(1), &running).await);
    }
}
