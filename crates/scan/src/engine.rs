//! The matching engines: YARA-X rules and a SHA-256 blocklist, plus signed rule bundles.
//!
//! A [`RuleSet`] is the source form (rule texts + blocklist) with a digest; it compiles
//! once per scan into an [`Engine`]. The compiled rules travel to scan workers as a file
//! written by [`Engine::save`]: magic `TANDEM-SCAN-ENGINE\0`, format version (u32 LE),
//! the JSON length (u64 LE), JSON (rules info + blocklist), then YARA-X's own serialized
//! rules to the end. Add a version, never edit version 1.
//!
//! Without the `yara` feature (and in a fuzzing build, `cfg(fuzzing)`) there is no rule
//! engine: [`RuleSet::compile`] refuses YARA sources and only the blocklist matches.
//!
//! Bundles: the server signs a [`RuleBundle`] with its `rules` key as a
//! [`tandem_proto::Signed`] of kind [`BUNDLE_KIND`]; [`RuleSet::from_bundle`] verifies it
//! against the pinned key before a single rule is parsed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tandem_proto::{PublicKey, Signed, SigningKey};

use crate::model::{Hit, RulesInfo};
use crate::ScanError;

/// Kind a rule bundle is signed as (domain separation in [`Signed`]).
pub const BUNDLE_KIND: &str = "scan-rules";
/// Value of [`RuleBundle::format`].
pub const BUNDLE_FORMAT: &str = "tandem-scan-rules-v1";
const ENGINE_MAGIC: &[u8; 19] = b"TANDEM-SCAN-ENGINE\0";
const ENGINE_VERSION: u32 = 1;

/// The EICAR anti-malware test file, the rule used when no other rules are given.
pub const BUILTIN_RULES: &str = r#"rule eicar_test_file {
  meta: description = "EICAR anti-malware test file"
  strings: $e = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
  condition: $e
}
"#;

/// One YARA source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSource {
    /// File name, used as the rule namespace.
    pub name: String,
    /// YARA text.
    pub source: String,
}

/// One blocklisted SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockEntry {
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// What it is.
    pub name: String,
}

/// The payload the server signs and distributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBundle {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// Monotonic bundle version; agents refuse to go backwards.
    pub version: u64,
    /// YARA sources.
    pub rules: Vec<RuleSource>,
    /// SHA-256 blocklist.
    pub blocklist: Vec<BlockEntry>,
}

/// Rules in source form, before compiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Where they came from, for reports.
    pub origin: String,
    /// YARA sources.
    pub rules: Vec<RuleSource>,
    /// SHA-256 blocklist.
    pub blocklist: Vec<BlockEntry>,
}

impl RuleSet {
    /// The built-in EICAR rule only.
    pub fn builtin() -> Self {
        RuleSet {
            origin: "built-in (EICAR test file only)".into(),
            rules: vec![RuleSource {
                name: "builtin".into(),
                source: BUILTIN_RULES.into(),
            }],
            blocklist: Vec::new(),
        }
    }

