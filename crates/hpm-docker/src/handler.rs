//! One request: route it to its endpoint, decode it, run the driver call on the blocking
//! pool, encode the reply. Never blocks an async thread and never panics on input; every
//! failure goes through [`reply::failure`].

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use tracing::{debug, warn};

use crate::reply::{self, Reply};
use crate::stream::{self, PumpEnd, ReplyBody, TarChunk};
use crate::wire::{self, Endpoint, TAR_CONTENT_TYPE};
use crate::{DriverError, DriverErrorKind, GraphDriver};

/// Largest JSON request body accepted (dockerd's are well under 1 KiB).
const MAX_JSON_BODY: usize = 1 << 20;

/// Answers one request. Infallible: every failure is a reply.
pub(crate) async fn handle(
    driver: Arc<dyn GraphDriver>,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let endpoint = match (req.method(), Endpoint::from_path(req.uri().path())) {
        (&Method::POST, Some(endpoint)) => endpoint,
        (method, _) => {
            let err = DriverError::unsupported(format!(
                "hpmapper's graphdriver plugin has no endpoint {method} {}; it serves \
                 POST /Plugin.Activate and POST /GraphDriver.<Method>",
                req.uri().path()
            ));
            debug!(%method, path = req.uri().path(), "unknown endpoint");
            // Read (a bounded amount of) the body anyway, so the connection stays usable.
            let _ = Limited::new(req.into_body(), MAX_JSON_BODY).collect().await;
            return Ok(reply::failure(None, &err));
        }
    };
    let result = match endpoint {
        Endpoint::ApplyDiff => apply_diff(driver, req).await,
        Endpoint::Diff => return Ok(diff(driver, req).await),
        _ => match read_json_body(endpoint, req.into_body()).await {
            Ok(body) => call(driver, endpoint, body).await,
            Err(e) => Err(e),
        },
    };
    Ok(match result {
        Ok(reply) => reply,
        Err(e) => {
            // ApplyDiff's driver errors were logged on the driver's thread already.
            if endpoint != Endpoint::ApplyDiff {
                warn!(endpoint = endpoint.name(), kind = ?e.kind, "{}", e.message);
            }
            reply::failure(Some(endpoint), &e)
        }
    })
}

/// Reads a whole (small) JSON request body.
async fn read_json_body(endpoint: Endpoint, body: Incoming) -> Result<Bytes, DriverError> {
    match Limited::new(body, MAX_JSON_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(DriverError::invalid(format!(
            "the {} request body is larger than {MAX_JSON_BODY} bytes; dockerd never sends that",
            endpoint.name()
        ))),
        Err(e) => Err(DriverError::new(
            DriverErrorKind::Io,
            format!("reading the {} request body failed: {e}", endpoint.name()),
        )),
    }
}

/// Runs `f` on the blocking pool; a panic in the driver becomes an error.
async fn blocking<T, F>(endpoint: Endpoint, f: F) -> Result<T, DriverError>
where
    F: FnOnce() -> Result<T, DriverError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(DriverError::new(
            DriverErrorKind::Io,
            format!(
                "the layer store failed inside {} ({e}); see the hpmapper log",
                endpoint.name()
            ),
        ))
    })
}

/// The id a request names; every endpoint that takes one needs it.
fn required_id(endpoint: Endpoint, id: String) -> Result<String, DriverError> {
    if id.is_empty() {
        Err(DriverError::invalid(format!(
            "{} needs a layer id (\"ID\")",
            endpoint.name()
        )))
    } else {
        Ok(id)
    }
}

fn parent_of(parent: String) -> Option<String> {
    Some(parent).filter(|p| !p.is_empty())
}

fn size_of(endpoint: Endpoint, size: u64) -> Result<i64, DriverError> {
    i64::try_from(size).map_err(|_| {
        DriverError::invalid(format!(
            "{} computed a size of {size} bytes, beyond what dockerd can read",
            endpoint.name()
        ))
    })
}

