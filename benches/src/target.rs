//! Where a benchmark sends its load: `kaelix://host:port`, `nats://host:port`,
//! `relay` (a raw TCP relay this tool starts) or `relay://host:port`.

use std::fmt;
use std::str::FromStr;

/// A broker (or relay) to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Kaelix(String),
    Nats(String),
    /// A relay at this address, or one to start when `None`.
    Relay(Option<String>),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "relay" {
            return Ok(Target::Relay(None));
        }
        let (scheme, addr) = s.split_once("://").ok_or_else(|| {
            format!("target {s:?}: expected kaelix://host:port, nats://host:port or relay")
        })?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("target {s:?}: the address needs host:port"));
        }
        match scheme {
            "kaelix" => Ok(Target::Kaelix(addr.into())),
            "nats" => Ok(Target::Nats(addr.into())),
            "relay" => Ok(Target::Relay(Some(addr.into()))),
            other => Err(format!(
                "target {s:?}: unknown scheme {other:?} (kaelix, nats, relay)"
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Kaelix(a) => write!(f, "kaelix://{a}"),
            Target::Nats(a) => write!(f, "nats://{a}"),
            Target::Relay(Some(a)) => write!(f, "relay://{a}"),
            Target::Relay(None) => f.write_str("relay"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            "kaelix://127.0.0.1:8080".parse(),
            Ok(Target::Kaelix("127.0.0.1:8080".into()))
        );
        assert_eq!(
            "nats://localhost:4222".parse(),
            Ok(Target::Nats("localhost:4222".into()))
        );
        assert_eq!("relay".parse(), Ok(Target::Relay(None)));
        assert_eq!("relay://h:1".parse(), Ok(Target::Relay(Some("h:1".into()))));
        assert!("http://x:1".parse::<Target>().is_err());
        assert!("kaelix://".parse::<Target>().is_err());
        assert!("127.0.0.1:8080".parse::<Target>().is_err());
        assert_eq!(Target::Nats("a:1".into()).to_string(), "nats://a:1");
    }
}
