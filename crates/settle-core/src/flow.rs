//! Flow control: how fast a run's items start, so that the service the
//! processor calls is not overrun (docs/flow-control.md).
//!
//! Each run has a scope, and with a key ([`FlowLimits`] and the item's
//! `key`) each key of the run has one of its own. A scope is a token bucket
//! whose rate adapts: a throttled answer (an HTTP 429, see
//! [`crate::domain::ErrorKind::Throttled`]) pauses the scope until its
//! retry-after and lowers the rate to 0.9 of the rate at which calls were
//! succeeding; while calls succeed the rate climbs back, quickly to just
//! under where it was throttled and then slowly past it (additive
//! increase, multiplicative decrease). After a pause only one call goes
//! out (a probe) until one succeeds, so an outage costs one call per pause,
//! not a burst. The ceiling of the rate is the run's `--rate` (the key's
//! `--key-rate`); without one, a scope is unlimited until it is throttled.
//!
//! An item that would wait long for its scope is not held: the worker sends
//! it round again after the wait ([`Admission::Later`]), its attempt
//! unused, so that a hot key's items never hold a place a cold key's item
//! could take (no head-of-line blocking across keys).

use crate::domain::RunId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A run's flow settings, stored with the run and carried by its messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowLimits {
    /// Calls per second at most for the whole run (`--rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Calls per second at most for each key (`--key-rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rate: Option<f64>,
    /// Items of one key in flight at once at most (`--key-concurrency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_concurrency: Option<u32>,
}

impl FlowLimits {
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.key_rate.is_none() && self.key_concurrency.is_none()
    }
}

/// The lowest rate a throttled scope slows to, per second.
pub const MIN_RATE: f64 = 0.2;
/// A wait up to this long is waited in place; a longer one sends the item round again.
pub const HOLD: Duration = Duration::from_millis(500);
/// The pause after a throttled answer that named no retry-after.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause between probes of a scope that keeps being throttled.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);
/// Share of the rate calls were succeeding at that a throttled scope slows to.
const DECREASE: f64 = 0.9;
/// Below this share of the rate it was throttled at, a scope climbs fast.
const RECOVERED: f64 = 0.9;
/// Climb per second, as shares of the rate it was throttled at: fast, then probing.
const FAST_CLIMB: f64 = 0.05;
const SLOW_CLIMB: f64 = 0.003;
/// The window over which the rate of successes is measured.
const WINDOW: Duration = Duration::from_secs(2);
const SLOTS: usize = 20;

/// What a worker may do with an item now.
#[derive(Debug)]
pub enum Admission {
    /// Start after `wait` (zero: now), holding `ticket` until it is done.
    Go { ticket: Ticket, wait: Duration },
    /// The whole run must wait (a pause, its rate): wait in place about
    /// this long and ask again. Every item of the run waits alike, so
    /// sending this one round would gain nothing and cost a queue trip.
    Wait(Duration),
    /// The item's key must wait: do not hold it, send it round again after
    /// this long, so that other keys' items behind it are reached.
    Later(Duration),
}

/// An admitted item's place in its scopes, given back with [`Limiter::done`].
#[derive(Debug)]
pub struct Ticket {
    run: RunId,
    key: Option<String>,
    probe: [bool; 2],
}

/// How an admitted item's call went, for the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The call was answered, not throttled (a success or a failure of the item's own).
    Answered,
    /// Throttled, with the retry-after asked for, if any.
    Throttled(Option<Duration>),
    /// Not run (the worker gave the item back before its call).
    NotRun,
}

/// What a scope looks like now: what `settle status` and the dashboard show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScopeState {
    /// `None` for the run's scope.
    pub key: Option<String>,
    /// Calls per second allowed now; `None`: no limit.
    pub rate: Option<f64>,
    /// Calls per second answered over the last two seconds.
    pub answered_per_s: f64,
    pub in_flight: u32,
    /// Paused until this long from now, after a throttled answer.
    pub paused_for_ms: Option<u64>,
    /// Throttled with no call answered since, for this long.
    pub throttled_for_ms: Option<u64>,
    /// Throttled answers so far.
    pub throttled: u64,
}

