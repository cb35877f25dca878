//! The definitions a process knows, by name and version.

use std::collections::HashMap;
use std::sync::Arc;

use crate::definition::{Definition, SagaDefinition};

/// The saga definitions a process can run, by name and version.
///
/// Several versions of one saga may be registered at once; each instance runs on the version
/// it was started with.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    definitions: HashMap<(String, u32), Arc<Definition>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a definition, replacing one with the same name and version.
    pub fn register<I>(&mut self, definition: &SagaDefinition<I>) -> &mut Self {
        self.insert(Arc::clone(definition.definition()));
        self
    }

    /// Adds an erased definition.
    pub fn insert(&mut self, definition: Arc<Definition>) {
        let key = (definition.name().to_owned(), definition.version());
        self.definitions.insert(key, definition);
    }

    /// The definition `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Definition>> {
        self.definitions.get(&(name.to_owned(), version))
    }

    /// Every registered definition.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.definitions.values()
    }

    /// Every service that some registered definition sends commands to, each once.
    pub fn services(&self) -> Vec<String> {
        let mut services: Vec<String> = self
            .iter()
            .flat_map(|d| d.services())
            .map(str::to_owned)
            .collect();
        services.sort_unstable();
        services.dedup();
        services
    }
}
