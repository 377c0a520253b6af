//! The result model: every file and every volume ends clean, infected, or not scanned with
//! a reason. "Could not read" is never "clean".

use serde::{Deserialize, Serialize};
use tandem_disk::{FsKind, TableKind};

/// Version of the JSON report (`format` = `tandem-scan-report`). Add fields, never change
/// the meaning of one; bump on a breaking change.
pub const REPORT_VERSION: u32 = 1;

/// Why a file or a volume was not scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The filesystem uses a feature the reader does not implement (ext4 `inline_data`…).
    FsUnsupportedFeature,
    /// NTFS-compressed file.
    NtfsCompressed,
    /// NTFS EFS-encrypted file.
    NtfsEncrypted,
    /// LUKS or BitLocker inside the guest: the content is ciphertext to us.
    EncryptedVolume,
    /// No filesystem we recognize on the volume (or swap, LVM).
    UnknownFilesystem,
    /// Larger than the per-file size cap.
    TooLarge,
    /// A time budget (file, volume, worker) ran out.
    Timeout,
    /// The on-disk structures are damaged or hostile.
    ParseError,
    /// Reading the disk failed (truncated image, I/O error).
    ReadError,
    /// The scan worker died (memory or CPU limit, crash) before reporting.
    WorkerFailed,
    /// Volume only: some of its files were not scanned (see the files).
    FilesNotScanned,
}

impl Reason {
    /// The snake_case name used in JSON and human output.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FsUnsupportedFeature => "fs_unsupported_feature",
            Reason::NtfsCompressed => "ntfs_compressed",
            Reason::NtfsEncrypted => "ntfs_encrypted",
            Reason::EncryptedVolume => "encrypted_volume",
            Reason::UnknownFilesystem => "unknown_filesystem",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
            Reason::ParseError => "parse_error",
            Reason::ReadError => "read_error",
            Reason::WorkerFailed => "worker_failed",
            Reason::FilesNotScanned => "files_not_scanned",
        }
    }
}

/// One engine hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    /// `rule` (YARA-X) or `sha256` (blocklist).
    pub engine: String,
    /// Rule identifier (`namespace:rule`) or the blocklist entry's name.
    pub name: String,
}

/// The outcome for one file or volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Read completely and matched nothing.
    Clean,
    /// Matched at least one rule or blocklisted hash.
    Infected {
        /// What matched.
        hits: Vec<Hit>,
    },
    /// Not (completely) read or matched.
    NotScanned {
        /// Machine-readable reason.
        reason: Reason,
        /// For people.
        detail: String,
    },
}

impl Verdict {
    /// Shorthand for a not-scanned verdict.
    pub fn not_scanned(reason: Reason, detail: impl Into<String>) -> Self {
        Verdict::NotScanned {
            reason,
            detail: detail.into(),
        }
    }
}

/// One file (or NTFS alternate data stream, shown as `path:stream`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResult {
    /// Path inside the volume, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// The outcome.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// SHA-256 of the content, when computed (blocklist in use, or the file is infected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// True when rule matching was skipped because an earlier clean scan saw the same
    /// file with the same content hash under the same rules.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// Counters for a volume or a whole scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Regular files (and data streams) seen.
    pub files: u64,
    /// Files clean.
    pub clean: u64,
    /// Files infected.
    pub infected: u64,
    /// Files not scanned.
    pub not_scanned: u64,
    /// Clean files whose rule matching was skipped (incremental).
    pub unchanged: u64,
    /// Bytes of file content read.
    pub bytes: u64,
}

impl Counts {
    /// Adds another set of counters.
    pub fn add(&mut self, o: &Counts) {
        self.files += o.files;
        self.clean += o.clean;
        self.infected += o.infected;
        self.not_scanned += o.not_scanned;
        self.unchanged += o.unchanged;
        self.bytes += o.bytes;
    }
}

/// One volume (partition or whole disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeResult {
    /// Partition number (0 = whole disk).
    pub index: u32,
    /// Where it was found.
    pub table: TableKind,
    /// Offset on the disk, bytes.
    pub start: u64,
    /// Length, bytes.
    pub len: u64,
    /// What it holds.
    pub fs: FsKind,
    /// The volume's outcome: infected if any file is, not scanned if the volume or any
    /// file could not be scanned, clean only when every file was read and matched nothing.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Counters.
    pub counts: Counts,
    /// Infected and not-scanned files (and clean ones when asked for).
    pub files: Vec<FileResult>,
    /// Wall-clock milliseconds.
    pub millis: u64,
}

impl VolumeResult {
    /// Sets the volume verdict from its files, unless the volume already failed.
    pub fn settle(&mut self) {
        if matches!(self.verdict, Verdict::NotScanned { .. }) && self.counts.infected == 0 {
            return;
        }
        let mut hits: Vec<Hit> = Vec::new();
        for f in &self.files {
            if let Verdict::Infected { hits: h } = &f.verdict {
                for x in h {
                    if !hits.contains(x) {
                        hits.push(x.clone());
                    }
                }
            }
        }
        self.verdict = if !hits.is_empty() {
            Verdict::Infected { hits }
        } else if self.counts.not_scanned > 0 {
            Verdict::not_scanned(
                Reason::FilesNotScanned,
                format!("{} file(s) not scanned", self.counts.not_scanned),
            )
        } else {
            Verdict::Clean
        };
    }
}

