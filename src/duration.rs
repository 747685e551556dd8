//! Durations as people write them: `90s`, `5m`, `1h`, `2d`.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a duration: write a whole number and a unit, like 90s, 5m, 1h or 7d")]
pub struct DurationError(pub String);

/// Parses `<n><unit>` with unit `s`, `m`, `h` or `d`; `n` is a positive whole number.
///
/// # Errors
/// [`DurationError`] for anything else (no unit, a fraction, zero, overflow).
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err()),
    };
    let secs = n.checked_mul(factor).filter(|&v| v > 0).ok_or_else(err)?;
    Ok(Duration::from_secs(secs))
}

/// Formats whole seconds in the largest unit that divides them exactly (`300` → `5m`).
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_formats_back() {
        for (text, secs) in [("90s", 90), ("5m", 300), ("1h", 3600), ("7d", 604_800)] {
            let d = parse(text).unwrap();
            assert_eq!(d.as_secs(), secs);
            assert_eq!(format(d), text);
        }
    }

    #[test]
    fn refuses_malformed_durations() {
        for bad in [
            "",
            "5",
            "m",
            "0s",
            "05m",
            "1.5h",
            "5 m",
            "-5m",
            "5M",
            "99999999999999999999d",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
