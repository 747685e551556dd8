//! Durations as people write them: `90s`, `5m`, `1h30m`, `500ms`, `7d`, read with `humantime`.
//!
//! Two things humantime accepts are refused here: spaces (`5 m` on a command line is two
//! arguments' worth of ambiguity, and a settings value with one is more likely a typo), and
//! months and years, which humantime counts as 30.44 and 365.25 days, a length nobody means.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text is not a duration.
    #[error(
        "'{0}' is not a duration: write numbers with units and no spaces, like 90s, 5m, 1h30m, 500ms or 7d"
    )]
    Malformed(String),
    /// The text is a duration of zero.
    #[error("'{0}' is zero: give a duration above zero, like 90s or 5m")]
    Zero(String),
    /// The duration has a fraction of a second where only whole seconds can be kept.
    #[error(
        "'{0}' is not a whole number of seconds: this setting is kept in seconds, write e.g. 90s"
    )]
    NotWholeSeconds(String),
    /// The duration is longer than the setting can hold.
    #[error("'{0}' is too long for this setting")]
    TooLong(String),
}

/// Parses a duration above zero: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`,
/// `d` (and humantime's other spellings of them, such as `min` or `days`), no spaces.
///
/// # Errors
/// [`DurationError::Malformed`] for anything else, [`DurationError::Zero`] for a zero duration.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed(s.to_owned());
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(malformed());
    }
    let refused_unit = s
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| matches!(unit, "M" | "month" | "months" | "y" | "year" | "years"));
    if refused_unit || !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(malformed());
    }
    let d = humantime::parse_duration(s).map_err(|_| malformed())?;
    if d.is_zero() {
        return Err(DurationError::Zero(s.to_owned()));
    }
    Ok(d)
}

/// Parses a duration that is kept in whole seconds (an entry's TTL, a join token's lifetime),
/// as the `u32` the admin API carries.
///
/// # Errors
/// What [`parse`] refuses, [`DurationError::NotWholeSeconds`] for `1500ms`,
/// [`DurationError::TooLong`] past `u32::MAX` seconds.
pub fn parse_whole_seconds(s: &str) -> Result<u32, DurationError> {
    let d = parse(s)?;
    if d.subsec_nanos() != 0 {
        return Err(DurationError::NotWholeSeconds(s.to_owned()));
    }
    u32::try_from(d.as_secs()).map_err(|_| DurationError::TooLong(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_units_and_combinations() {
        for (text, ms) in [
            ("90s", 90_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("2m30s", 150_000),
            ("1.5h", 5_400_000),
        ] {
            assert_eq!(parse(text).unwrap().as_millis(), ms, "{text}");
        }
    }

    #[test]
    fn refuses_malformed_durations() {
        for bad in [
            "",
            "5",
            "m",
            "5 m",
            "5 minutes",
            "-5m",
            "5M",
            "1y",
            "2months",
            "99999999999999999999d",
        ] {
            assert!(
                matches!(parse(bad), Err(DurationError::Malformed(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        assert_eq!(parse("0s"), Err(DurationError::Zero("0s".into())));
        // Days are refused only as a unit: "d" inside "days" is not "y".
        assert_eq!(parse("2days").unwrap().as_secs(), 172_800);
    }

    #[test]
    fn whole_seconds_refuses_fractions_and_overflow() {
        assert_eq!(parse_whole_seconds("5m"), Ok(300));
        assert_eq!(
            parse_whole_seconds("1500ms"),
            Err(DurationError::NotWholeSeconds("1500ms".into()))
        );
        assert_eq!(
            parse_whole_seconds("200000d"),
            Err(DurationError::TooLong("200000d".into()))
        );
    }
}
