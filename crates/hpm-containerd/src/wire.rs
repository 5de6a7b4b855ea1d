//! Between the generated protobuf messages and our types: the checks containerd's own
//! services make on requests (keys present, label sizes), the conversions both ways, and the
//! one mapping of our [`Error`] to a gRPC status. Pure: no I/O, no snapshotter, no logging.

use std::collections::HashMap;
use std::time::SystemTime;

use tonic::Status;

use crate::api::snapshots as pb;
use crate::types::{Code, Error, Info, Kind, Labels, Mount, Result};

/// containerd's limit on a label: its key and value together, in bytes
/// (`labels.Validate`, `maxSize`).
pub(crate) const MAX_LABEL_BYTES: usize = 4096;

/// How many infos one List reply message carries (containerd's own snapshots service sends
/// batches of 100 too).
pub(crate) const LIST_BATCH: usize = 100;

/// The gRPC status containerd is told for `err`: the one error mapping of this surface.
/// containerd turns the code back into its errdefs (NotFound, AlreadyExists, ...), and logs
/// or returns the message.
pub(crate) fn status(err: &Error) -> Status {
    Status::new(grpc_code(err.code), err.message.clone())
}

fn grpc_code(code: Code) -> tonic::Code {
    match code {
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::Unimplemented => tonic::Code::Unimplemented,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::Internal => tonic::Code::Internal,
    }
}

/// `value` of request field `field`, which must not be empty (a key or a name).
pub(crate) fn required(field: &str, value: String) -> Result<String> {
    if value.is_empty() {
        return Err(Error::new(
            Code::InvalidArgument,
            format!("the request's {field} is empty; it must name a snapshot"),
        ));
    }
    Ok(value)
}

/// A parent field: empty means none.
pub(crate) fn parent(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// Request labels, each key and value at most [`MAX_LABEL_BYTES`] together.
pub(crate) fn labels(labels: HashMap<String, String>) -> Result<Labels> {
    if let Some((key, value)) = labels
        .iter()
        .find(|(k, v)| k.len() + v.len() > MAX_LABEL_BYTES)
    {
        let mut shown = key.as_str();
        if shown.len() > 64 {
            let cut = (0..=64)
                .rev()
                .find(|&i| key.is_char_boundary(i))
                .unwrap_or(0);
            shown = &key[..cut];
        }
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "label {shown:?}{} is {} bytes with its value, more than containerd's limit of \
                 {MAX_LABEL_BYTES}; shorten the value",
                if shown.len() < key.len() { "..." } else { "" },
                key.len() + value.len()
            ),
        ));
    }
    Ok(labels.into_iter().collect())
}

/// Key, parent and labels of Prepare and View, checked.
pub(crate) fn new_snapshot(
    key: String,
    parent: String,
    labels: HashMap<String, String>,
) -> Result<(String, Option<String>, Labels)> {
    Ok((
        required("key", key)?,
        self::parent(parent),
        self::labels(labels)?,
    ))
}

/// Update's arguments: the info (its name required, its labels checked) and the field paths
/// (no mask: none, meaning all mutable fields).
///
/// Only `name` and `labels` matter to [`Snapshotter::update`](crate::Snapshotter::update);
/// the immutable fields are passed along as received. containerd's metadata layer sends kind
/// `UNKNOWN` and no times, which become `Active` and the epoch here.
pub(crate) fn update(
    info: Option<pb::Info>,
    mask: Option<prost_types::FieldMask>,
) -> Result<(Info, Vec<String>)> {
    let info = info.ok_or_else(|| {
        Error::new(
            Code::InvalidArgument,
            "the update request has no info; it must name the snapshot",
        )
    })?;
    let kind = match pb::Kind::try_from(info.kind) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Committed) => Kind::Committed,
        Ok(pb::Kind::Active | pb::Kind::Unknown) | Err(_) => Kind::Active,
    };
    let info = Info {
        name: required("info.name", info.name)?,
        parent: parent(info.parent),
        kind,
        created: time(info.created_at),
        updated: time(info.updated_at),
        labels: labels(info.labels)?,
    };
    Ok((info, mask.map(|m| m.paths).unwrap_or_default()))
}

