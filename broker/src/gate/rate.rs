//! A token bucket per connection: how the gate holds a device to its message rate.
//!
//! Each packet a device starts (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PINGREQ) takes a token; tokens come back at the configured rate up to the burst size.
//! With no token left the gate waits before reading the next packet, so TCP pushes back on
//! the device: it is slowed, never disconnected, and nothing it sent is dropped.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens per second; `None` is unlimited.
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: (per_second > 0).then(|| f64::from(per_second)),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes a token; returns how long to wait before reading on when none was left.
    pub fn take(&mut self) -> Option<Duration> {
        let rate = self.rate?;
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_a_device_to_its_rate_after_the_burst() {
        let mut bucket = TokenBucket::new(10, 5);
        for _ in 0..5 {
            assert_eq!(bucket.take(), None);
        }
        // The sixth message must wait for one token: a tenth of a second.
        let wait = bucket.take().unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        tokio::time::advance(wait).await;
        // Waiting paid for that message; the next one waits another tenth.
        let wait = bucket.take().unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        tokio::time::advance(Duration::from_secs(10)).await;
        // A long pause refills to the burst, not beyond.
        for _ in 0..5 {
            assert_eq!(bucket.take(), None);
        }
        assert!(bucket.take().is_some());
    }

    #[test]
    fn zero_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 1);
        for _ in 0..10_000 {
            assert_eq!(bucket.take(), None);
        }
    }
}