/// The overall outcome, which the CLI maps to its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Everything was read and nothing matched (exit 0).
    Clean,
    /// Something matched (exit 1), whether or not the scan was complete.
    Infected,
    /// Nothing matched but something could not be scanned (exit 2).
    Incomplete,
}

/// Rules a scan ran with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesInfo {
    /// Where they came from (file, bundle version, built-in).
    pub source: String,
    /// SHA-256 over the rule sources and blocklist: incremental state is only reused
    /// under the same digest.
    pub digest: String,
    /// Number of YARA rules.
    pub rules: usize,
    /// Number of blocklisted hashes.
    pub blocklist: usize,
}

/// A whole scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Always `tandem-scan-report`.
    pub format: String,
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// What was scanned (path, `NAME@VER`, VM name).
    pub target: String,
    /// Guest-visible disk size.
    pub disk_size: u64,
    /// Rules used.
    pub rules: RulesInfo,
    /// Overall outcome.
    pub outcome: Outcome,
    /// Sum over volumes.
    pub counts: Counts,
    /// Per volume.
    pub volumes: Vec<VolumeResult>,
    /// Wall-clock milliseconds.
    pub millis: u64,
}

impl Report {
    /// Builds the report and its outcome from volume results.
    pub fn new(
        target: String,
        disk_size: u64,
        rules: RulesInfo,
        volumes: Vec<VolumeResult>,
        millis: u64,
    ) -> Self {
        let mut counts = Counts::default();
        for v in &volumes {
            counts.add(&v.counts);
        }
        let infected = volumes
            .iter()
            .any(|v| matches!(v.verdict, Verdict::Infected { .. }));
        let incomplete = volumes.is_empty()
            || volumes
                .iter()
                .any(|v| matches!(v.verdict, Verdict::NotScanned { .. }));
        let outcome = if infected {
            Outcome::Infected
        } else if incomplete {
            Outcome::Incomplete
        } else {
            Outcome::Clean
        };
        Report {
            format: "tandem-scan-report".into(),
            version: REPORT_VERSION,
            target,
            disk_size,
            rules,
            outcome,
            counts,
            volumes,
            millis,
        }
    }

    /// Every infected file as `(volume index, path, hits)`.
    pub fn infected_files(&self) -> Vec<(u32, &str, &[Hit])> {
        let mut out = Vec::new();
        for v in &self.volumes {
            for f in &v.files {
                if let Verdict::Infected { hits } = &f.verdict {
                    out.push((v.index, f.path.as_str(), hits.as_slice()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(files: Vec<FileResult>, counts: Counts) -> VolumeResult {
        let mut v = VolumeResult {
            index: 1,
            table: TableKind::Mbr,
            start: 0,
            len: 1,
            fs: FsKind::Ext,
            verdict: Verdict::Clean,
            counts,
            files,
            millis: 0,
        };
        v.settle();
        v
    }

    fn rules() -> RulesInfo {
        RulesInfo {
            source: "t".into(),
            digest: "d".into(),
            rules: 1,
            blocklist: 0,
        }
    }

    #[test]
    fn not_scanned_file_makes_volume_and_report_incomplete_never_clean() {
        let f = FileResult {
            path: "/x".into(),
            size: 1,
            verdict: Verdict::not_scanned(Reason::TooLarge, "big"),
            sha256: None,
            unchanged: false,
        };
        let v = vol(
            vec![f],
            Counts {
                files: 1,
                not_scanned: 1,
                ..Default::default()
            },
        );
        assert!(matches!(
            v.verdict,
            Verdict::NotScanned {
                reason: Reason::FilesNotScanned,
                ..
            }
        ));
        let r = Report::new("t".into(), 1, rules(), vec![v], 0);
        assert_eq!(r.outcome, Outcome::Incomplete);
        assert_eq!(
            Report::new("t".into(), 1, rules(), vec![], 0).outcome,
            Outcome::Incomplete
        );
    }

    #[test]
    fn infected_wins_over_incomplete() {
        let hit = Hit {
            engine: "rule".into(),
            name: "default:eicar".into(),
        };
        let f = FileResult {
            path: "/e".into(),
            size: 68,
            verdict: Verdict::Infected { hits: vec![hit] },
            sha256: None,
            unchanged: false,
        };
        let v1 = vol(
            vec![f],
            Counts {
                files: 1,
                infected: 1,
                ..Default::default()
            },
        );
        let mut v2 = vol(vec![], Counts::default());
        v2.verdict = Verdict::not_scanned(Reason::EncryptedVolume, "luks");
        let r = Report::new("t".into(), 1, rules(), vec![v1, v2], 0);
        assert_eq!(r.outcome, Outcome::Infected);
        assert_eq!(r.infected_files().len(), 1);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["volumes"][0]["verdict"], "infected");
        assert_eq!(json["volumes"][1]["reason"], "encrypted_volume");
    }
}