/// The JSON endpoints.
async fn call(
    driver: Arc<dyn GraphDriver>,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<Reply, DriverError> {
    let done = wire::Response::default();
    if matches!(
        endpoint,
        Endpoint::Capabilities | Endpoint::Status | Endpoint::Cleanup
    ) {
        // No arguments (dockerd sends `{}`), but a body that is not JSON is still refused.
        let _: wire::Request = wire::decode(endpoint, &body)?;
    }
    match endpoint {
        Endpoint::Activate => Ok(reply::ok(&wire::MANIFEST)),
        Endpoint::Init => {
            let req: wire::InitRequest = wire::decode(endpoint, &body)?;
            if !req.uid_maps.is_empty() || !req.gid_maps.is_empty() {
                return Err(DriverError::unsupported(
                    "user namespace remapping is not supported by hpmapper; \
                     run dockerd without --userns-remap",
                ));
            }
            if !Path::new(&req.home).is_absolute() {
                return Err(DriverError::invalid(format!(
                    "GraphDriver.Init needs an absolute \"Home\", got {:?}",
                    req.home
                )));
            }
            debug!(home = %req.home, opts = ?req.opts, "init");
            blocking(endpoint, move || {
                driver.init(Path::new(&req.home), &req.opts)
            })
            .await?;
            Ok(reply::ok(&done))
        }
        Endpoint::Capabilities => Ok(reply::ok(&wire::Response {
            capabilities: Some(wire::Capabilities::default()),
            ..done
        })),
        Endpoint::Status => {
            let status = blocking(endpoint, move || Ok(driver.status())).await?;
            Ok(reply::ok(&wire::Response {
                status: Some(status.into_iter().map(|(k, v)| [k, v]).collect()),
                ..done
            }))
        }
        Endpoint::Cleanup => {
            blocking(endpoint, move || driver.cleanup()).await?;
            Ok(reply::ok(&done))
        }
        _ => {
            let req: wire::Request = wire::decode(endpoint, &body)?;
            if endpoint == Endpoint::Exists && req.id.is_empty() {
                return Ok(reply::ok(&wire::Response {
                    exists: Some(false),
                    ..done
                }));
            }
            let id = required_id(endpoint, req.id)?;
            let parent = parent_of(req.parent);
            debug!(endpoint = endpoint.name(), %id, ?parent, "call");
            let started = std::time::Instant::now();
            let log_id = id.clone();
            let result = call_on_layer(
                driver,
                endpoint,
                id,
                parent,
                req.mount_label,
                req.storage_opt,
            )
            .await;
            debug!(
                endpoint = endpoint.name(),
                id = %log_id,
                ok = result.is_ok(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "done"
            );
            result
        }
    }
}

/// The JSON endpoints about one layer.
async fn call_on_layer(
    driver: Arc<dyn GraphDriver>,
    endpoint: Endpoint,
    id: String,
    parent: Option<String>,
    mount_label: String,
    storage_opt: std::collections::BTreeMap<String, String>,
) -> Result<Reply, DriverError> {
    let done = wire::Response::default();
    let reply = match endpoint {
        Endpoint::Create | Endpoint::CreateReadWrite => {
            let rw = endpoint == Endpoint::CreateReadWrite;
            blocking(endpoint, move || {
                driver.create(&id, parent.as_deref(), rw, &storage_opt)
            })
            .await?;
            done
        }
        Endpoint::Remove => {
            blocking(endpoint, move || driver.remove(&id)).await?;
            done
        }
        Endpoint::Get => {
            let (again, id_again) = (driver.clone(), id.clone());
            let dir = blocking(endpoint, move || driver.get(&id, &mount_label)).await?;
            let dir = match dir.to_str() {
                Some(d) if dir.is_absolute() => d.to_owned(),
                _ => {
                    // dockerd sees a failed Get and sends no Put: take the mount back.
                    if let Err(e) = blocking(endpoint, move || again.put(&id_again)).await {
                        tracing::warn!("putting back a layer whose Get failed: {}", e.message);
                    }
                    return Err(DriverError::new(
                        DriverErrorKind::Invalid,
                        format!(
                            "the layer store returned {} as the mount point, which is not an \
                             absolute UTF-8 path dockerd can use",
                            dir.display()
                        ),
                    ));
                }
            };
            wire::Response {
                dir: Some(dir),
                ..done
            }
        }
        Endpoint::Put => {
            blocking(endpoint, move || driver.put(&id)).await?;
            done
        }
        Endpoint::Exists => {
            let exists = blocking(endpoint, move || Ok(driver.exists(&id))).await?;
            wire::Response {
                exists: Some(exists),
                ..done
            }
        }
        Endpoint::GetMetadata => {
            let metadata = blocking(endpoint, move || driver.metadata(&id)).await?;
            wire::Response {
                metadata: Some(metadata),
                ..done
            }
        }
        Endpoint::Changes => {
            let changes =
                blocking(endpoint, move || driver.changes(&id, parent.as_deref())).await?;
            let changes = changes
                .into_iter()
                .map(|(path, kind)| match kind {
                    crate::CHANGE_MODIFY | crate::CHANGE_ADD | crate::CHANGE_DELETE => {
                        Ok(wire::Change { path, kind })
                    }
                    _ => Err(DriverError::invalid(format!(
                        "the layer store reported change kind {kind} for {path}; \
                         only 0 (modify), 1 (add) and 2 (delete) exist"
                    ))),
                })
                .collect::<Result<_, _>>()?;
            wire::Response {
                changes: Some(changes),
                ..done
            }
        }
        Endpoint::DiffSize => {
            let size = blocking(endpoint, move || driver.diff_size(&id, parent.as_deref())).await?;
            wire::Response {
                size: Some(size_of(endpoint, size)?),
                ..done
            }
        }
        Endpoint::Activate
        | Endpoint::Init
        | Endpoint::Capabilities
        | Endpoint::Status
        | Endpoint::Cleanup
        | Endpoint::Diff
        | Endpoint::ApplyDiff => {
            return Err(DriverError::new(
                DriverErrorKind::Io,
                format!("hpmapper routed {} wrongly (a bug)", endpoint.name()),
            ))
        }
    };
    Ok(reply::ok(&reply))
}

/// ApplyDiff: the request body (a raw tar, usually chunked) streams into the driver's
/// `apply_diff` through a bounded channel; the reply goes out after the whole body was read.
async fn apply_diff(
    driver: Arc<dyn GraphDriver>,
    req: Request<Incoming>,
) -> Result<Reply, DriverError> {
    let endpoint = Endpoint::ApplyDiff;
    let (tx, mut reader) = stream::body_channel();
    let (id, parent) = match wire::apply_diff_ids(req.uri().query()) {
        Ok(ids) => ids,
        Err(e) => {
            // The tar is read and dropped all the same: replying before the end of the
            // request would cost the keep-alive connection.
            drop(reader);
            stream::pump(req.into_body(), tx).await;
            return Err(e);
        }
    };
    debug!(%id, ?parent, "apply diff");
    // The pump stays in this future (not a task of its own): if hyper drops the request,
    // the pump's sender goes with it and the reader sees an error, never a clean end.
    let pumping = stream::pump(req.into_body(), tx);
    let applying = blocking(endpoint, move || {
        let result = driver.apply_diff(&id, parent.as_deref(), &mut reader);
        if let Err(e) = &result {
            // Logged here too: if the client is gone, nobody else will see it.
            warn!(%id, kind = ?e.kind, "GraphDriver.ApplyDiff failed: {}", e.message);
        }
        result
    });
    let (pumped, applied) = tokio::join!(pumping, applying);
    if let PumpEnd::Broken(e) = &pumped {
        debug!("the ApplyDiff request body broke off: {e}");
    }
    let size = size_of(endpoint, applied?)?;
    Ok(reply::ok(&wire::Response {
        size: Some(size),
        ..wire::Response::default()
    }))
}

/// Diff: the driver writes the tar into a bounded channel that is the reply body. The
/// status is decided by the first message: an error before any byte is a 500 `{"Err"}`
/// reply; after the first byte, a failure cuts the stream.
async fn diff(driver: Arc<dyn GraphDriver>, req: Request<Incoming>) -> Reply {
    let endpoint = Endpoint::Diff;
    let started = async {
        let body = read_json_body(endpoint, req.into_body()).await?;
        let req: wire::Request = wire::decode(endpoint, &body)?;
        let id = required_id(endpoint, req.id)?;
        let parent = parent_of(req.parent);
        debug!(%id, ?parent, "diff");
        let (mut writer, mut rx) = stream::tar_channel();
        let task = tokio::task::spawn_blocking(move || {
            let result = driver.diff(&id, parent.as_deref(), &mut writer);
            if let Err(e) = &result {
                warn!(%id, kind = ?e.kind, "GraphDriver.Diff failed: {}", e.message);
            }
            writer.finish(result);
        });
        match rx.recv().await {
            Some(TarChunk::Data(first)) => Ok(ReplyBody::tar(first, rx)),
            Some(TarChunk::End) => Ok(ReplyBody::Full(None)),
            Some(TarChunk::Failed(e)) => Err(e),
            // The writer was dropped without finishing: the driver panicked.
            None => Err(DriverError::new(
                DriverErrorKind::Io,
                match task.await {
                    Err(e) => format!(
                        "the layer store failed inside GraphDriver.Diff ({e}); see the hpmapper log"
                    ),
                    Ok(()) => "GraphDriver.Diff ended without a result".to_owned(),
                },
            )),
        }
    };
    match started.await {
        Ok(body) => {
            let mut reply = Response::new(body);
            reply
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TAR_CONTENT_TYPE));
            reply
        }
        Err(e) => {
            warn!(endpoint = endpoint.name(), kind = ?e.kind, "{}", e.message);
            reply::failure(Some(endpoint), &e)
        }
    }
}
