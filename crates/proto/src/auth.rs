//! Per-request device signatures: how a device proves who it is on every HTTP request,
//! without a bearer secret that another device could replay.
//!
//! The device signs, with the ed25519 key it generated at enrollment,
//! `b"tandem-request-v1\0" || METHOD || "\n" || PATH_AND_QUERY || "\n" || TIME || "\n" ||
//! NONCE || "\n" || hex(BLAKE3(body))` and sends the pieces in the headers below. The
//! server checks the signature against the key bound to the device, that `TIME` is within
//! [`MAX_SKEW_SECS`] of its clock, that the nonce was not seen in that window, and the
//! device's current status (a killed device is refused).

/// Header carrying the device id.
pub const HEADER_DEVICE: &str = "x-tandem-device";
/// Header carrying the signing time, unix seconds.
pub const HEADER_TIME: &str = "x-tandem-time";
/// Header carrying a random nonce (hex, 16 bytes), unique per request.
pub const HEADER_NONCE: &str = "x-tandem-nonce";
/// Header carrying the base64 ed25519 signature.
pub const HEADER_SIGNATURE: &str = "x-tandem-signature";
/// How far a request's time may be from the server's clock.
pub const MAX_SKEW_SECS: u64 = 300;

/// The exact bytes a device signs for one request.
pub fn request_message(
    method: &str,
    path_and_query: &str,
    time: u64,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    let body_hash = blake3::hash(body).to_hex();
    format!(
        "tandem-request-v1\0{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        time,
        nonce,
        body_hash
    )
    .into_bytes()
}

/// The four header values that authenticate one request.
#[derive(Debug, Clone)]
pub struct RequestSignature {
    /// Value of [`HEADER_DEVICE`].
    pub device: String,
    /// Value of [`HEADER_TIME`].
    pub time: u64,
    /// Value of [`HEADER_NONCE`].
    pub nonce: String,
    /// Value of [`HEADER_SIGNATURE`].
    pub signature: String,
}

impl RequestSignature {
    /// Signs one request as `device` with its key.
    pub fn sign(
        key: &crate::SigningKey,
        device: &str,
        method: &str,
        path_and_query: &str,
        time: u64,
        body: &[u8],
    ) -> Self {
        use base64::Engine as _;
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let msg = request_message(method, path_and_query, time, &nonce, body);
        RequestSignature {
            device: device.to_string(),
            time,
            nonce,
            signature: base64::engine::general_purpose::STANDARD.encode(key.sign_raw(&msg)),
        }
    }

    /// Checks the signature with the device's bound key (time, nonce and status are the
    /// server's to check).
    pub fn verify(
        &self,
        key: &crate::PublicKey,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<(), crate::SignError> {
        use base64::Engine as _;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|e| crate::SignError::MalformedSignature(e.to_string()))?;
        let msg = request_message(method, path_and_query, self.time, &self.nonce, body);
        key.verify_raw(&msg, &sig)
            .map_err(|_| crate::SignError::BadSignature("request".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_signature_binds_method_path_and_body() {
        let key = crate::SigningKey::generate();
        let s = RequestSignature::sign(&key, "dev1", "post", "/v1/checkin", 100, b"{}");
        s.verify(&key.public(), "POST", "/v1/checkin", b"{}")
            .expect("verifies");
        assert!(s
            .verify(&key.public(), "POST", "/v1/checkin", b"{1}")
            .is_err());
        assert!(s
            .verify(&key.public(), "GET", "/v1/checkin", b"{}")
            .is_err());
        assert!(s.verify(&key.public(), "POST", "/v1/other", b"{}").is_err());
        let other = crate::SigningKey::generate();
        assert!(s
            .verify(&other.public(), "POST", "/v1/checkin", b"{}")
            .is_err());
    }
}
