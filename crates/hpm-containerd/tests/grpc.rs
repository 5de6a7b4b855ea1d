//! The snapshots gRPC service through a real tonic client (the generated one, as containerd's
//! proxy client would call it) over the unix socket, against an in-memory snapshotter that
//! keeps containerd's rules (unique keys, committed parents, no removal with children).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

use hpm_containerd::api::snapshots::snapshots_client::SnapshotsClient;
use hpm_containerd::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as PbInfo, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use hpm_containerd::{Code, Error, Info, Kind, Labels, Mount, Snapshotter, Usage};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

type Client = SnapshotsClient<Channel>;

/// An in-memory snapshotter. `fail` makes every call fail with that error; `calls` counts
/// the calls that reached it.
#[derive(Default)]
struct Fake {
    snapshots: Mutex<BTreeMap<String, Info>>,
    fail: Mutex<Option<Error>>,
    panic: std::sync::atomic::AtomicBool,
    calls: AtomicUsize,
    cleanups: AtomicUsize,
    last_update: Mutex<Option<(Info, Vec<String>)>>,
    /// Holds the next call: it says it entered, then waits to be released.
    hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Fake {
    fn enter(&self) -> hpm_containerd::Result<std::sync::MutexGuard<'_, BTreeMap<String, Info>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let hold = self.hold.lock().unwrap().take();
        if let Some((entered, release)) = hold {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        if self.panic.load(Ordering::SeqCst) {
            panic!("the fake snapshotter was told to panic");
        }
        if let Some(err) = self.fail.lock().unwrap().clone() {
            return Err(err);
        }
        Ok(self.snapshots.lock().unwrap())
    }

    fn insert(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: Labels,
    ) -> hpm_containerd::Result<Vec<Mount>> {
        let mut snaps = self.enter()?;
        if snaps.contains_key(key) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("snapshot {key:?} exists"),
            ));
        }
        if let Some(p) = parent {
            match snaps.get(p) {
                None => {
                    return Err(Error::new(
                        Code::NotFound,
                        format!("parent {p:?} not found"),
                    ))
                }
                Some(i) if i.kind != Kind::Committed => {
                    return Err(Error::new(
                        Code::FailedPrecondition,
                        format!("parent {p:?} is not committed"),
                    ))
                }
                Some(_) => {}
            }
        }
        let now = SystemTime::now();
        let info = Info {
            name: key.into(),
            parent: parent.map(Into::into),
            kind,
            created: now,
            updated: now,
            labels,
        };
        let mounts = mounts_of(&info);
        snaps.insert(key.into(), info);
        Ok(mounts)
    }
}

fn mounts_of(info: &Info) -> Vec<Mount> {
    let mode = if info.kind == Kind::Active {
        "rw"
    } else {
        "ro"
    };
    vec![Mount {
        fs_type: "ext4".into(),
        source: format!("/dev/fake/{}", info.name.len()),
        options: vec![mode.into(), "noatime".into()],
    }]
}

fn not_found(key: &str) -> Error {
    Error::new(Code::NotFound, format!("snapshot {key:?} not found"))
}

