//! The catalog: databases, schemas, tables and views, durable in RocksDB and visible to
//! DataFusion as a `CatalogProviderList` shared by every session.
//!
//! DDL first commits the object's [`CatalogRecord`] to the store, then registers the
//! provider here; on start the server replays the records in id order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, SchemaProvider,
};
use datafusion::datasource::TableProvider;
use millrace_storage::{CatalogRecord, ObjectKind, Store};

use crate::error::ObjectClass;
use crate::error::{PlanError, Result};
use crate::system_table::{SystemTables, UserSchema};
use crate::table::MillraceTable;

/// Databases, schemas and relations, in memory and in the durable store.
#[derive(Debug)]
pub struct Catalog {
    /// The durable store holding the records and table logs.
    store: Arc<Store>,
    /// What DataFusion resolves names against.
    list: Arc<Databases>,
    /// Every live catalog record by id.
    records: RwLock<BTreeMap<u64, CatalogRecord>>,
    /// Tables by id.
    tables: RwLock<HashMap<u64, Arc<MillraceTable>>>,
    /// System tables, resolvable from every schema.
    system: SystemTables,
}

impl Catalog {
    /// An empty catalog over `store` (records are replayed by the caller).
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            list: Arc::new(Databases::default()),
            records: RwLock::new(BTreeMap::new()),
            tables: RwLock::new(HashMap::new()),
            system: SystemTables::default(),
        }
    }

    /// Adds a system table, visible from every schema of every database.
    pub fn register_system_table(&self, name: &str, table: Arc<dyn TableProvider>) {
        if let Ok(mut system) = self.system.write() {
            system.insert(name.to_string(), table);
        }
    }

    /// The durable store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The provider list DataFusion sessions resolve names with.
    pub fn provider_list(&self) -> Arc<dyn CatalogProviderList> {
        self.list.clone()
    }

    /// A snapshot of all records, in id order.
    pub fn records(&self) -> Vec<CatalogRecord> {
        self.records
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces an object's record (its stored SQL changed; the provider did not).
    pub fn update_record(&self, record: CatalogRecord) {
        if let Ok(mut records) = self.records.write() {
            records.insert(record.id, record);
        }
    }

    /// The record of an object by id.
    pub fn record(&self, id: u64) -> Option<CatalogRecord> {
        self.records.read().ok()?.get(&id).cloned()
    }

    /// The record of an object of one of `kinds` by its qualified name.
    pub fn find(
        &self,
        kinds: &[ObjectKind],
        database: &str,
        schema: &str,
        name: &str,
    ) -> Option<CatalogRecord> {
        let records = self.records.read().ok()?;
        records
            .values()
            .find(|r| {
                kinds.contains(&r.kind)
                    && r.database == database
                    && r.schema == schema
                    && r.name == name
            })
            .cloned()
    }

    /// Ids of every table.
    pub fn table_ids(&self) -> Vec<u64> {
        self.tables
            .read()
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The table with the given id.
    pub fn table(&self, id: u64) -> Option<Arc<MillraceTable>> {
        self.tables.read().ok()?.get(&id).cloned()
    }

    /// Objects that depend on `id`, directly or through others, dependents first.
    pub fn dependents(&self, id: u64) -> Vec<CatalogRecord> {
        let records = self.records();
        let mut out: Vec<CatalogRecord> = Vec::new();
        let mut frontier = vec![id];
        while let Some(next) = frontier.pop() {
            for r in &records {
                if r.depends_on.contains(&next) && !out.iter().any(|o| o.id == r.id) {
                    out.push(r.clone());
                    frontier.push(r.id);
                }
            }
        }
        out.reverse();
        out
    }

    /// Objects inside a database or schema (for DROP ... CASCADE).
    pub fn contents(&self, database: &str, schema: Option<&str>) -> Vec<CatalogRecord> {
        let mut out: Vec<CatalogRecord> = self
            .records()
            .into_iter()
            .filter(|r| {
                r.database == database
                    && match schema {
                        Some(s) => r.schema == s && r.kind != ObjectKind::Schema,
                        None => r.kind != ObjectKind::Database,
                    }
            })
            .collect();
        out.reverse();
        out
    }

    /// The DataFusion catalog of a database.
    pub fn database(&self, name: &str) -> Option<Arc<dyn CatalogProvider>> {
        self.list.catalog(name)
    }

    /// The DataFusion schema of a database's schema.
    pub fn schema(&self, database: &str, schema: &str) -> Option<Arc<dyn SchemaProvider>> {
        self.database(database)?.schema(schema)
    }

    /// Registers a committed database record.
    pub fn register_database(&self, record: CatalogRecord) -> Arc<dyn CatalogProvider> {
        let provider: Arc<dyn CatalogProvider> = Arc::new(MemoryCatalogProvider::new());
        self.list
            .register_catalog(record.name.clone(), provider.clone());
        self.put_record(record);
        provider
    }

    /// Registers a committed schema record.
    pub fn register_schema(&self, record: CatalogRecord) -> Result<()> {
        let db = self
            .database(&record.database)
            .ok_or_else(|| PlanError::UndefinedObject {
                kind: ObjectClass::Database,
                name: record.database.clone(),
            })?;
        db.register_schema(&record.name, Arc::new(UserSchema::new(self.system.clone())))?;
        self.put_record(record);
        Ok(())
    }

    /// Registers a committed table or view record with its provider.
    pub fn register_relation(
        &self,
        record: CatalogRecord,
        provider: Arc<dyn TableProvider>,
        table: Option<Arc<MillraceTable>>,
    ) -> Result<()> {
        let schema = self
            .schema(&record.database, &record.schema)
            .ok_or_else(|| PlanError::UndefinedObject {
                kind: ObjectClass::Schema,
                name: record.schema.clone(),
            })?;
        schema.deregister_table(&record.name)?;
        schema.register_table(record.name.clone(), provider)?;
        if let Some(table) = table
            && let Ok(mut tables) = self.tables.write()
        {
            tables.insert(record.id, table);
        }
        self.put_record(record);
        Ok(())
    }

    /// Registers a committed index or sink record (neither has a provider of its own).
    pub fn register_index(&self, record: CatalogRecord) {
        self.put_record(record);
    }

    /// Forgets a dropped object (its record is already deleted from the store).
    pub fn deregister(&self, record: &CatalogRecord) -> Result<()> {
        match record.kind {
            ObjectKind::Database => {
                self.list.deregister(&record.name);
            }
            ObjectKind::Schema => {
                if let Some(db) = self.database(&record.database) {
                    db.deregister_schema(&record.name, true)?;
                }
            }
            ObjectKind::Table | ObjectKind::View | ObjectKind::MaterializedView => {
                if let Some(schema) = self.schema(&record.database, &record.schema) {
                    schema.deregister_table(&record.name)?;
                }
                if let Ok(mut tables) = self.tables.write() {
                    tables.remove(&record.id);
                }
            }
            ObjectKind::Index | ObjectKind::Sink => {}
        }
        if let Ok(mut records) = self.records.write() {
            records.remove(&record.id);
        }
        Ok(())
    }

    fn put_record(&self, record: CatalogRecord) {
        if let Ok(mut records) = self.records.write() {
            records.insert(record.id, record);
        }
    }
}

/// The databases as DataFusion's `CatalogProviderList` (which, unlike DataFusion's memory
/// list, can forget a dropped database).
#[derive(Debug, Default)]
pub struct Databases {
    /// Catalog providers by database name.
    by_name: RwLock<HashMap<String, Arc<dyn CatalogProvider>>>,
}

impl Databases {
    fn deregister(&self, name: &str) {
        if let Ok(mut m) = self.by_name.write() {
            m.remove(name);
        }
    }
}

impl CatalogProviderList for Databases {
    fn register_catalog(
        &self,
        name: String,
        catalog: Arc<dyn CatalogProvider>,
    ) -> Option<Arc<dyn CatalogProvider>> {
        self.by_name.write().ok()?.insert(name, catalog)
    }

    fn catalog_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    fn catalog(&self, name: &str) -> Option<Arc<dyn CatalogProvider>> {
        self.by_name.read().ok()?.get(name).cloned()
    }
}
