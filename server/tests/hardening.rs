//! Hostile and careless peers on every port of a real `pigeon` process: slow and silent
//! clients, connection floods, malformed HTTP. Each test is bounded (a few hundred sockets,
//! timeouts of a second or two from the config) and names the finding it guards against.

mod support;

use std::time::{Duration, Instant};

use pigeon_client::DeviceState;
use serde_json::{Value, json};
use support::cluster::{CLUSTER_SECRET, Deployment, GatewayProcess, NodeProcess, Redis};
use support::{Server, WAIT, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The host:port of an `http://` URL.
fn address(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned()
}

/// Reads until the peer closes (or `within` passes): what it sent, and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, true),
            Ok(Ok(read)) => received.extend_from_slice(&chunk[..read]),
            Err(_) => return (received, false),
        }
    }
}

/// Sends raw bytes as one HTTP exchange; the status and JSON body of the answer.
async fn raw_http(server: &Server, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(address(&server.http_url))
        .await
        .expect("connect");
    stream.write_all(request).await.expect("write");
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    parse_response(&answer)
}

fn parse_response(answer: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

/// Open file descriptors of a process.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Finding 1: slow clients on the HTTP API. They are closed by the header and idle
/// deadlines, never hold more than `max_http_connections`, and the device port keeps
/// working meanwhile.
#[tokio::test]
async fn slow_http_clients_are_cut_off_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__MAX_HTTP_CONNECTIONS", "40"),
            ("PIGEON_LIMITS__HTTP_HEADER_TIMEOUT", "1s"),
            ("PIGEON_LIMITS__HTTP_BODY_TIMEOUT", "1s"),
            ("PIGEON_LIMITS__CONNECTION_IDLE_TIMEOUT", "2s"),
        ],
    );
    let baseline = open_files(server.pid());
    let http = address(&server.http_url);

    // 300 clients that send a request head one byte at a time, every 200 ms.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(&http).await.expect("connect");
        stream.write_all(b"P").await.expect("first byte");
        slow.push(stream);
    }
    let started = Instant::now();
    let mut dribble = tokio::time::interval(Duration::from_millis(200));
    // While they dribble, the process holds at most the cap of them.
    for _ in 0..3 {
        dribble.tick().await;
        for stream in &mut slow {
            let _ = stream.write_all(b"O").await;
        }
    }
    let held = open_files(server.pid()).saturating_sub(baseline);
    assert!(held <= 40 + 5, "{held} descriptors above the baseline");
    // A device still connects and is welcomed.
    let device = connect(&server, "dora", &DeviceState::default()).await;
    drop(device);
    // Every slow client is closed: past the cap at once, the others at the header deadline.
    for stream in &mut slow {
        let (answer, closed) = read_until_closed(stream, Duration::from_secs(3)).await;
        assert!(closed, "a slow client was still open");
        // Either closed on arrival (nothing), or told 408 by the HTTP layer.
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"));
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // A complete request, then silence: the keep-alive connection is closed once idle.
    let mut idle = TcpStream::connect(&http).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(6)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    assert!(closed, "an idle keep-alive connection stayed open");

    // A body that dribbles gets 408 at the body deadline, and its connection is closed.
    let mut dribbling = TcpStream::connect(&http).await.expect("connect");
    let head = format!(
        "POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        server.api_key
    );
    dribbling.write_all(head.as_bytes()).await.expect("write");
    let (answer, closed) = read_until_closed(&mut dribbling, Duration::from_secs(4)).await;
    let (status, body) = parse_response(&answer);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(closed);

    // Afterwards the API answers as before, and the descriptors are given back.
    let health = reqwest::get(format!("{}/healthz", server.http_url))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let deadline = Instant::now() + WAIT;
    while open_files(server.pid()) > baseline + 2 {
        assert!(Instant::now() < deadline, "descriptors were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 12: every listener gets the kernel's maximum backlog (or the configured one).
#[tokio::test]
async fn listeners_take_the_configured_backlog() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("a number");
    let backlog_of = |url: &str| -> Option<u32> {
        let port = address(url).rsplit(':').next()?.to_owned();
        let output = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .ok()?;
        // State, Recv-Q, Send-Q (the backlog of a listening socket), ...
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    assert_eq!(backlog_of(&server.http_url), Some(somaxconn));
    assert_eq!(backlog_of(&server.ws_url), Some(somaxconn));
    drop(server);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("PIGEON_LISTEN__BACKLOG", "77")]);
    assert_eq!(backlog_of(&server.http_url), Some(77));
    assert_eq!(backlog_of(&server.ws_url), Some(77));
}

/// Findings 7, 8 and 13: what malformed or oversized HTTP gets, always as JSON.
#[tokio::test]
async fn malformed_http_gets_clear_json_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let key = &server.api_key;

    // A malformed chunked body is a bad request, not a large one.
    let request = format!(
        "POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
    );
    let (status, body) = raw_http(&server, request.as_bytes()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_body");

    // A declared length far over the limit is refused before the client is invited to
    // send it: no 100 Continue.
    let mut stream = TcpStream::connect(address(&server.http_url))
        .await
        .expect("connect");
    let request = format!(
        "POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Expect: 100-continue\r\nContent-Length: 99000000\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (_, body) = parse_response(&answer);
    assert_eq!(body["error"]["code"], "too_large");

    // A method a route does not take.
    let (status, body) = raw_http(
        &server,
        b"GET /v1/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // A JSON array is no push, and no message names a server type.
    let (status, body) = server
        .push_with_key(Some(key), r#"[{"uids":["x"]},1]"#.into())
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("struct"), "{body}");

    // HTTP/2 without TLS (h2c) is not spoken here: the API is HTTP/1.1; gRPC has its port.
    let mut stream = TcpStream::connect(address(&server.http_url))
        .await
        .expect("connect");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "an HTTP/2 answer: {answer:?}"
    );

    // Payloads must be I-JSON; uids follow the credential rule.
    for (payload, field) in [(r#""\ud800""#, "payload"), (r#"{"n":1e999999}"#, "payload")] {
        let body = format!(r#"{{"audience":{{"uids":["x"]}},"payload":{payload}}}"#);
        let (status, answer) = server.push_with_key(Some(key), body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["field"], field);
    }
    let (status, answer) = server
        .push(json!({"audience": {"uids": ["carl\u{0}evil"]}, "payload": 1}))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "audience.uids[0]");
}

/// Finding 2: the gRPC ports (a gateway's push API, a node's internal API) close connections
/// that never send the HTTP/2 preface, and hold no more than their cap.
#[tokio::test]
async fn grpc_ports_close_connections_that_never_speak() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let limits = [
        ("PIGEON_LIMITS__CONNECTION_IDLE_TIMEOUT", "1s"),
        ("PIGEON_LIMITS__MAX_GRPC_CONNECTIONS", "50"),
    ];
    let node = NodeProcess::start(&deployment, &limits);
    let gateway = GatewayProcess::start(&deployment, &limits);
    for port in [&node.grpc_addr, &gateway.grpc_addr] {
        let mut silent = Vec::new();
        for _ in 0..200 {
            silent.push(TcpStream::connect(port.as_str()).await.expect("connect"));
        }
        let started = Instant::now();
        for stream in &mut silent {
            let (_, closed) = read_until_closed(stream, Duration::from_secs(4)).await;
            assert!(closed, "a silent connection to {port} was still open");
        }
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    // Real calls still go through.
    let pushed = gateway.push_to(&["nobody"], json!({"n": 1})).await;
    assert_eq!(pushed["targets"]["unknown"], 1, "{pushed}");

    // Finding 9: a priority outside the enum is INVALID_ARGUMENT naming the field.
    use pigeon_proto::push::PushRequest;
    use pigeon_proto::push::push_client::PushClient;
    let mut client = PushClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .expect("gRPC connect");
    let request = support::cluster::with_api_key(PushRequest {
        uids: vec!["nobody".into()],
        payload_json: "{}".into(),
        priority: 99,
        ..PushRequest::default()
    });
    let status = client.push(request).await.expect_err("priority 99");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("priority:"),
        "{}",
        status.message()
    );
}

/// Finding 4: a node's internal API takes calls only with the cluster's secret, and cluster
/// mode does not start without one.
#[tokio::test]
async fn the_internal_api_needs_the_cluster_secret() {
    use pigeon_proto::cluster::node_client::NodeClient;
    use pigeon_proto::cluster::{DeliverRequest, DeliverTarget, TakeoverRequest};

    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let deployment = Deployment::single(&redis);
    let node = NodeProcess::start(&deployment, &[]);
    let mut client = NodeClient::connect(format!("http://{}", node.grpc_addr))
        .await
        .expect("connect");
    let forged = || DeliverRequest {
        message: Some(pigeon_proto::store::StoredMessage {
            message_id: "forged".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            ..Default::default()
        }),
        targets: vec![DeliverTarget {
            token: "any".into(),
            seq: 3000,
        }],
        app: "demo".into(),
    };
    for authorization in [
        None,
        Some("Bearer not-the-secret"),
        Some("Bearer cluster-test-shared-secret-012345678"),
    ] {
        let mut request = tonic::Request::new(forged());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
        }
        let status = client.deliver(request).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{authorization:?}"
        );
        let mut takeover = tonic::Request::new(TakeoverRequest {
            token: "any".into(),
            connection_id: 1,
            close_code: 0,
        });
        if let Some(value) = authorization {
            takeover
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
        }
        let status = client.takeover(takeover).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    let mut request = tonic::Request::new(forged());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {CLUSTER_SECRET}").parse().expect("ascii"),
    );
    let answer = client.deliver(request).await.expect("the secret opens it");
    assert_eq!(answer.into_inner().statuses.len(), 1);

    // No secret, no cluster process.
    for role in ["node", "gateway"] {
        let output = deployment
            .command(role, &[("PIGEON_CLUSTER__SECRET", "")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("cluster.secret"), "{stderr}");
    }
}

/// Finding 5: a device token is no bearer key to another user's queue. Presented with a
/// credential of another uid it is not resumed: that device gets a token of its own, and the
/// owner keeps its queue, its pushes and its connection.
#[tokio::test]
async fn a_device_token_is_bound_to_its_uid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let bob = connect(&server, "bob2", &DeviceState::default()).await;
    let bob_state = DeviceState {
        device_token: bob.welcome().device_token.clone(),
        last_seq: 0,
        ..DeviceState::default()
    };
    bob.close().await;
    for n in 1..=3 {
        let answer = server.push_to("bob2", json!({"n": n})).await;
        assert_eq!(answer["targets"]["stored"], 1, "{answer}");
    }
    // alice2 presents bob2's token.
    let mut alice = connect(&server, "alice2", &bob_state).await;
    assert!(!alice.welcome().resumed);
    assert_ne!(alice.welcome().device_token, bob_state.device_token);
    assert_eq!(alice.welcome().acked_seq, 0);
    support::assert_no_push(&mut alice, Duration::from_millis(300)).await;
    // Pushes to bob2 still find his device; bob2 resumes and gets all four, in order.
    let answer = server.push_to("bob2", json!({"n": 4})).await;
    assert_eq!(answer["targets"]["stored"], 1, "{answer}");
    assert_eq!(answer["targets"]["unknown"], 0, "{answer}");
    let mut bob = connect(&server, "bob2", &bob_state).await;
    assert!(bob.welcome().resumed);
    for n in 1..=4u64 {
        let push = support::next_push(&mut bob).await;
        assert_eq!(push.seq, n);
        assert_eq!(support::payload(&push)["n"], n);
    }
    // alice2's device was not replaced, and gets its own pushes.
    server.push_to("alice2", json!({"for": "alice"})).await;
    let push = support::next_push(&mut alice).await;
    assert_eq!(support::payload(&push)["for"], "alice");
}