impl Snapshotter for Fake {
    fn stat(&self, key: &str) -> hpm_containerd::Result<Info> {
        self.enter()?
            .get(key)
            .cloned()
            .ok_or_else(|| not_found(key))
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> hpm_containerd::Result<Info> {
        let mut snaps = self.enter()?;
        *self.last_update.lock().unwrap() = Some((info.clone(), fieldpaths.to_vec()));
        let current = snaps
            .get_mut(&info.name)
            .ok_or_else(|| not_found(&info.name))?;
        if fieldpaths.is_empty() {
            current.labels = info.labels.clone();
        }
        for path in fieldpaths {
            if path == "labels" {
                current.labels = info.labels.clone();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match info.labels.get(key) {
                    Some(v) => current.labels.insert(key.into(), v.clone()),
                    None => current.labels.remove(key),
                };
            } else {
                return Err(Error::new(
                    Code::InvalidArgument,
                    format!("cannot update {path:?}"),
                ));
            }
        }
        current.updated = SystemTime::now();
        Ok(current.clone())
    }

    fn usage(&self, key: &str) -> hpm_containerd::Result<Usage> {
        let snaps = self.enter()?;
        let info = snaps.get(key).ok_or_else(|| not_found(key))?;
        Ok(Usage {
            size: 4096 * info.name.len() as i64,
            inodes: 7,
        })
    }

    fn mounts(&self, key: &str) -> hpm_containerd::Result<Vec<Mount>> {
        self.enter()?
            .get(key)
            .map(mounts_of)
            .ok_or_else(|| not_found(key))
    }

    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> hpm_containerd::Result<Vec<Mount>> {
        self.insert(key, parent, Kind::Active, labels)
    }

    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> hpm_containerd::Result<Vec<Mount>> {
        self.insert(key, parent, Kind::View, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> hpm_containerd::Result<()> {
        let mut snaps = self.enter()?;
        let active = snaps.get(key).ok_or_else(|| not_found(key))?;
        if active.kind != Kind::Active {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("{key:?} is not active"),
            ));
        }
        if snaps.contains_key(name) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("snapshot {name:?} exists"),
            ));
        }
        let mut info = snaps.remove(key).expect("checked");
        info.name = name.into();
        info.kind = Kind::Committed;
        info.labels = labels;
        info.updated = SystemTime::now();
        snaps.insert(name.into(), info);
        Ok(())
    }

    fn remove(&self, key: &str) -> hpm_containerd::Result<()> {
        let mut snaps = self.enter()?;
        if !snaps.contains_key(key) {
            return Err(not_found(key));
        }
        if snaps.values().any(|i| i.parent.as_deref() == Some(key)) {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("{key:?} has children"),
            ));
        }
        snaps.remove(key);
        Ok(())
    }

    fn list(&self) -> hpm_containerd::Result<Vec<Info>> {
        Ok(self.enter()?.values().cloned().collect())
    }

    fn cleanup(&self) -> hpm_containerd::Result<()> {
        drop(self.enter()?);
        self.cleanups.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A served fake and a client connected to it.
struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    fake: Arc<Fake>,
    client: Client,
    stop: watch::Sender<bool>,
    serving: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/hpmapper/containerd.sock");
    let listener = hpm_containerd::bind(&socket).unwrap();
    let fake = Arc::new(Fake::default());
    let (stop, stopped) = watch::channel(false);
    let serving = tokio::spawn(hpm_containerd::serve(listener, fake.clone(), stopped));
    let client = SnapshotsClient::new(connect(&socket).await);
    Harness {
        _dir: dir,
        socket,
        fake,
        client,
        stop,
        serving,
    }
}

async fn connect(socket: &std::path::Path) -> Channel {
    Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn prepare_req(key: &str, parent: &str, l: &[(&str, &str)]) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "hpmapper".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    }
}

async fn prepare(c: &mut Client, key: &str, parent: &str) -> Result<(), tonic::Status> {
    c.prepare(prepare_req(key, parent, &[])).await.map(drop)
}

async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "hpmapper".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("containerd.io/snapshot.ref", name)]),
    })
    .await
    .map(drop)
}

async fn stat(c: &mut Client, key: &str) -> Result<PbInfo, tonic::Status> {
    let reply = c
        .stat(StatSnapshotRequest {
            snapshotter: "hpmapper".into(),
            key: key.into(),
        })
        .await?;
    Ok(reply.into_inner().info.expect("Stat answers an info"))
}

