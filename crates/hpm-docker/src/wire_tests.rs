use super::*;

#[test]
fn every_endpoint_round_trips_through_its_path_and_nothing_else_matches() {
    for e in Endpoint::ALL {
        assert_eq!(Endpoint::from_path(&format!("/{}", e.name())), Some(e));
    }
    for path in [
        "",
        "/",
        "GraphDriver.Create",
        "/graphdriver.create",
        "/GraphDriver.Create/",
        "/GraphDriver.Nope",
        "/VolumeDriver.Create",
    ] {
        assert_eq!(Endpoint::from_path(path), None, "{path:?}");
    }
}

#[test]
fn requests_decode_as_dockerd_encodes_them() {
    // Go's json.Encoder output: omitempty fields dropped, a trailing newline.
    let r: Request = decode(Endpoint::Create, b"{\"ID\":\"abc\"}\n").unwrap();
    assert_eq!(
        r,
        Request {
            id: "abc".into(),
            ..Request::default()
        }
    );
    let r: Request = decode(
        Endpoint::CreateReadWrite,
        br#"{"ID":"c","Parent":"c-init","MountLabel":"system_u:object_r:container_file_t:s0:c1,c2","StorageOpt":{"size":"20G"}}"#,
    )
    .unwrap();
    assert_eq!(r.id, "c");
    assert_eq!(r.parent, "c-init");
    assert_eq!(r.mount_label, "system_u:object_r:container_file_t:s0:c1,c2");
    assert_eq!(r.storage_opt.get("size").map(String::as_str), Some("20G"));
    // Calls without arguments send `{}`, Activate sends nothing; null fields are empty.
    for body in [
        &b"{}\n"[..],
        b"",
        b"  \n",
        b"null",
        br#"{"ID":null,"StorageOpt":null}"#,
    ] {
        let r: Request = decode(Endpoint::Status, body).unwrap();
        assert_eq!(r, Request::default(), "{:?}", String::from_utf8_lossy(body));
    }
    // Unknown fields are ignored (newer daemons).
    let r: Request = decode(Endpoint::Get, br#"{"ID":"x","Future":[1]}"#).unwrap();
    assert_eq!(r.id, "x");
}

#[test]
fn init_decodes_null_maps_and_snake_case_id_maps() {
    let r: InitRequest = decode(
        Endpoint::Init,
        br#"{"Home":"/var/lib/docker/hpmapper","Opts":null,"UIDMaps":null,"GIDMaps":null}"#,
    )
    .unwrap();
    assert_eq!(r.home, "/var/lib/docker/hpmapper");
    assert!(r.opts.is_empty() && r.uid_maps.is_empty() && r.gid_maps.is_empty());
    let r: InitRequest = decode(
        Endpoint::Init,
        br#"{"Home":"/h","Opts":["hpmapper.basesize=10G"],"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":[]}"#,
    )
    .unwrap();
    assert_eq!(r.opts, ["hpmapper.basesize=10G"]);
    assert_eq!(
        r.uid_maps,
        [IdMap {
            container_id: 0,
            host_id: 100000,
            size: 65536
        }]
    );
    assert!(r.gid_maps.is_empty());
}

#[test]
fn malformed_json_is_an_invalid_request_naming_the_endpoint() {
    for body in [
        &b"{"[..],
        b"[1,2]",
        br#"["abc"]"#,
        b"true",
        b"\"ID\"",
        br#"{"ID": 5}"#,
        br#"{"StorageOpt": {"size": 20}}"#,
    ] {
        let e = decode::<Request>(Endpoint::Create, body).unwrap_err();
        assert_eq!(e.kind, crate::DriverErrorKind::Invalid);
        assert!(
            e.message
                .contains("malformed JSON in the GraphDriver.Create request"),
            "{e}"
        );
    }
    let e =
        decode::<InitRequest>(Endpoint::Init, br#"{"UIDMaps":[{"ContainerID":0}]}"#).unwrap_err();
    assert!(e.message.contains("container_id"), "{e}");
}

#[test]
fn responses_use_dockerd_field_names_and_omit_what_is_unset() {
    let json = |r: &Response| serde_json::to_string(r).unwrap();
    assert_eq!(json(&Response::default()), "{}");
    assert_eq!(
        json(&Response {
            err: "layer x not found".into(),
            ..Response::default()
        }),
        r#"{"Err":"layer x not found"}"#
    );
    assert_eq!(
        json(&Response {
            exists: Some(false),
            ..Response::default()
        }),
        r#"{"Exists":false}"#
    );
    let r = Response {
        dir: Some("/m/x/rootfs".into()),
        status: Some(vec![["Pool".into(), "p".into()]]),
        changes: Some(vec![Change {
            path: "/a".into(),
            kind: 2,
        }]),
        size: Some(7),
        metadata: Some(BTreeMap::from([("k".into(), "v".into())])),
        capabilities: Some(Capabilities::default()),
        ..Response::default()
    };
    assert_eq!(
        json(&r),
        r#"{"Dir":"/m/x/rootfs","Status":[["Pool","p"]],"Changes":[{"Path":"/a","Kind":2}],"Size":7,"Metadata":{"k":"v"},"Capabilities":{"ReproducesExactDiffs":false}}"#
    );
    assert_eq!(
        serde_json::to_string(&MANIFEST).unwrap(),
        r#"{"Implements":["GraphDriver"]}"#
    );
}

#[test]
fn apply_diff_ids_come_raw_from_the_query_string() {
    let ok = |q: &str| apply_diff_ids(Some(q)).unwrap();
    assert_eq!(ok("id=abc&parent=def"), ("abc".into(), Some("def".into())));
    assert_eq!(ok("id=abc&parent="), ("abc".into(), None));
    assert_eq!(ok("id=abc"), ("abc".into(), None));
    assert_eq!(
        ok("parent=p&id=c-init"),
        ("c-init".into(), Some("p".into()))
    );
    // Not percent-decoded: dockerd does not escape.
    assert_eq!(ok("id=a%20b&parent=x"), ("a%20b".into(), Some("x".into())));
    for q in [
        None,
        Some(""),
        Some("id="),
        Some("parent=p"),
        Some("ID=abc"),
    ] {
        let e = apply_diff_ids(q).unwrap_err();
        assert_eq!(e.kind, crate::DriverErrorKind::Invalid);
        assert!(e.message.contains("?id=<id>&parent=<parent>"), "{e}");
    }
}