    /// Rules from `.yar`/`.yara` files or directories of them, plus an optional blocklist
    /// file (`<sha256> [name]` per line, `#` comments).
    pub fn from_paths(rules: &[PathBuf], blocklist: Option<&Path>) -> Result<Self, ScanError> {
        let mut out = RuleSet {
            origin: String::new(),
            rules: Vec::new(),
            blocklist: Vec::new(),
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ScanError::Io { path, source }
        };
        for p in rules {
            let mut files = Vec::new();
            if p.is_dir() {
                for e in std::fs::read_dir(p).map_err(io(p))? {
                    let f = e.map_err(io(p))?.path();
                    if matches!(f.extension().and_then(|x| x.to_str()), Some("yar" | "yara")) {
                        files.push(f);
                    }
                }
                files.sort();
            } else {
                files.push(p.clone());
            }
            for f in files {
                let source = std::fs::read_to_string(&f).map_err(io(&f))?;
                let name = f
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("rules")
                    .to_string();
                out.rules.push(RuleSource { name, source });
            }
        }
        if let Some(b) = blocklist {
            let text = std::fs::read_to_string(b).map_err(io(b))?;
            out.blocklist =
                parse_blocklist(&text).map_err(|(line, detail)| ScanError::Blocklist {
                    path: b.to_path_buf(),
                    line,
                    detail,
                })?;
        }
        if out.rules.is_empty() && out.blocklist.is_empty() {
            return Err(ScanError::NoRules);
        }
        out.origin = rules
            .iter()
            .map(|p| p.display().to_string())
            .chain(blocklist.map(|b| b.display().to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(out)
    }

    /// Verifies a signed bundle against the pinned rules key, then takes its rules.
    pub fn from_bundle(signed: &Signed, trusted: &[PublicKey]) -> Result<(Self, u64), ScanError> {
        let b: RuleBundle = signed
            .verify(BUNDLE_KIND, trusted)
            .map_err(ScanError::Bundle)?;
        if b.format != BUNDLE_FORMAT {
            return Err(ScanError::BundleFormat(b.format));
        }
        for e in &b.blocklist {
            parse_hash(&e.sha256)
                .ok_or_else(|| ScanError::BundleFormat(format!("bad sha256 {:?}", e.sha256)))?;
        }
        Ok((
            RuleSet {
                origin: format!("bundle v{} signed by {}", b.version, signed.key_id),
                rules: b.rules,
                blocklist: b.blocklist,
            },
            b.version,
        ))
    }

    /// Signs these rules as bundle `version` (server side).
    pub fn sign(&self, key: &SigningKey, version: u64) -> Signed {
        key.sign(
            BUNDLE_KIND,
            &RuleBundle {
                format: BUNDLE_FORMAT.into(),
                version,
                rules: self.rules.clone(),
                blocklist: self.blocklist.clone(),
            },
        )
    }

    /// SHA-256 over every source and hash, in order.
    pub fn digest(&self) -> String {
        let mut h = sha2::Sha256::new();
        for r in &self.rules {
            h.update(r.name.as_bytes());
            h.update([0]);
            h.update(r.source.as_bytes());
            h.update([0]);
        }
        h.update([1]);
        for b in &self.blocklist {
            h.update(b.sha256.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }

    /// Compiles the rules (once per scan).
    pub fn compile(&self) -> Result<Engine, ScanError> {
        #[cfg(all(feature = "yara", not(fuzzing)))]
        let rules = {
            let mut c = yara_x::Compiler::new();
            for r in &self.rules {
                c.new_namespace(&r.name);
                c.add_source(r.source.as_str())
                    .map_err(|e| ScanError::Rules {
                        name: r.name.clone(),
                        detail: e.to_string(),
                    })?;
            }
            c.build()
        };
        #[cfg(not(all(feature = "yara", not(fuzzing))))]
        if let Some(r) = self.rules.first() {
            return Err(ScanError::Rules {
                name: r.name.clone(),
                detail: NO_YARA.into(),
            });
        }
        let mut blocklist = HashMap::new();
        for b in &self.blocklist {
            let h = parse_hash(&b.sha256)
                .ok_or_else(|| ScanError::BundleFormat(format!("bad sha256 {:?}", b.sha256)))?;
            blocklist.insert(h, b.name.clone());
        }
        let info = RulesInfo {
            source: self.origin.clone(),
            digest: self.digest(),
            #[cfg(all(feature = "yara", not(fuzzing)))]
            rules: rules.iter().len(),
            #[cfg(not(all(feature = "yara", not(fuzzing))))]
            rules: 0,
            blocklist: blocklist.len(),
        };
        Ok(Engine {
            #[cfg(all(feature = "yara", not(fuzzing)))]
            rules,
            blocklist,
            info,
        })
    }
}

/// Why YARA sources are refused by a build without the rule engine.
#[cfg(not(all(feature = "yara", not(fuzzing))))]
const NO_YARA: &str =
    "this build has no YARA-X (feature `yara` off): only a SHA-256 blocklist can be used";

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// Parses `<sha256> [name]` lines; errors are `(line number, what)`.
fn parse_blocklist(text: &str) -> Result<Vec<BlockEntry>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let hash = parts.next().unwrap_or("").to_ascii_lowercase();
        if parse_hash(&hash).is_none() {
            return Err((i + 1, format!("{hash:?} is not a hex SHA-256")));
        }
        let name = parts
            .next()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or("blocklisted")
            .to_string();
        out.push(BlockEntry { sha256: hash, name });
    }
    Ok(out)
}

/// Compiled rules and the blocklist, ready to match.
pub struct Engine {
    #[cfg(all(feature = "yara", not(fuzzing)))]
    rules: yara_x::Rules,
    blocklist: HashMap<[u8; 32], String>,
    info: RulesInfo,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({:?})", self.info)
    }
}

#[derive(Serialize, Deserialize)]
struct EngineHeader {
    info: RulesInfo,
    blocklist: Vec<(String, String)>,
}

impl Engine {
    /// What the scan ran with.
    pub fn info(&self) -> &RulesInfo {
        &self.info
    }

