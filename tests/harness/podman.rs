//! Worker images under podman, run as a kubelet would (runc, a pod's
//! ulimits), and what a container run left: its status, stderr and JSON
//! result, dumped whole when a check fails.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// The image `make images` builds for `worker`:
/// `$POPULATOR_IMAGE_REPO/worker:$POPULATOR_IMAGE_TAG` (default
/// `localhost/populator/worker:dev`).
pub fn image(worker: &str) -> String {
    let repo =
        std::env::var("POPULATOR_IMAGE_REPO").unwrap_or_else(|_| "localhost/populator".into());
    let tag = std::env::var("POPULATOR_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("{repo}/{worker}:{tag}")
}

/// [`image`], failing loudly when it has not been built.
pub fn require_image(worker: &str) -> String {
    let image = image(worker);
    let exists = Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .expect("running podman (install it: scripts/install-test-deps.sh)");
    assert!(
        exists.success(),
        "image {image} is missing: build it with `make images` (make test does)"
    );
    image
}

/// `podman run --rm` with runc and a pod's ulimits; add the run's own
/// options, the image and the worker's arguments.
pub fn podman_run() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args([
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:20000",
        "--ulimit",
        "nproc=1024:1024",
    ]);
    cmd
}

/// A finished container run and the result it wrote to `result_path` (the
/// host side of its `--termination-log`).
pub struct ContainerRun {
    pub output: Output,
    pub result: String,
}

impl ContainerRun {
    /// Runs `cmd` (from [`podman_run`]) to the end.
    pub fn run(cmd: &mut Command, result_path: &Path) -> ContainerRun {
        let output = cmd
            .output()
            .expect("running podman (install it: scripts/install-test-deps.sh)");
        ContainerRun::new(output, result_path)
    }

    /// A run already waited for (e.g. a container spawned in the background).
    pub fn new(output: Output, result_path: &Path) -> ContainerRun {
        let result = std::fs::read_to_string(result_path).unwrap_or_default();
        ContainerRun { output, result }
    }

    /// Status, stderr and result, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "\nstatus: {}\nstderr:\n{}\nresult:\n{}",
            self.output.status,
            String::from_utf8_lossy(&self.output.stderr),
            self.result
        )
    }

    /// Asserts the container succeeded and returns its JSON result.
    pub fn success(&self) -> Value {
        assert!(
            self.output.status.success(),
            "the container failed{}",
            self.dump()
        );
        serde_json::from_str(&self.result).expect("a JSON result")
    }
}
