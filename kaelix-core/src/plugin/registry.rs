//! Plugins by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::guard::{Call, PluginHandle};
use super::security::SecurityIsolation;
use super::{ProcessingAction, StreamPlugin};
use crate::{Error, Message, Result};

/// Makes a new instance of a plugin, for each `[[plugins]]` entry that
/// names it.
pub type PluginFactory = Arc<dyn Fn() -> Box<dyn StreamPlugin> + Send + Sync>;

/// Plugins registered by name, each behind its guard, and factories that
/// make plugins for the broker's `[[plugins]]` entries.
#[derive(Default)]
pub struct PluginRegistry {
    /// In the order they were registered: initialized in that order, shut
    /// down in the reverse.
    plugins: Vec<Entry>,
    factories: BTreeMap<String, PluginFactory>,
}

struct Entry {
    handle: PluginHandle,
    config: toml::Table,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("plugins", &self.names().collect::<Vec<_>>())
            .field("factories", &self.factories.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PluginRegistry {
    pub fn new() -> PluginRegistry {
        PluginRegistry::default()
    }

    /// Registers `plugin` under `name`, under the default
    /// [`SecurityIsolation`]. A name can be registered once.
    pub fn register<P: StreamPlugin + 'static>(
        &mut self,
        name: &str,
        plugin: Box<P>,
    ) -> Result<()> {
        self.register_boxed(name, plugin)
    }

    /// [`register`](Self::register) for a plugin already boxed as a trait
    /// object.
    pub fn register_boxed(&mut self, name: &str, plugin: Box<dyn StreamPlugin>) -> Result<()> {
        if self.get(name).is_some() || self.factories.contains_key(name) {
            return Err(plugin_error(
                name,
                "a plugin is already registered under this name",
            ));
        }
        self.plugins.push(Entry {
            handle: PluginHandle::new(name, name, plugin, SecurityIsolation::default()),
            config: toml::Table::new(),
        });
        Ok(())
    }

    /// Registers a factory: each `[[plugins]]` entry that names `kind` gets
    /// its own instance, initialized with that entry's `config`.
    pub fn register_factory<F>(&mut self, kind: &str, factory: F) -> Result<()>
    where
        F: Fn() -> Box<dyn StreamPlugin> + Send + Sync + 'static,
    {
        if self.get(kind).is_some() || self.factories.contains_key(kind) {
            return Err(plugin_error(
                kind,
                "a plugin is already registered under this name",
            ));
        }
        self.factories.insert(kind.to_string(), Arc::new(factory));
        Ok(())
    }

    /// The configuration table `name` is initialized with (empty unless
    /// set here).
    pub fn configure(&mut self, name: &str, config: toml::Table) -> Result<()> {
        let entry = self.entry_mut(name)?;
        entry.config = config;
        Ok(())
    }

    /// Initializes every registered plugin, in the order they were
    /// registered. Every plugin is tried; the first failure is returned,
    /// and a plugin that failed stays out of the message path.
    pub async fn initialize_all(&mut self) -> Result<()> {
        let mut first = None;
        for entry in &self.plugins {
            if let Err(err) = entry.handle.initialize(entry.config.clone()) {
                tracing::error!(plugin = entry.handle.name(), "{err}");
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Shuts every plugin down, in the reverse order of registration.
    pub async fn shutdown_all(&mut self) -> Result<()> {
        let mut first = None;
        for entry in self.plugins.iter().rev() {
            if let Err(err) = entry.handle.shutdown() {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs plugin `name` on `message` through its guard. A plugin that
    /// fails, panics, is switched off or was not initialized is an error
    /// that says which.
    pub fn process_message(&self, name: &str, message: &mut Message) -> Result<ProcessingAction> {
        let handle = self
            .get(name)
            .ok_or_else(|| plugin_error(name, "no plugin is registered under this name"))?;
        match handle.call(message) {
            Call::Done(action) => Ok(action),
            Call::Failed(failure) => Err(plugin_error(name, &failure.to_string())),
            Call::Off => Err(plugin_error(
                name,
                "not in the message path: not initialized, or switched off by its circuit breaker",
            )),
        }
    }

    /// Sets `name`'s limits and permissions (see
    /// [`PluginHandle::set_security`]).
    pub fn set_security(&mut self, name: &str, security: SecurityIsolation) -> Result<()> {
        self.entry_mut(name)?.handle.set_security(security);
        Ok(())
    }

    /// The registered plugin `name`.
    pub fn get(&self, name: &str) -> Option<&PluginHandle> {
        self.plugins
            .iter()
            .find(|e| e.handle.name() == name)
            .map(|e| &e.handle)
    }

    /// The factory for `kind`.
    pub fn factory(&self, kind: &str) -> Option<&PluginFactory> {
        self.factories.get(kind)
    }

    /// Whether `name` is a registered plugin or a factory.
    pub fn knows(&self, name: &str) -> bool {
        self.get(name).is_some() || self.factories.contains_key(name)
    }

    /// The registered plugins' names, in the order of registration.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().map(|e| e.handle.name())
    }

    /// The factories' names.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    fn entry_mut(&mut self, name: &str) -> Result<&mut Entry> {
        self.plugins
            .iter_mut()
            .find(|e| e.handle.name() == name)
            .ok_or_else(|| plugin_error(name, "no plugin is registered under this name"))
    }
}

fn plugin_error(plugin: &str, reason: &str) -> Error {
    Error::Plugin {
        plugin: plugin.to_string(),
        reason: reason.to_string(),
    }
}
