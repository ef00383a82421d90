//! The client's circuit breaker: consecutive failures open it, and while
//! it is open calls fail fast; after the cooldown one probe decides.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// State of the client's circuit breaker, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

/// `HalfOpen`: the cooldown is over; `probing` while the one probe is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transition {
    Opened,
    Closed,
}

/// Consecutive-failure breaker: `threshold` failures open it for
/// `cooldown`, then one probe decides between closed and open again.
#[derive(Debug)]
pub(super) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

/// Leave to make one call; report its outcome with [`Permit::finish`]. A
/// dropped (cancelled) probe frees the probe slot.
pub(super) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    finished: bool,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold, cooldown, state: Mutex::new(BreakerState::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn state(&self, now: Instant) -> CircuitState {
        match *self.lock() {
            BreakerState::Closed { .. } => CircuitState::Closed,
            BreakerState::Open { until } if now >= until => CircuitState::HalfOpen,
            BreakerState::Open { .. } => CircuitState::Open,
            BreakerState::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// A permit, or how long until the next attempt may go through.
    pub(super) fn admit(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let permit = |probe| Permit { breaker: self, probe, finished: false };
        if self.threshold == 0 {
            return Ok(permit(false));
        }
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => Ok(permit(false)),
            BreakerState::Open { until } if now < until => Err(until - now),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                *state = BreakerState::HalfOpen { probing: true };
                Ok(permit(true))
            }
            BreakerState::HalfOpen { probing: true } => Err(Duration::ZERO),
        }
    }

    fn record(&self, probe: bool, healthy: bool, now: Instant) -> Option<Transition> {
        if self.threshold == 0 {
            return None;
        }
        let mut state = self.lock();
        match (*state, probe, healthy) {
            (BreakerState::HalfOpen { .. }, true, true) => {
                *state = BreakerState::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (BreakerState::HalfOpen { .. }, true, false) => {
                *state = BreakerState::Open { until: now + self.cooldown };
                Some(Transition::Opened)
            }
            (BreakerState::Closed { .. }, false, true) => {
                *state = BreakerState::Closed { failures: 0 };
                None
            }
            (BreakerState::Closed { failures }, false, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    *state = BreakerState::Open { until: now + self.cooldown };
                    Some(Transition::Opened)
                } else {
                    *state = BreakerState::Closed { failures };
                    None
                }
            }
            // Late outcomes of calls admitted before the state changed.
            _ => None,
        }
    }
}

impl Permit<'_> {
    pub(super) fn finish(self, healthy: bool) -> Option<Transition> {
        self.finish_at(healthy, Instant::now())
    }

    fn finish_at(mut self, healthy: bool, now: Instant) -> Option<Transition> {
        self.finished = true;
        self.breaker.record(self.probe, healthy, now)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished && self.probe {
            let mut state = self.breaker.lock();
            if *state == (BreakerState::HalfOpen { probing: true }) {
                *state = BreakerState::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_fails_fast_and_recovers() {
        let b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        }
        // A success resets the count.
        assert_eq!(b.admit(t0).unwrap().finish_at(true, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), Some(Transition::Opened));
        assert_eq!(b.state(t0), CircuitState::Open);
        assert_eq!(b.admit(t0 + Duration::from_secs(10)).err(), Some(Duration::from_secs(20)));

        // Cooldown over: one probe, the others still fail fast.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        let probe = b.admit(later).unwrap();
        assert!(probe.probe);
        assert_eq!(b.admit(later).err(), Some(Duration::ZERO));
        // The probe fails: open again for a full cooldown.
        assert_eq!(probe.finish_at(false, later), Some(Transition::Opened));
        assert!(b.admit(later + Duration::from_secs(29)).is_err());

        // The next probe succeeds: closed.
        let again = later + Duration::from_secs(30);
        let probe = b.admit(again).unwrap();
        assert!(probe.probe);
        assert_eq!(probe.finish_at(true, again), Some(Transition::Closed));
        assert_eq!(b.state(again), CircuitState::Closed);
        assert!(!b.admit(again).unwrap().probe);
    }

    #[test]
    fn cancelled_probe_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), Some(Transition::Opened));
        let later = t0 + Duration::from_secs(1);
        let probe = b.admit(later).unwrap();
        assert!(probe.probe);
        drop(probe);
        assert!(b.admit(later).unwrap().probe);
    }

    #[test]
    fn zero_threshold_disables_the_breaker() {
        let b = Breaker::new(0, Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.admit(t0).unwrap().finish(false), None);
        }
        assert_eq!(b.state(t0), CircuitState::Closed);
    }
}