/// Every batch of a List reply stream, as the names in each.
async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<Vec<String>>, tonic::Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "hpmapper".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut batches = Vec::new();
    while let Some(batch) = stream.message().await? {
        batches.push(batch.info.into_iter().map(|i| i.name).collect());
    }
    Ok(batches)
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips() {
    let mut h = start().await;
    let c = &mut h.client;
    let base = "default/1/extract-1 sha256:base";

    // Prepare without parent: our mounts, target empty, labels through.
    let mounts = c
        .prepare(prepare_req(
            base,
            "",
            &[("containerd.io/snapshot.ref", "sha256:base")],
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "ext4");
    assert_eq!(mounts[0].source, format!("/dev/fake/{}", base.len()));
    assert_eq!(mounts[0].target, "");
    assert_eq!(mounts[0].options, ["rw", "noatime"]);
    let active = stat(c, base).await.unwrap();
    assert_eq!(
        (active.kind, active.parent.as_str()),
        (2, ""),
        "ACTIVE, no parent"
    );
    assert_eq!(
        active.labels,
        labels(&[("containerd.io/snapshot.ref", "sha256:base")])
    );

    // Commit, then Stat the committed one: kind, times and labels as the snapshotter has them.
    commit(c, "sha256:base", base).await.unwrap();
    let committed = stat(c, "sha256:base").await.unwrap();
    let ours = h.fake.snapshots.lock().unwrap()["sha256:base"].clone();
    assert_eq!(committed.name, "sha256:base");
    assert_eq!(committed.kind, 3, "COMMITTED");
    assert_eq!(committed.created_at, Some(timestamp(ours.created)));
    assert_eq!(committed.updated_at, Some(timestamp(ours.updated)));
    assert_eq!(
        committed.labels,
        labels(&[("containerd.io/snapshot.ref", "sha256:base")])
    );

    // Prepare on a parent, View of it, Mounts of both.
    c.prepare(prepare_req("default/2/c1", "sha256:base", &[("x", "1")]))
        .await
        .unwrap();
    let child = stat(c, "default/2/c1").await.unwrap();
    assert_eq!((child.kind, child.parent.as_str()), (2, "sha256:base"));
    let view = c
        .view(ViewSnapshotRequest {
            snapshotter: "hpmapper".into(),
            key: "default/3/v".into(),
            parent: "sha256:base".into(),
            labels: labels(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(view[0].options, ["ro", "noatime"]);
    assert_eq!(stat(c, "default/3/v").await.unwrap().kind, 1, "VIEW");
    let m = c
        .mounts(MountsRequest {
            snapshotter: "hpmapper".into(),
            key: "default/2/c1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (m[0].r#type.as_str(), m[0].options[0].as_str()),
        ("ext4", "rw")
    );

    // Usage.
    let usage = c
        .usage(UsageRequest {
            snapshotter: "hpmapper".into(),
            key: "default/2/c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.size, usage.inodes), (4096 * 12, 7));

    // Update with a mask of one label: set one, the others stay; kind, parent and times in
    // the request reach the snapshotter as sent but do not change anything.
    let update = |info: PbInfo, paths: &[&str]| UpdateSnapshotRequest {
        snapshotter: "hpmapper".into(),
        info: Some(info),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let request = PbInfo {
        name: "default/2/c1".into(),
        kind: 0, // containerd's metadata layer sends UNKNOWN
        labels: labels(&[("y", "2"), ("ignored", "not in the mask")]),
        ..Default::default()
    };
    let after = c
        .update(update(request.clone(), &["labels.y"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(after.labels, labels(&[("x", "1"), ("y", "2")]));
    assert_eq!((after.kind, after.parent.as_str()), (2, "sha256:base"));
    let (seen, paths) = h.fake.last_update.lock().unwrap().clone().unwrap();
    assert_eq!(paths, ["labels.y"]);
    assert_eq!((seen.name.as_str(), seen.parent), ("default/2/c1", None));
    // A mask path for a label the info lacks deletes it.
    let after = c
        .update(update(request.clone(), &["labels.x"]))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(after.labels, labels(&[("y", "2")]));
    // No mask: all mutable fields, i.e. the labels replaced.
    let after = c
        .update(UpdateSnapshotRequest {
            snapshotter: "hpmapper".into(),
            info: Some(request.clone()),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(after.labels, request.labels);
    assert!(h
        .fake
        .last_update
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .1
        .is_empty());

    // List, whole and filtered.
    assert_eq!(
        list(c, &[]).await.unwrap(),
        [["default/2/c1", "default/3/v", "sha256:base"]]
    );
    assert_eq!(
        list(c, &["kind==view", "kind==committed"]).await.unwrap(),
        [["default/3/v", "sha256:base"]]
    );
    assert_eq!(
        list(c, &[r#"parent==sha256:base,labels."y"==2"#])
            .await
            .unwrap(),
        [["default/2/c1"]]
    );
    assert!(
        list(c, &["name==nothing"]).await.unwrap().is_empty(),
        "no batch for nothing"
    );

    // Remove: a parent with children refuses, leaves go.
    let remove = |key: &str| RemoveSnapshotRequest {
        snapshotter: "hpmapper".into(),
        key: key.into(),
    };
    let err = c.remove(remove("sha256:base")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("has children"), "{}", err.message());
    c.remove(remove("default/2/c1")).await.unwrap();
    c.remove(remove("default/3/v")).await.unwrap();
    c.remove(remove("sha256:base")).await.unwrap();
    assert!(list(c, &[]).await.unwrap().is_empty());

    // Cleanup.
    c.cleanup(CleanupRequest {
        snapshotter: "hpmapper".into(),
    })
    .await
    .unwrap();
    assert_eq!(h.fake.cleanups.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshotter_errors_keep_their_code_and_message() {
    let mut h = start().await;
    let c = &mut h.client;

    let err = stat(c, "missing").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "snapshot \"missing\" not found");

    prepare(c, "k", "").await.unwrap();
    let err = prepare(c, "k", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        prepare(c, "k2", "missing").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        prepare(c, "k2", "k").await.unwrap_err().code(),
        tonic::Code::FailedPrecondition,
        "parent not committed"
    );
    commit(c, "c", "k").await.unwrap();
    prepare(c, "k3", "").await.unwrap();
    assert_eq!(
        commit(c, "c", "k3").await.unwrap_err().code(),
        tonic::Code::AlreadyExists
    );

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
        *h.fake.fail.lock().unwrap() = Some(Error::new(code, format!("injected {code:?}")));
        let err = c
            .usage(UsageRequest {
                snapshotter: "hpmapper".into(),
                key: "c".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), grpc);
        assert_eq!(err.message(), format!("injected {code:?}"));
        let err = list(c, &[]).await.unwrap_err();
        assert_eq!(err.code(), grpc, "List fails before its stream");
    }
    *h.fake.fail.lock().unwrap() = None;

    // A snapshotter that panics is an internal error, and the server goes on.
    h.fake.panic.store(true, Ordering::SeqCst);
    let err = stat(c, "c").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    h.fake.panic.store(false, Ordering::SeqCst);
    assert_eq!(stat(c, "c").await.unwrap().kind, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_the_snapshotter() {
    let mut h = start().await;
    let c = &mut h.client;
    let invalid = |r: Result<(), tonic::Status>| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        err.message().to_owned()
    };

    // Empty keys and names.
    let msg = invalid(prepare(c, "", "").await);
    assert!(msg.contains("key is empty"), "{msg}");
    invalid(c.view(ViewSnapshotRequest::default()).await.map(drop));
    invalid(c.mounts(MountsRequest::default()).await.map(drop));
    invalid(stat(c, "").await.map(drop));
    invalid(c.usage(UsageRequest::default()).await.map(drop));
    invalid(c.remove(RemoveSnapshotRequest::default()).await.map(drop));
    invalid(commit(c, "", "k").await);
    invalid(commit(c, "n", "").await);
    invalid(c.update(UpdateSnapshotRequest::default()).await.map(drop));
    invalid(
        c.update(UpdateSnapshotRequest {
            info: Some(PbInfo::default()),
            ..Default::default()
        })
        .await
        .map(drop),
    );

    // Labels: key and value up to 4096 bytes together.
    let long = "v".repeat(4096);
    let msg = invalid(
        c.prepare(prepare_req("k", "", &[("key", &long)]))
            .await
            .map(drop),
    );
    assert!(msg.contains("4099 bytes"), "{msg}");
    invalid(
        c.view(ViewSnapshotRequest {
            key: "k".into(),
            labels: labels(&[("k", &long)]),
            ..Default::default()
        })
        .await
        .map(drop),
    );
    invalid(
        c.commit(CommitSnapshotRequest {
            name: "n".into(),
            key: "k".into(),
            labels: labels(&[("k", &long)]),
            ..Default::default()
        })
        .await
        .map(drop),
    );
    invalid(
        c.update(UpdateSnapshotRequest {
            info: Some(PbInfo {
                name: "n".into(),
                labels: labels(&[("k", &long)]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(drop),
    );

    // Filters that do not parse.
    let err = list(c, &["kind==view", "kind=view"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"kind=view\""), "{}", err.message());

    assert_eq!(
        h.fake.calls.load(Ordering::SeqCst),
        0,
        "nothing reached the snapshotter"
    );

    // At the limit is fine.
    let at_limit = "v".repeat(4093);
    c.prepare(prepare_req("k", "", &[("key", &at_limit)]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_batches_of_at_most_100() {
    let mut h = start().await;
    prepare(&mut h.client, "base", "").await.unwrap();
    commit(&mut h.client, "committed", "base").await.unwrap();
    for i in 0..250 {
        let key = format!("default/{i:03}/extract");
        h.client
            .prepare(prepare_req(
                &key,
                "committed",
                &[("n", &(i % 2).to_string())],
            ))
            .await
            .unwrap();
    }
    let sizes = |batches: Vec<Vec<String>>| batches.iter().map(Vec::len).collect::<Vec<_>>();
    let all = list(&mut h.client, &[]).await.unwrap();
    assert_eq!(sizes(all.clone()), [100, 100, 51]);
    let names: Vec<String> = all.into_iter().flatten().collect();
    assert_eq!(names.len(), 251);
    assert_eq!(
        names
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        251
    );
    assert_eq!(
        sizes(list(&mut h.client, &["labels.n==1"]).await.unwrap()),
        [100, 25]
    );
    assert_eq!(
        sizes(
            list(&mut h.client, &["kind==active,name~=^default/1"])
                .await
                .unwrap()
        ),
        [100]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_root_only_and_shutdown_ends_serve() {
    let mut h = start().await;
    let meta = std::fs::symlink_metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A second server on the same live socket is refused.
    assert_eq!(
        hpm_containerd::bind(&h.socket).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse
    );

    // A connected client (containerd keeps its connection) does not hold shutdown up.
    prepare(&mut h.client, "k", "").await.unwrap();
    h.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), h.serving)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(
        h.socket.exists(),
        "the socket file is the caller's to remove"
    );
    // Nobody answers any more: a new connection is refused, and the old one is gone (the
    // client may still send on it before it sees the GOAWAY: then the call is cancelled).
    let endpoint = Endpoint::from_shared(format!("unix://{}", h.socket.display())).unwrap();
    assert!(endpoint.connect().await.is_err());
    let err = prepare(&mut h.client, "k2", "").await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled
        ),
        "{err:?}"
    );

    // Dropping the sender stops it too.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let listener = hpm_containerd::bind(&socket).unwrap();
    let (stop, stopped) = watch::channel(false);
    let serving = tokio::spawn(hpm_containerd::serve(
        listener,
        Arc::new(Fake::default()),
        stopped,
    ));
    let mut client = SnapshotsClient::new(connect(&socket).await);
    assert!(list(&mut client, &[]).await.unwrap().is_empty());
    drop(stop);
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve returns once the sender is gone")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_call_in_flight_finish() {
    let h = start().await;
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *h.fake.hold.lock().unwrap() = Some((entered_tx, release_rx));
    let mut client = h.client.clone();
    let call = tokio::spawn(async move { prepare(&mut client, "slow", "").await });
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();

    h.stop.send(true).unwrap();
    tokio::task::yield_now().await;
    assert!(!h.serving.is_finished(), "a call is in flight");
    release.send(()).unwrap();
    call.await.unwrap().expect("the call in flight completes");
    tokio::time::timeout(Duration::from_secs(30), h.serving)
        .await
        .expect("serve returns once the call is done")
        .unwrap()
        .unwrap();
    assert!(h.fake.snapshots.lock().unwrap().contains_key("slow"));
}
