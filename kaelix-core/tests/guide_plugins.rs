//! The user's guide, "Plugin Development": its `LoggingPlugin`, its
//! registration and use, and "Plugin Security", as written there, plus the
//! imports the guide leaves implicit and checks of what they did.

use bytes::Bytes;
use kaelix_core::plugin::{Plugin, PluginContext, ProcessingAction, StreamProcessor};
use kaelix_core::{Message, Result, Topic};

pub struct LoggingPlugin {
    name: String,
    log_level: String,
}

impl Plugin for LoggingPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> &str {
        "1.0.0"
    }

    fn initialize(&mut self, context: &PluginContext) -> Result<()> {
        println!("Initializing logging plugin");
        self.log_level = context
            .get_config("log_level")
            .unwrap_or_else(|| "info".to_string());
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        println!("Shutting down logging plugin");
        Ok(())
    }
}

impl StreamProcessor for LoggingPlugin {
    fn process_message(&mut self, message: &mut Message) -> Result<ProcessingAction> {
        println!(
            "Processing message: {} on topic: {}",
            message.id, message.topic
        );

        // Add processing timestamp header
        message.set_header("processed_at".to_string(), chrono::Utc::now().to_rfc3339());

        Ok(ProcessingAction::Continue)
    }
}

mod register_and_use {
    use super::*;
    use kaelix_core::plugin::PluginRegistry;

    #[tokio::test]
    async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mut registry = PluginRegistry::new();

        // Register plugin
        let logging_plugin = Box::new(LoggingPlugin {
            name: "logging".to_string(),
            log_level: "info".to_string(),
        });

        registry.register("logging", logging_plugin)?;

        // Initialize all plugins
        registry.initialize_all().await?;

        // Use plugin for message processing
        let mut message = Message::new(Topic::new("events.test")?, Bytes::from("test data"))?;

        registry.process_message("logging", &mut message)?;

        // What it did: the header is there, and an RFC 3339 time.
        let stamped = message.header("processed_at").expect("stamped");
        assert!(chrono::DateTime::parse_from_rfc3339(stamped).is_ok());
        assert_eq!(
            registry.get("logging").unwrap().describe(),
            ("logging".to_string(), "1.0.0".to_string())
        );
        // A name cannot be taken twice.
        let again = Box::new(LoggingPlugin {
            name: "logging".to_string(),
            log_level: "info".to_string(),
        });
        assert!(registry.register("logging", again).is_err());
        Ok(())
    }
}

mod plugin_security {
    use super::*;
    use kaelix_core::plugin::PluginRegistry;
    use kaelix_core::plugin::{PermissionSet, ResourceLimits, SecurityIsolation};

    #[tokio::test]
    async fn security() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mut registry = PluginRegistry::new();
        registry.register(
            "logging",
            Box::new(LoggingPlugin {
                name: "logging".to_string(),
                log_level: String::new(),
            }),
        )?;

        // Configure plugin security
        let security = SecurityIsolation::new()
            .with_resource_limits(ResourceLimits {
                max_memory_mb: 100,
                max_cpu_percent: 10,
                max_file_descriptors: 50,
            })
            .with_permissions(PermissionSet {
                can_read_config: true,
                can_write_metrics: true,
                can_access_network: false,
            });

        // Apply security to plugin
        registry.set_security("logging", security.clone())?;

        assert_eq!(registry.get("logging").unwrap().security(), security);
        // An unknown name says so.
        let err = registry
            .set_security("nope", SecurityIsolation::new())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin nope: no plugin is registered under this name"
        );
        Ok(())
    }
}
