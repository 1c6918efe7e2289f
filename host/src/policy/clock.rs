//! The clock policies read, injectable so tests can pin it.
//!
//! Time conditions see UTC civil time: the date, the ISO weekday and the
//! minute of the day.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where policies get "now" from.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }
}

/// A clock that says what it is told (for tests).
#[derive(Default)]
pub struct FixedClock(AtomicI64);

impl FixedClock {
    pub fn new(unix_seconds: i64) -> FixedClock {
        FixedClock(AtomicI64::new(unix_seconds))
    }

    pub fn set(&self, unix_seconds: i64) {
        self.0.store(unix_seconds, Ordering::Relaxed);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// UTC civil time, as policies see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilTime {
    /// `yyyymmdd`, e.g. 20261123.
    pub date: i64,
    /// ISO weekday: 1 = Monday .. 7 = Sunday.
    pub weekday: i64,
    pub hour: i64,
    /// Minute of the day, 0..1440.
    pub minute: i64,
}

impl CivilTime {
    pub fn from_unix(seconds: i64) -> CivilTime {
        let days = seconds.div_euclid(86_400);
        let secs_of_day = seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        // 1970-01-01 was a Thursday (ISO 4).
        let weekday = (days + 3).rem_euclid(7) + 1;
        CivilTime { date: y * 10_000 + m * 100 + d, weekday, hour: secs_of_day / 3600, minute: secs_of_day / 60 }
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_of_known_instants() {
        assert_eq!(CivilTime::from_unix(0), CivilTime { date: 19700101, weekday: 4, hour: 0, minute: 0 });
        // 2026-11-23 22:30:00 UTC, a Monday.
        let t = CivilTime::from_unix(1_795_473_000);
        assert_eq!((t.date, t.weekday, t.hour, t.minute), (20261123, 1, 22, 22 * 60 + 30));
        // 2024-02-29, a Thursday.
        assert_eq!(CivilTime::from_unix(1_709_164_800).date, 20240229);
        assert_eq!(CivilTime::from_unix(1_709_164_800).weekday, 4);
    }
}
