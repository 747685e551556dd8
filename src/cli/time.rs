//! Times for people: RFC 3339 in UTC with how far away they are ("2026-12-01T03:42:10Z, in
//! 4m58s", "2026-12-01T03:37:12Z, 3m ago"). Raw Unix seconds appear only in JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `unix_secs` as RFC 3339 with a relative hint from `now`; `-` for 0 (not set).
pub fn when(unix_secs: i64, now: SystemTime) -> String {
    when_ms(unix_secs.saturating_mul(1000), now)
}

/// [`when`] for a time in Unix milliseconds (audit records), shown to the second.
pub fn when_ms(unix_ms: i64, now: SystemTime) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    let at = match u64::try_from(unix_ms) {
        Ok(ms) => UNIX_EPOCH + Duration::from_millis(ms),
        Err(_) => return format!("{unix_ms} (ms before 1970)"),
    };
    let stamp = humantime::format_rfc3339_seconds(at);
    match at.duration_since(now) {
        Ok(ahead) if ahead.as_secs() == 0 => format!("{stamp}, now"),
        Ok(ahead) => format!("{stamp}, in {}", compact(ahead)),
        Err(behind) if behind.duration().as_secs() == 0 => format!("{stamp}, now"),
        Err(behind) => format!("{stamp}, {} ago", compact(behind.duration())),
    }
}

/// A duration in its two largest units, without spaces: `4m58s`, `2h5m`, `3d4h`, `42s`.
pub fn compact(d: Duration) -> String {
    const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)];
    let mut rest = d.as_secs();
    let Some(first) = UNITS.iter().position(|&(_, size)| rest >= size) else {
        return "0s".to_owned();
    };
    let mut out = String::new();
    for &(name, size) in UNITS[first..].iter().take(2) {
        let n = rest / size;
        rest %= size;
        if n > 0 {
            out.push_str(&format!("{n}{name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_and_past_times_read_as_rfc3339_with_a_hint() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_096_232); // 2026-12-01T03:37:12Z
        assert_eq!(when(1_796_096_530, now), "2026-12-01T03:42:10Z, in 4m58s");
        assert_eq!(when(1_796_096_052, now), "2026-12-01T03:34:12Z, 3m ago");
        assert_eq!(when_ms(1_796_096_232_400, now), "2026-12-01T03:37:12Z, now");
        assert_eq!(when(0, now), "-");
    }

    #[test]
    fn compact_shows_the_two_largest_units() {
        for (secs, text) in [
            (0, "0s"),
            (42, "42s"),
            (300, "5m"),
            (298, "4m58s"),
            (3600, "1h"),
            (3660, "1h1m"),
            (3601, "1h"),
            (93_600, "1d2h"),
        ] {
            assert_eq!(compact(Duration::from_secs(secs)), text, "{secs}");
        }
    }
}
