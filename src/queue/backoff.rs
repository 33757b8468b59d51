//! Retry backoff: exponential with jitter, `min(base * 2^(attempt-1), cap) * (1 ± 20 %)`.

use std::time::Duration;

use rand::Rng;

/// Delay before retrying after `attempt` (1-based) failed; `jitter` in `[-1, 1]` scales the ±20 %.
pub fn backoff(attempt: i32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).clamp(0, 30) as u32;
    let raw = base.saturating_mul(2u32.saturating_pow(exponent)).min(cap);
    raw.mul_f64(1.0 + 0.2 * jitter.clamp(-1.0, 1.0))
}

/// [`backoff`] with a random jitter.
pub(crate) fn random_backoff(attempt: i32, base: Duration, cap: Duration) -> Duration {
    backoff(attempt, base, cap, rand::rng().random_range(-1.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(15);
    const CAP: Duration = Duration::from_secs(600);

    #[test]
    fn doubles_per_attempt_until_the_cap() {
        assert_eq!(backoff(1, BASE, CAP, 0.0), Duration::from_secs(15));
        assert_eq!(backoff(2, BASE, CAP, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(3, BASE, CAP, 0.0), Duration::from_secs(60));
        assert_eq!(backoff(10, BASE, CAP, 0.0), CAP);
        assert_eq!(backoff(i32::MAX, BASE, CAP, 0.0), CAP);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(backoff(1, BASE, CAP, 1.0), Duration::from_secs(18));
        assert_eq!(backoff(1, BASE, CAP, -1.0), Duration::from_secs(12));
        for _ in 0..100 {
            let d = random_backoff(2, BASE, CAP);
            assert!(d >= Duration::from_secs(24) && d <= Duration::from_secs(36), "{d:?}");
        }
    }
}
