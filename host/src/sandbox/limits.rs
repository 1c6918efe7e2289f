//! What a domain sandbox may use: its limits, its WASI grants and its
//! restart policy, all set per domain in the bundle manifest.
//!
//! Each limit defends against one kind of hostile or broken guest:
//!
//! | limit | defends against |
//! |---|---|
//! | `memory-mb` (per instance) | a memory bomb in one hyperty |
//! | `total-memory-mb` (per domain) | many instances together exhausting the host |
//! | `instances` | a bundle or restart loop creating instances without bound |
//! | `table-elements` | table growth as a memory bomb |
//! | `call-timeout-ms` (epoch deadline) | infinite loops: the call traps at the deadline |
//! | `fuel-per-call` (optional) | the same with a deterministic instruction budget |
//! | `inbox`, `inbox-bytes` | unbounded queues (in messages, and in bytes of messages whose size senders choose): senders get `inbox-full` (back-pressure) |
//! | `rate` / `burst` (per hyperty) | floods: sends beyond the rate get `rate-limited` |
//! | `max-pending` (per hyperty) | requests that are never answered: one more gets `too-many-pending` |
//! | `max-request-timeout-ms` | requests held for ever: a longer `timeout-ms` is clamped |
//! | `log-lines` / `log-bytes` (per hyperty) | log floods: lines beyond the rate are suppressed, then counted in one line |
//! | `objects`, `objects-per-hyperty`, `object-bytes`, `object-children`, `object-subscribers` | data objects as a memory and disk bomb: refused `limit` |
//! | `grants` | ambient authority: WASI files, sockets, clocks, random only when granted |

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::MAX_MEMORY_BYTES;

/// The longest line a component writes into the host's log, in bytes
/// (longer ones are cut, with `…`, after escaping).
pub const MAX_LOG_LINE: usize = 4096;

/// Limits of a domain sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Messages the domain's inbox holds before senders get `inbox-full`.
    pub inbox: usize,
    /// Bytes of messages (`Message::size`) the domain's inbox holds before
    /// senders get `inbox-full`: without it, `inbox` messages of the bus's
    /// largest size (1 MiB) could wait for a slow domain.
    pub inbox_bytes: usize,
    /// Linear memory per instance, in MiB.
    pub memory_mb: u32,
    /// Linear memory of all the domain's instances together, in MiB.
    pub total_memory_mb: u32,
    /// Elements per table of an instance.
    pub table_elements: u32,
    /// Wall-clock time one call into a guest may take, in milliseconds.
    pub call_timeout_ms: u64,
    /// If set, a deterministic budget of fuel (roughly, instructions) per call.
    pub fuel_per_call: Option<u64>,
    /// Hyperty instances the domain may hold.
    pub instances: u32,
    /// Messages per second each hyperty may send (sustained).
    pub rate: u32,
    /// Messages a hyperty may send in a burst above `rate`.
    pub burst: u32,
    /// Requests each hyperty may have waiting for their response (or
    /// 408); one more is refused `too-many-pending` at the import.
    pub max_pending: u32,
    /// The longest a hyperty's request waits for its response, in
    /// milliseconds: a larger `timeout-ms` (or runtime default) is clamped.
    pub max_request_timeout_ms: u32,
    /// Log lines per second each hyperty may write (and as many at once);
    /// lines beyond are dropped and counted in one line when logging resumes.
    pub log_lines: u32,
    /// Log bytes per second each hyperty may write (and as many at once),
    /// counted after a line is cut at 4 KiB and escaped.
    pub log_bytes: u32,
    // Data objects (syncher): what the domain's reporters may make the
    // host keep; an object's bytes also count in `total-memory-mb`.
    /// Data objects the domain's hyperties may report together.
    pub objects: u32,
    /// Data objects one hyperty may report.
    pub objects_per_hyperty: u32,
    /// Bytes of one object's JSON (its data, children and their names),
    /// checked after every patch operation and child change. At most
    /// [`MAX_OBJECT_BYTES`], so its state fits a message.
    pub object_bytes: u32,
    /// Children of one object.
    pub object_children: u32,
    /// Subscribers of one object (and, separately, invited observers).
    pub object_subscribers: u32,
}

