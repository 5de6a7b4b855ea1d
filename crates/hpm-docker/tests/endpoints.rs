//! Every JSON endpoint, with the exact bodies dockerd 20.10 sends (moby
//! `daemon/graphdriver/proxy.go`: omitempty fields dropped, `{}` for calls without
//! arguments, nothing for Plugin.Activate, null id maps), and the error replies.

mod common;

use common::{within, Plugin};
use hpm_docker::{DriverError, DriverErrorKind};
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "current_thread")]
async fn activate_answers_graphdriver_for_an_empty_or_null_body() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        for body in ["", "null\n"] {
            let v = c.post("/Plugin.Activate", body).await.ok_json();
            assert_eq!(v, json!({"Implements": ["GraphDriver"]}));
        }
        assert!(plugin.driver.take_calls().is_empty());
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn init_passes_home_and_options_and_refuses_user_namespaces() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        // Without --userns-remap and without --storage-opt: Go's nil slices are null.
        let v = c
            .call(
                "GraphDriver.Init",
                r#"{"Home":"/var/lib/docker/hpmapper","Opts":null,"UIDMaps":null,"GIDMaps":null}"#,
            )
            .await
            .ok_json();
        assert_eq!(v, json!({}));
        // With options, and empty (not null) maps.
        c.call(
            "GraphDriver.Init",
            r#"{"Home":"/var/lib/docker/hpmapper","Opts":["hpmapper.basesize=10G"],"UIDMaps":[],"GIDMaps":[]}"#,
        )
        .await
        .ok_json();
        assert_eq!(
            plugin.driver.take_calls(),
            [
                "init /var/lib/docker/hpmapper []",
                "init /var/lib/docker/hpmapper [\"hpmapper.basesize=10G\"]",
            ]
        );
        // An unknown hpmapper.* option: the driver's message, verbatim.
        let err = c
            .call(
                "GraphDriver.Init",
                r#"{"Home":"/var/lib/docker/hpmapper","Opts":["hpmapper.nope=1"],"UIDMaps":null,"GIDMaps":null}"#,
            )
            .await
            .err(StatusCode::OK);
        assert_eq!(
            err,
            "unknown storage option hpmapper.nope; hpmapper knows hpmapper.basesize"
        );
        plugin.driver.take_calls();
        // --userns-remap: idtools.IDMap's snake_case keys; refused before the driver.
        let err = c
            .call(
                "GraphDriver.Init",
                r#"{"Home":"/var/lib/docker/100000.100000/hpmapper","Opts":null,"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":[{"container_id":0,"host_id":100000,"size":65536}]}"#,
            )
            .await
            .err(StatusCode::OK);
        assert!(
            err.contains("user namespace remapping is not supported"),
            "{err}"
        );
        let err = c
            .call(
                "GraphDriver.Init",
                r#"{"Home":"relative","Opts":null,"UIDMaps":null,"GIDMaps":null}"#,
            )
            .await
            .err(StatusCode::OK);
        assert!(err.contains("absolute"), "{err}");
        assert!(plugin.driver.take_calls().is_empty());
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn capabilities_are_nested_and_do_not_reproduce_exact_diffs() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let v = c.call("GraphDriver.Capabilities", "{}").await.ok_json();
        assert_eq!(v, json!({"Capabilities": {"ReproducesExactDiffs": false}}));
        plugin.stop().await;
    })
    .await;
}

/// A Get whose path dockerd cannot use fails, and its mount is taken back: dockerd sends no
/// Put after a failed Get.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_get_reply_puts_the_layer_back() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = &plugin.driver;
        let mut c = plugin.client().await;
        c.call("GraphDriver.CreateReadWrite", r#"{"ID":"c1"}"#)
            .await
            .ok_json();
        driver.next_get_relative();
        let e = c
            .call("GraphDriver.Get", r#"{"ID":"c1"}"#)
            .await
            .err(StatusCode::OK);
        assert!(e.contains("absolute UTF-8 path"), "{e}");
        assert_eq!(driver.mounts_of("c1"), 0);
        assert_eq!(
            driver.take_calls(),
            [
                "create c1 parent=None rw=true opt={}",
                "get c1 label=\"\"",
                "put c1"
            ]
        );
        plugin.stop().await;
    })
    .await;
}

