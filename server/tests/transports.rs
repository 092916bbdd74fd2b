//! What is particular to the secure transports: QUIC connection migration, certificate
//! failures on both sides, plaintext on a TLS port, and the per-node and per-device limits.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pigeon_client::{ClientError, ConnectOptions, Connection, DeviceState};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(server: &Server) -> String {
    reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

#[tokio::test]
async fn a_quic_device_that_changes_its_address_keeps_its_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(Transport::Quic, dir.path(), &[]);
    let mut device = connect(&server, "rita", &DeviceState::default()).await;
    server.push_to("rita", json!("before the move")).await;
    let first = next_push(&mut device).await;
    device.ack(first.seq).await.expect("ack");

    // The phone moves from Wi-Fi to cellular: a new UDP socket, a new port.
    let before = device.local_addr().expect("a QUIC address");
    device.rebind().expect("rebind");
    let after = device.local_addr().expect("a QUIC address");
    assert_ne!(before.port(), after.port());

    // The node follows: same connection, same session, the next push arrives.
    server.push_to("rita", json!("after the move")).await;
    let second = next_push(&mut device).await;
    assert_eq!((second.seq, payload(&second)), (2, json!("after the move")));
    device.ack(second.seq).await.expect("ack over the new path");
    assert!(metrics(&server).await.contains("pigeon_connections 1\n"));
}

#[tokio::test]
async fn an_untrusted_certificate_or_a_wrong_name_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(Transport::Quic, dir.path(), &[]);
    let stranger = pigeon_server::tls::write_dev_certificate(&dir.path().join("stranger"))
        .expect("another CA");
    let credential = server.credential("sam");
    let quic_url = server.quic_url.clone().expect("quic url");
    for url in [server.ws_url.as_str(), quic_url.as_str()] {
        let untrusted = ConnectOptions {
            ca_file: Some(stranger.ca.clone()),
            ..ConnectOptions::default()
        };
        let wrong_name = ConnectOptions {
            server_name: Some("pigeon.invalid".into()),
            ..server.options()
        };
        for options in [untrusted, wrong_name] {
            let result = tokio::time::timeout(
                WAIT,
                Connection::connect_with(url, &credential, &DeviceState::default(), &options),
            )
            .await
            .expect("a failed handshake must not hang");
            match result {
                Err(ClientError::Tls(message)) => {
                    assert!(message.contains("certificate"), "{url}: {message}");
                }
                Err(other) => panic!("{url}: expected a TLS error, got {other:?}"),
                Ok(_) => panic!("{url}: connected with {options:?}"),
            }
            assert!(!ClientError::Tls(String::new()).is_retryable());
        }
    }
    // The server is unharmed and serves a device that trusts it.
    let mut device = connect(&server, "sam", &DeviceState::default()).await;
    server.push_to("sam", json!("fine")).await;
    assert_eq!(payload(&next_push(&mut device).await), json!("fine"));
}

#[tokio::test]
async fn plaintext_on_the_tls_port_fails_cleanly_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(Transport::Wss, dir.path(), &[]);
    let address = server
        .ws_url
        .trim_start_matches("wss://")
        .trim_end_matches('/')
        .to_owned();

    // A client speaking plain WebSocket to the wss port gets an error, not a hang.
    let plain_url = format!("ws://{address}/");
    let result = tokio::time::timeout(
        WAIT,
        Connection::connect(
            &plain_url,
            &server.credential("tom"),
            &DeviceState::default(),
        ),
    )
    .await
    .expect("plaintext must not hang");
    assert!(
        matches!(result, Err(ClientError::Io(_))),
        "{:?}",
        result.err()
    );

    // The server drops a plaintext socket at once, well before its handshake deadline.
    let mut tcp = tokio::net::TcpStream::connect(&address).await.expect("tcp");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 256];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // a TLS alert, then the close
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a plaintext socket open");

    let mut device = connect(&server, "tom", &DeviceState::default()).await;
    server.push_to("tom", json!("still serving")).await;
    assert_eq!(
        payload(&next_push(&mut device).await),
        json!("still serving")
    );
}