/// Counts of events over the last [`WINDOW`], in [`SLOTS`] slots.
#[derive(Debug, Clone)]
struct Window {
    slots: [u32; SLOTS],
    /// Index (in slot lengths since `origin`) of the newest slot.
    head: u64,
    origin: Instant,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            slots: [0; SLOTS],
            head: 0,
            origin: now,
        }
    }
    fn slot_of(&self, now: Instant) -> u64 {
        let slot = WINDOW / SLOTS as u32;
        (now.saturating_duration_since(self.origin).as_nanos() / slot.as_nanos()) as u64
    }
    fn advance(&mut self, now: Instant) {
        let at = self.slot_of(now);
        while self.head < at {
            self.head += 1;
            self.slots[(self.head % SLOTS as u64) as usize] = 0;
            if at - self.head >= SLOTS as u64 {
                self.slots = [0; SLOTS];
                self.head = at;
            }
        }
    }
    fn add(&mut self, now: Instant) {
        self.advance(now);
        self.slots[(self.head % SLOTS as u64) as usize] += 1;
    }
    /// Events per second over the busiest half second of the window: what
    /// the service took while calls were going out (a pause in the window
    /// would halve the plain average).
    fn busiest_per_second(&mut self, now: Instant) -> f64 {
        self.advance(now);
        const GROUP: usize = SLOTS / 4;
        let head = (self.head % SLOTS as u64) as usize;
        // Whole half seconds back from the newest slot, which is still filling.
        (0..4)
            .map(|g| {
                (0..GROUP)
                    .map(|i| self.slots[(head + SLOTS - 1 - g * GROUP - i) % SLOTS])
                    .sum::<u32>()
            })
            .max()
            .unwrap_or(0) as f64
            / (WINDOW.as_secs_f64() / 4.0)
    }

    /// Events per second over the window.
    fn per_second(&mut self, now: Instant) -> f64 {
        self.advance(now);
        let covered = now
            .saturating_duration_since(self.origin)
            .min(WINDOW)
            .as_secs_f64()
            .max(WINDOW.as_secs_f64() / SLOTS as f64);
        self.slots.iter().sum::<u32>() as f64 / covered
    }
}

/// One run's, or one key's, bucket.
#[derive(Debug)]
struct Scope {
    ceiling: Option<f64>,
    concurrency: Option<u32>,
    /// The rate now; `None`: unlimited.
    rate: Option<f64>,
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
    /// The rate it was last throttled at: where the fast climb stops.
    peak: Option<f64>,
    /// The highest rate it was ever throttled at: the scale of the climb.
    best: f64,
    /// When it was last throttled: the longer ago, the faster it climbs.
    last_throttle: Option<Instant>,
    /// The rate was set from a measure, not from a throttle at it: it
    /// doubles each second until the next throttle says where the limit is.
    doubling: bool,
    /// No further decrease before this: the answers of calls already out.
    calm_until: Option<Instant>,
    /// The first throttled answer since the last answered call.
    throttled_since: Option<Instant>,
    /// Throttles in a row with no answered call: the pause grows with them.
    streak: u32,
    answered: Window,
    in_flight: u32,
    probing: bool,
    throttled: u64,
    /// Average call duration, for spreading items sent round on a full key.
    mean_call: Duration,
    /// When the next item sent round should come back.
    next_return: Instant,
}

impl Scope {
    fn new(now: Instant, ceiling: Option<f64>, concurrency: Option<u32>) -> Self {
        Self {
            ceiling,
            concurrency,
            rate: ceiling,
            tokens: 1.0,
            refilled: now,
            paused_until: None,
            peak: None,
            best: 0.0,
            last_throttle: None,
            doubling: false,
            calm_until: None,
            throttled_since: None,
            streak: 0,
            answered: Window::new(now),
            in_flight: 0,
            probing: false,
            throttled: 0,
            mean_call: Duration::from_millis(100),
            next_return: now,
        }
    }

    /// Burst allowed: a tenth of a second's calls, at least one.
    fn burst(rate: f64) -> f64 {
        (rate / 10.0).max(1.0)
    }

