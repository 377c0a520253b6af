//! Tandem laptop agent: the device's identity, check-in with the server, the lease gate
//! the corporate VM start calls, and kill execution — all working offline on what the
//! device last received.
//!
//! Directory layout (`<dir>`, default `/var/lib/tandem-agent`):
//! - `identity/`: device key (`device.key`, 0600) and `identity.json` (device id, user,
//!   server URL, pinned server keys) — see [`identity`];
//! - `state/`: `target.json` (last signed target state), `lease.json` (signed lease),
//!   `clock.json` (trusted-time high-water mark), `checkin.json`, `killed.json`;
//! - `store/` + `keys/store.key`: the encrypted chunk store and its data key (image sync);
//! - `keys/`: every piece of corporate key material — a kill shreds this whole tree;
//! - `corporate/`, `personal/`, `vms/`: VM disks and supervisor state (VM orchestration).
//!
//! Every state file is JSON with a `format` tag (`tandem-<name>-v1`) as magic and
//! version; a file with another tag is refused. Every signed artifact is verified against
//! the server key pinned for its kind on every read, not only on arrival.
//!
//! Module map: [`identity`] (enroll, load, request signing), [`checkin`] (one check-in,
//! the run loop, [`checkin::Hooks`] for the VM supervisor), [`images`] (pull assigned
//! versions with the image sync client, signed with the device key), [`lease`] (the
//! gate), [`kill`] (crypto-erase, [`kill::CorporateVms`]), [`status`].

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod backup;
pub mod checkin;
pub mod client;
pub mod daemon;
pub mod escrow;
pub mod fsutil;
pub mod identity;
pub mod images;
pub mod kill;
pub mod laptop;
pub mod lease;
pub mod rules;
pub mod status;
pub mod versions;

use std::path::{Path, PathBuf};

/// The agent's directory and the fixed places inside it.
#[derive(Debug, Clone)]
pub struct AgentDir {
    root: PathBuf,
}

impl AgentDir {
    /// Wraps a directory (created on demand by writers).
    pub fn new(root: impl AsRef<Path>) -> Self {
        AgentDir {
            root: root.as_ref().to_path_buf(),
        }
    }
    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `identity/`.
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }
    /// `state/`.
    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    /// `keys/`: all corporate key material.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    /// `store/`: the encrypted chunk store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// `corporate/`: corporate VM disks.
    pub fn corporate(&self) -> PathBuf {
        self.root.join("corporate")
    }
    /// `personal/`: the personal VM.
    pub fn personal(&self) -> PathBuf {
        self.root.join("personal")
    }
    /// `vms/`: VM supervisor state.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
}

/// Unix seconds by the device clock.
pub use tandem_tools::clock::now_secs as now;

/// Shared test fixture: an enrolled identity with known server keys, no server.
#[cfg(test)]
pub(crate) mod testkit {
    use tandem_proto::fleet::{DeviceId, PinnedKeys};
    use tandem_proto::SigningKey;

    use crate::identity::{save_for_tests, IdentityInfo};
    use crate::AgentDir;

    pub struct Fixture {
        pub _tmp: tempfile::TempDir,
        pub dir: AgentDir,
        pub state_key: SigningKey,
        pub kill_key: SigningKey,
        pub device_key: SigningKey,
        pub device: DeviceId,
    }

    pub fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (state_key, kill_key, device_key) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let device = DeviceId::generate();
        let info = IdentityInfo {
            device,
            user: "alice".into(),
            server: "http://127.0.0.1:1".into(),
            keys: PinnedKeys {
                image: SigningKey::generate().public(),
                state: state_key.public(),
                kill: kill_key.public(),
                rules: SigningKey::generate().public(),
            },
            enrolled_at: 0,
        };
        save_for_tests(tmp.path(), &info, &device_key).expect("save");
        let dir = AgentDir::new(tmp.path());
        Fixture {
            _tmp: tmp,
            dir,
            state_key,
            kill_key,
            device_key,
            device,
        }
    }
}