/// A protobuf time as ours; missing or out of range: the epoch (only ever in fields the
/// snapshotter ignores).
fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Our info on the wire.
pub(crate) fn info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

/// Our mounts on the wire (`target` stays empty: the caller picks where to mount).
pub(crate) fn mounts(mounts: Vec<Mount>) -> Vec<crate::api::Mount> {
    mounts
        .into_iter()
        .map(|m| crate::api::Mount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

/// List's reply messages: `infos` in batches of [`LIST_BATCH`] (none for no infos).
pub(crate) fn list_batches(infos: Vec<Info>) -> Vec<pb::ListSnapshotsResponse> {
    let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
    let mut infos = infos.into_iter().map(info).peekable();
    while infos.peek().is_some() {
        batches.push(pb::ListSnapshotsResponse {
            info: infos.by_ref().take(LIST_BATCH).collect(),
        });
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_code_maps_to_its_grpc_code_with_the_message() {
        for (code, grpc) in [
            (Code::NotFound, tonic::Code::NotFound),
            (Code::AlreadyExists, tonic::Code::AlreadyExists),
            (Code::FailedPrecondition, tonic::Code::FailedPrecondition),
            (Code::InvalidArgument, tonic::Code::InvalidArgument),
            (Code::Unimplemented, tonic::Code::Unimplemented),
            (Code::ResourceExhausted, tonic::Code::ResourceExhausted),
            (Code::Unavailable, tonic::Code::Unavailable),
            (Code::Internal, tonic::Code::Internal),
        ] {
            let s = status(&Error::new(code, "what failed"));
            assert_eq!(s.code(), grpc, "{code:?}");
            assert_eq!(s.message(), "what failed");
        }
    }

    #[test]
    fn labels_up_to_the_limit_pass_and_longer_ones_are_refused() {
        let at_limit = HashMap::from([("k".to_owned(), "v".repeat(MAX_LABEL_BYTES - 1))]);
        assert_eq!(labels(at_limit).unwrap().len(), 1);
        let long_key = "é".repeat(100);
        let over = HashMap::from([(long_key.clone(), "v".repeat(MAX_LABEL_BYTES))]);
        let err = labels(over).unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(err.message.contains(&"é".repeat(32)), "{}", err.message);
        assert!(!err.message.contains(&long_key), "the key is cut short");
        assert!(err.message.contains("4296 bytes"), "{}", err.message);
    }

    #[test]
    fn empty_keys_are_refused_and_empty_parents_are_none() {
        assert_eq!(
            required("key", String::new()).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(required("key", "k".into()).unwrap(), "k");
        assert_eq!(parent(String::new()), None);
        assert_eq!(parent("p".into()).as_deref(), Some("p"));
    }

    #[test]
    fn info_round_trips_and_update_fills_what_containerd_leaves_out() {
        let ours = Info {
            name: "default/4/x".into(),
            parent: Some("default/1/p".into()),
            kind: Kind::Committed,
            created: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            updated: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_001, 6),
            labels: Labels::from([("a".into(), "b".into())]),
        };
        let wire = info(ours.clone());
        assert_eq!(wire.kind, 3);
        let (back, paths) = update(Some(wire), None).unwrap();
        assert_eq!(back, ours);
        assert!(paths.is_empty());

        let sparse = pb::Info {
            name: "n".into(),
            ..Default::default()
        };
        let mask = prost_types::FieldMask {
            paths: vec!["labels.a".into()],
        };
        let (back, paths) = update(Some(sparse), Some(mask)).unwrap();
        assert_eq!(
            (back.kind, back.parent, back.created),
            (Kind::Active, None, SystemTime::UNIX_EPOCH)
        );
        assert_eq!(paths, ["labels.a"]);
        assert_eq!(update(None, None).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn list_batches_hold_at_most_100() {
        let one = Info {
            name: String::new(),
            parent: None,
            kind: Kind::View,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: Labels::new(),
        };
        assert!(list_batches(Vec::new()).is_empty());
        let sizes = |n| {
            list_batches(vec![one.clone(); n])
                .iter()
                .map(|b| b.info.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(100), [100]);
        assert_eq!(sizes(250), [100, 100, 50]);
    }
}
