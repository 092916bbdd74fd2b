//! Admission: a new connection's Hello before the handshake deadline, its credential, and
//! its device token resolved (or issued) by the registry.

use std::net::SocketAddr;
use std::time::Instant;

use pigeon_proto::CloseCode;
use pigeon_proto::credential;
use pigeon_proto::device::Hello;

use super::transport::DeviceTransport;
use super::{DeviceContext, Ending};
use crate::log_throttle::Throttle;
use crate::session::{Admission, Handshake, SessionError};

/// Reads the Hello before the handshake deadline and admits the device; otherwise, why the
/// connection ends.
pub(crate) async fn admit<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    accepted: Instant,
    peer: SocketAddr,
) -> Result<Admission, Ending> {
    let handshake = Handshake::new(accepted, &context.session);
    let deadline = tokio::time::Instant::from_std(handshake.deadline());
    let hello = match tokio::time::timeout_at(deadline, transport.recv()).await {
        Err(_elapsed) => {
            let error = handshake
                .handle_timeout(Instant::now())
                .err()
                .unwrap_or(SessionError::HandshakeTimeout);
            return Err(Ending::session(error));
        }
        Ok(Err(error)) => return Err(Ending::transport(error)),
        Ok(Ok(None)) => return Err(Ending::gone("closed before its Hello")),
        Ok(Ok(Some(frame))) => handshake.handle_frame(frame).map_err(Ending::session)?,
    };
    resolve(context, hello, peer).await
}

/// Checks the credential and resolves the device token.
async fn resolve(
    context: &DeviceContext,
    hello: Hello,
    peer: SocketAddr,
) -> Result<Admission, Ending> {
    let now_secs = crate::message::unix_millis() / 1000;
    let secret_of = |id: &str| context.app(id).map(|app| app.secret.as_bytes());
    let claims = credential::verify(&hello.credential, secret_of, now_secs)
        .map_err(|error| Ending::session(SessionError::Unauthorized(error.to_string())))?;
    let device = match context
        .store
        .admit_device(&claims.app, &claims.sub, &hello.device_token)
        .await
    {
        Ok(device) => device,
        Err(error) => {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, %peer, suppressed, "admitting a device failed");
            }
            return Err(Ending::close(
                CloseCode::InternalError,
                "registry unavailable",
            ));
        }
    };
    tracing::debug!(
        uid = %claims.sub,
        device.token = %device.token,
        resumed = device.resumed,
        "device connected"
    );
    Ok(Admission {
        device_token: device.token,
        resumed: device.resumed,
        acked_seq: device.acked_seq,
        highest_seq: device.highest_seq,
        client_last_seq: hello.last_seq,
    })
}