/// The largest `object-bytes`: an object's state travels in one `read` or
/// `subscribe` answer, so it must fit the bus's default message limit
/// (1 MiB) with room for the rest of the state (addresses, user, scheme).
pub const MAX_OBJECT_BYTES: u32 = 960 << 10;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            inbox: 1024,
            inbox_bytes: 64 << 20,
            memory_mb: 64,
            total_memory_mb: 512,
            table_elements: 20_000,
            call_timeout_ms: 1000,
            fuel_per_call: None,
            instances: 100,
            rate: 100_000,
            burst: 10_000,
            max_pending: 1000,
            max_request_timeout_ms: 120_000,
            log_lines: 100,
            log_bytes: 64 << 10,
            // Data objects (syncher)
            objects: 1000,
            objects_per_hyperty: 100,
            object_bytes: 512 << 10,
            object_children: 1000,
            object_subscribers: 10_000,
        }
    }
}

impl Limits {
    /// Checks the values are in range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let max_mb = (MAX_MEMORY_BYTES >> 20) as u32;
        let check = |ok: bool, field: &str, range: String| if ok { Ok(()) } else { Err(format!("{field} must be in {range}")) };
        check((1..=1_000_000).contains(&self.inbox), "inbox", "1..=1000000".into())?;
        check((1..=1u64 << 32).contains(&(self.inbox_bytes as u64)), "inbox-bytes", "1..=4294967296".into())?;
        check((1..=max_mb).contains(&self.memory_mb), "memory-mb", format!("1..={max_mb}"))?;
        check(self.total_memory_mb >= 1, "total-memory-mb", "1..".into())?;
        check((1..=10_000_000).contains(&self.table_elements), "table-elements", "1..=10000000".into())?;
        check((10..=600_000).contains(&self.call_timeout_ms), "call-timeout-ms", "10..=600000".into())?;
        check(self.fuel_per_call.is_none_or(|f| f > 0), "fuel-per-call", "1..".into())?;
        check((1..=1000).contains(&self.instances), "instances", "1..=1000".into())?;
        check(self.rate >= 1, "rate", "1..".into())?;
        check(self.burst >= 1, "burst", "1..".into())?;
        check((1..=1_000_000).contains(&self.max_pending), "max-pending", "1..=1000000".into())?;
        check(self.max_request_timeout_ms >= 1, "max-request-timeout-ms", "1..".into())?;
        check(self.log_lines >= 1, "log-lines", "1..".into())?;
        // A line (at most MAX_LOG_LINE bytes) must fit in the bucket.
        let line = MAX_LOG_LINE as u32;
        check(self.log_bytes >= line, "log-bytes", format!("{line}.."))?;
        // Data objects (syncher)
        check(self.objects >= 1, "objects", "1..".into())?;
        check(self.objects_per_hyperty >= 1, "objects-per-hyperty", "1..".into())?;
        check((1..=MAX_OBJECT_BYTES).contains(&self.object_bytes), "object-bytes", format!("1..={MAX_OBJECT_BYTES}"))?;
        check(self.object_children >= 1, "object-children", "1..".into())?;
        check(self.object_subscribers >= 1, "object-subscribers", "1..".into())
    }
}

/// What happens to a hyperty that traps.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RestartPolicy {
    /// `backoff`: restart after a delay that doubles with each consecutive
    /// failure; `stop`: leave it stopped.
    pub policy: RestartKind,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartKind {
    Backoff,
    Stop,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy { policy: RestartKind::Backoff, initial_backoff_ms: 100, max_backoff_ms: 30_000 }
    }
}

impl RestartPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_backoff_ms == 0 || self.max_backoff_ms < self.initial_backoff_ms {
            return Err("need 0 < initial-backoff-ms <= max-backoff-ms".into());
        }
        Ok(())
    }

    /// The delay before restart attempt `failures` (1 for the first).
    pub fn backoff(&self, failures: u32) -> Option<Duration> {
        match self.policy {
            RestartKind::Stop => None,
            RestartKind::Backoff => {
                let factor = 1u64 << failures.saturating_sub(1).min(20);
                Some(Duration::from_millis(self.initial_backoff_ms.saturating_mul(factor).min(self.max_backoff_ms)))
            }
        }
    }
}