    /// Refills the bucket and applies the climb since the last look.
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let Some(rate) = self.rate else { return };
        let mut rate = rate;
        if let (Some(peak), false) = (self.peak, self.throttled_since.is_some()) {
            if self.answered.per_second(now) > 0.0 {
                // Back to just under the last top fast; past it slowly at
                // first, then faster the longer no throttle comes.
                if self.doubling {
                    rate *= 2f64.powf(dt);
                } else {
                    let climb = if rate < RECOVERED * peak {
                        FAST_CLIMB
                    } else {
                        let calm = self
                            .last_throttle
                            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
                        SLOW_CLIMB * (1.0 + calm / 30.0)
                    };
                    rate += (climb * self.best.max(peak)).max(0.1) * dt;
                }
            }
        }
        if let Some(c) = self.ceiling {
            rate = rate.min(c);
        }
        self.rate = Some(rate);
        self.tokens = (self.tokens + rate * dt).min(Self::burst(rate));
    }

    /// How long an item must wait for this scope, if it can be admitted at all now.
    fn wait(&mut self, now: Instant) -> Result<Duration, Duration> {
        if let Some(until) = self.paused_until.filter(|u| *u > now) {
            return Err(until - now);
        }
        if self.throttled_since.is_some() && self.probing {
            // One probe out at a time until a call is answered.
            return Err(self.mean_call.max(Duration::from_millis(50)));
        }
        if let Some(c) = self.concurrency {
            if self.in_flight >= c {
                return Err(self.mean_call.max(Duration::from_millis(10)));
            }
        }
        self.refill(now);
        match self.rate {
            None => Ok(Duration::ZERO),
            Some(_) if self.tokens >= 1.0 => Ok(Duration::ZERO),
            Some(rate) => Ok(Duration::from_secs_f64((1.0 - self.tokens) / rate)),
        }
    }

    fn take(&mut self) -> bool {
        if self.rate.is_some() {
            self.tokens -= 1.0;
        }
        self.in_flight += 1;
        let probe = self.throttled_since.is_some();
        self.probing |= probe;
        probe
    }

    /// When an item that may not start now should come back: spread, so
    /// that items sent round together do not all return at once.
    fn later(&mut self, now: Instant, wait: Duration) -> Duration {
        let step = match (self.rate, self.concurrency) {
            (Some(r), _) => Duration::from_secs_f64(1.0 / r),
            (None, Some(c)) => self.mean_call / c.max(1),
            (None, None) => Duration::ZERO,
        };
        self.next_return = self.next_return.max(now + wait) + step;
        self.next_return - now
    }

    fn release(&mut self, probe: bool) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if probe {
            self.probing = false;
        }
    }

    fn done(&mut self, now: Instant, probe: bool, signal: Signal, took: Duration) {
        self.release(probe);
        match signal {
            Signal::NotRun => {
                if self.rate.is_some() {
                    self.tokens += 1.0;
                }
            }
            Signal::Answered => {
                self.answered.add(now);
                self.throttled_since = None;
                self.streak = 0;
                self.mean_call = (self.mean_call * 7 + took) / 8;
            }
            Signal::Throttled(after) => self.throttle(now, after),
        }
    }

    fn throttle(&mut self, now: Instant, after: Option<Duration>) {
        self.throttled += 1;
        self.throttled_since.get_or_insert(now);
        self.last_throttle = Some(now);
        self.streak = self.streak.saturating_add(1);
        // The pause the service asked for; without one, a throttle in a
        // row with no answer between (the service is not back yet) waits
        // twice as long as the last, up to MAX_PAUSE.
        let pause = after.unwrap_or_else(|| {
            DEFAULT_PAUSE
                .saturating_mul(1 << self.streak.saturating_sub(1).min(5))
                .min(MAX_PAUSE)
        });
        let until = now + pause;
        self.paused_until = Some(self.paused_until.map_or(until, |u| u.max(until)));
        self.tokens = 0.0;
        if self.calm_until.is_some_and(|c| c > now) {
            return;
        }
        // With no call answered lately, the rate says nothing of the
        // service's capacity (an outage): pause only.
        // What the service took: over the window (a young scope's over its
        // life so far), or over its busiest half second if a pause in the
        // window halves that.
        let answered = self
            .answered
            .per_second(now)
            .max(self.answered.busiest_per_second(now));
        // From the rate allowed, or from what was taken where no rate
        // held the calls back yet (none set, or one far above what went
        // out): the measure only ever starts the rate, since a pause in the
        // window makes it read low.
        let base = match self.rate {
            // Nothing answered lately: an outage says nothing of the rate.
            _ if answered == 0.0 => None,
            Some(r) if r <= 1.5 * answered => Some((r, false)),
            // A measure right after a pause reads low: start from it and
            // double until the next throttle.
            _ => Some((answered, true)),
        };
        if let Some((base, measured)) = base {
            self.peak = Some(base);
            self.best = if measured { base } else { self.best.max(base) };
            self.rate = Some((base * DECREASE).max(MIN_RATE));
            self.doubling = measured;
        }
        // The answers of the calls already out arrive within about one call.
        self.calm_until = Some(until + self.mean_call);
    }

    fn state(&mut self, now: Instant, key: Option<String>) -> ScopeState {
        ScopeState {
            key,
            rate: self.rate,
            answered_per_s: self.answered.per_second(now),
            in_flight: self.in_flight,
            paused_for_ms: self
                .paused_until
                .filter(|u| *u > now)
                .map(|u| (u - now).as_millis() as u64),
            throttled_for_ms: self
                .throttled_since
                .map(|s| now.saturating_duration_since(s).as_millis() as u64),
            throttled: self.throttled,
        }
    }
}

