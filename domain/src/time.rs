//! Times written as RFC 3339 text without `core::fmt`.
//!
//! chrono writes a time through `Display`, one `write_char` at a time, and
//! serde_json escapes each piece as it comes: on a 50-entry leaderboard page
//! that was an eighth of the server's CPU. [`Rfc3339`] writes the same text
//! into a stack buffer with a handful of digit stores; [`serialize`] hands it
//! to the serializer as one string. Property tests hold both to chrono's own
//! text for every time.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;
use std::fmt;

/// How many digits follow the seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fraction {
    /// As chrono's serde text (`SecondsFormat::AutoSi`): none for a whole
    /// second, else 3, 6 or 9 digits, the fewest that are exact.
    Auto,
    /// Always 6 digits (`SecondsFormat::Micros`), truncated.
    Micros,
}

/// A time's RFC 3339 text in UTC (`Z`), held on the stack.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    buf: [u8; Self::CAPACITY],
    len: u8,
}

impl Rfc3339 {
    /// Room for chrono's longest text: a signed five-digit year and nine
    /// digits of fraction.
    const CAPACITY: usize = 40;

    /// `at` as chrono's `to_rfc3339_opts(format, true)` writes it.
    pub fn new(at: &DateTime<Utc>, fraction: Fraction) -> Self {
        let mut text = Self {
            buf: [0; Self::CAPACITY],
            len: 0,
        };
        // `DateTime<Utc>`'s own accessors each add the (zero) offset again;
        // the naive UTC time is a field.
        let naive = at.naive_utc();
        let (date, time) = (naive.date(), naive.time());
        let year = date.year();
        if !(0..=9999).contains(&year) {
            // chrono's signed years (`+10000`, `-0001`): rare enough to let
            // chrono write them.
            let format = match fraction {
                Fraction::Auto => SecondsFormat::AutoSi,
                Fraction::Micros => SecondsFormat::Micros,
            };
            text.push(at.to_rfc3339_opts(format, true).as_bytes());
            return text;
        }
        // A leap second is second 59 with a nanosecond past 1e9: chrono
        // writes it as :60.
        let nanos = time.nanosecond();
        let (second, nanos) = (time.second() + nanos / 1_000_000_000, nanos % 1_000_000_000);
        text.digits(year as u32, 4);
        text.push(b"-");
        text.digits(date.month(), 2);
        text.push(b"-");
        text.digits(date.day(), 2);
        text.push(b"T");
        text.digits(time.hour(), 2);
        text.push(b":");
        text.digits(time.minute(), 2);
        text.push(b":");
        text.digits(second, 2);
        match fraction {
            Fraction::Micros => {
                text.push(b".");
                text.digits(nanos / 1_000, 6);
            }
            Fraction::Auto if nanos == 0 => {}
            Fraction::Auto if nanos % 1_000_000 == 0 => {
                text.push(b".");
                text.digits(nanos / 1_000_000, 3);
            }
            Fraction::Auto if nanos % 1_000 == 0 => {
                text.push(b".");
                text.digits(nanos / 1_000, 6);
            }
            Fraction::Auto => {
                text.push(b".");
                text.digits(nanos, 9);
            }
        }
        text.push(b"Z");
        text
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators, or chrono's own text, go in.
        std::str::from_utf8(&self.buf[..self.len as usize]).expect("RFC 3339 text is ASCII")
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = self.len as usize;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
    }

    /// `value` in exactly `width` decimal digits, zero-padded.
    fn digits(&mut self, mut value: u32, width: usize) {
        let at = self.len as usize;
        for slot in self.buf[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width as u8;
    }
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Serializes a time as chrono's serde does (the same text), as one string:
/// for `#[serde(serialize_with = "podium_domain::time::serialize")]`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(Rfc3339::new(at, Fraction::Auto).as_str())
}

/// [`serialize`] for an optional time (`null` when absent).
pub fn serialize_option<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serialize(at, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A time chrono can hold, leap seconds included (a nanosecond past
    /// 1e9 on second 59).
    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        let nanos = prop_oneof![
            Just(0u32),
            (0u32..1_000).prop_map(|ms| ms * 1_000_000),
            (0u32..1_000_000).prop_map(|us| us * 1_000),
            0u32..1_000_000_000,
            1_000_000_000u32..2_000_000_000,
        ];
        let seconds = prop_oneof![
            // This era, where every real time falls.
            0i64..4_102_444_800,
            min..=max,
        ];
        (seconds, nanos).prop_filter_map("a time chrono holds", |(s, n)| {
            // Leap nanoseconds only on a minute's last second.
            let s = if n >= 1_000_000_000 {
                s - s.rem_euclid(60) + 59
            } else {
                s
            };
            DateTime::from_timestamp(s, n)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn the_text_is_chronos(at in any_time()) {
            let serde_text = serde_json::to_string(&at).unwrap();
            let mut ours = serde_json::Serializer::new(Vec::new());
            serialize(&at, &mut ours).unwrap();
            prop_assert_eq!(String::from_utf8(ours.into_inner()).unwrap(), serde_text);
            prop_assert_eq!(
                Rfc3339::new(&at, Fraction::Micros).to_string(),
                at.to_rfc3339_opts(SecondsFormat::Micros, true)
            );
        }
    }

    #[test]
    fn edges_read_as_chrono_writes_them() {
        for (at, auto) in [
            (
                DateTime::from_timestamp(0, 0).unwrap(),
                "1970-01-01T00:00:00Z",
            ),
            (
                DateTime::from_timestamp(1_764_627_617, 120_000_000).unwrap(),
                "2025-12-01T22:20:17.120Z",
            ),
            (
                DateTime::from_timestamp(1_764_627_617, 120_001_000).unwrap(),
                "2025-12-01T22:20:17.120001Z",
            ),
            (
                DateTime::from_timestamp(1_764_627_617, 120_000_001).unwrap(),
                "2025-12-01T22:20:17.120000001Z",
            ),
            (
                DateTime::from_timestamp(1_764_627_659, 1_500_000_000).unwrap(),
                "2025-12-01T22:20:60.500Z",
            ),
            (
                DateTime::<Utc>::MAX_UTC,
                &DateTime::<Utc>::MAX_UTC.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            ),
        ] {
            assert_eq!(Rfc3339::new(&at, Fraction::Auto).as_str(), auto);
            assert_eq!(serde_json::to_string(&at).unwrap(), format!("\"{auto}\""));
        }
    }
}
