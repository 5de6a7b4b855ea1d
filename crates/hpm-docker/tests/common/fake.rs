//! An in-memory layer store: layers are records with their applied tar kept as bytes; Get
//! hands out a directory under a temporary root. Every call is recorded, failures can be
//! injected per method, and ApplyDiff/Diff outcomes are reported as events.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use hpm_docker::{DriverError, DriverErrorKind, GraphDriver};
use tokio::sync::mpsc;

/// What the streaming calls did, for tests to wait on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// apply_diff started reading for this id.
    ApplyStarted(String),
    /// apply_diff ended: the size, or the error kind and message of the read that failed.
    Applied(String, Result<u64, (io::ErrorKind, String)>),
    /// diff ended: the bytes written, or the write error.
    Diffed(String, Result<usize, (io::ErrorKind, String)>),
}

#[derive(Debug, Default)]
struct Layer {
    parent: Option<String>,
    rw: bool,
    tar: Vec<u8>,
    mounts: u32,
}

/// The fake driver.
pub struct FakeDriver {
    calls: Mutex<Vec<String>>,
    layers: Mutex<BTreeMap<String, Layer>>,
    failures: Mutex<HashMap<&'static str, DriverError>>,
    panics: Mutex<Vec<&'static str>>,
    changes: Mutex<Vec<(String, u8)>>,
    diff_fail_after: Mutex<Option<usize>>,
    apply_reads_only: Mutex<Option<usize>>,
    apply_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    diff_written: AtomicUsize,
    relative_get: AtomicBool,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    mnt: tempfile::TempDir,
}

impl FakeDriver {
    pub fn new() -> FakeDriver {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        FakeDriver {
            calls: Mutex::default(),
            layers: Mutex::default(),
            failures: Mutex::default(),
            panics: Mutex::default(),
            changes: Mutex::default(),
            diff_fail_after: Mutex::default(),
            apply_reads_only: Mutex::default(),
            apply_gate: Mutex::default(),
            diff_written: AtomicUsize::new(0),
            relative_get: Default::default(),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            mnt: tempfile::tempdir().unwrap(),
        }
    }

    /// Every call so far, one line each, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// The next call of `method` fails with `err`.
    pub fn fail_next(&self, method: &'static str, err: DriverError) {
        self.failures.lock().unwrap().insert(method, err);
    }

    /// The next call of `method` panics.
    pub fn panic_next(&self, method: &'static str) {
        self.panics.lock().unwrap().push(method);
    }

    /// What `changes` reports.
    pub fn set_changes(&self, changes: Vec<(String, u8)>) {
        *self.changes.lock().unwrap() = changes;
    }

    /// `diff` fails after writing this many bytes (once).
    pub fn fail_diff_after(&self, bytes: usize) {
        *self.diff_fail_after.lock().unwrap() = Some(bytes);
    }

    /// `apply_diff` reads only this many bytes, then fails (once).
    pub fn apply_reads_only(&self, bytes: usize) {
        *self.apply_reads_only.lock().unwrap() = Some(bytes);
    }

    /// The next `apply_diff` waits, right after `ApplyStarted`, until the returned sender
    /// sends (or is dropped) before it reads anything.
    pub fn gate_apply(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.apply_gate.lock().unwrap() = Some(rx);
        tx
    }

    /// Bytes the running or last `diff` has written so far.
    pub fn diff_written(&self) -> usize {
        self.diff_written.load(Ordering::SeqCst)
    }

    /// The tar applied to `id`.
    pub fn tar_of(&self, id: &str) -> Vec<u8> {
        self.layers.lock().unwrap()[id].tar.clone()
    }

    /// Stores `tar` as the content of a new layer `id`, without the wire.
    pub fn insert_layer(&self, id: &str, tar: Vec<u8>) {
        self.layers.lock().unwrap().insert(
            id.to_owned(),
            Layer {
                tar,
                ..Layer::default()
            },
        );
    }

    /// Replaces the content of layer `id` (as if files had been written through Get).
    pub fn set_tar(&self, id: &str, tar: Vec<u8>) {
        self.layers.lock().unwrap().get_mut(id).unwrap().tar = tar;
    }