/// One run's scopes: its own, and its keys'.
#[derive(Debug)]
struct RunScopes {
    run: Scope,
    keys: HashMap<String, Scope>,
}

/// The flow control of every run a worker process works on: shared by all
/// of its batches (the local runner's pollers), so that a limit holds for
/// the process as a whole.
#[derive(Debug, Default)]
pub struct Limiter {
    runs: Mutex<HashMap<RunId, RunScopes>>,
}

impl Limiter {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, RunScopes>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether an item of `run` (of `key`, if the run has keys) may start.
    pub fn admit(&self, run: &RunId, key: Option<&str>, limits: &FlowLimits) -> Admission {
        let now = Instant::now();
        let mut runs = self.runs();
        if !runs.contains_key(run) {
            let scopes = RunScopes {
                run: Scope::new(now, limits.rate, None),
                keys: HashMap::new(),
            };
            runs.insert(run.clone(), scopes);
        }
        let scopes = runs.get_mut(run).expect("inserted above");
        let keyed = match key {
            Some(k) => {
                if !scopes.keys.contains_key(k) {
                    let scope = Scope::new(now, limits.key_rate, limits.key_concurrency);
                    scopes.keys.insert(k.to_owned(), scope);
                }
                scopes.keys.get_mut(k)
            }
            None => None,
        };
        let run_scope = &mut scopes.run;
        let run_wait = run_scope.wait(now);
        let (key_scope, key_wait) = match keyed {
            Some(s) => {
                let w = s.wait(now);
                (Some(s), Some(w))
            }
            None => (None, None),
        };
        // The scope that holds the item back longest spreads its return.
        let blocked = match (run_wait, key_wait) {
            (Err(r), Some(Err(k))) if k >= r => Some((k, true)),
            (Err(r), _) => Some((r, false)),
            (Ok(_), Some(Err(k))) => Some((k, true)),
            (Ok(r), Some(Ok(k))) if r.max(k) > HOLD => Some((r.max(k), k >= r)),
            (Ok(r), None) if r > HOLD => Some((r, false)),
            _ => None,
        };
        if let Some((wait, by_key)) = blocked {
            return match key_scope {
                Some(s) if by_key => Admission::Later(s.later(now, wait)),
                _ => Admission::Wait(wait),
            };
        }
        let wait = run_wait
            .unwrap_or_default()
            .max(key_wait.and_then(Result::ok).unwrap_or_default());
        let probe = [run_scope.take(), key_scope.is_some_and(|s| s.take())];
        Admission::Go {
            ticket: Ticket {
                run: run.clone(),
                key: key.map(str::to_owned),
                probe,
            },
            wait,
        }
    }

