//! The plugin against the real dockerd 20.10 (Debian's docker.io), with the fake driver
//! behind it: daemon start (Activate, Init, Capabilities), `docker info` (Status),
//! `docker load` (Create + a chunked ApplyDiff from Go's HTTP client), `docker create`
//! (the -init layer, Get/Put, CreateReadWrite), `docker diff` (Changes), `docker commit`
//! (Diff streamed to dockerd and applied back as a new layer, byte for byte),
//! `docker inspect` (GetMetadata), `docker rm`/`rmi` (Remove) and daemon shutdown (Cleanup).
//!
//! Needs root and dockerd (scripts/test installs docker.io), and places a socket with a
//! unique name in /run/docker/plugins (removed at the end). It runs no container, so it
//! needs no cgroups or networking.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{layer_tar, Plugin};
use tokio::process::Command;

struct Dockerd {
    child: tokio::process::Child,
    host: String,
    log: PathBuf,
}

impl Dockerd {
    async fn start(dir: &Path, driver_name: &str) -> Dockerd {
        let log = dir.join("dockerd.log");
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let child = Command::new("dockerd")
            .args(["--experimental", "--storage-driver", driver_name])
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--host", &host])
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("dockerd.err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("dockerd runs (Debian's docker.io)");
        let d = Dockerd { child, host, log };
        for _ in 0..120 {
            if d.docker(&["version"]).await.is_ok() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("dockerd did not come up:\n{}", d.logs(dir));
    }

    fn logs(&self, dir: &Path) -> String {
        let err = std::fs::read_to_string(dir.join("dockerd.err")).unwrap_or_default();
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail = |s: &str| {
            s.lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!("{}\n{}", tail(&out), tail(&err))
    }

    async fn docker(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .args(["--host", &self.host])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "docker {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await;
        assert!(killed.unwrap().success());
        self.child.wait().await.unwrap();
    }
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// A `docker save` archive of a one-layer image tagged `tag`.
fn image_archive(dir: &Path, layer: &[u8], tag: &str) -> PathBuf {
    let layer_path = dir.join("layer.tar");
    std::fs::write(&layer_path, layer).unwrap();
    let diff_id = sha256(&layer_path);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/true"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}},"history":[{{"created":"2026-01-01T00:00:00Z","created_by":"hpm-docker test"}}]}}"#
    );
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, &config).unwrap();
    let config_name = format!("{}.json", sha256(&config_path));
    let manifest = format!(
        r#"[{{"Config":"{config_name}","RepoTags":["{tag}"],"Layers":["{diff_id}/layer.tar"]}}]"#
    );
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        archive.append_data(&mut h, name, data).unwrap();
    };
    add("manifest.json", manifest.as_bytes());
    add(&config_name, config.as_bytes());
    add(&format!("{diff_id}/layer.tar"), layer);
    let path = dir.join("image.tar");
    std::fs::write(&path, archive.into_inner().unwrap()).unwrap();
    path
}

/// The id of the layer `create` made with `pattern` in its recorded call.
fn created(calls: &[String], pattern: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.starts_with("create ") && c.contains(pattern))
        .map(|c| c.split(' ').nth(1).unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dockerd_drives_the_plugin() {
    let dir = tempfile::Builder::new()
        .prefix("hpmd")
        .tempdir_in("/tmp")
        .unwrap();
    let name = format!("hpmtest{}", std::process::id());
    let socket = PathBuf::from(format!("/run/docker/plugins/{name}.sock"));
    let work = dir.path().to_path_buf();
    let plugin = Plugin::start_at(socket.clone(), dir).await;
    let driver = plugin.driver.clone();
    let dockerd = Dockerd::start(&work, &name).await;
    let result = async {
        let calls = driver.calls();
        let home = work.join("root").join(&name);
        assert!(
            calls.contains(&format!("init {} []", home.display())),
            "{calls:?}"
        );
        // docker info: the driver's name and its Status.
        let info = dockerd
            .docker(&["info", "--format", "{{.Driver}} {{json .DriverStatus}}"])
            .await?;
        assert!(info.starts_with(&name), "{info}");
        assert!(info.contains(r#"["Backing","memory"]"#), "{info}");

        // docker load: Create + ApplyDiff, the layer arriving byte for byte.
        let (layer, _) = layer_tar(6, 300_000, 42);
        let image = image_archive(&work, &layer, "hpmtest:base");
        dockerd
            .docker(&["load", "-i", image.to_str().unwrap()])
            .await?;
        let calls = driver.calls();
        let base = created(&calls, "parent=None rw=false");
        assert_eq!(base.len(), 1, "{calls:?}");
        assert!(calls.contains(&format!("apply_diff {} parent=None", base[0])));
        assert!(driver.tar_of(&base[0]) == layer, "the layer arrived intact");

        // docker create: the -init layer (Get, files, Put) and the container layer.
        let cid = dockerd
            .docker(&["create", "--name", "c1", "hpmtest:base", "/bin/true"])
            .await?;
        let calls = driver.calls();
        let init = created(&calls, &format!("parent=Some(\"{}\") rw=true", base[0]));
        assert_eq!(init.len(), 1, "{calls:?}");
        assert!(init[0].ends_with("-init"));
        let rw = created(&calls, &format!("parent=Some(\"{}\") rw=true", init[0]));
        assert_eq!(rw.len(), 1, "{calls:?}");
        assert!(
            calls.contains(&format!("get {} label=\"\"", init[0])),
            "{calls:?}"
        );
        assert!(calls.contains(&format!("put {}", init[0])), "{calls:?}");

        // docker diff: Changes.
        driver.set_changes(vec![
            ("/etc".into(), hpm_docker::CHANGE_MODIFY),
            ("/etc/new".into(), hpm_docker::CHANGE_ADD),
            ("/etc/motd".into(), hpm_docker::CHANGE_DELETE),
        ]);
        let diff = dockerd.docker(&["diff", &cid]).await?;
        assert_eq!(diff, "C /etc\nA /etc/new\nD /etc/motd");

        // docker commit: Diff streamed to dockerd, applied back as a new image layer.
        let (changes, _) = layer_tar(4, 250_000, 43);
        driver.set_tar(&rw[0], changes.clone());
        dockerd
            .docker(&["commit", "c1", "hpmtest:committed"])
            .await?;
        let calls = driver.calls();
        assert!(
            calls.contains(&format!("diff {} parent=Some(\"{}\")", rw[0], init[0])),
            "{calls:?}"
        );
        let committed = created(&calls, &format!("parent=Some(\"{}\") rw=false", base[0]));
        assert_eq!(committed.len(), 1, "{calls:?}");
        assert!(
            driver.tar_of(&committed[0]) == changes,
            "the committed layer made the round trip intact"
        );

        // docker inspect: GetMetadata shows up as GraphDriver.Data.
        let data = dockerd
            .docker(&["inspect", "--format", "{{json .GraphDriver}}", "c1"])
            .await?;
        assert!(
            data.contains(&name) && data.contains(r#""ReadWrite":"true""#),
            "{data}"
        );

        // Removal.
        dockerd.docker(&["rm", "c1"]).await?;
        dockerd
            .docker(&["rmi", "hpmtest:committed", "hpmtest:base"])
            .await?;
        let calls = driver.calls();
        for id in [&rw[0], &init[0], &committed[0], &base[0]] {
            assert!(calls.contains(&format!("remove {id}")), "{id}: {calls:?}");
        }
        Ok::<(), String>(())
    }
    .await;
    let logs = dockerd.logs(&work);
    dockerd.stop().await;
    let _ = std::fs::remove_file(&socket);
    if let Err(e) = result {
        panic!("{e}\n--- dockerd ---\n{logs}");
    }
    assert!(
        driver.calls().contains(&"cleanup".to_owned()),
        "dockerd's shutdown calls Cleanup"
    );
    plugin.stop().await;
}