#[tokio::test]
async fn past_the_connection_limit_new_devices_are_refused_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(
        Transport::Quic,
        dir.path(),
        &[("PIGEON_LIMITS__MAX_CONNECTIONS", "2")],
    );
    let credential = server.credential("una");
    let options = server.options();
    let quic_url = server.quic_url.clone().expect("quic url");
    // The limit is the node's, over both listeners: a wss and a QUIC device fill it, and
    // the next one on each is refused.
    let _ws = Connection::connect_with(
        &server.ws_url,
        &credential,
        &DeviceState::default(),
        &options,
    )
    .await
    .expect("first wss device");
    let _quic = Connection::connect_with(&quic_url, &credential, &DeviceState::default(), &options)
        .await
        .expect("first QUIC device");
    match Connection::connect_with(
        &server.ws_url,
        &credential,
        &DeviceState::default(),
        &options,
    )
    .await
    {
        Err(ClientError::Closed { code, reason }) => {
            assert_eq!(code, 1013, "{reason}");
        }
        other => panic!("expected 1013, got {:?}", other.err()),
    }
    let refused =
        Connection::connect_with(&quic_url, &credential, &DeviceState::default(), &options).await;
    match refused {
        Err(ClientError::Io(message)) => assert!(message.contains("refused"), "{message}"),
        other => panic!("expected a refused QUIC connection, got {:?}", other.err()),
    }
}

/// A raw QUIC connection to the server that trusts its development CA.
async fn raw_quic(server: &Server) -> (quinn::Endpoint, quinn::Connection) {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = server.ca.clone().expect("a CA");
    for certificate in CertificateDer::pem_file_iter(&ca).expect("ca file") {
        roots.add(certificate.expect("certificate")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(pigeon_server::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![pigeon_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let address = server
        .quic_url
        .as_deref()
        .expect("quic url")
        .trim_start_matches("quic://")
        .trim_end_matches('/')
        .parse()
        .expect("socket address");
    let connection = endpoint
        .connect(address, "localhost")
        .expect("connect")
        .await
        .expect("QUIC handshake");
    (endpoint, connection)
}

fn application_close(error: &quinn::ConnectionError) -> Option<u64> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test]
async fn a_quic_device_gets_one_control_stream_and_a_handshake_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(
        Transport::Quic,
        dir.path(),
        &[("PIGEON_LIMITS__HANDSHAKE_TIMEOUT", "1500ms")],
    );
    // A connection that never opens its stream is closed at the deadline (4002).
    let (_endpoint, idle) = raw_quic(&server).await;
    let error = tokio::time::timeout(WAIT, idle.closed())
        .await
        .expect("closed in time");
    assert_eq!(application_close(&error), Some(4002), "{error}");

    // The transport parameters allow one bidirectional stream and no unidirectional one:
    // a second stream (or a uni stream) cannot even be opened.
    let (_endpoint, connection) = raw_quic(&server).await;
    let (mut send, _recv) = connection.open_bi().await.expect("the control stream");
    send.write_all(b"").await.expect("write");
    // (Both checks finish well within the 1.5 s handshake deadline, so the connection is
    // still open: a stream that cannot be opened waits for credit that never comes.)
    let second = tokio::time::timeout(Duration::from_millis(300), connection.open_bi()).await;
    assert!(second.is_err(), "a second bidirectional stream was allowed");
    let uni = tokio::time::timeout(Duration::from_millis(300), connection.open_uni()).await;
    assert!(uni.is_err(), "a unidirectional stream was allowed");
    assert!(
        connection.close_reason().is_none(),
        "closed too early to prove anything"
    );
}

#[tokio::test]
async fn garbage_on_the_quic_stream_closes_with_a_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_over(Transport::Quic, dir.path(), &[]);
    for (bytes, code) in [
        (vec![0x03, 0xff, 0xff, 0xff], 1002u64), // a 3-byte frame that is no protobuf
        (vec![0xff, 0xff, 0x03], 1009),          // a 64 KiB frame announced
    ] {
        let (_endpoint, connection) = raw_quic(&server).await;
        let (mut send, _recv) = connection.open_bi().await.expect("stream");
        send.write_all(&bytes).await.expect("write");
        let error = tokio::time::timeout(WAIT, connection.closed())
            .await
            .expect("closed");
        assert_eq!(application_close(&error), Some(code), "{error}");
    }
}

#[tokio::test]
async fn the_dev_certificate_cli_and_bad_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["cert", "--dev", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("pigeon cert");
    assert!(status.success());
    for file in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(out.join(file).exists(), "{file} missing");
    }

    let run = |env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pigeon"));
        command
            .arg("standalone")
            .env("PIGEON_DATA_DIR", dir.path().join("data"))
            .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
            .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0");
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().expect("run pigeon");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = run(&[("PIGEON_LISTEN__QUIC", "127.0.0.1:0")]);
    assert!(stderr.contains("listen.quic"), "{stderr}");
    let missing = out.join("nope.pem");
    let stderr = run(&[
        ("PIGEON_TLS__CERT", missing.to_str().expect("utf8")),
        (
            "PIGEON_TLS__KEY",
            out.join("key.pem").to_str().expect("utf8"),
        ),
    ]);
    assert!(stderr.contains("nope.pem"), "{stderr}");
}