    /// Writes the compiled engine for a worker (see the module doc for the layout).
    pub fn save(&self, path: &Path) -> Result<(), ScanError> {
        let header = EngineHeader {
            info: self.info.clone(),
            blocklist: self
                .blocklist
                .iter()
                .map(|(k, v)| (hex::encode(k), v.clone()))
                .collect(),
        };
        let json = serde_json::to_vec(&header).expect("plain data serializes");
        #[cfg(all(feature = "yara", not(fuzzing)))]
        let rules = self.rules.serialize().map_err(|e| ScanError::Rules {
            name: "compiled".into(),
            detail: e.to_string(),
        })?;
        #[cfg(not(all(feature = "yara", not(fuzzing))))]
        let rules: Vec<u8> = Vec::new();
        let mut out = Vec::with_capacity(ENGINE_MAGIC.len() + 12 + json.len() + rules.len());
        out.extend_from_slice(ENGINE_MAGIC);
        out.extend_from_slice(&ENGINE_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&rules);
        std::fs::write(path, out).map_err(|source| ScanError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads an engine written by [`Engine::save`].
    pub fn load(path: &Path) -> Result<Self, ScanError> {
        let b = std::fs::read(path).map_err(|source| ScanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |detail: &str| ScanError::Rules {
            name: path.display().to_string(),
            detail: detail.into(),
        };
        let m = ENGINE_MAGIC.len();
        if b.len() < m + 12 || &b[..m] != ENGINE_MAGIC {
            return Err(bad("not a compiled engine file"));
        }
        if u32::from_le_bytes(b[m..m + 4].try_into().expect("4 bytes")) != ENGINE_VERSION {
            return Err(bad("unknown engine file version"));
        }
        let jl = u64::from_le_bytes(b[m + 4..m + 12].try_into().expect("8 bytes")) as usize;
        let js = m + 12;
        if jl > b.len() - js {
            return Err(bad("truncated engine file"));
        }
        let header: EngineHeader =
            serde_json::from_slice(&b[js..js + jl]).map_err(|e| bad(&e.to_string()))?;
        #[cfg(all(feature = "yara", not(fuzzing)))]
        let rules = yara_x::Rules::deserialize(&b[js + jl..]).map_err(|e| bad(&e.to_string()))?;
        #[cfg(not(all(feature = "yara", not(fuzzing))))]
        if b.len() > js + jl {
            return Err(bad(NO_YARA));
        }
        let mut blocklist = HashMap::new();
        for (k, v) in header.blocklist {
            blocklist.insert(parse_hash(&k).ok_or_else(|| bad("bad hash"))?, v);
        }
        Ok(Engine {
            #[cfg(all(feature = "yara", not(fuzzing)))]
            rules,
            blocklist,
            info: header.info,
        })
    }

    /// A matcher for one thread; `timeout` bounds each file's rule evaluation.
    pub fn matcher(&self, timeout: Duration) -> Matcher<'_> {
        #[cfg(all(feature = "yara", not(fuzzing)))]
        let scanner = {
            let mut scanner = yara_x::Scanner::new(&self.rules);
            scanner.set_timeout(timeout);
            scanner
        };
        #[cfg(not(all(feature = "yara", not(fuzzing))))]
        let _ = timeout;
        Matcher {
            engine: self,
            #[cfg(all(feature = "yara", not(fuzzing)))]
            scanner,
        }
    }
}

/// Matches file contents; reuse it for every file of a volume.
pub struct Matcher<'r> {
    engine: &'r Engine,
    #[cfg(all(feature = "yara", not(fuzzing)))]
    scanner: yara_x::Scanner<'r>,
}

/// Why a buffer could not be matched.
#[derive(Debug)]
pub enum MatchError {
    /// The rule engine's timeout ran out.
    Timeout,
    /// Anything else the engine reported.
    Other(String),
}

impl Matcher<'_> {
    /// Whether any hash is blocklisted (else SHA-256 need not be computed).
    pub fn has_blocklist(&self) -> bool {
        !self.engine.blocklist.is_empty()
    }

