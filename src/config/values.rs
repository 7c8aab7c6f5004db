//! Value parsers for settings: each checks its allowed range, so a value out of
//! range stops start-up (and `docsidecar check`) with a message that states
//! the range; `cli` adds the name of the environment variable that held it.

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// Seconds, a decimal number within `min..=max`.
pub fn seconds(
    min: f64,
    max: f64,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let range = || {
            if min == 0.0 {
                format!("a number of seconds from 0 to {max}")
            } else {
                format!("a number of seconds from {min} to {max} (0 is not allowed)")
            }
        };
        let secs: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number: expected {}", range()))?;
        if !(min..=max).contains(&secs) {
            return Err(format!("{secs} is out of range: expected {}", range()));
        }
        Duration::try_from_secs_f64(secs).map_err(|_| format!("expected {}", range()))
    }
}

/// A duration with a unit (`90s`, `30m`, `24h`, `7d`) within `min..=max`.
pub fn duration(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let range = || {
            format!(
                "a number with a unit s, m, h or d (24h) from {}s to {}d",
                min.as_secs(),
                max.as_secs() / 86_400
            )
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}` is not a duration: expected {}", range()))?;
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("`{s}` is not a duration: expected {}", range())),
        };
        let d = Duration::from_secs(n.saturating_mul(seconds));
        if d < min || d > max {
            return Err(format!("{s} is out of range: expected {}", range()));
        }
        Ok(d)
    }
}

/// A whole number within `min..=max`; `what` names it in messages ("a number
/// of bytes", "a port number").
pub fn count<T>(
    min: T,
    max: T,
    what: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| {
        let range = format!("{what} from {min} to {max}");
        let n: T = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not {range}"))?;
        if n < min || n > max {
            return Err(format!("{n} is out of range: expected {range}"));
        }
        Ok(n)
    }
}

/// A PostgreSQL schema name: it becomes an SQL identifier.
pub fn schema(s: &str) -> Result<String, String> {
    if crate::store::is_valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{} is not a valid schema name: {}",
            crate::quote::shown(s),
            crate::store::NAME_RULE
        ))
    }
}

/// HOST:PORT of a TCP listener (the admin listener).
pub fn tcp_address(s: &str) -> Result<String, String> {
    match s.parse::<super::ListenAddr>()? {
        super::ListenAddr::Tcp(addr) => Ok(addr),
        super::ListenAddr::Unix(_) => Err(format!(
            "`{s}` is a Unix socket: this listener is HTTP on HOST:PORT (for example 0.0.0.0:9090)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seconds_state_their_range() {
        let parse = seconds(0.1, 3600.0);
        assert_eq!(parse("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "3601", "NaN", "inf", "soon", ""] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("from 0.1 to 3600"), "{bad}: {err}");
        }
        assert!(seconds(0.0, 10.0)("0").is_ok());
    }

    #[test]
    fn counts_state_their_range() {
        let parse = count(1usize, 1000, "a number of connections");
        assert_eq!(parse("10").unwrap(), 10);
        for bad in ["0", "1001", "-3", "ten", "1.5"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("from 1 to 1000"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_have_units_and_ranges() {
        let parse = duration(Duration::from_secs(1), Duration::from_secs(365 * 86_400));
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        for bad in ["0s", "400d", "24", "h", "1.5h", ""] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("from 1s to 365d"), "{bad}: {err}");
        }
    }

    #[test]
    fn names() {
        assert!(schema("docsidecar").is_ok());
        assert!(schema("Bad-Schema").unwrap_err().contains("lowercase"));
        assert!(tcp_address("0.0.0.0:9090").is_ok());
        assert!(tcp_address("unix:/tmp/a").is_err());
        assert!(tcp_address("nowhere").is_err());
    }

    proptest! {
        #[test]
        fn accepted_seconds_are_in_range(s in "\\PC{0,12}") {
            if let Ok(d) = seconds(0.1, 3600.0)(&s) {
                prop_assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(3600));
            }
        }
    }
}
