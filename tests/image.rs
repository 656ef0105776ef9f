//! The http-import image (FROM scratch, uid 107) run by podman against the
//! loopback nginx, writing to a loop device passed with --device. `make test`
//! builds the image first (`make images`).

use std::path::Path;

use populator_tests::fixtures::{random_fixture, sha256_file, sha256_prefix};
use populator_tests::loopdev::LoopDevice;
use populator_tests::nginx::nginx;
use populator_tests::podman::{podman_run, require_image, ContainerRun};
use populator_tests::{require_root, test_dir};

const MIB: u64 = 1 << 20;

#[test]
fn http_import_image_fills_a_block_device_under_podman() {
    require_root();
    let image = require_image("http-import");
    let data = random_fixture("image-test-24m.bin", 24 * MIB, 11);
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
    let run = ContainerRun::run(
        podman_run().args([
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
        ]),
        &out.join("result.json"),
    );
    populator_tests::sh(&format!("chown 0:0 {device}"));
    let v = run.success();
    let dump = run.dump();
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