    /// Gives an admitted item's place back, with how its call went. A
    /// throttle slows the item's key if it has one, else its run.
    pub fn done(&self, ticket: Ticket, signal: Signal, took: Duration) {
        let now = Instant::now();
        let mut runs = self.runs();
        let Some(scopes) = runs.get_mut(&ticket.run) else {
            return;
        };
        match (signal, &ticket.key) {
            // With keys, a throttle slows the key: the run's scope only
            // gives the place back.
            (Signal::Throttled(_), Some(_)) => scopes.run.release(ticket.probe[0]),
            (signal, _) => scopes.run.done(now, ticket.probe[0], signal, took),
        }
        if let Some(s) = ticket.key.and_then(|k| scopes.keys.get_mut(&k)) {
            s.done(now, ticket.probe[1], signal, took);
        }
    }

    /// The run's scope and its busiest keys' (at most `keys`), as they are now.
    pub fn state(&self, run: &RunId, keys: usize) -> Vec<ScopeState> {
        let now = Instant::now();
        let mut runs = self.runs();
        let Some(scopes) = runs.get_mut(run) else {
            return Vec::new();
        };
        let mut out = vec![scopes.run.state(now, None)];
        let mut keyed: Vec<ScopeState> = scopes
            .keys
            .iter_mut()
            .map(|(k, s)| s.state(now, Some(k.clone())))
            .collect();
        keyed.sort_by(|a, b| b.in_flight.cmp(&a.in_flight).then(a.key.cmp(&b.key)));
        keyed.truncate(keys);
        out.extend(keyed);
        out
    }