    /// The blocklist hit for a content hash, if any.
    pub fn blocklisted(&self, sha256: &[u8; 32]) -> Option<Hit> {
        self.engine.blocklist.get(sha256).map(|name| Hit {
            engine: "sha256".into(),
            name: name.clone(),
        })
    }

    /// The rules matching `data` (none without the rule engine).
    #[cfg(not(all(feature = "yara", not(fuzzing))))]
    pub fn rules(&mut self, data: &[u8]) -> Result<Vec<Hit>, MatchError> {
        let _ = data;
        Ok(Vec::new())
    }

    /// The rules matching `data`.
    #[cfg(all(feature = "yara", not(fuzzing)))]
    pub fn rules(&mut self, data: &[u8]) -> Result<Vec<Hit>, MatchError> {
        let res = self.scanner.scan(data).map_err(|e| match e {
            yara_x::ScanError::Timeout => MatchError::Timeout,
            other => MatchError::Other(other.to_string()),
        })?;
        Ok(res
            .matching_rules()
            .map(|r| Hit {
                engine: "rule".into(),
                name: format!("{}:{}", r.namespace(), r.identifier()),
            })
            .collect())
    }
}

#[cfg(all(test, feature = "yara", not(fuzzing)))]
mod tests {
    use super::*;

    const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

    #[test]
    fn builtin_rule_finds_eicar_and_nothing_else() {
        let e = RuleSet::builtin().compile().expect("compiles");
        let mut m = e.matcher(Duration::from_secs(5));
        let mut data = vec![0u8; 10_000];
        data[5000..5000 + EICAR.len()].copy_from_slice(EICAR);
        assert_eq!(
            m.rules(&data).expect("scan")[0].name,
            "builtin:eicar_test_file"
        );
        assert!(m.rules(&data[..5000]).expect("scan").is_empty());
    }

    #[test]
    fn engine_file_round_trips_and_bad_files_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut rs = RuleSet::builtin();
        rs.blocklist =
            parse_blocklist(&format!("# c\n{} evil\n", "ab".repeat(32))).expect("parses");
        let e = rs.compile().expect("compiles");
        let p = d.path().join("engine");
        e.save(&p).expect("save");
        let back = Engine::load(&p).expect("load");
        assert_eq!(back.info(), e.info());
        assert!(back
            .matcher(Duration::from_secs(1))
            .blocklisted(&[0xab; 32])
            .is_some());
        std::fs::write(&p, b"garbage").expect("write");
        assert!(Engine::load(&p).is_err());
    }

    #[test]
    fn bundle_verifies_only_with_the_rules_key_and_untampered() {
        let key = SigningKey::generate();
        let signed = RuleSet::builtin().sign(&key, 7);
        let (rs, v) = RuleSet::from_bundle(&signed, &[key.public()]).expect("verifies");
        assert_eq!(v, 7);
        assert_eq!(rs.rules, RuleSet::builtin().rules);
        let mut t = signed.clone();
        t.payload = t.payload.replace("eicar_test_file", "harmless");
        assert!(RuleSet::from_bundle(&t, &[key.public()]).is_err());
        let other = SigningKey::generate();
        assert!(RuleSet::from_bundle(&signed, &[other.public()]).is_err());
        // A lease signed by the same key is not a bundle.
        let lease = key.sign("lease", &serde_json::json!({"x": 1}));
        assert!(RuleSet::from_bundle(&lease, &[key.public()]).is_err());
    }

    #[test]
    fn bad_rules_and_blocklists_say_where() {
        let rs = RuleSet {
            origin: "t".into(),
            rules: vec![RuleSource {
                name: "broken".into(),
                source: "rule x { condition: nope }".into(),
            }],
            blocklist: vec![],
        };
        let err = rs.compile().expect_err("bad rule");
        assert!(err.to_string().contains("broken"), "{err}");
        assert_eq!(parse_blocklist("zz\n").expect_err("bad").0, 1);
    }
}