/// Finding 3: sockets that never send Hello (or never even upgrade) cannot keep devices
/// out. They do not count against `max_connections`; when they fill the handshake places,
/// the oldest is evicted once it has been at it for a second (a rush of newer sockets waits
/// until then), and `/metrics` shows them.
#[tokio::test]
async fn silent_sockets_do_not_keep_devices_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            ("PIGEON_LIMITS__MAX_CONNECTIONS", "100"),
            ("PIGEON_LIMITS__MAX_HANDSHAKES", "50"),
            ("PIGEON_LIMITS__HANDSHAKE_TIMEOUT", "10s"),
        ],
    );
    let device_port = address(&server.ws_url);
    // 50 sockets that say nothing take every place.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(&device_port).await.expect("connect"));
    }
    support::await_metric(&server, "pigeon_handshakes", 50).await;
    // A rush of newcomers while the places are young: they wait (in the listen backlog),
    // neither closed nor evicting.
    let mut rush = Vec::new();
    for _ in 0..30 {
        rush.push(TcpStream::connect(&device_port).await.expect("connect"));
    }
    for stream in &mut rush {
        assert!(!read_until_closed(stream, Duration::from_millis(20)).await.1);
    }
    support::await_metric(&server, "pigeon_handshakes_waited_total", 1).await;
    assert_eq!(
        support::metric(&server, "pigeon_handshakes_evicted_total").await,
        Some(0)
    );
    // A second later the silent sockets are old: the waiting ones, and newcomers, evict
    // them. 20 upgrade and then say nothing either; a real device gets in within a second
    // or so.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut upgraded = Vec::new();
    for _ in 0..20 {
        upgraded.push(support::raw_websocket(&server).await);
    }
    let started = Instant::now();
    let device = connect(&server, "real", &DeviceState::default()).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        support::metric(&server, "pigeon_connections").await,
        Some(1)
    );
    let mut closed = 0;
    for stream in &mut silent {
        closed += usize::from(read_until_closed(stream, Duration::from_millis(50)).await.1);
    }
    assert!(closed >= 21, "only {closed} silent sockets were evicted");
    // Once the upgraded ones are old too, newcomers evict them with 1013.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut newcomers = Vec::new();
    for _ in 0..50 {
        newcomers.push(TcpStream::connect(&device_port).await.expect("connect"));
    }
    let codes = futures_util::future::join_all(
        upgraded
            .iter_mut()
            .map(|stream| support::close_code_after(stream, None)),
    )
    .await;
    assert!(
        codes.contains(&Some(1013)),
        "no upgraded socket heard 1013: {codes:?}"
    );
    assert!(support::metric(&server, "pigeon_handshakes_evicted_total").await >= Some(21));
    drop(device);
}

