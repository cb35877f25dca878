//! Retry policies: how often a step is attempted and how long to wait between attempts.

use std::time::Duration;

/// How a step (or a compensation, or a fence) is retried after a retryable failure.
///
/// The delay before attempt `n + 1` is `initial_backoff * multiplier^(n - 1)`, capped at
/// `max_backoff`, then reduced by up to `jitter` (a fraction in `0.0..=1.0`) so that many sagas
/// failing together do not retry together. Retrying stops after `max_attempts`, or once
/// `max_elapsed` has passed since the first failed attempt, whichever comes first.
///
/// Forward steps default to [`RetryPolicy::default`] (5 attempts); compensations and fences
/// to [`RetryPolicy::patient`] (a day of retries), because an undo must eventually happen.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; at least 1.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth factor of the delay from one attempt to the next; at least 1.0.
    pub multiplier: f64,
    /// Fraction of the delay that may be taken off at random, in `0.0..=1.0`.
    pub jitter: f64,
    /// No retry is scheduled once this long has passed since the first failed attempt
    /// (`None`: only `max_attempts` bounds the retries).
    pub max_elapsed: Option<Duration>,
}

impl RetryPolicy {
    /// Default number of attempts.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// Default delay before the second attempt.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
    /// Default upper bound of a delay.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
    /// Default growth factor.
    pub const DEFAULT_MULTIPLIER: f64 = 2.0;
    /// Default jitter fraction.
    pub const DEFAULT_JITTER: f64 = 0.2;

    /// How long [`RetryPolicy::patient`] keeps retrying.
    pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(24 * 3600);
    /// The longest delay between two attempts of [`RetryPolicy::patient`].
    pub const PATIENT_MAX_BACKOFF: Duration = Duration::from_secs(300);

    /// A policy that makes one attempt and never retries.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The default of compensations and fences: retried from 1 s, doubling up to 5 minutes
    /// between attempts, for [`RetryPolicy::DEFAULT_PATIENCE`] (a day) after the first failure,
    /// however many attempts that takes. Then the saga parks as `stuck` with the reason.
    pub fn patient() -> Self {
        Self {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Self::PATIENT_MAX_BACKOFF,
            multiplier: Self::DEFAULT_MULTIPLIER,
            jitter: Self::DEFAULT_JITTER,
            max_elapsed: Some(Self::DEFAULT_PATIENCE),
        }
    }

    /// Whether another attempt may follow `attempt`, the first failure having been
    /// `elapsed` ago.
    pub fn allows_another(&self, attempt: u32, elapsed: Duration) -> bool {
        attempt < self.max_attempts && self.max_elapsed.is_none_or(|limit| elapsed < limit)
    }

    /// The delay before attempt `failed_attempt + 1`, given a `unit` random draw in `0.0..1.0`.
    ///
    /// The draw comes from the log (it is derived from the failed command's id), so replaying a
    /// saga always computes the same delay.
    pub fn delay(&self, failed_attempt: u32, unit: f64) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * unit.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }

    /// The smallest and largest delay [`RetryPolicy::delay`] can return after `failed_attempt`.
    pub fn delay_bounds(&self, failed_attempt: u32) -> (Duration, Duration) {
        (
            self.delay(failed_attempt, 1.0),
            self.delay(failed_attempt, 0.0),
        )
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "multiplier must be a finite number >= 1.0, got {}",
                self.multiplier
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!(
                "jitter must be within 0.0..=1.0, got {}",
                self.jitter
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(format!(
                "initial_backoff ({:?}) exceeds max_backoff ({:?})",
                self.initial_backoff, self.max_backoff
            ));
        }
        Ok(())
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            multiplier: Self::DEFAULT_MULTIPLIER,
            jitter: Self::DEFAULT_JITTER,
            max_elapsed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_within_policy_bounds(
            initial_ms in 1u64..5_000,
            extra_ms in 0u64..100_000,
            multiplier in 1.0f64..4.0,
            jitter in 0.0f64..=1.0,
            attempt in 1u32..40,
            unit in 0.0f64..1.0,
        ) {
            let policy = RetryPolicy {
                max_attempts: 50,
                initial_backoff: Duration::from_millis(initial_ms),
                max_backoff: Duration::from_millis(initial_ms + extra_ms),
                multiplier,
                jitter,
                max_elapsed: None,
            };
            let delay = policy.delay(attempt, unit);
            let (low, high) = policy.delay_bounds(attempt);
            prop_assert!(delay <= policy.max_backoff);
            prop_assert!(low <= delay && delay <= high);
            let undamped = (initial_ms as f64 * multiplier.powi(attempt as i32 - 1))
                .min((initial_ms + extra_ms) as f64);
            prop_assert!(delay.as_secs_f64() * 1000.0 >= undamped * (1.0 - jitter) - 1e-6);
        }
    }

    #[test]
    fn delays_grow_then_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
            jitter: 0.0,
            max_elapsed: None,
        };
        let delays: Vec<_> = (1..=4).map(|a| policy.delay(a, 0.5).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }

    #[test]
    fn a_patient_policy_stops_on_time_not_on_count() {
        let policy = RetryPolicy::patient();
        let day = RetryPolicy::DEFAULT_PATIENCE;
        assert!(policy.allows_another(10_000, day - Duration::from_secs(1)));
        assert!(!policy.allows_another(2, day));
        assert_eq!(policy.delay(30, 0.0), RetryPolicy::PATIENT_MAX_BACKOFF);
        assert!(RetryPolicy::default().allows_another(4, day * 10));
        assert!(!RetryPolicy::default().allows_another(5, Duration::ZERO));
    }
}
