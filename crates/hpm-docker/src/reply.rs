//! Building replies, and the one place where a failure becomes a reply ([`failure`]).
//!
//! Rule of the wire: a logical error is HTTP 200 with `{"Err": "<message>"}`, which is what
//! every dockerd client path decodes. Two exceptions, both still carrying `{"Err"}` (dockerd
//! decodes it from non-200 replies too): an unknown endpoint is 404, and a Diff that fails
//! before its first byte is 500, because dockerd would read a 200 reply of Diff as the tar
//! itself.

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::stream::ReplyBody;
use crate::wire::{self, Endpoint, JSON_CONTENT_TYPE};
use crate::DriverError;

/// A reply as hyper sends it.
pub(crate) type Reply = Response<ReplyBody>;

/// A JSON reply with `status`.
pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| {
        // Our reply types always serialize; if one ever does not, dockerd still gets an Err.
        serde_json::to_vec(&wire::Response {
            err: format!("hpmapper could not encode its reply: {e}"),
            ..wire::Response::default()
        })
        .unwrap_or_else(|_| b"{\"Err\":\"hpmapper could not encode its reply\"}".to_vec())
    });
    let mut reply = Response::new(ReplyBody::full(body));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    reply
}

/// A successful JSON reply.
pub(crate) fn ok(value: &impl Serialize) -> Reply {
    json(StatusCode::OK, value)
}

/// The reply for a request to `endpoint` (`None`: no such endpoint) that failed with `err`.
/// The `Err` text is never empty (an empty `Err` means success to dockerd): an error without
/// a message gets one naming the endpoint and the kind.
pub(crate) fn failure(endpoint: Option<Endpoint>, err: &DriverError) -> Reply {
    let status = match endpoint {
        None => StatusCode::NOT_FOUND,
        Some(Endpoint::Diff) => StatusCode::INTERNAL_SERVER_ERROR,
        Some(_) => StatusCode::OK,
    };
    let message = if err.message.trim().is_empty() {
        let what = endpoint.map_or("request", Endpoint::name);
        format!("hpmapper: {what} failed: {}", err.kind.describe())
    } else {
        err.message.clone()
    };
    json(
        status,
        &wire::Response {
            err: message,
            ..wire::Response::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::DriverErrorKind;

    const KINDS: [DriverErrorKind; 9] = [
        DriverErrorKind::Io,
        DriverErrorKind::Corrupt,
        DriverErrorKind::NoSpace,
        DriverErrorKind::NotFound,
        DriverErrorKind::Exists,
        DriverErrorKind::Busy,
        DriverErrorKind::Invalid,
        DriverErrorKind::ReadOnly,
        DriverErrorKind::Unsupported,
    ];

    fn body_json(reply: Reply) -> serde_json::Value {
        let bytes = block_on(reply.into_body().collect()).unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn every_kind_on_every_endpoint_becomes_an_err_reply() {
        let endpoints = Endpoint::ALL.into_iter().map(Some).chain([None]);
        for endpoint in endpoints {
            for kind in KINDS {
                for message in ["layer abc: it broke; run hpmapper check", "", "  "] {
                    let reply = failure(endpoint, &DriverError::new(kind, message));
                    let want_status = match endpoint {
                        None => StatusCode::NOT_FOUND,
                        Some(Endpoint::Diff) => StatusCode::INTERNAL_SERVER_ERROR,
                        Some(_) => StatusCode::OK,
                    };
                    assert_eq!(reply.status(), want_status, "{endpoint:?} {kind:?}");
                    assert_eq!(reply.headers()[CONTENT_TYPE], JSON_CONTENT_TYPE);
                    let v = body_json(reply);
                    let err = v["Err"].as_str().unwrap();
                    assert_eq!(v.as_object().unwrap().len(), 1, "only Err: {v}");
                    if message.trim().is_empty() {
                        assert!(err.contains(kind.describe()), "{err}");
                        let what = endpoint.map_or("request", Endpoint::name);
                        assert!(err.contains(what), "{err}");
                    } else {
                        assert_eq!(err, message);
                    }
                }
            }
        }
    }
}
