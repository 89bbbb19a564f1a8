//! Validation of the shim's OCI documents (runtime spec 1.1 `config.json`,
//! `process`, `linux.resources`) before anything touches the system, so a bad
//! request fails with an error naming the field and leaves nothing behind.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde_json::Value;

use super::Error;

/// Namespace types of OCI runtime spec 1.1 `linux.namespaces[].type`.
const NAMESPACE_TYPES: &[&str] = &[
    "pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time",
];

/// Checks a container or exec id: non-empty, at most 128 characters of
/// `[A-Za-z0-9_+.-]`, not `.`/`..` (libcontainer's rule, and a safe file name).
pub fn validate_id(field: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 128 {
        return Err(Error::invalid(field, "must be 1..=128 characters"));
    }
    if id == "." || id == ".." {
        return Err(Error::invalid(field, format!("{id:?} is not a valid id")));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        return Err(Error::invalid(
            field,
            format!("invalid character {c:?} in {id:?}"),
        ));
    }
    Ok(())
}

fn parse_json(what: &str, json: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(json).map_err(|e| Error::invalid(what, format!("malformed JSON: {e}")))
}

/// Checks the parts of `process` (at JSON path `at`) that serde would accept
/// but the runtime cannot run.
fn check_process(at: &str, process: &Value) -> Result<(), Error> {
    let args = process.get("args").and_then(Value::as_array);
    match args {
        Some(a) if !a.is_empty() => {}
        _ => {
            return Err(Error::invalid(
                format!("{at}.args"),
                "must be a non-empty array",
            ))
        }
    }
    if let Some(cwd) = process.get("cwd").and_then(Value::as_str) {
        if !cwd.starts_with('/') {
            return Err(Error::invalid(
                format!("{at}.cwd"),
                format!("{cwd:?} is not absolute"),
            ));
        }
    }
    Ok(())
}

