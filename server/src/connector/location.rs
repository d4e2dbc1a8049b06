//! Where a file source's files live: a local directory, or a bucket prefix on an
//! S3-compatible object store (`s3://bucket/prefix`), read through `object_store`.
//!
//! The file source lists a location for names it has not read and reads each whole file;
//! both operations fail with a connector error (the source turns unhealthy and retries)
//! when the directory or the store cannot be reached.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::catalog::options::ConnectorOptions;
use crate::error::{Result, ServerError};

/// A directory of files, local or in object storage.
#[derive(Debug, Clone)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// A prefix in a bucket.
    Store {
        /// The bucket's client.
        store: Arc<dyn ObjectStore>,
        /// The prefix (no leading or trailing slash).
        prefix: String,
        /// `s3://bucket/prefix`, for messages.
        url: String,
    },
}

impl Location {
    /// The location named by the `path` option; S3 settings come from `s3.endpoint`,
    /// `s3.region`, `s3.access_key_id`, `s3.secret_access_key` or the `AWS_*` environment.
    pub fn try_new(options: &ConnectorOptions) -> Result<Self> {
        let path = options.required(&["path"])?;
        let Some(rest) = path.strip_prefix("s3://") else {
            return Ok(Location::Local(PathBuf::from(
                path.strip_prefix("file://").unwrap_or(&path),
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ServerError::InvalidSetting {
                name: "path".into(),
                value: path,
            });
        }
        let get = |keys: &[&str]| keys.iter().find_map(|k| options.values.get(*k)).cloned();
        // NOTE: an unreachable store should turn the source unhealthy in seconds, not after
        // object_store's default of ten retries over three minutes; the source retries itself.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
            ..RetryConfig::default()
        };
        let mut client = ClientOptions::new()
            .with_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry);
        if let Some(endpoint) = get(&["s3.endpoint", "s3.endpoint_url"]) {
            client = client.with_allow_http(endpoint.starts_with("http://"));
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder.with_client_options(client);
        builder =
            builder.with_region(get(&["s3.region", "s3.region_name"]).unwrap_or_else(|| {
                std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())
            }));
        if let Some(key) = get(&["s3.access_key_id", "s3.credentials.access"]) {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = get(&["s3.secret_access_key", "s3.credentials.secret"]) {
            builder = builder.with_secret_access_key(secret);
        }
        let store = builder.build().map_err(|e| ServerError::InvalidSetting {
            name: "path".into(),
            value: format!("{path}: {e}"),
        })?;
        Ok(Location::Store {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: path.clone(),
        })
    }

    /// Names of the files directly in the location (not in sub-directories).
    pub async fn list(&self) -> Result<Vec<String>> {
        match self {
            Location::Local(dir) => {
                let listing = std::fs::read_dir(dir).map_err(|e| {
                    ServerError::Connector(format!("cannot list {}: {e}", dir.display()))
                })?;
                let mut names = Vec::new();
                for entry in listing {
                    let entry = entry.map_err(|e| {
                        ServerError::Connector(format!("cannot list {}: {e}", dir.display()))
                    })?;
                    if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                Ok(names)
            }
            Location::Store { store, prefix, url } => {
                let prefix_path = (!prefix.is_empty()).then(|| StorePath::from(prefix.as_str()));
                let listing = store
                    .list_with_delimiter(prefix_path.as_ref())
                    .await
                    .map_err(|e| ServerError::Connector(format!("cannot list {url}: {e}")))?;
                Ok(listing
                    .objects
                    .into_iter()
                    .filter_map(|o| o.location.filename().map(|n| n.to_string()))
                    .collect())
            }
        }
    }

    /// The bytes of file `name`.
    pub async fn read(&self, name: &str) -> Result<Bytes> {
        match self {
            Location::Local(dir) => {
                let path = dir.join(name);
                std::fs::read(&path).map(Bytes::from).map_err(|e| {
                    ServerError::Connector(format!("cannot read {}: {e}", path.display()))
                })
            }
            Location::Store { store, prefix, url } => {
                let path = if prefix.is_empty() {
                    StorePath::from(name)
                } else {
                    StorePath::from(format!("{prefix}/{name}"))
                };
                let fail = |e: object_store::Error| {
                    ServerError::Connector(format!("cannot read {url}/{name}: {e}"))
                };
                store
                    .get(&path)
                    .await
                    .map_err(fail)?
                    .bytes()
                    .await
                    .map_err(fail)
            }
        }
    }
}