    /// How long the run has been throttled with no call answered, in its
    /// longest-throttled scope.
    pub fn throttled_for(&self, run: &RunId) -> Option<Duration> {
        let now = Instant::now();
        let runs = self.runs();
        let scopes = runs.get(run)?;
        std::iter::once(&scopes.run)
            .chain(scopes.keys.values())
            .filter_map(|s| s.throttled_since.map(|t| now.saturating_duration_since(t)))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunId {
        RunId::generate(0)
    }

    fn go(a: Admission) -> (Ticket, Duration) {
        match a {
            Admission::Go { ticket, wait } => (ticket, wait),
            Admission::Later(d) | Admission::Wait(d) => panic!("held back for {d:?}"),
        }
    }

    fn later(a: Admission) -> Duration {
        match a {
            Admission::Later(d) | Admission::Wait(d) => d,
            Admission::Go { wait, .. } => panic!("admitted after {wait:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_limits_or_throttles_everything_starts_at_once() {
        let (l, r) = (Limiter::default(), run());
        for _ in 0..1000 {
            let (t, wait) = go(l.admit(&r, None, &FlowLimits::default()));
            assert_eq!(wait, Duration::ZERO);
            l.done(t, Signal::Answered, Duration::ZERO);
        }
        assert_eq!(l.state(&r, 0)[0].rate, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_paces_starts_and_long_waits_are_waited_or_sent_round() {
        let (l, r) = (Limiter::default(), run());
        let limits = FlowLimits {
            rate: Some(10.0),
            ..FlowLimits::default()
        };
        // A burst of one, then one every 100 ms; past HOLD, the whole run
        // waits: in place.
        let mut waits = Vec::new();
        loop {
            match l.admit(&r, None, &limits) {
                Admission::Go { wait, .. } => waits.push(wait),
                Admission::Wait(d) => {
                    assert!(d > HOLD, "{d:?}");
                    break;
                }
                Admission::Later(d) => panic!("a run's wait sent round after {d:?}"),
            }
        }
        assert_eq!(waits.len(), 6, "{waits:?}");
        assert_eq!(waits[0], Duration::ZERO);
        assert_eq!(waits[5], Duration::from_millis(500));
        // A key's long wait sends the item round, spread: items sent round
        // together do not all come back at once.
        let (r, keyed) = (
            RunId::generate(1),
            FlowLimits {
                key_rate: Some(10.0),
                ..FlowLimits::default()
            },
        );
        for _ in 0..6 {
            go(l.admit(&r, Some("k"), &keyed));
        }
        let (a, b) = (
            later(l.admit(&r, Some("k"), &keyed)),
            later(l.admit(&r, Some("k"), &keyed)),
        );
        assert!(b >= a + Duration::from_millis(99), "{a:?} then {b:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_then_probes_then_slows_and_climbs_back() {
        let (l, r) = (Limiter::default(), run());
        let none = FlowLimits::default();
        // Calls answered at 100/s for two seconds.
        for _ in 0..200 {
            let (t, _) = go(l.admit(&r, None, &none));
            tokio::time::advance(Duration::from_millis(10)).await;
            l.done(t, Signal::Answered, Duration::from_millis(10));
        }
        let (t, _) = go(l.admit(&r, None, &none));
        l.done(
            t,
            Signal::Throttled(Some(Duration::from_secs(2))),
            Duration::ZERO,
        );
        let state = &l.state(&r, 0)[0];
        let rate = state.rate.expect("a rate after a throttle");
        assert!((85.0..=95.0).contains(&rate), "{rate}");
        assert_eq!(state.paused_for_ms, Some(2000));
        // Paused for everyone until the retry-after.
        let d = later(l.admit(&r, None, &none));
        assert!(d >= Duration::from_secs(2), "{d:?}");
        tokio::time::advance(Duration::from_secs(2)).await;
        // Then one probe, and no one else until it is answered.
        let (probe, _) = go(l.admit(&r, None, &none));
        later(l.admit(&r, None, &none));
        l.done(probe, Signal::Answered, Duration::from_millis(10));
        let (t, _) = go(l.admit(&r, None, &none));
        l.done(t, Signal::Answered, Duration::from_millis(10));
        // While calls succeed the rate climbs back past where it was.
        for _ in 0..3000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if let Admission::Go { ticket, .. } = l.admit(&r, None, &none) {
                l.done(ticket, Signal::Answered, Duration::from_millis(10));
            }
        }
        let climbed = l.state(&r, 0)[0].rate.expect("a rate");
        assert!(climbed > 100.0, "{climbed}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_pauses_without_slowing_and_backs_off_without_a_retry_after() {
        let (l, r) = (Limiter::default(), run());
        let none = FlowLimits::default();
        let mut pauses = Vec::new();
        for _ in 0..4 {
            let (t, _) = go(l.admit(&r, None, &none));
            l.done(t, Signal::Throttled(None), Duration::ZERO);
            let p = l.state(&r, 0)[0].paused_for_ms.expect("paused");
            pauses.push(p);
            tokio::time::advance(Duration::from_millis(p)).await;
        }
        assert_eq!(pauses, [1000, 2000, 4000, 8000]);
        // Nothing was answered: no rate was learnt, none is imposed.
        assert_eq!(l.state(&r, 0)[0].rate, None);
        assert!(l.throttled_for(&r).unwrap() >= Duration::from_secs(15));
        let (t, _) = go(l.admit(&r, None, &none));
        l.done(t, Signal::Answered, Duration::ZERO);
        assert_eq!(l.throttled_for(&r), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_held_and_slowed_alone() {
        let (l, r) = (Limiter::default(), run());
        let limits = FlowLimits {
            key_concurrency: Some(2),
            ..FlowLimits::default()
        };
        let hot: Vec<Ticket> = (0..2)
            .map(|_| go(l.admit(&r, Some("hot"), &limits)).0)
            .collect();
        // The hot key is full: its next item is sent round, a cold key's starts.
        later(l.admit(&r, Some("hot"), &limits));
        let (cold, wait) = go(l.admit(&r, Some("cold"), &limits));
        assert_eq!(wait, Duration::ZERO);
        // A throttle of the hot key pauses it, not the cold key nor the run.
        let mut hot = hot.into_iter();
        l.done(
            hot.next().unwrap(),
            Signal::Throttled(Some(Duration::from_secs(5))),
            Duration::ZERO,
        );
        later(l.admit(&r, Some("hot"), &limits));
        l.done(cold, Signal::Answered, Duration::ZERO);
        go(l.admit(&r, Some("cold"), &limits));
        let states = l.state(&r, 5);
        assert_eq!(states[0].key, None);
        assert_eq!(states[0].paused_for_ms, None);
        let hot_state = states
            .iter()
            .find(|s| s.key.as_deref() == Some("hot"))
            .unwrap();
        assert_eq!(hot_state.paused_for_ms, Some(5000));
        assert_eq!(hot_state.throttled, 1);
    }
}