/// A WASI capability a domain can be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// `wasi:clocks`: wall and monotonic clocks.
    Clocks,
    /// `wasi:random`: secure and insecure random.
    Random,
    /// `wasi:filesystem`: linked, with no directory opened.
    Filesystem,
    /// `wasi:sockets`: linked; every address is refused unless allowed.
    Sockets,
    /// `rethink:hyperty/media`: WebRTC peer connections, with the domain's
    /// `media` table (see [`crate::media::MediaSettings`]).
    Media,
}

impl Grant {
    /// The package (or interface) whose imports this grant allows.
    pub fn package(self) -> &'static str {
        match self {
            Grant::Clocks => "wasi:clocks/",
            Grant::Random => "wasi:random/",
            Grant::Filesystem => "wasi:filesystem/",
            Grant::Sockets => "wasi:sockets/",
            Grant::Media => "rethink:hyperty/media@",
        }
    }

    pub const ALL: [Grant; 5] = [Grant::Clocks, Grant::Random, Grant::Filesystem, Grant::Sockets, Grant::Media];

    pub fn name(self) -> &'static str {
        match self {
            Grant::Clocks => "clocks",
            Grant::Random => "random",
            Grant::Filesystem => "filesystem",
            Grant::Sockets => "sockets",
            Grant::Media => "media",
        }
    }
}

/// The default grants: clocks and random, nothing else.
pub fn default_grants() -> Vec<Grant> {
    vec![Grant::Clocks, Grant::Random]
}

/// Memory used by all the instances of one domain.
#[derive(Debug, Default)]
pub(crate) struct DomainMemory {
    used: AtomicUsize,
}