fn check_linux(linux: &Value) -> Result<(), Error> {
    if let Some(nss) = linux.get("namespaces") {
        let nss = nss
            .as_array()
            .ok_or_else(|| Error::invalid("linux.namespaces", "must be an array"))?;
        for (i, ns) in nss.iter().enumerate() {
            let ty = ns.get("type").and_then(Value::as_str).unwrap_or("");
            if !NAMESPACE_TYPES.contains(&ty) {
                return Err(Error::invalid(
                    format!("linux.namespaces[{i}].type"),
                    format!(
                        "unknown namespace type {ty:?} (expected one of {})",
                        NAMESPACE_TYPES.join(", ")
                    ),
                ));
            }
        }
    }
    if let Some(rules) = linux
        .get("seccomp")
        .and_then(|s| s.get("syscalls"))
        .and_then(Value::as_array)
    {
        for (i, rule) in rules.iter().enumerate() {
            let names = rule.get("names").and_then(Value::as_array);
            for (j, name) in names.into_iter().flatten().enumerate() {
                let field = format!("linux.seccomp.syscalls[{i}].names[{j}]");
                let name = name
                    .as_str()
                    .ok_or_else(|| Error::invalid(&field, "must be a string"))?;
                if libseccomp::ScmpSyscall::from_name(name).is_err() {
                    return Err(Error::invalid(
                        field,
                        format!("unknown system call name {name:?}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Deserialises each top-level member on its own first so a type error names
/// the member (serde's own message gives the position inside it).
fn typed_spec(value: Value) -> Result<Spec, Error> {
    fn part<T: serde::de::DeserializeOwned>(value: &Value, key: &str) -> Result<(), Error> {
        if let Some(v) = value.get(key) {
            serde_json::from_value::<T>(v.clone())
                .map_err(|e| Error::invalid(key, e.to_string()))?;
        }
        Ok(())
    }
    use oci_spec::runtime as r;
    part::<r::Process>(&value, "process")?;
    part::<r::Root>(&value, "root")?;
    part::<Vec<r::Mount>>(&value, "mounts")?;
    part::<r::Linux>(&value, "linux")?;
    part::<r::Hooks>(&value, "hooks")?;
    part::<String>(&value, "hostname")?;
    part::<String>(&value, "domainname")?;
    serde_json::from_value(value).map_err(|e| Error::invalid("config.json", e.to_string()))
}

/// The validated bundle of a new container.
pub struct Bundle {
    /// The spec as written to `config.json`.
    pub spec: Spec,
    /// The rewritten `config.json` document.
    pub json: Vec<u8>,
    /// cgroup v2 path of the container relative to the cgroup root
    /// (`linux.cgroupsPath`, default `/vmrt/<id>`).
    pub cgroup_path: PathBuf,
}

/// Validates the shim's `config.json` for container `id` with rootfs `rootfs`
/// and rewrites it for the guest: `root.path` = `rootfs`, `process.terminal` =
/// `terminal`, `linux.cgroupsPath` defaulted to `/vmrt/<id>` (and replaced by
/// it when it is a systemd `slice:prefix:name` triple, which has no meaning in
/// the guest). Errors name the offending field (`rootfs`, `config.json`,
/// `linux.namespaces[i].type`, `linux.seccomp.syscalls[i].names[j]`, ...).
pub fn prepare_bundle(
    id: &str,
    spec_json: &[u8],
    rootfs: &Path,
    terminal: bool,
) -> Result<Bundle, Error> {
    validate_id("container_id", id)?;
    if !rootfs.is_absolute() {
        return Err(Error::invalid(
            "rootfs",
            format!("{} is not an absolute path", rootfs.display()),
        ));
    }
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::invalid(
                "rootfs",
                format!("{} is not a directory", rootfs.display()),
            ))
        }
        Err(e) => {
            return Err(Error::invalid(
                "rootfs",
                format!("{}: {e}", rootfs.display()),
            ))
        }
    }
    let mut value = parse_json("config.json", spec_json)?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| Error::invalid("config.json", "must be a JSON object"))?;
    let version = obj.get("ociVersion").and_then(Value::as_str).unwrap_or("");
    if !version.starts_with("1.") {
        return Err(Error::invalid(
            "ociVersion",
            format!("unsupported version {version:?} (need 1.x)"),
        ));
    }
    let process = obj
        .get_mut("process")
        .ok_or_else(|| Error::invalid("process", "missing"))?;
    check_process("process", process)?;
    if let Some(p) = process.as_object_mut() {
        p.insert("terminal".into(), Value::Bool(terminal));
    }
    let linux = obj
        .entry("linux")
        .or_insert_with(|| Value::Object(Default::default()));
    check_linux(linux)?;
    let linux = linux
        .as_object_mut()
        .ok_or_else(|| Error::invalid("linux", "must be a JSON object"))?;
    let default_cgroup = format!("/vmrt/{id}");
    let cgroup_path = match linux.get("cgroupsPath").and_then(Value::as_str) {
        Some(p) if !p.is_empty() && !p.contains(':') => {
            if p.split('/').any(|c| c == "..") {
                return Err(Error::invalid(
                    "linux.cgroupsPath",
                    format!("{p:?} contains \"..\""),
                ));
            }
            if p.starts_with('/') {
                p.to_string()
            } else {
                format!("/{p}")
            }
        }
        _ => default_cgroup,
    };
    linux.insert("cgroupsPath".into(), Value::String(cgroup_path.clone()));
    let rootfs_str = rootfs
        .to_str()
        .ok_or_else(|| Error::invalid("rootfs", "path is not UTF-8"))?;
    let root = obj
        .entry("root")
        .or_insert_with(|| Value::Object(Default::default()));
    let root = root
        .as_object_mut()
        .ok_or_else(|| Error::invalid("root", "must be a JSON object"))?;
    root.insert("path".into(), Value::String(rootfs_str.into()));

    let json = serde_json::to_vec_pretty(&value)
        .map_err(|e| Error::Internal(format!("serialise config.json: {e}")))?;
    let spec = typed_spec(value)?;
    Ok(Bundle {
        spec,
        json,
        cgroup_path: PathBuf::from(cgroup_path),
    })
}

/// Validates an exec's OCI `process` object and forces its `terminal` field;
/// returns the JSON to hand to libcontainer. Errors name `process.*` fields.
pub fn prepare_process(process_json: &[u8], terminal: bool) -> Result<Vec<u8>, Error> {
    let mut value = parse_json("process", process_json)?;
    check_process("process", &value)?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| Error::invalid("process", "must be a JSON object"))?;
    obj.insert("terminal".into(), Value::Bool(terminal));
    serde_json::from_value::<Process>(value.clone())
        .map_err(|e| Error::invalid("process", e.to_string()))?;
    serde_json::to_vec(&value).map_err(|e| Error::Internal(format!("serialise process: {e}")))
}

/// Parses an OCI `linux.resources` object (field `resources`).
pub fn parse_resources(resources_json: &[u8]) -> Result<LinuxResources, Error> {
    let value = parse_json("resources", resources_json)?;
    serde_json::from_value(value).map_err(|e| Error::invalid("resources", e.to_string()))
}
