//! Idempotent machine setup for a fresh machine of this project's kind (Debian, root).
//! Nothing is left in, or read from, /tmp.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::sh;

/// Debian packages the tests, benches and demo use.
const APT_PACKAGES: &[&str] = &[
    "nginx-light",
    "curl",
    "iproute2",
    "iptables",
    "ca-certificates",
    // The registry tests and bench: the distribution registry, skopeo, containerd, dockerd.
    "docker-registry",
    "skopeo",
    "containerd",
    "docker.io",
    // netlab's path-MTU checks.
    "iputils-ping",
    // The status page's test: headless Chromium.
    "chromium-headless-shell",
];

/// What `cargo xtask bench stock` compares against, beyond [`APT_PACKAGES`]: BitTorrent
/// clients, the tracker, the torrent maker, and a font for the plots' labels.
const STOCK_PACKAGES: &[&str] = &[
    "aria2",
    "python3-libtorrent",
    "opentracker",
    "mktorrent",
    "fonts-dejavu-core",
];

/// rqbit, the Rust BitTorrent client, built from crates.io at a pinned version.
const RQBIT_VERSION: &str = "9.1.0";

/// The Hugging Face client the model tests drive (`huggingface_hub`, from PyPI), pinned.
const HF_HUB_VERSION: &str = "2.4.0";

/// Garage, the S3-compatible store the S3 tests use, built from crates.io at a pinned version
/// (lmdb metadata only: the tests need no more, and it builds in about 5 minutes).
const GARAGE_VERSION: &str = "2.5.0";

/// cargo-fuzz (libFuzzer driver for `cargo xtask fuzz`), from crates.io, pinned.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Python tools from PyPI, pinned (package, module, version): the Hugging Face client for the
/// model tests; Helm v4's engine as a library (render, lint) and the Kubernetes schemas for the
/// chart's checks; the OTLP classes and gRPC for the tracing test.
const PIP_PACKAGES: &[(&str, &str, &str)] = &[
    ("huggingface_hub", "huggingface_hub", HF_HUB_VERSION),
    ("helm-python-sdk", "helm_python", "0.2.2"),
    ("kubernetes-validate", "kubernetes_validate", "1.37.0"),
    // The tracing test's OTLP receiver: the protocol's generated classes, and gRPC.
    ("opentelemetry-proto", "opentelemetry.proto", "1.45.2"),
    ("grpcio", "grpc", "1.85.4"),
];

pub fn run() -> Result<()> {
    ensure_ebpf_toolchain()?;
    ensure_apt_packages()?;
    ensure_model_tools()?;
    ensure_tracefs();
    Ok(())
}

/// [`PIP_PACKAGES`], each at its version.
pub fn ensure_pip_packages() -> Result<()> {
    for (package, module, version) in PIP_PACKAGES {
        let check = format!(
            "import importlib.metadata as m, {module}, sys; sys.exit(m.version({package:?}) != {version:?})"
        );
        if !quiet_ok(Command::new("python3").args(["-c", &check])) {
            sh(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--root-user-action=ignore",
                &format!("{package}=={version}"),
            ]))?;
        }
    }
    Ok(())
}

/// The PyPI packages (`huggingface_hub` among them) and `garage` from crates.io, for the model
/// tests.
pub fn ensure_model_tools() -> Result<()> {
    ensure_pip_packages()?;
    ensure_cargo_tool(
        Command::new("garage").arg("--version"),
        "garage",
        GARAGE_VERSION,
        &["--no-default-features", "--features", "bundled-libs,lmdb"],
    )
}

/// `cargo install --locked CRATE --version VERSION EXTRA...` unless `check` prints `version`.
fn ensure_cargo_tool(
    check: &mut Command,
    krate: &str,
    version: &str,
    extra: &[&str],
) -> Result<()> {
    let have = check
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
        .unwrap_or(false);
    if !have {
        sh(Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", "--locked", krate, "--version", version])
            .args(extra))?;
    }
    Ok(())
}

/// cargo-fuzz, and the nightly toolchain it builds the targets with (installed with the eBPF
/// toolchain).
pub fn ensure_cargo_fuzz() -> Result<()> {
    ensure_ebpf_toolchain()?;
    ensure_cargo_tool(
        Command::new("cargo").args(["fuzz", "--version"]),
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        &[],
    )
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// nightly + rust-src, and bpf-linker built against the nightly's own LLVM.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    if !quiet_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!(
            "the nightly toolchain is missing; this machine kind ships it (rustup toolchain list)"
        );
    }
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false);
    if !has_src {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if quiet_ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    // bpf-linker links against libLLVM; use the very one nightly rustc ships, through a
    // prefix directory outside /tmp (the binary keeps an rpath to it).
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))
        .context("cannot list the nightly sysroot")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("the nightly sysroot has no libLLVM.so.*")?;
    let major = lib
        .file_name()
        .and_then(|n| {
            n.to_string_lossy()
                .strip_prefix("libLLVM.so.")
                .map(|v| v.split('.').next().unwrap_or("").to_string())
        })
        .filter(|m| !m.is_empty())
        .context("cannot read the LLVM version")?;
    let prefix = home().join(".local/share/starling-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    sh(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
}

pub fn ensure_apt_packages() -> Result<()> {
    ensure_packages(APT_PACKAGES)
}

/// The stock peers `bench stock` runs: [`STOCK_PACKAGES`] from apt and, when `rqbit`, rqbit
/// from crates.io.
pub fn ensure_stock_peers(rqbit: bool) -> Result<()> {
    ensure_packages(APT_PACKAGES)?;
    ensure_packages(STOCK_PACKAGES)?;
    if !rqbit {
        return Ok(());
    }
    let have = Command::new("rqbit")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(RQBIT_VERSION))
        .unwrap_or(false);
    if !have {
        sh(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
            "install",
            "--locked",
            "rqbit",
            "--version",
            RQBIT_VERSION,
        ]))?;
    }
    Ok(())
}

fn ensure_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !quiet_ok(Command::new("python3").arg("--version")) {
        bail!(
            "python3 is missing (the tests use python3 -m http.server as a Range-ignoring origin)"
        );
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix_is_root() {
        bail!(
            "apt packages {missing:?} are missing; install them as root (apt-get install {})",
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Tracepoints attached through tracefs need it mounted; tp_btf, fentry, tc and sock_ops don't.
fn ensure_tracefs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.contains(" tracefs "))
        .unwrap_or(false);
    if !mounted && rustix_is_root() {
        let _ =
            quiet_ok(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]));
    }
}