impl DomainMemory {
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` more for the domain if that keeps it within `total`
    /// bytes; false (nothing taken) otherwise. One compare-and-swap, so a
    /// charge that does not fit never shows, even for a moment, to another
    /// store charging at once (which would be refused for room it had).
    pub fn charge(&self, bytes: usize, total: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(bytes).filter(|&after| after <= total))
            .is_ok()
    }

    /// Takes `bytes` whatever the total: what exists already and moves here
    /// (a data object restored from disk, or its reporter's domain
    /// redeployed) is counted, never dropped; a domain past its total then
    /// takes nothing more through [`DomainMemory::charge`] until it gives
    /// back. Saturates rather than wraps.
    pub fn take(&self, bytes: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_add(bytes)));
    }

    /// Gives back `bytes` taken with [`DomainMemory::charge`] or
    /// [`DomainMemory::take`].
    pub fn release(&self, bytes: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes)));
    }
}

/// Bytes of what waits in a queue (a domain's inbox, a gateway client's
/// send queue) within a bound that one item alone may pass: an empty queue
/// takes anything, so nothing is refused for its size alone (the bus bounds
/// that). One compare-and-swap, as [`DomainMemory::charge`]: an item that
/// does not fit never shows to another taking at once.
#[derive(Debug, Default)]
pub(crate) struct QueuedBytes(AtomicUsize);

impl QueuedBytes {
    /// Takes `bytes` if the queue holds nothing yet or they keep it within
    /// `max`; false (nothing taken) otherwise.
    pub fn take(&self, bytes: usize, max: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                let after = queued.saturating_add(bytes);
                (queued == 0 || after <= max).then_some(after)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken with [`QueuedBytes::take`] (the item left
    /// the queue).
    pub fn give_back(&self, bytes: usize) {
        self.0.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The `ResourceLimiter` of one instance's store: its own limits and its
/// share of the domain's total memory, released when the store is dropped.
pub(crate) struct InstanceLimiter {
    memory_per_instance: usize,
    memory_total: usize,
    table_elements: usize,
    domain: Arc<DomainMemory>,
    held: usize,
    /// Set when a grow was refused, to explain the trap that usually follows.
    pub refused_growth: Option<String>,
}

impl InstanceLimiter {
    /// The linear memory its instance holds, in bytes.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn new(limits: &Limits, domain: Arc<DomainMemory>) -> InstanceLimiter {
        InstanceLimiter {
            memory_per_instance: (limits.memory_mb as usize) << 20,
            memory_total: (limits.total_memory_mb as usize) << 20,
            table_elements: limits.table_elements as usize,
            domain,
            held: 0,
            refused_growth: None,
        }
    }
}

impl InstanceLimiter {
    /// The memory of the instance's domain (data objects are charged to it too).
    pub fn domain(&self) -> &Arc<DomainMemory> {
        &self.domain
    }
}

impl wasmtime::ResourceLimiter for InstanceLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_per_instance {
            self.refused_growth = Some(format!(
                "memory limit of the instance reached ({} MiB asked, memory-mb = {})",
                desired >> 20,
                self.memory_per_instance >> 20
            ));
            return Ok(false);
        }
        let delta = desired.saturating_sub(current);
        if !self.domain.charge(delta, self.memory_total) {
            self.refused_growth = Some(format!(
                "memory limit of the domain reached (total-memory-mb = {})",
                self.memory_total >> 20
            ));
            return Ok(false);
        }
        self.held += delta;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.refused_growth = Some(format!("table limit reached (table-elements = {})", self.table_elements));
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        // Core instances inside one component (a Rust guest has a handful).
        100
    }

    fn tables(&self) -> usize {
        100
    }

    fn memories(&self) -> usize {
        100
    }
}

impl Drop for InstanceLimiter {
    fn drop(&mut self) {
        self.domain.release(self.held);
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up (full
/// at first).
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        let burst = burst as f64;
        RateLimiter { rate: rate as f64, burst, tokens: burst, last: Instant::now() }
    }

    /// Takes a token; false if there is none.
    pub fn take(&mut self) -> bool {
        self.take_n(1.0)
    }

    /// Takes `n` tokens; false (and none taken) if there are fewer.
    pub fn take_n(&mut self, n: f64) -> bool {
        if !self.has(n) {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Whether `n` tokens are there, taking none. Refills on every call, so
    /// tokens earned while full are not banked (at most `burst` at once).
    pub fn has(&mut self, n: f64) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        self.tokens >= n
    }
}

/// The log rate of one hyperty: lines and bytes a second (`log-lines`,
/// `log-bytes`, each also the burst), and the lines dropped since the last
/// one written.
pub(crate) struct LogLimiter {
    lines: RateLimiter,
    bytes: RateLimiter,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(limits: &Limits) -> LogLimiter {
        LogLimiter {
            lines: RateLimiter::new(limits.log_lines, limits.log_lines),
            bytes: RateLimiter::new(limits.log_bytes, limits.log_bytes),
            suppressed: 0,
        }
    }

    /// Whether a line of `len` bytes may be written now: `None` if not (it
    /// is counted), else how many lines were dropped before it (to be said
    /// first, in one line).
    pub fn admit(&mut self, len: usize) -> Option<u64> {
        if !(self.lines.has(1.0) && self.bytes.has(len as f64)) {
            self.suppressed += 1;
            return None;
        }
        self.lines.take_n(1.0);
        self.bytes.take_n(len as f64);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose growth does not fit is refused without taking room
    /// from another growing at the same time: with 60 of 100 bytes held,
    /// 30 more always fit, however many refused 50-byte charges race them.
    #[test]
    fn a_refused_charge_never_takes_room_from_one_that_fits() {
        let memory = DomainMemory::default();
        assert!(memory.charge(60, 100));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let refused = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    assert!(!memory.charge(50, 100));
                }
            });
            let mut refused = 0;
            for _ in 0..200_000 {
                if memory.charge(30, 100) {
                    memory.release(30);
                } else {
                    refused += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            refused
        });
        assert_eq!(refused, 0, "30 bytes refused with 60 of 100 held");
        assert_eq!(memory.used(), 60);
        assert!(!memory.charge(usize::MAX, usize::MAX), "an overflowing charge is refused");
        assert_eq!(memory.used(), 60);
        // What exists already is taken past the total; then nothing more fits.
        memory.take(70);
        assert_eq!(memory.used(), 130);
        assert!(!memory.charge(1, 100));
        memory.release(70);
        assert!(memory.charge(1, 100));
    }

    fn backoff_ms(policy: &RestartPolicy, failures: u32) -> Option<u128> {
        policy.backoff(failures).map(|d| d.as_millis())
    }

    #[test]
    fn default_backoff_doubles_from_100_ms_up_to_30_s() {
        let policy = RestartPolicy::default();
        let schedule: Vec<u128> = (1..=11).map(|n| backoff_ms(&policy, n).unwrap()).collect();
        assert_eq!(schedule, [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30_000, 30_000]);
        // However many failures: the cap, no overflow.
        for failures in [21, 64, 1000, u32::MAX] {
            assert_eq!(backoff_ms(&policy, failures), Some(30_000), "failure {failures}");
        }
    }

    #[test]
    fn backoff_follows_the_configured_initial_and_cap() {
        let policy = RestartPolicy { initial_backoff_ms: 40, max_backoff_ms: 100, ..RestartPolicy::default() };
        let schedule: Vec<u128> = (1..=5).map(|n| backoff_ms(&policy, n).unwrap()).collect();
        assert_eq!(schedule, [40, 80, 100, 100, 100]);
        // A huge initial value saturates at the cap instead of overflowing.
        let policy = RestartPolicy { initial_backoff_ms: u64::MAX / 2, max_backoff_ms: u64::MAX, ..RestartPolicy::default() };
        assert_eq!(policy.backoff(30), Some(Duration::from_millis(u64::MAX)));
    }

    #[test]
    fn stop_policy_never_restarts() {
        let policy = RestartPolicy { policy: RestartKind::Stop, ..RestartPolicy::default() };
        assert_eq!((1..=3).map(|n| policy.backoff(n)).collect::<Vec<_>>(), [None, None, None]);
    }

    #[test]
    fn restart_policy_needs_a_positive_initial_backoff_under_its_cap() {
        assert!(RestartPolicy::default().validate().is_ok());
        let zero = RestartPolicy { initial_backoff_ms: 0, ..RestartPolicy::default() };
        let inverted = RestartPolicy { initial_backoff_ms: 200, max_backoff_ms: 100, ..RestartPolicy::default() };
        for bad in [zero, inverted] {
            assert!(bad.validate().unwrap_err().contains("initial-backoff-ms"), "{bad:?}");
        }
    }

    #[test]
    fn rate_limiter_never_grants_more_than_burst_plus_rate() {
        let mut bucket = RateLimiter::new(1000, 100);
        std::thread::sleep(Duration::from_millis(50)); // idle while full: nothing banked
        let started = Instant::now();
        let granted = (0..5000).filter(|_| bucket.take()).count() as f64;
        let bound = 100.0 + 1000.0 * started.elapsed().as_secs_f64() + 1.0;
        assert!(granted >= 100.0 && granted <= bound, "granted {granted}, bound {bound}");
    }

    #[test]
    fn new_limits_are_validated_naming_the_field() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let bad = [
            (Limits { max_pending: 0, ..Limits::default() }, "max-pending must be in 1..=1000000"),
            (Limits { max_request_timeout_ms: 0, ..Limits::default() }, "max-request-timeout-ms must be in 1.."),
            (Limits { log_lines: 0, ..Limits::default() }, "log-lines must be in 1.."),
            (Limits { log_bytes: 4095, ..Limits::default() }, "log-bytes must be in 4096.."),
        ];
        for (limits, why) in bad {
            assert_eq!(limits.validate(), Err(why.to_owned()));
        }
    }

    #[test]
    fn log_limiter_bounds_lines_and_bytes_and_counts_what_it_drops() {
        let limits = Limits { log_lines: 10, log_bytes: 8192, ..Limits::default() };
        let mut log = LogLimiter::new(&limits);
        let started = Instant::now();
        // Lines of 4 KiB: the bytes bucket (8 KiB) binds before the lines one.
        let admitted: Vec<Option<u64>> = (0..1000).map(|_| log.admit(4096)).collect();
        let kept = admitted.iter().flatten().count() as f64;
        let bound = 2.0 + 2.0 * started.elapsed().as_secs_f64() + 1.0;
        assert!(kept >= 2.0 && kept <= bound, "kept {kept}, bound {bound}");
        // Small lines: the lines bucket binds.
        let mut log = LogLimiter::new(&limits);
        let started = Instant::now();
        let kept = (0..1000).filter(|_| log.admit(1).is_some()).count();
        let bound = 10.0 + 10.0 * started.elapsed().as_secs_f64() + 1.0;
        assert!(kept >= 10 && kept as f64 <= bound, "kept {kept}, bound {bound}");
        assert_eq!(log.suppressed as usize, 1000 - kept, "every dropped line is counted");
    }
}
