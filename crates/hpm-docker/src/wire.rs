//! The wire format of the graphdriver plugin protocol, as dockerd 20.10 encodes and decodes
//! it (moby `daemon/graphdriver/proxy.go`, `pkg/plugins`): endpoint names, JSON shapes with
//! their exact field names, and the ApplyDiff query string. Pure: no I/O, no driver.
//!
//! dockerd's request struct has `omitempty` on every field, so any field may be missing;
//! Go encodes nil slices and maps as `null`, so those may be `null`. Both decode to the
//! empty value here. Unknown fields are ignored, so newer daemons keep working.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::DriverError;

/// Content type of every JSON reply (dockerd does not check it; this is the convention).
pub(crate) const JSON_CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Content type of the Diff reply, a raw tar stream.
pub(crate) const TAR_CONTENT_TYPE: &str = "application/x-tar";

/// One endpoint of the protocol: `POST /<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Activate,
    Init,
    Capabilities,
    Create,
    CreateReadWrite,
    Remove,
    Get,
    Put,
    Exists,
    Status,
    GetMetadata,
    Cleanup,
    Diff,
    Changes,
    ApplyDiff,
    DiffSize,
}

impl Endpoint {
    /// Every endpoint, for tests and error messages.
    pub(crate) const ALL: [Endpoint; 16] = [
        Endpoint::Activate,
        Endpoint::Init,
        Endpoint::Capabilities,
        Endpoint::Create,
        Endpoint::CreateReadWrite,
        Endpoint::Remove,
        Endpoint::Get,
        Endpoint::Put,
        Endpoint::Exists,
        Endpoint::Status,
        Endpoint::GetMetadata,
        Endpoint::Cleanup,
        Endpoint::Diff,
        Endpoint::Changes,
        Endpoint::ApplyDiff,
        Endpoint::DiffSize,
    ];

    /// The method name, as in the path `/<name>`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::Activate => "Plugin.Activate",
            Endpoint::Init => "GraphDriver.Init",
            Endpoint::Capabilities => "GraphDriver.Capabilities",
            Endpoint::Create => "GraphDriver.Create",
            Endpoint::CreateReadWrite => "GraphDriver.CreateReadWrite",
            Endpoint::Remove => "GraphDriver.Remove",
            Endpoint::Get => "GraphDriver.Get",
            Endpoint::Put => "GraphDriver.Put",
            Endpoint::Exists => "GraphDriver.Exists",
            Endpoint::Status => "GraphDriver.Status",
            Endpoint::GetMetadata => "GraphDriver.GetMetadata",
            Endpoint::Cleanup => "GraphDriver.Cleanup",
            Endpoint::Diff => "GraphDriver.Diff",
            Endpoint::Changes => "GraphDriver.Changes",
            Endpoint::ApplyDiff => "GraphDriver.ApplyDiff",
            Endpoint::DiffSize => "GraphDriver.DiffSize",
        }
    }

    /// The endpoint of a request path (`/GraphDriver.Create`), exact and case-sensitive.
    pub(crate) fn from_path(path: &str) -> Option<Endpoint> {
        let name = path.strip_prefix('/')?;
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// Decodes `null` as the type's default (Go encodes nil slices and maps as `null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// dockerd's `graphDriverRequest`: every endpoint but Init, Activate and ApplyDiff.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct Request {
    #[serde(rename = "ID", default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(rename = "Parent", default, deserialize_with = "null_as_default")]
    pub parent: String,
    #[serde(rename = "MountLabel", default, deserialize_with = "null_as_default")]
    pub mount_label: String,
    #[serde(rename = "StorageOpt", default, deserialize_with = "null_as_default")]
    pub storage_opt: BTreeMap<String, String>,
}