    /// Every call so far, without forgetting them.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// The mount count of `id`.
    /// The next Get mounts as usual but answers a relative path (no use to dockerd).
    pub fn next_get_relative(&self) {
        self.relative_get.store(true, Ordering::SeqCst);
    }

    pub fn mounts_of(&self, id: &str) -> u32 {
        self.layers.lock().unwrap()[id].mounts
    }

    /// The next event.
    pub async fn next_event(&self) -> Event {
        self.events_rx.lock().await.recv().await.unwrap()
    }

    fn enter(&self, method: &'static str, call: String) -> Result<(), DriverError> {
        self.calls.lock().unwrap().push(call);
        let panic = {
            let mut panics = self.panics.lock().unwrap();
            let at = panics.iter().position(|m| *m == method);
            at.map(|i| panics.remove(i)).is_some()
        };
        if panic {
            panic!("the fake driver panics in {method} as asked");
        }
        match self.failures.lock().unwrap().remove(method) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn known(&self, id: &str) -> Result<(), DriverError> {
        if self.layers.lock().unwrap().contains_key(id) {
            Ok(())
        } else {
            Err(DriverError::not_found(format!("layer {id} does not exist")))
        }
    }

    fn event(&self, event: Event) {
        let _ = self.events_tx.send(event);
    }
}

impl GraphDriver for FakeDriver {
    fn init(&self, home: &Path, opts: &[String]) -> Result<(), DriverError> {
        self.enter("init", format!("init {} {opts:?}", home.display()))?;
        for (key, _) in hpm_docker::parse_key_values(opts)? {
            if key.starts_with("hpmapper.") && key != "hpmapper.basesize" {
                return Err(DriverError::invalid(format!(
                    "unknown storage option {key}; hpmapper knows hpmapper.basesize"
                )));
            }
        }
        Ok(())
    }

