//! Reconnect delays: exponential, with jitter so that a fleet that lost Tellus at one moment
//! does not come back at one moment.

use std::time::Duration;

/// The delays between connection attempts: `min` (at least 10 ms), doubling up to `max`,
/// each drawn at random from its upper half. A connection that lasted 10 s starts the
/// sequence over; one that Tellus closes sooner counts as a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Where a device is in its backoff sequence.
#[derive(Debug)]
pub(crate) struct Attempts {
    backoff: Backoff,
    failures: u32,
}

impl Attempts {
    pub fn new(backoff: Backoff) -> Attempts {
        let min = backoff.min.max(Duration::from_millis(10));
        Attempts {
            backoff: Backoff {
                min,
                max: backoff.max.max(min),
            },
            failures: 0,
        }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failed attempt (or a connection lost).
    pub fn note_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// The delay before the next attempt: none before the first after a success (a
    /// connection ended on purpose), then growing with the failures.
    pub fn delay(&self) -> Duration {
        let Some(doublings) = self.failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        let ceiling = self
            .backoff
            .min
            .saturating_mul(1u32 << doublings.min(20))
            .min(self.backoff.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    #[cfg(test)]
    fn next_delay(&mut self) -> Duration {
        self.note_failure();
        self.delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_bounds_and_start_over_after_a_success() {
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut attempts = Attempts::new(backoff);
        let ceilings = [100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000];
        for ceiling in ceilings {
            let d = attempts.next_delay().as_millis() as u64;
            assert!(
                (ceiling / 2..=ceiling).contains(&d),
                "{d} ms outside the upper half of {ceiling} ms"
            );
        }
        attempts.reset();
        assert!(attempts.next_delay() <= Duration::from_millis(100));
        // Many failures neither overflow nor pass the ceiling.
        for _ in 0..100 {
            assert!(attempts.next_delay() <= Duration::from_secs(2));
        }
    }

    #[test]
    fn delays_are_spread() {
        let mut attempts = Attempts::new(Backoff::default());
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                attempts.reset();
                attempts.next_delay()
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
