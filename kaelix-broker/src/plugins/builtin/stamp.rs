//! `header_stamp`: the broker's time, its id and fixed headers.

use std::time::SystemTime;

use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result, Timestamp};

use super::{bad, known_keys};

/// Stamps each message with headers.
///
/// ```toml
/// [[plugins]]
/// name = "header_stamp"
/// pattern = "orders.>"
/// [plugins.config]
/// time = "kaelix-time"          # header for the broker's receive time; "" for none
/// time_format = "rfc3339"       # or "unix_nanos"
/// broker_id = "kaelix-broker"   # header for the broker's id; "" for none
/// id = "eu-1"                   # the id (default: the host name)
/// overwrite = true              # replace a header the publisher set
/// headers = { env = "prod" }    # fixed headers
/// ```
#[derive(Debug, Default)]
pub struct HeaderStamp {
    time: Option<String>,
    unix_nanos: bool,
    broker: Option<(String, String)>,
    fixed: Vec<(String, String)>,
    overwrite: bool,
    /// The last time stamped and its text: the messages of one read share
    /// their receive time, so it is formatted once per read.
    last: Option<(Timestamp, String)>,
}

impl Plugin for HeaderStamp {
    fn name(&self) -> &str {
        "header_stamp"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        known_keys(
            context,
            &[
                "time",
                "time_format",
                "broker_id",
                "id",
                "overwrite",
                "headers",
            ],
        )?;
        let header = |key: &str, default: &str| {
            let name = context.get_config(key).unwrap_or_else(|| default.into());
            (!name.is_empty()).then_some(name)
        };
        self.time = header("time", "kaelix-time");
        self.last = None;
        self.unix_nanos = match context.get_config("time_format").as_deref() {
            None | Some("rfc3339") => false,
            Some("unix_nanos") => true,
            Some(other) => {
                return Err(bad(
                    context,
                    "time_format",
                    format!("{other:?} is neither \"rfc3339\" nor \"unix_nanos\""),
                ))
            }
        };
        self.broker = header("broker_id", "kaelix-broker").map(|name| {
            let id = context.get_config("id").unwrap_or_else(host_name);
            (name, id)
        });
        self.overwrite = match context.value("overwrite") {
            None => true,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                return Err(bad(
                    context,
                    "overwrite",
                    format!("must be true or false, not {other}"),
                ))
            }
        };
        self.fixed.clear();
        if let Some(headers) = context.value("headers") {
            let Some(table) = headers.as_table() else {
                return Err(bad(
                    context,
                    "headers",
                    "must be a table of names and values",
                ));
            };
            for (name, value) in table {
                let Some(value) = value.as_str() else {
                    return Err(bad(context, &format!("headers.{name}"), "must be a string"));
                };
                self.fixed.push((name.clone(), value.to_string()));
            }
        }
        // Headers that the protocol could not carry fail here, not per message.
        let mut probe = kaelix_core::Headers::default();
        for (name, value) in &self.fixed {
            probe.insert(name.clone(), value.clone());
        }
        probe
            .validate()
            .map_err(|err| bad(context, "headers", err))?;
        Ok(())
    }
}

impl HeaderStamp {
    fn set(&self, message: &mut Message, name: &str, value: impl FnOnce() -> String) {
        if self.overwrite || message.header(name).is_none() {
            message.set_header(name, value());
        }
    }
}

impl StreamProcessor for HeaderStamp {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        if let Some(name) = &self.time {
            // The time the broker read the message, taken once per read.
            let at = message.timestamp;
            if self.overwrite || message.header(name).is_none() {
                let text = match &self.last {
                    Some((t, text)) if *t == at => text.clone(),
                    _ => {
                        let text = if self.unix_nanos {
                            at.as_nanos().to_string()
                        } else {
                            humantime::format_rfc3339_micros(SystemTime::from(at)).to_string()
                        };
                        self.last = Some((at, text.clone()));
                        text
                    }
                };
                message.set_header(name.as_str(), text);
            }
        }
        if let Some((name, id)) = &self.broker {
            self.set(message, name, || id.clone());
        }
        for (name, value) in &self.fixed {
            self.set(message, name, || value.clone());
        }
        Ok(ProcessingAction::Continue)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kaelix".into())
}