/// dockerd's `graphDriverInitRequest`.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct InitRequest {
    #[serde(rename = "Home", default, deserialize_with = "null_as_default")]
    pub home: String,
    #[serde(rename = "Opts", default, deserialize_with = "null_as_default")]
    pub opts: Vec<String>,
    #[serde(rename = "UIDMaps", default, deserialize_with = "null_as_default")]
    pub uid_maps: Vec<IdMap>,
    #[serde(rename = "GIDMaps", default, deserialize_with = "null_as_default")]
    pub gid_maps: Vec<IdMap>,
}

/// One range of a user namespace mapping (moby `idtools.IDMap`; snake_case JSON keys).
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub(crate) struct IdMap {
    pub container_id: i64,
    pub host_id: i64,
    pub size: i64,
}

/// Decodes a request body; an empty body or `null` is the empty request (dockerd sends
/// `{}` or nothing for the calls without arguments).
pub(crate) fn decode<T>(endpoint: Endpoint, body: &[u8]) -> Result<T, DriverError>
where
    T: Default + for<'de> Deserialize<'de>,
{
    let malformed = |why: &dyn std::fmt::Display| {
        DriverError::invalid(format!(
            "malformed JSON in the {} request body: {why}",
            endpoint.name()
        ))
    };
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Ok(T::default());
    }
    // serde would also take a JSON array for a struct; dockerd only sends objects.
    if !trimmed.starts_with(b"{") && trimmed != b"null" {
        return Err(malformed(&"expected a JSON object"));
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| malformed(&e))
}

/// dockerd's `graphDriverResponse`. Fields left `None` are not sent (Go's `omitempty`);
/// each endpoint sets its own result field even when it is the zero value.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Response {
    #[serde(rename = "Err", skip_serializing_if = "String::is_empty")]
    pub err: String,
    #[serde(rename = "Dir", skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    #[serde(rename = "Exists", skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<[String; 2]>>,
    #[serde(rename = "Changes", skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
    #[serde(rename = "Size", skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    #[serde(rename = "Metadata", skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "Capabilities", skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// One entry of a Changes reply (moby `archive.Change`; Kind is an integer).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Change {
    #[serde(rename = "Path")]
    pub path: String,
    #[serde(rename = "Kind")]
    pub kind: u8,
}

/// The Capabilities reply's nested object (dockerd reads it nested, not at top level).
#[derive(Debug, Default, Serialize)]
pub(crate) struct Capabilities {
    /// false: dockerd rebuilds layer tars from its tar-split data and files read through
    /// Get, rather than calling Diff for push and save.
    #[serde(rename = "ReproducesExactDiffs")]
    pub reproduces_exact_diffs: bool,
}

/// The Plugin.Activate reply.
#[derive(Debug, Serialize)]
pub(crate) struct Manifest {
    #[serde(rename = "Implements")]
    pub implements: [&'static str; 1],
}

/// The only Activate reply: this plugin is a graphdriver.
pub(crate) const MANIFEST: Manifest = Manifest {
    implements: ["GraphDriver"],
};

/// The ids of an ApplyDiff, from its query string `id=<id>&parent=<parent>`. dockerd does
/// not escape them (they are hex ids, `-init` suffixed at most), so they are taken as they
/// are, without percent-decoding. An empty parent is no parent; other keys are ignored.
pub(crate) fn apply_diff_ids(query: Option<&str>) -> Result<(String, Option<String>), DriverError> {
    let mut id = None;
    let mut parent = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("id", value)) => id = Some(value),
            Some(("parent", value)) => parent = Some(value),
            _ => {}
        }
    }
    match id {
        Some(id) if !id.is_empty() => Ok((
            id.to_owned(),
            parent.filter(|p| !p.is_empty()).map(str::to_owned),
        )),
        _ => Err(DriverError::invalid(format!(
            "GraphDriver.ApplyDiff needs the layer id in its query string \
             (/GraphDriver.ApplyDiff?id=<id>&parent=<parent>), got {:?}",
            query.unwrap_or("")
        ))),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