    fn create(
        &self,
        id: &str,
        parent: Option<&str>,
        rw: bool,
        storage_opt: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        self.enter(
            "create",
            format!("create {id} parent={parent:?} rw={rw} opt={storage_opt:?}"),
        )?;
        if let Some(parent) = parent {
            self.known(parent)?;
        }
        let mut layers = self.layers.lock().unwrap();
        if layers.contains_key(id) {
            return Err(DriverError::new(
                DriverErrorKind::Exists,
                format!("layer {id} already exists"),
            ));
        }
        layers.insert(
            id.to_owned(),
            Layer {
                parent: parent.map(str::to_owned),
                rw,
                ..Layer::default()
            },
        );
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.enter("remove", format!("remove {id}"))?;
        self.layers.lock().unwrap().remove(id);
        Ok(())
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, DriverError> {
        self.enter("get", format!("get {id} label={mount_label:?}"))?;
        let mut layers = self.layers.lock().unwrap();
        let layer = layers
            .get_mut(id)
            .ok_or_else(|| DriverError::not_found(format!("layer {id} does not exist")))?;
        layer.mounts += 1;
        if self.relative_get.swap(false, Ordering::SeqCst) {
            return Ok(PathBuf::from(id).join("rootfs"));
        }
        let dir = self.mnt.path().join(id).join("rootfs");
        std::fs::create_dir_all(&dir).map_err(|e| DriverError::io("mounting", &e))?;
        Ok(dir)
    }

    fn put(&self, id: &str) -> Result<(), DriverError> {
        self.enter("put", format!("put {id}"))?;
        let mut layers = self.layers.lock().unwrap();
        let layer = layers
            .get_mut(id)
            .ok_or_else(|| DriverError::not_found(format!("layer {id} does not exist")))?;
        layer.mounts = layer
            .mounts
            .checked_sub(1)
            .ok_or_else(|| DriverError::invalid(format!("layer {id} is not mounted")))?;
        Ok(())
    }

    fn exists(&self, id: &str) -> bool {
        let _ = self.enter("exists", format!("exists {id}"));
        self.layers.lock().unwrap().contains_key(id)
    }

    fn status(&self) -> Vec<(String, String)> {
        let _ = self.enter("status", "status".to_owned());
        vec![
            ("Backing".to_owned(), "memory".to_owned()),
            (
                "Layers".to_owned(),
                self.layers.lock().unwrap().len().to_string(),
            ),
        ]
    }

    fn metadata(&self, id: &str) -> Result<BTreeMap<String, String>, DriverError> {
        self.enter("metadata", format!("metadata {id}"))?;
        let layers = self.layers.lock().unwrap();
        let layer = layers
            .get(id)
            .ok_or_else(|| DriverError::not_found(format!("layer {id} does not exist")))?;
        Ok(BTreeMap::from([
            (
                "Parent".to_owned(),
                layer.parent.clone().unwrap_or_default(),
            ),
            ("ReadWrite".to_owned(), layer.rw.to_string()),
        ]))
    }

    fn cleanup(&self) -> Result<(), DriverError> {
        self.enter("cleanup", "cleanup".to_owned())
    }

    fn diff(&self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<(), DriverError> {
        self.enter("diff", format!("diff {id} parent={parent:?}"))?;
        self.known(id)?;
        let tar = self.tar_of(id);
        let fail_after = self.diff_fail_after.lock().unwrap().take();
        let mut written = 0;
        self.diff_written.store(0, Ordering::SeqCst);
        // Small writes, as a tar writer makes them.
        for piece in tar.chunks(8 * 1024) {
            if fail_after.is_some_and(|n| written >= n) {
                self.event(Event::Diffed(id.to_owned(), Ok(written)));
                return Err(DriverError::new(
                    DriverErrorKind::Io,
                    format!("reading layer {id} failed halfway"),
                ));
            }
            if let Err(e) = out.write_all(piece) {
                self.event(Event::Diffed(id.to_owned(), Err((e.kind(), e.to_string()))));
                return Err(DriverError::io(format!("sending the diff of {id}"), &e));
            }
            written += piece.len();
            self.diff_written.store(written, Ordering::SeqCst);
        }
        self.event(Event::Diffed(id.to_owned(), Ok(written)));
        Ok(())
    }

    fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, u8)>, DriverError> {
        self.enter("changes", format!("changes {id} parent={parent:?}"))?;
        self.known(id)?;
        Ok(self.changes.lock().unwrap().clone())
    }

    fn apply_diff(
        &self,
        id: &str,
        parent: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<u64, DriverError> {
        self.enter("apply_diff", format!("apply_diff {id} parent={parent:?}"))?;
        self.known(id)?;
        self.event(Event::ApplyStarted(id.to_owned()));
        let gate = self.apply_gate.lock().unwrap().take();
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
        if let Some(limit) = self.apply_reads_only.lock().unwrap().take() {
            let mut head = vec![0; limit];
            let result = tar
                .read_exact(&mut head)
                .map_err(|e| DriverError::io("reading the layer", &e))
                .and(Err(DriverError::new(
                    DriverErrorKind::Corrupt,
                    format!("layer {id}: the tar is broken after {limit} bytes"),
                )));
            if let Err(e) = &result {
                self.event(Event::Applied(
                    id.to_owned(),
                    Err((io::ErrorKind::InvalidData, e.message.clone())),
                ));
            }
            return result;
        }
        // A streaming consumer, as the real applier is: tar entries straight off the reader,
        // keeping a copy of every byte to compare.
        let mut tee = Tee {
            inner: tar,
            copy: Vec::new(),
        };
        let result: io::Result<u64> = (|| {
            let mut sum = 0;
            for entry in tar::Archive::new(&mut tee).entries()? {
                let mut entry = entry?;
                sum += entry.header().size()?;
                io::copy(&mut entry, &mut io::sink())?;
            }
            // Whatever follows the archive's end (padding) is read too.
            io::copy(&mut tee, &mut io::sink())?;
            Ok(sum)
        })();
        match result {
            Ok(sum) => {
                let copy = std::mem::take(&mut tee.copy);
                self.layers.lock().unwrap().get_mut(id).unwrap().tar = copy;
                self.event(Event::Applied(id.to_owned(), Ok(sum)));
                Ok(sum)
            }
            Err(e) => {
                self.event(Event::Applied(
                    id.to_owned(),
                    Err((e.kind(), e.to_string())),
                ));
                Err(DriverError::io(format!("applying layer {id}"), &e))
            }
        }
    }

    fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, DriverError> {
        self.enter("diff_size", format!("diff_size {id} parent={parent:?}"))?;
        self.known(id)?;
        Ok(self.tar_of(id).len() as u64)
    }
}

struct Tee<'a> {
    inner: &'a mut dyn Read,
    copy: Vec<u8>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}
