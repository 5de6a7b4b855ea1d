//! The streamed endpoints: ApplyDiff's chunked tar request body and Diff's tar reply body,
//! multi-MiB, intact, with errors on either side and clients that go away halfway.
//!
//! Every test runs the server and the client on one current-thread runtime: if the server
//! ever blocked an async thread on a driver call, the test would stop making progress.

mod common;

use bytes::Bytes;
use common::client::{read_all, SendBody};
use common::{layer_tar, within, Event, Plugin};
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Go's io.Copy buffer: dockerd's chunk size.
const GO_CHUNK: usize = 32 * 1024;

#[tokio::test(flavor = "current_thread")]
async fn apply_diff_streams_a_multi_mib_chunked_tar_intact() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let (tar, sum) = layer_tar(24, 256 * 1024 + 3, 1);
        assert!(tar.len() > 6 << 20);
        c.call("GraphDriver.Create", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        let v = c
            .apply_diff("id=l1&parent=", &tar, GO_CHUNK)
            .await
            .ok_json();
        assert_eq!(v, json!({ "Size": sum }));
        assert!(
            plugin.driver.tar_of("l1") == tar,
            "the bytes arrived intact"
        );
        // With a parent, odd chunk sizes, and on the same keep-alive connection.
        c.call("GraphDriver.Create", r#"{"ID":"l2","Parent":"l1"}"#)
            .await
            .ok_json();
        let (tar2, sum2) = layer_tar(5, 700_001, 2);
        let v = c.apply_diff("id=l2&parent=l1", &tar2, 4093).await.ok_json();
        assert_eq!(v, json!({ "Size": sum2 }));
        assert!(plugin.driver.tar_of("l2") == tar2);
        assert_eq!(
            plugin.driver.take_calls(),
            [
                "create l1 parent=None rw=false opt={}",
                "apply_diff l1 parent=None",
                "create l2 parent=Some(\"l1\") rw=false opt={}",
                "apply_diff l2 parent=Some(\"l1\")",
            ]
        );
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn apply_diff_with_a_content_length_works_too() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let (tar, sum) = layer_tar(3, 100_000, 3);
        c.call("GraphDriver.Create", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        let reply = c
            .send(
                "/GraphDriver.ApplyDiff?id=l1&parent=",
                SendBody::Full(Some(Bytes::from(tar.clone()))),
            )
            .await
            .unwrap();
        assert_eq!(read_all(reply).await.ok_json(), json!({ "Size": sum }));
        assert!(plugin.driver.tar_of("l1") == tar);
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn two_apply_diffs_at_once_on_two_connections() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        for id in ["a", "b"] {
            c.call("GraphDriver.Create", &format!(r#"{{"ID":"{id}"}}"#))
                .await
                .ok_json();
        }
        let (tar_a, sum_a) = layer_tar(8, 400_000, 4);
        let (tar_b, sum_b) = layer_tar(9, 300_000, 5);
        let mut ca = plugin.client().await;
        let mut cb = plugin.client().await;
        let (ra, rb) = tokio::join!(
            ca.apply_diff("id=a&parent=", &tar_a, GO_CHUNK),
            cb.apply_diff("id=b&parent=", &tar_b, GO_CHUNK),
        );
        assert_eq!(ra.ok_json(), json!({ "Size": sum_a }));
        assert_eq!(rb.ok_json(), json!({ "Size": sum_b }));
        assert!(plugin.driver.tar_of("a") == tar_a && plugin.driver.tar_of("b") == tar_b);
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn apply_diff_errors_are_err_replies_after_the_whole_body_and_keep_the_connection() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let (tar, _) = layer_tar(8, 500_000, 6);
        // Unknown layer: the driver fails before reading.
        let err = c
            .apply_diff("id=zz&parent=", &tar, GO_CHUNK)
            .await
            .err(StatusCode::OK);
        assert_eq!(err, "layer zz does not exist");
        // The driver reads 1 KiB and gives up: the rest is drained, the reply is the error.
        c.call("GraphDriver.Create", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        plugin.driver.apply_reads_only(1024);
        let err = c
            .apply_diff("id=l1&parent=", &tar, GO_CHUNK)
            .await
            .err(StatusCode::OK);
        assert_eq!(err, "layer l1: the tar is broken after 1024 bytes");
        // No id in the query string: refused before the driver.
        for query in ["parent=l1", "id=&parent=l1", ""] {
            let err = c
                .apply_diff(query, &tar, GO_CHUNK)
                .await
                .err(StatusCode::OK);
            assert!(err.contains("needs the layer id"), "{query}: {err}");
        }
        // Same connection, still in step.
        let v = c
            .call("GraphDriver.Exists", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        assert_eq!(v, json!({"Exists": true}));
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_leaving_mid_apply_diff_is_a_read_error_and_others_are_still_served() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = &plugin.driver;
        let mut other = plugin.client().await;
        other
            .call("GraphDriver.Create", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        let (tar, sum) = layer_tar(16, 256 * 1024, 7);
        // By hand, as dockerd's Go client sends it: chunked, no length, ids in the query.
        let mut raw = tokio::net::UnixStream::connect(&plugin.socket)
            .await
            .unwrap();
        raw.write_all(
            b"POST /GraphDriver.ApplyDiff?id=l1&parent= HTTP/1.1\r\n\
              Host: plugin\r\n\
              User-Agent: Go-http-client/1.1\r\n\
              Transfer-Encoding: chunked\r\n\
              Accept: application/vnd.docker.plugins.v1.2+json\r\n\
              Accept-Encoding: gzip\r\n\r\n",
        )
        .await
        .unwrap();
        for piece in tar[..tar.len() / 2].chunks(GO_CHUNK) {
            raw.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await
                .unwrap();
            raw.write_all(piece).await.unwrap();
            raw.write_all(b"\r\n").await.unwrap();
        }
        assert_eq!(driver.next_event().await, Event::ApplyStarted("l1".into()));
        // While that ApplyDiff waits for more of its body, other connections are served.
        let v = other
            .call("GraphDriver.Exists", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        assert_eq!(v, json!({"Exists": true}));
        // dockerd goes away halfway through the tar.
        drop(raw);
        match driver.next_event().await {
            Event::Applied(id, Err((_, message))) => {
                assert_eq!(id, "l1");
                assert!(message.contains("ApplyDiff"), "{message}");
            }
            e => panic!("the driver should have seen a read error, got {e:?}"),
        }
        // The server goes on: the same layer again, whole this time.
        let v = other
            .apply_diff("id=l1&parent=", &tar, GO_CHUNK)
            .await
            .ok_json();
        assert_eq!(v, json!({ "Size": sum }));
        assert!(driver.tar_of("l1") == tar);
        let mut fresh = plugin.client().await;
        fresh.call("GraphDriver.Status", "{}").await.ok_json();
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn diff_streams_a_multi_mib_tar_intact() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let (tar, _) = layer_tar(20, 300_000, 8);
        c.call("GraphDriver.CreateReadWrite", r#"{"ID":"c1"}"#)
            .await
            .ok_json();
        c.apply_diff("id=c1&parent=", &tar, GO_CHUNK)
            .await
            .ok_json();
        // `docker commit`: Diff(container, init layer); here without a parent.
        let reply = c
            .send(
                "/GraphDriver.Diff",
                SendBody::Full(Some(Bytes::from_static(b"{\"ID\":\"c1\"}\n"))),
            )
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()["content-type"], "application/x-tar");
        assert_eq!(
            reply.headers()["transfer-encoding"],
            "chunked",
            "streamed, not buffered"
        );
        let mut body = reply.into_body();
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
        }
        assert!(got == tar, "the tar arrived intact");
        assert!(frames > 1);
        // The same connection goes on.
        c.call("GraphDriver.Status", "{}").await.ok_json();
        // An empty diff is an empty body.
        c.call("GraphDriver.Create", r#"{"ID":"empty"}"#)
            .await
            .ok_json();
        let r = c
            .call("GraphDriver.Diff", r#"{"ID":"empty","Parent":"c1"}"#)
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty());
        let calls = plugin.driver.take_calls();
        assert!(
            calls.contains(&"diff c1 parent=None".to_owned()),
            "{calls:?}"
        );
        assert!(calls.contains(&"diff empty parent=Some(\"c1\")".to_owned()));
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn diff_failing_before_its_first_byte_is_a_500_with_err() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let err = c
            .call("GraphDriver.Diff", r#"{"ID":"zz","Parent":"p"}"#)
            .await
            .err(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err, "layer zz does not exist");
        // Failing after some bytes were written but before any left the buffer: still an Err.
        let (tar, _) = layer_tar(2, 10_000, 9);
        plugin.driver.insert_layer("l1", tar);
        plugin.driver.fail_diff_after(8192);
        let err = c
            .call("GraphDriver.Diff", r#"{"ID":"l1"}"#)
            .await
            .err(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err, "reading layer l1 failed halfway");
        for (body, want) in [("{\"ID\":", "malformed JSON"), ("{}", "needs a layer id")] {
            let err = c
                .call("GraphDriver.Diff", body)
                .await
                .err(StatusCode::INTERNAL_SERVER_ERROR);
            assert!(err.contains(want), "{err}");
        }
        plugin.driver.panic_next("diff");
        let err = c
            .call("GraphDriver.Diff", r#"{"ID":"l1"}"#)
            .await
            .err(StatusCode::INTERNAL_SERVER_ERROR);
        assert!(err.contains("GraphDriver.Diff"), "{err}");
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn diff_failing_mid_stream_breaks_the_stream() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        let (tar, _) = layer_tar(8, 500_000, 10);
        plugin.driver.insert_layer("l1", tar);
        plugin.driver.fail_diff_after(1 << 20);
        let reply = c
            .send(
                "/GraphDriver.Diff",
                SendBody::Full(Some(Bytes::from_static(b"{\"ID\":\"l1\"}\n"))),
            )
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        let mut body = reply.into_body();
        let mut got = 0;
        let broke = loop {
            match body.frame().await {
                Some(Ok(frame)) => got += frame.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("the stream ended cleanly after {got} bytes of a failed diff"),
            }
        };
        assert!(got <= 1 << 20, "{got}");
        assert!(format!("{broke:?}").contains("UnexpectedEof"), "{broke:?}");
        // Others are still served.
        plugin
            .client()
            .await
            .call("GraphDriver.Status", "{}")
            .await
            .ok_json();
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_leaving_mid_diff_is_a_write_error_for_the_driver() {
    within(async {
        let plugin = Plugin::start().await;
        let (tar, _) = layer_tar(64, 512 * 1024, 11);
        let total = tar.len();
        plugin.driver.insert_layer("l1", tar);
        let mut raw = tokio::net::UnixStream::connect(&plugin.socket).await.unwrap();
        let body = "{\"ID\":\"l1\"}\n";
        raw.write_all(
            format!(
                "POST /GraphDriver.Diff HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = vec![0; 64 * 1024];
        raw.read_exact(&mut head).await.unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
        drop(raw);
        match plugin.driver.next_event().await {
            Event::Diffed(id, Err((kind, _))) => {
                assert_eq!(id, "l1");
                assert_eq!(kind, std::io::ErrorKind::BrokenPipe);
            }
            e => panic!("the driver should have seen a write error, got {e:?} ({total} bytes)"),
        }
        plugin.client().await.call("GraphDriver.Status", "{}").await.ok_json();
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_lets_an_apply_diff_in_flight_finish() {
    within(async {
        let plugin = Plugin::start().await;
        let mut c = plugin.client().await;
        c.call("GraphDriver.Create", r#"{"ID":"l1"}"#)
            .await
            .ok_json();
        let (tar, sum) = layer_tar(8, 300_000, 12);
        let (tx, rx) = mpsc::channel(4);
        let sending = tokio::spawn(async move {
            let reply = c
                .send("/GraphDriver.ApplyDiff?id=l1&parent=", SendBody::Chunks(rx))
                .await
                .unwrap();
            read_all(reply).await
        });
        let (first, rest) = tar.split_at(tar.len() / 2);
        for piece in first.chunks(GO_CHUNK) {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(
            plugin.driver.next_event().await,
            Event::ApplyStarted("l1".into())
        );
        let driver = plugin.driver.clone();
        plugin.signal_stop();
        let (serving, _stop, _dir) = plugin.into_serving();
        for piece in rest.chunks(GO_CHUNK) {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        drop(tx);
        let reply = sending.await.unwrap();
        assert_eq!(reply.ok_json(), json!({ "Size": sum }));
        assert!(driver.tar_of("l1") == tar);
        serving.await.unwrap().unwrap();
    })
    .await;
}

/// Far below the 64 MiB layers of the backpressure tests, far above what the bounded channels,
/// hyper's buffers and the socket buffers hold together (a few MiB).
const IN_FLIGHT_BOUND: usize = 16 << 20;

/// Lets every task on this runtime run until it waits: a stalled pipeline stays stalled.
async fn settle() {
    for _ in 0..2000 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn apply_diff_holds_back_the_client_while_the_driver_does_not_read() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = plugin.driver.clone();
        let mut c = plugin.client().await;
        c.call("GraphDriver.Create", r#"{"ID":"big"}"#)
            .await
            .ok_json();
        let (tar, sum) = layer_tar(64, 1 << 20, 13);
        let gate = driver.gate_apply();
        let (tx, rx) = mpsc::channel(4);
        let fed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let feeding = tokio::spawn({
            let (tar, fed) = (tar.clone(), fed.clone());
            async move {
                for piece in tar.chunks(GO_CHUNK) {
                    tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
                    fed.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let sending = tokio::spawn(async move {
            let reply = c
                .send(
                    "/GraphDriver.ApplyDiff?id=big&parent=",
                    SendBody::Chunks(rx),
                )
                .await
                .unwrap();
            read_all(reply).await
        });
        assert_eq!(driver.next_event().await, Event::ApplyStarted("big".into()));
        settle().await;
        let held = fed.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            held < IN_FLIGHT_BOUND,
            "{held} bytes taken from the client while the driver read nothing"
        );
        gate.send(()).unwrap();
        assert_eq!(sending.await.unwrap().ok_json(), json!({ "Size": sum }));
        feeding.await.unwrap();
        assert!(driver.tar_of("big") == tar);
        plugin.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn diff_holds_back_the_driver_while_the_client_does_not_read() {
    within(async {
        let plugin = Plugin::start().await;
        let driver = plugin.driver.clone();
        let (tar, _) = layer_tar(64, 1 << 20, 14);
        driver.insert_layer("big", tar.clone());
        let mut c = plugin.client().await;
        let reply = c
            .send(
                "/GraphDriver.Diff",
                SendBody::Full(Some(Bytes::from_static(b"{\"ID\":\"big\"}\n"))),
            )
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        settle().await;
        let written = driver.diff_written();
        assert!(
            written < IN_FLIGHT_BOUND,
            "the driver wrote {written} bytes while the client read none"
        );
        let got = reply.into_body().collect().await.unwrap().to_bytes();
        assert!(got == tar);
        plugin.stop().await;
    })
    .await;
}
