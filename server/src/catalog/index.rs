//! Secondary indexes from their definitions: which table columns a CREATE INDEX names, and
//! the indexes recorded for a table built into its cache (after replay or a table rewrite).

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::sql::sqlparser::ast::{self, Statement};
use millrace_planner::{Catalog, MillraceTable, PlanError};
use millrace_storage::ObjectKind;

use crate::error::{Result, ServerError};
use crate::sql::fold;
use millrace_planner::error::ObjectClass;
use millrace_storage::error::LockResultExt;

/// Table column positions of a CREATE INDEX statement's columns.
pub fn index_columns(schema: &SchemaRef, index: &ast::CreateIndex) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(index.columns.len());
    for col in &index.columns {
        let name = match &col.column.expr {
            ast::Expr::Identifier(i) => fold(i),
            ast::Expr::CompoundIdentifier(parts) => parts.last().map(fold).unwrap_or_default(),
            other => {
                return Err(ServerError::NotSupported(format!(
                    "index on expression {other}"
                )));
            }
        };
        out.push(
            schema
                .index_of(&name)
                .map_err(|_| PlanError::UndefinedObject {
                    kind: ObjectClass::Column,
                    name: name.clone(),
                })?,
        );
    }
    Ok(out)
}

/// Builds the secondary indexes recorded for a table (after replay or a table rewrite).
pub fn attach_indexes(catalog: &Catalog, table: &MillraceTable) -> Result<()> {
    for record in catalog.records() {
        if record.kind != ObjectKind::Index || record.depends_on.first() != Some(&table.id) {
            continue;
        }
        let Statement::CreateIndex(index) = crate::sql::parse_one(&record.sql)? else {
            continue;
        };
        let columns = index_columns(&table.def.schema, &index)?;
        table
            .rows
            .write()
            .or_poisoned("table")?
            .add_index(&record.name, columns)?;
    }
    Ok(())
}
