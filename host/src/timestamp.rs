//! Timestamps as text: RFC 3339 in UTC, written byte for byte as chrono's serde writes them
//! (`2026-12-01T03:25:54.433475411Z`: seconds, then 3, 6 or 9 digits of fraction as needed, then
//! `Z`), but into a stack buffer instead of through `core::fmt` one character at a time. The
//! store writes several per task run (its state, each transition, a cache hit's expiry), so this
//! is on the path of every recorded task run. Reading them back stays chrono's.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// The longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// `t` as chrono's serde writes it, when its year has four digits (`None` otherwise: chrono
/// writes those with a sign, and they are left to it).
fn format(t: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let (mut sec, mut nano) = (t.second(), t.nanosecond());
    // A leap second is written as second 60, as chrono does.
    if nano >= 1_000_000_000 {
        sec += 1;
        nano -= 1_000_000_000;
    }
    put2(buf, 0, year / 100);
    put2(buf, 2, year % 100);
    buf[4] = b'-';
    put2(buf, 5, t.month());
    buf[7] = b'-';
    put2(buf, 8, t.day());
    buf[10] = b'T';
    put2(buf, 11, t.hour());
    buf[13] = b':';
    put2(buf, 14, t.minute());
    buf[16] = b':';
    put2(buf, 17, sec);
    let (digits, mut fraction) = match nano {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (3, n / 1_000_000),
        n if n % 1_000 == 0 => (6, n / 1_000),
        n => (9, n),
    };
    let mut len = 19;
    if digits > 0 {
        buf[len] = b'.';
        for i in (0..digits).rev() {
            buf[len + 1 + i] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        len += 1 + digits;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

/// Two decimal digits of `n` (< 100) at `at`.
fn put2(buf: &mut [u8; MAX_LEN], at: usize, n: u32) {
    buf[at] = b'0' + (n / 10 % 10) as u8;
    buf[at + 1] = b'0' + (n % 10) as u8;
}

/// Append `t` to `out` as [`serialize`] writes it.
pub fn push(out: &mut String, t: &DateTime<Utc>) {
    let mut buf = [0u8; MAX_LEN];
    match format(t, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
        Some(text) => out.push_str(text),
        None => out.push_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
    }
}

/// `#[serde(serialize_with)]` for a `DateTime<Utc>`.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    match format(t, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
        Some(text) => s.serialize_str(text),
        None => serde::Serialize::serialize(t, s),
    }
}

/// `#[serde(serialize_with)]` for an `Option<DateTime<Utc>>`.
pub fn serialize_option<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&Text(t)),
        None => s.serialize_none(),
    }
}

/// A timestamp serialized by [`serialize`].
struct Text<'a>(&'a DateTime<Utc>);

impl serde::Serialize for Text<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(self.0, s)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};

    use super::*;

    #[derive(serde::Serialize)]
    struct Optional(#[serde(serialize_with = "serialize_option")] Option<DateTime<Utc>>);

    #[test]
    fn writes_what_chrono_writes() {
        let at = |y, mo, d, h, mi, s| {
            Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
                .single()
                .expect("date")
        };
        let base = at(2026, 12, 1, 3, 25, 54);
        let mut cases = vec![
            base,
            at(0, 1, 1, 0, 0, 0),
            at(9999, 12, 31, 23, 59, 59),
            at(-5, 3, 1, 0, 0, 0),
            at(10_000, 1, 1, 0, 0, 0),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        for nanos in [
            1,
            7,
            1_000,
            433_000,
            433_475_000,
            433_475_411,
            999_999_999,
            100_000_000,
        ] {
            cases.push(base + chrono::TimeDelta::nanoseconds(nanos));
        }
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("a leap second");
        cases.push(Utc.from_utc_datetime(&leap));
        for t in &cases {
            let chrono_text = serde_json::to_string(t).expect("chrono");
            assert_eq!(
                serde_json::to_string(&Text(t)).expect("ours"),
                chrono_text,
                "{t:?}"
            );
            assert_eq!(
                serde_json::to_string(&Optional(Some(*t))).expect("ours"),
                chrono_text
            );
        }
        assert_eq!(
            serde_json::to_string(&Optional(None)).expect("none"),
            "null"
        );
    }
}
