//! The http-import image (FROM scratch, uid 107) run by podman against the
//! loopback nginx, writing to a loop device passed with --device. `make test`
//! builds the image first (`make images`).

use std::path::Path;
use std::process::Command;

use populator_tests::fixtures::{random_file, sha256_file, sha256_prefix};
use populator_tests::loopdev::LoopDevice;
use populator_tests::nginx::nginx;
use populator_tests::{require_root, scratch, test_dir};

const MIB: u64 = 1 << 20;

fn image(worker: &str) -> String {
    let repo =
        std::env::var("POPULATOR_IMAGE_REPO").unwrap_or_else(|_| "localhost/populator".into());
    let tag = std::env::var("POPULATOR_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("{repo}/{worker}:{tag}")
}

fn podman_run(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:20000",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(args)
        .output()
        .expect("running podman (install it: scripts/install-test-deps.sh)")
}

#[test]
fn http_import_image_fills_a_block_device_under_podman() {
    require_root();
    let image = image("http-import");
    let inspect = Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .unwrap();
    assert!(
        inspect.success(),
        "image {image} is missing: build it with `make images` (make test does)"
    );

    let data = scratch().join("fixtures/image-test-24m.bin");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    random_file(&data, 24 * MIB, 11);
    let url = nginx().serve("image-test-24m.bin", &data);
    let dir = test_dir("image");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // uid 107 in the container writes the result here.
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dev = LoopDevice::new(&dir, "blk", 32 * MIB);
    dev.fill_random();
    let device = dev.device.to_str().unwrap();
    // What a container runtime with device_ownership_from_security_context
    // does for a pod running as uid 107: hand it the device node.
    populator_tests::sh(&format!("chown 107:107 {device}"));
    let output = podman_run(&[
        "--network",
        "host",
        "--read-only",
        "--device",
        &format!("{device}:/dev/block:rw"),
        "-v",
        &format!("{}:/out", out.display()),
        &image,
        "--url",
        &url,
        "--checksum",
        &format!("sha256:{}", sha256_file(&data)),
        "--termination-log",
        "/out/result.json",
    ]);
    populator_tests::sh(&format!("chown 0:0 {device}"));
    let result = std::fs::read_to_string(out.join("result.json")).unwrap_or_default();
    let dump = format!(
        "\nstatus: {}\nstderr:\n{}\nresult:\n{result}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the container failed{dump}");
    let v: serde_json::Value = serde_json::from_str(&result).expect("a JSON result");
    assert_eq!(v["status"], "Succeeded", "{dump}");
    assert_eq!(
        v["target"]["kind"], "block",
        "the default target /dev/block was not used{dump}"
    );
    assert_eq!(v["target"]["path"], "/dev/block");
    assert_eq!(
        sha256_prefix(Path::new(device), 24 * MIB),
        sha256_file(&data)
    );
}