/// Finding 6: past the connection limit every device hears 1013, none a bare EOF: at most
/// 64 are refused at once, the rest wait in the listen backlog for their turn.
#[tokio::test]
async fn past_the_limit_every_device_hears_1013() {
    use pigeon_client::{ClientError, Connection};

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("PIGEON_LIMITS__MAX_CONNECTIONS", "100")]);
    let options = server.options();
    let attempts = (0..300).map(|n| {
        let credential = server.credential(&format!("crowd{n}"));
        let url = server.ws_url.clone();
        let options = options.clone();
        async move {
            Connection::connect_with(&url, &credential, &DeviceState::default(), &options).await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut welcomed = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok(connection) => welcomed.push(connection),
            Err(ClientError::Closed { code: 1013, .. }) => refused += 1,
            Err(other) => panic!("a device got neither a Welcome nor 1013: {other:?}"),
        }
    }
    assert_eq!(welcomed.len(), 100);
    assert_eq!(refused, 200);
}

/// Key rotation: during it the previous API key and the previous secret work beside the
/// new ones (a `kid` selects the secret); once they are removed from the config, what they
/// sign is refused. Finding 13's credential checks too: `nbf` and the longest lifetime.
#[tokio::test]
async fn keys_rotate_without_downtime() {
    use pigeon_client::{ClientError, Connection};
    use pigeon_proto::credential::{self, Key};

    const OLD_SECRET: &str = "old-secret-0123456789abcdef0123456789";
    const NEW_SECRET: &str = "new-secret-0123456789abcdef0123456789";
    let rotating = [
        ("PIGEON_APPS__0__ID", "news"),
        ("PIGEON_APPS__0__API_KEY", "pk_new_0123456789abcdef"),
        ("PIGEON_APPS__0__SECRET", NEW_SECRET),
        ("PIGEON_APPS__0__KID", "2026-11"),
        // The rotation's half, dropped from the config once it is done:
        (
            "PIGEON_APPS__0__PREVIOUS_API_KEY",
            "pk_old_0123456789abcdef",
        ),
        ("PIGEON_APPS__0__PREVIOUS_SECRET", OLD_SECRET),
        ("PIGEON_APPS__0__PREVIOUS_KID", "2026-05"),
    ];
    let old_key = Key {
        secret: OLD_SECRET.as_bytes(),
        kid: Some("2026-05"),
    };
    let new_key = Key {
        secret: NEW_SECRET.as_bytes(),
        kid: Some("2026-11"),
    };
    let unnamed_old = Key {
        secret: OLD_SECRET.as_bytes(),
        kid: None,
    };
    let now = pigeon_server::message::unix_millis() / 1000;
    let mint = |key: Key<'_>, ttl: u64| credential::mint("news", key, "reader", now, ttl);
    let push = json!({"audience": {"uids": ["reader"]}, "payload": 1}).to_string();

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &rotating);
    for api_key in ["pk_new_0123456789abcdef", "pk_old_0123456789abcdef"] {
        let (status, answer) = server.push_with_key(Some(api_key), push.clone()).await;
        assert_eq!(status, 202, "{api_key}: {answer}");
    }
    let options = server.options();
    for key in [old_key, new_key, unnamed_old] {
        let credential = mint(key, 600);
        let device = Connection::connect_with(
            &server.ws_url,
            &credential,
            &DeviceState::default(),
            &options,
        )
        .await;
        assert!(device.is_ok(), "{key:?}: {:?}", device.err());
    }
    // A credential that lives past limits.max_credential_lifetime (7 days) is refused.
    let forever = mint(new_key, 365 * 86_400);
    let refused =
        Connection::connect_with(&server.ws_url, &forever, &DeviceState::default(), &options).await;
    assert!(
        matches!(refused, Err(ClientError::Closed { code: 4001, .. })),
        "{:?}",
        refused.err()
    );
    drop(server);

    // The rotation is done: the previous key and secret are gone from the config.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &rotating[..4]);
    let (status, _) = server
        .push_with_key(Some("pk_old_0123456789abcdef"), push.clone())
        .await;
    assert_eq!(status, 401);
    let (status, _) = server
        .push_with_key(Some("pk_new_0123456789abcdef"), push)
        .await;
    assert_eq!(status, 202);
    for key in [old_key, unnamed_old] {
        let refused = Connection::connect_with(
            &server.ws_url,
            &mint(key, 600),
            &DeviceState::default(),
            &server.options(),
        )
        .await;
        assert!(
            matches!(refused, Err(ClientError::Closed { code: 4001, .. })),
            "{key:?}: {:?}",
            refused.err()
        );
    }
}

