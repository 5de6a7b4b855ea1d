use std::collections::VecDeque;

use super::*;

/// A request body made of given frames, the last perhaps an error.
struct Frames(VecDeque<Result<Bytes, String>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        Poll::Ready(self.0.pop_front().map(|r| r.map(Frame::data)))
    }
}

fn frames(parts: &[&[u8]], error: Option<&str>) -> Frames {
    let mut q: VecDeque<_> = parts
        .iter()
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    q.extend(error.map(|e| Err(e.to_owned())));
    Frames(q)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn reader_sees_every_byte_then_end_of_file() {
    let (tx, mut reader) = body_channel();
    let reading = std::thread::spawn(move || {
        let mut all = Vec::new();
        let n = reader.read_to_end(&mut all).unwrap();
        assert_eq!(reader.read(&mut [0; 4]).unwrap(), 0, "end of file stays");
        (n, all)
    });
    let end = runtime().block_on(pump(frames(&[b"ab", b"", b"cde", b"f"], None), tx));
    assert!(matches!(end, PumpEnd::Complete));
    assert_eq!(reading.join().unwrap(), (6, b"abcdef".to_vec()));
}

#[test]
fn reader_sees_an_error_when_the_body_breaks_off() {
    let (tx, mut reader) = body_channel();
    let reading = std::thread::spawn(move || {
        let mut all = Vec::new();
        let e = reader.read_to_end(&mut all).unwrap_err();
        assert!(reader.read(&mut [0; 4]).is_err(), "the failure stays");
        (all, e)
    });
    let end = runtime().block_on(pump(frames(&[b"abc"], Some("connection reset")), tx));
    assert!(matches!(end, PumpEnd::Broken(_)));
    let (all, e) = reading.join().unwrap();
    assert_eq!(all, b"abc");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("connection reset"), "{e}");
}

#[test]
fn reader_sees_an_error_when_the_pump_is_dropped_without_an_end() {
    let (tx, mut reader) = body_channel();
    tx.try_send(BodyChunk::Data(Bytes::from_static(b"xy")))
        .unwrap();
    drop(tx);
    let mut all = Vec::new();
    let e = reader.read_to_end(&mut all).unwrap_err();
    assert_eq!(all, b"xy");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("abandoned"), "{e}");
}

#[test]
fn pump_drains_the_body_after_the_reader_stops() {
    let (tx, reader) = body_channel();
    drop(reader);
    let parts: Vec<&[u8]> = vec![&[7u8; 1000]; 3 * REQUEST_CHUNKS];
    let mut body = frames(&parts, None);
    let end = runtime().block_on(async {
        let end = pump(&mut body, tx).await;
        assert!(body.0.is_empty(), "every frame was read");
        end
    });
    assert!(matches!(end, PumpEnd::Complete));
}

#[test]
fn writer_cuts_chunks_and_ends_with_the_marker() {
    let (mut writer, mut rx) = tar_channel();
    let writing = std::thread::spawn(move || {
        writer.write_all(&vec![1u8; TAR_CHUNK * 2 + 100]).unwrap();
        writer.write_all(b"tail").unwrap();
        writer.finish(Ok(()));
    });
    let mut sizes = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(TarChunk::Data(b)) => sizes.push(b.len()),
            Some(TarChunk::End) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    writing.join().unwrap();
    assert_eq!(sizes, [TAR_CHUNK, TAR_CHUNK, 104]);
    assert!(rx.blocking_recv().is_none());
}

#[test]
fn writer_failure_replaces_the_buffered_rest() {
    let (mut writer, mut rx) = tar_channel();
    writer.write_all(b"partial").unwrap();
    writer.finish(Err(DriverError::not_found("layer x does not exist")));
    match rx.blocking_recv() {
        Some(TarChunk::Failed(e)) => assert_eq!(e.message, "layer x does not exist"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn writer_fails_once_the_client_is_gone() {
    let (mut writer, rx) = tar_channel();
    drop(rx);
    let e = writer.write_all(&[0; 10]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn tar_body_streams_then_ends_or_breaks() {
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        tx.send(TarChunk::Data(Bytes::from_static(b"b")))
            .await
            .unwrap();
        tx.send(TarChunk::End).await.unwrap();
        let body = ReplyBody::tar(Bytes::from_static(b"a"), rx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");

        let (tx, rx) = mpsc::channel(4);
        tx.send(TarChunk::Failed(DriverError::invalid("bad")))
            .await
            .unwrap();
        let mut body = ReplyBody::tar(Bytes::from_static(b"a"), rx);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("bad"), "{e}");

        let (tx, rx) = mpsc::channel(4);
        drop(tx);
        let mut body = ReplyBody::tar(Bytes::from_static(b"a"), rx);
        body.frame().await.unwrap().unwrap();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("without finishing"), "{e}");
    });
}

#[test]
fn full_body_has_an_exact_size() {
    let body = ReplyBody::full(Bytes::from_static(b"{}"));
    assert_eq!(body.size_hint().exact(), Some(2));
    assert!(!body.is_end_stream());
    assert!(ReplyBody::Full(None).is_end_stream());
}