/// A pull, a container's life and its removal, call by call as dockerd makes them, all on
/// one keep-alive connection.
#[tokio::test(flavor = "current_thread")]
async fn layer_lifecycle_as_dockerd_drives_it() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = &plugin.driver;
        let mut c = plugin.client().await;
        let l1 = "1a2b".repeat(16);
        let l2 = "3c4d".repeat(16);
        // Pull: image layers.
        assert_eq!(
            c.call("GraphDriver.Create", &format!(r#"{{"ID":"{l1}"}}"#))
                .await
                .ok_json(),
            json!({})
        );
        c.call(
            "GraphDriver.Create",
            &format!(r#"{{"ID":"{l2}","Parent":"{l1}"}}"#),
        )
        .await
        .ok_json();
        // Container: the -init layer, its files written through Get/Put, then the RW layer.
        c.call(
            "GraphDriver.CreateReadWrite",
            &format!(r#"{{"ID":"c1-init","Parent":"{l2}"}}"#),
        )
        .await
        .ok_json();
        let v = c
            .call("GraphDriver.Get", r#"{"ID":"c1-init"}"#)
            .await
            .ok_json();
        let dir = v["Dir"].as_str().unwrap();
        assert!(
            dir.starts_with('/') && std::path::Path::new(dir).is_dir(),
            "{v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        c.call("GraphDriver.Put", r#"{"ID":"c1-init"}"#)
            .await
            .ok_json();
        c.call(
            "GraphDriver.CreateReadWrite",
            r#"{"ID":"c1","Parent":"c1-init","StorageOpt":{"size":"20G"}}"#,
        )
        .await
        .ok_json();
        // Start, with an SELinux label; a second Get (docker cp) and its Put.
        let label = "system_u:object_r:container_file_t:s0:c1,c2";
        let v = c
            .call(
                "GraphDriver.Get",
                &format!(r#"{{"ID":"c1","MountLabel":"{label}"}}"#),
            )
            .await
            .ok_json();
        assert!(v["Dir"].as_str().unwrap().ends_with("c1/rootfs"), "{v}");
        c.call("GraphDriver.Get", r#"{"ID":"c1"}"#).await.ok_json();
        assert_eq!(driver.mounts_of("c1"), 2);
        c.call("GraphDriver.Put", r#"{"ID":"c1"}"#).await.ok_json();
        // Queries.
        for (id, want) in [("c1", true), ("nope", false)] {
            let v = c
                .call("GraphDriver.Exists", &format!(r#"{{"ID":"{id}"}}"#))
                .await
                .ok_json();
            assert_eq!(v, json!({ "Exists": want }));
        }
        let v = c.call("GraphDriver.Status", "{}").await.ok_json();
        assert_eq!(
            v,
            json!({"Status": [["Backing", "memory"], ["Layers", "4"]]})
        );
        let v = c
            .call("GraphDriver.GetMetadata", r#"{"ID":"c1"}"#)
            .await
            .ok_json();
        assert_eq!(
            v,
            json!({"Metadata": {"Parent": "c1-init", "ReadWrite": "true"}})
        );
        driver.set_changes(vec![
            ("/etc".into(), hpm_docker::CHANGE_MODIFY),
            ("/etc/new".into(), hpm_docker::CHANGE_ADD),
            ("/etc/motd".into(), hpm_docker::CHANGE_DELETE),
        ]);
        let v = c
            .call("GraphDriver.Changes", r#"{"ID":"c1","Parent":"c1-init"}"#)
            .await
            .ok_json();
        assert_eq!(
            v,
            json!({"Changes": [
                {"Path": "/etc", "Kind": 0},
                {"Path": "/etc/new", "Kind": 1},
                {"Path": "/etc/motd", "Kind": 2},
            ]})
        );
        let v = c
            .call("GraphDriver.DiffSize", r#"{"ID":"c1","Parent":"c1-init"}"#)
            .await
            .ok_json();
        assert_eq!(v, json!({"Size": 0}));
        // Stop and remove; removing twice is fine; daemon shutdown.
        c.call("GraphDriver.Put", r#"{"ID":"c1"}"#).await.ok_json();
        for id in ["c1", "c1-init", "c1"] {
            c.call("GraphDriver.Remove", &format!(r#"{{"ID":"{id}"}}"#))
                .await
                .ok_json();
        }
        c.call("GraphDriver.Cleanup", "{}").await.ok_json();
        assert_eq!(
            driver.take_calls(),
            [
                format!("create {l1} parent=None rw=false opt={{}}"),
                format!("create {l2} parent=Some(\"{l1}\") rw=false opt={{}}"),
                format!("create c1-init parent=Some(\"{l2}\") rw=true opt={{}}"),
                "get c1-init label=\"\"".to_owned(),
                "put c1-init".to_owned(),
                "create c1 parent=Some(\"c1-init\") rw=true opt={\"size\": \"20G\"}".to_owned(),
                format!("get c1 label=\"{label}\""),
                "get c1 label=\"\"".to_owned(),
                "put c1".to_owned(),
                "exists c1".to_owned(),
                "exists nope".to_owned(),
                "status".to_owned(),
                "metadata c1".to_owned(),
                "changes c1 parent=Some(\"c1-init\")".to_owned(),
                "diff_size c1 parent=Some(\"c1-init\")".to_owned(),
                "put c1".to_owned(),
                "remove c1".to_owned(),
                "remove c1-init".to_owned(),
                "remove c1".to_owned(),
                "cleanup".to_owned(),
            ]
        );
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn driver_errors_come_back_as_err_with_the_drivers_message() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = &plugin.driver;
        let mut c = plugin.client().await;
        // Errors the fake produces itself.
        c.call("GraphDriver.Create", r#"{"ID":"a"}"#)
            .await
            .ok_json();
        let cases = [
            (
                "GraphDriver.Create",
                r#"{"ID":"a"}"#,
                "layer a already exists",
            ),
            (
                "GraphDriver.Create",
                r#"{"ID":"b","Parent":"zz"}"#,
                "layer zz does not exist",
            ),
            (
                "GraphDriver.Get",
                r#"{"ID":"zz"}"#,
                "layer zz does not exist",
            ),
            ("GraphDriver.Put", r#"{"ID":"a"}"#, "layer a is not mounted"),
            (
                "GraphDriver.GetMetadata",
                r#"{"ID":"zz"}"#,
                "layer zz does not exist",
            ),
            (
                "GraphDriver.Changes",
                r#"{"ID":"zz","Parent":"a"}"#,
                "layer zz does not exist",
            ),
            (
                "GraphDriver.DiffSize",
                r#"{"ID":"zz"}"#,
                "layer zz does not exist",
            ),
        ];
        for (method, body, want) in cases {
            let err = c.call(method, body).await.err(StatusCode::OK);
            assert_eq!(err, want, "{method}");
        }
        // Injected ones, for the endpoints without natural failures.
        let injected = [
            ("remove", "GraphDriver.Remove", r#"{"ID":"a"}"#),
            ("cleanup", "GraphDriver.Cleanup", "{}"),
            ("init", "GraphDriver.Init", r#"{"Home":"/h"}"#),
        ];
        for (method, endpoint, body) in injected {
            driver.fail_next(
                method,
                DriverError::new(
                    DriverErrorKind::Busy,
                    format!("{method}: layer a is in use"),
                ),
            );
            let err = c.call(endpoint, body).await.err(StatusCode::OK);
            assert_eq!(err, format!("{method}: layer a is in use"));
        }
        // An error without a message still reads as an error.
        driver.fail_next("remove", DriverError::new(DriverErrorKind::Busy, ""));
        let err = c
            .call("GraphDriver.Remove", r#"{"ID":"a"}"#)
            .await
            .err(StatusCode::OK);
        assert!(
            err.contains("GraphDriver.Remove") && err.contains("in use"),
            "{err}"
        );
        // A change kind that does not exist is caught.
        driver.set_changes(vec![("/x".into(), 7)]);
        let err = c
            .call("GraphDriver.Changes", r#"{"ID":"a"}"#)
            .await
            .err(StatusCode::OK);
        assert!(err.contains("change kind 7"), "{err}");
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_driver_call_is_an_err_reply_and_the_server_goes_on() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        plugin.driver.panic_next("create");
        let err = c
            .call("GraphDriver.Create", r#"{"ID":"a"}"#)
            .await
            .err(StatusCode::OK);
        assert!(err.contains("GraphDriver.Create"), "{err}");
        c.call("GraphDriver.Create", r#"{"ID":"a"}"#)
            .await
            .ok_json();
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_requests_are_err_replies_and_never_reach_the_driver() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let cases = [
            ("GraphDriver.Create", "{\"ID\":", "malformed JSON"),
            ("GraphDriver.Create", "[\"a\"]", "malformed JSON"),
            ("GraphDriver.Get", "{\"ID\": 12}", "malformed JSON"),
            (
                "GraphDriver.CreateReadWrite",
                "{\"ID\":\"c\",\"StorageOpt\":{\"size\":20}}",
                "malformed JSON",
            ),
            (
                "GraphDriver.Init",
                "{\"Home\":\"/h\",\"UIDMaps\":[{\"ContainerID\":0}]}",
                "malformed JSON",
            ),
            ("GraphDriver.Status", "not json", "malformed JSON"),
            ("GraphDriver.Create", "{}", "needs a layer id"),
            ("GraphDriver.Remove", "", "needs a layer id"),
            (
                "GraphDriver.Get",
                "{\"MountLabel\":\"x\"}",
                "needs a layer id",
            ),
        ];
        for (method, body, want) in cases {
            let reply = c.call(method, body).await;
            assert!(
                reply.json().get("Err").is_some(),
                "{method} {body}: {reply:?}"
            );
            let err = reply.err(StatusCode::OK);
            assert!(err.contains(want), "{method} {body}: {err}");
            if want == "malformed JSON" {
                assert!(err.contains(method), "{err}");
            }
        }
        // Exists without an id is simply false.
        let v = c.call("GraphDriver.Exists", "{}").await.ok_json();
        assert_eq!(v, json!({"Exists": false}));
        // A JSON body over the limit.
        let huge = format!("{{\"ID\":\"{}\"}}", "a".repeat(2 << 20));
        let err = c
            .call("GraphDriver.Create", &huge)
            .await
            .err(StatusCode::OK);
        assert!(err.contains("larger than"), "{err}");
        assert!(plugin.driver.take_calls().is_empty());
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_endpoints_are_404_with_err() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        for path in [
            "/GraphDriver.Frobnicate",
            "/graphdriver.create",
            "/VolumeDriver.Create",
            "/",
            "/GraphDriver.Create/extra",
        ] {
            let err = c.post(path, "{}\n").await.err(StatusCode::NOT_FOUND);
            assert!(err.contains("no endpoint"), "{path}: {err}");
        }
        // The connection stays in step.
        c.call("GraphDriver.Status", "{}").await.ok_json();
        assert_eq!(plugin.driver.take_calls(), ["status"]);
        // Only POST.
        let mut raw = tokio::net::UnixStream::connect(&plugin.socket)
            .await
            .unwrap();
        raw.write_all(
            b"GET /GraphDriver.Status HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut reply = String::new();
        raw.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        assert!(
            reply.contains("{\"Err\":\"") && reply.contains("GET"),
            "{reply}"
        );
        assert!(plugin.driver.take_calls().is_empty());
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn stop_returns_with_idle_connections_open_and_a_dropped_sender_stops_too() {
    within(async {
        let plugin = Plugin::start().await;
        let mut idle = plugin.client().await;
        idle.call("GraphDriver.Status", "{}").await.ok_json();
        plugin.stop().await;
        drop(idle);

        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        c.call("GraphDriver.Status", "{}").await.ok_json();
        let (serving, stop, _dir) = plugin.into_serving();
        drop(stop);
        serving.await.unwrap().unwrap();
    })
    .await;
}