/// Finding 13: `/metrics` can be kept private with a token; `/healthz` stays open.
#[tokio::test]
async fn metrics_can_be_kept_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "metrics-token-0123456789";
    let server = Server::start(dir.path(), &[("PIGEON_METRICS_TOKEN", token)]);
    let client = reqwest::Client::new();
    let url = format!("{}/metrics", server.http_url);
    let anonymous = client.get(&url).send().await.expect("metrics");
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = client
        .get(&url)
        .bearer_auth("metrics-token-012345678")
        .send()
        .await;
    assert_eq!(wrong.expect("metrics").status(), 401);
    let allowed = client
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .expect("metrics");
    assert_eq!(allowed.status(), 200);
    assert!(
        allowed
            .text()
            .await
            .expect("text")
            .contains("pigeon_connections")
    );
    let health = client
        .get(format!("{}/healthz", server.http_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

/// Per-address limits on the device port (off by default): one address holds at most
/// `max_connections_per_ip` sockets and opens at most `connects_per_ip_per_second`; other
/// addresses are not affected.
#[tokio::test]
async fn one_address_cannot_take_the_device_port() {
    async fn connect_from(source: [u8; 4], port: &str) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from((source, 0)))
            .expect("bind a loopback source address");
        socket
            .connect(port.parse().expect("address"))
            .await
            .expect("connect")
    }
    async fn closed_at_once(stream: &mut TcpStream) -> bool {
        read_until_closed(stream, Duration::from_millis(300))
            .await
            .1
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[("PIGEON_LIMITS__MAX_CONNECTIONS_PER_IP", "5")],
    );
    let port = address(&server.ws_url);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from([127, 0, 0, 2], &port).await);
    }
    let mut sixth = connect_from([127, 0, 0, 2], &port).await;
    assert!(closed_at_once(&mut sixth).await, "a sixth socket was kept");
    for stream in &mut held {
        assert!(
            !closed_at_once(stream).await,
            "a socket within the limit was closed"
        );
    }
    // Another address is not affected.
    let mut other = connect_from([127, 0, 0, 3], &port).await;
    assert!(!closed_at_once(&mut other).await);
    drop(server);

    // 20 connects at once from one address: at most 8 a second are taken (so at most 16
    // over the one or two seconds the burst may straddle).
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[("PIGEON_LIMITS__CONNECTS_PER_IP_PER_SECOND", "8")],
    );
    let port = address(&server.ws_url);
    let mut burst = Vec::new();
    for _ in 0..20 {
        burst.push(connect_from([127, 0, 0, 4], &port).await);
    }
    let closed = futures_util::future::join_all(burst.iter_mut().map(closed_at_once)).await;
    let refused = closed.iter().filter(|closed| **closed).count();
    assert!(refused >= 4, "only {refused} of 20 connects were refused");
    assert!(refused <= 12, "{refused} of 20 connects were refused");
}
