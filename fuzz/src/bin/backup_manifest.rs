//! Backup manifest: the upload body a device sends, its staged parts and the head.
use tandem_proto::backup::{BackupHead, BackupUpload, ManifestPart};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(u) = serde_json::from_slice::<BackupUpload>(data) {
            let _ = u.manifest.validate();
            if let Some(s) = &u.staged {
                let _ = tandem_proto::backup::valid_upload_id(&s.upload);
            }
        }
        let _ = serde_json::from_slice::<ManifestPart>(data);
        let _ = serde_json::from_slice::<BackupHead>(data);
    });
}
