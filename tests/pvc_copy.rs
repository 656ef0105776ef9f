//! End-to-end tests of pvc-copy (issue 5), as root: real ext4 and xfs
//! volumes on loop devices, trees with every file type, rsync as the judge,
//! block devices compared with cmp.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use populator_tests::fixtures::{mostly_zero_file, random_file, sha256_file};
use populator_tests::loopdev::{Fs, LoopDevice};
use populator_tests::run::{worker, Run, WorkerCmd};
use populator_tests::{require_root, sh, test_dir};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn copy(source: &Path, target: &Path) -> WorkerCmd {
    worker("pvc-copy")
        .arg("--source")
        .arg(source)
        .arg("--target")
        .arg(target)
        .args(["--progress", "none"])
}

/// A volume with a filesystem; xfs with reflink=1 spelled out.
fn volume(dir: &Path, name: &str, size: u64, fs: Fs) -> LoopDevice {
    let mut dev = LoopDevice::new(dir, name, size);
    let mnt = dir.join(format!("{name}.mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mkfs = match fs {
        Fs::Ext4 => "mkfs.ext4 -q -F -b 4096",
        Fs::Xfs => "mkfs.xfs -q -f -m reflink=1",
    };
    sh(&format!(
        "{mkfs} {dev} && mount {dev} {mnt}",
        dev = dev.device.display(),
        mnt = mnt.display()
    ));
    dev.mount = Some(mnt);
    dev
}

/// Every file type and piece of metadata the copy must keep, plus 10k
/// small files.
fn make_tree(root: &Path) {
    let script = r#"
set -e
cd "$ROOT"
mkdir -p dir/sub/deeper empty 'with space' acl-dir
printf 'hello\n' > dir/file
ln dir/file dir/hardlink
ln dir/file hardlink-at-top
ln -s ../dir/file dir/sub/symlink
ln -s /nonexistent/target dangling
mkfifo fifo
mknod chardev c 1 3
mknod blockdev b 7 200
printf 'setuid' > setuid && chown 1234:5678 setuid && chmod 4755 setuid
printf 'setgid' > setgid && chmod 2710 setgid
mkdir sticky && chmod 1777 sticky
printf 'owned' > owned && chown 4000:4001 owned
chown -h 4002:4003 dangling
setfattr -n user.note -v 'a value' dir/file
setfattr -n user.binary -v 0x00ff10 owned
setfattr -n trusted.secret -v hidden owned
setfattr -n user.ondir -v d dir
setfacl -m u:1234:rwx,g:99:r-- acl-dir
setfacl -d -m u:1234:r-x acl-dir
printf 'acl' > acl-dir/inherits
setfacl -m u:777:rw acl-dir/inherits
truncate -s 64M sparse
printf 'middle' | dd of=sparse bs=1 seek=33554432 conv=notrunc status=none
truncate -s 10M all-hole
dd if=/dev/urandom of=random-3m bs=1M count=3 status=none
long=$(printf 'L%.0s' $(seq 1 250))
printf 'long' > "$long.txt"
printf 'latin1' > "$(printf 'caf\xe9')"
printf 'bytes' > "dir/$(printf '\xff\xfe-not-utf8')"
mkdir -p many
touch -h -d '2001-02-03 04:05:06.123456789' dir/file dir/sub/symlink dangling
touch -d '1999-12-31 23:59:59.5' dir/sub dir
chmod 0500 empty
"#;
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("ROOT", root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..10_000u32 {
        let dir = root.join(format!("many/d{:02}", i % 40));
        if i < 40 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), format!("small file {i}\n")).unwrap();
    }
    sh(&format!("sync -f {}", root.display()));
}

/// rsync's own judgement: prints nothing when source and target agree on
/// content, owners, modes, times, hard links, ACLs and xattrs.
fn assert_rsync_identical(src: &Path, dst: &Path, run: &Run) {
    let out = sh(&format!(
        "rsync -aHAX --checksum --dry-run --itemize-changes --exclude=/lost+found \
         --filter='-x trusted.SGI_ACL_*' {}/ {}/",
        src.display(),
        dst.display()
    ));
    assert!(
        out.trim().is_empty(),
        "rsync finds differences:\n{out}{}",
        run.dump()
    );
}

fn blocks(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().blocks()
}

fn check_tree_copy(src_fs: Fs, dst_fs: Fs, name: &str) {
    require_root();
    let dir = test_dir(name);
    let src = volume(&dir, "src", GIB, src_fs);
    let dst = volume(&dir, "dst", GIB, dst_fs);
    make_tree(src.mount_point());
    let run = copy(src.mount_point(), dst.mount_point())
        .arg("--verify")
        .run();
    run.success();
    assert_rsync_identical(src.mount_point(), dst.mount_point(), &run);
    let result = run.result();
    assert_eq!(result["target"]["kind"], "filesystem");
    let digest = result["digests"]["tree"].as_str().expect("a tree digest");
    assert_eq!(
        result["sourceDigest"].as_str(),
        Some(digest),
        "{}",
        run.dump()
    );
    assert!(
        result["files"].as_u64().unwrap() >= 10_000,
        "{}",
        run.dump()
    );
    assert_eq!(result["hardlinks"], 2, "{}", run.dump());
    for sparse in ["sparse", "all-hole"] {
        let (a, b) = (
            blocks(&src.mount_point().join(sparse)),
            blocks(&dst.mount_point().join(sparse)),
        );
        assert!(
            b <= a,
            "{sparse}: {b} blocks in the copy, {a} in the source"
        );
    }
    assert_eq!(
        sha256_file(&src.mount_point().join("random-3m")),
        sha256_file(&dst.mount_point().join("random-3m"))
    );
    // The resume state is gone; lost+found of the source was not copied.
    assert!(!dst.mount_point().join(".pvc-copy-state").exists());
    let acl = sh(&format!(
        "getfacl -p {}/acl-dir/inherits",
        dst.mount_point().display()
    ));
    assert!(acl.contains("user:777:rw-"), "ACL lost: {acl}");
}

#[test]
fn tree_ext4_to_ext4_is_identical_for_rsync() {
    check_tree_copy(Fs::Ext4, Fs::Ext4, "tree-ext4-ext4");
}

#[test]
fn tree_ext4_to_xfs_is_identical_for_rsync() {
    check_tree_copy(Fs::Ext4, Fs::Xfs, "tree-ext4-xfs");
}

#[test]
fn tree_xfs_reflink_to_xfs_is_identical_for_rsync() {
    check_tree_copy(Fs::Xfs, Fs::Xfs, "tree-xfs-xfs");
}

#[test]
fn tree_within_one_xfs_volume_is_reflinked() {
    require_root();
    let dir = test_dir("reflink-same-fs");
    let vol = volume(&dir, "vol", GIB, Fs::Xfs);
    let (src, dst) = (vol.mount_point().join("a"), vol.mount_point().join("b"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    random_file(&src.join("big"), 64 * MIB, 5);
    let run = copy(&src, &dst).arg("--verify").run();
    run.success();
    assert_eq!(run.result()["reflinkedFiles"], 1, "{}", run.dump());
    assert_eq!(sha256_file(&src.join("big")), sha256_file(&dst.join("big")));
}

/// 1 GiB, every other MiB random and the rest zeros, as a sparse image file.
fn half_zero_image() -> PathBuf {
    let dir = populator_tests::scratch().join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("half-zero-1g.img");
    mostly_zero_file(&path, GIB, 2, 9);
    path
}

fn cmp_equal(a: &Path, b: &Path, len: u64) {
    sh(&format!("cmp -n {len} {} {}", a.display(), b.display()));
}

#[test]
fn block_image_to_device_to_device_to_image_is_byte_identical() {
    require_root();
    let image = half_zero_image();
    let dir = test_dir("block");
    let dev = LoopDevice::new(&dir, "dev1", GIB);
    dev.fill_random();
    let run = copy(&image, &dev.device).arg("--verify").run();
    run.success();
    cmp_equal(&image, &dev.device, GIB);
    let digest = run.result()["digests"]["device"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(run.result()["target"]["kind"], "block");
    assert!(run.result()["zeroBytes"].as_u64().unwrap() >= GIB / 2 - 8 * MIB);

    // Device to a larger device pre-filled with noise: the first GiB equal.
    let dev2 = LoopDevice::new(&dir, "dev2", GIB + 64 * MIB);
    dev2.fill_random();
    let run = copy(&dev.device, &dev2.device).arg("--verify").run();
    run.success();
    assert_eq!(run.result()["digests"]["device"].as_str(), Some(&*digest));
    cmp_equal(&dev.device, &dev2.device, GIB);

    // Device to an image file: sparse where the source is zero.
    let out = dir.join("copy.img");
    let run = copy(&dev2.device, &out).run();
    run.success();
    assert_eq!(run.result()["target"]["kind"], "file");
    cmp_equal(&dev2.device, &out, GIB + 64 * MIB);
    assert!(
        blocks(&out) * 512 <= GIB / 2 + 64 * MIB + 8 * MIB,
        "the image file is not sparse: {} bytes allocated",
        blocks(&out) * 512
    );
}

#[test]
fn source_file_from_a_filesystem_volume_onto_a_block_device() {
    require_root();
    let dir = test_dir("source-file");
    let vol = volume(&dir, "fsvol", 512 * MIB, Fs::Ext4);
    let image = vol.mount_point().join("disk.img");
    mostly_zero_file(&image, 96 * MIB, 3, 4);
    let dev = LoopDevice::new(&dir, "blk", 128 * MIB);
    dev.fill_random();
    let run = worker("pvc-copy")
        .arg("--source")
        .arg(vol.mount_point())
        .args(["--source-file", "disk.img", "--target"])
        .arg(&dev.device)
        .run();
    run.success();
    cmp_equal(&image, &dev.device, 96 * MIB);
}

#[test]
fn target_too_small_is_refused_before_writing() {
    require_root();
    let dir = test_dir("too-small");
    let image = dir.join("src.img");
    random_file(&image, 48 * MIB, 3);
    let dev = LoopDevice::new(&dir, "small", 32 * MIB);
    dev.fill_random();
    let before = sha256_file(&dev.device);
    let run = copy(&image, &dev.device).run();
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("can take only");
    assert_eq!(sha256_file(&dev.device), before, "the device was written");

    // A tree whose volume holds more than the target's free space.
    let src = volume(&dir, "bigsrc", GIB, Fs::Ext4);
    random_file(&src.mount_point().join("a"), 300 * MIB, 6);
    sh(&format!("sync -f {}", src.mount_point().display()));
    let dst = volume(&dir, "smalldst", 256 * MIB, Fs::Ext4);
    let run = copy(src.mount_point(), dst.mount_point()).run();
    run.code(4).reason("InsufficientCapacity");
    assert!(!dst.mount_point().join("a").exists(), "{}", run.dump());
}

#[test]
fn bad_sources_and_mixed_modes_are_usage_errors() {
    require_root();
    let dir = test_dir("usage");
    let target = dir.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let run = copy(&dir.join("missing"), &target).run();
    run.code(2)
        .reason("SourceUnreadable")
        .message_contains("missing");

    // A directory onto a block device, and a block device into a directory.
    let dev = LoopDevice::new(&dir, "blk", 16 * MIB);
    let run = copy(&target, &dev.device).run();
    run.code(2)
        .reason("MixedVolumeModes")
        .message_contains("directory");
    let run = copy(&dev.device, &target).run();
    run.code(2).reason("MixedVolumeModes");

    // A non-empty target without --overwrite; with it, the copy goes on.
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("new"), "new").unwrap();
    std::fs::write(target.join("old"), "old").unwrap();
    let run = copy(&src, &target).run();
    run.code(2)
        .reason("TargetNotEmpty")
        .message_contains("--overwrite");
    assert!(!target.join("new").exists());
    let run = copy(&src, &target).arg("--overwrite").run();
    run.success();
    assert_eq!(std::fs::read_to_string(target.join("new")).unwrap(), "new");
    assert_eq!(std::fs::read_to_string(target.join("old")).unwrap(), "old");
}

#[test]
fn a_source_changing_during_the_copy_fails_verification() {
    require_root();
    let dir = test_dir("changing");
    let src = dir.join("src");
    let dst = dir.join("dst");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    random_file(&src.join("big"), 256 * MIB, 8);
    // A writer keeps changing the file until the copy is over.
    let stop = dir.join("stop");
    let mut writer = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "i=0; while [ ! -e {stop} ] && [ $i -lt 3000 ]; do printf '%08d' $i | dd of={f} bs=1 seek=$((i * 4096 % 268435456)) conv=notrunc status=none; i=$((i+1)); sleep 0.01; done",
            stop = stop.display(),
            f = src.join("big").display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let run = copy(&src, &dst).arg("--verify").run();
    std::fs::write(&stop, "").unwrap();
    writer.wait().unwrap();
    run.code(3)
        .reason("VerificationFailed")
        .message_contains("'big' differs");
    assert!(
        run.result()["digests"]["tree"].is_string(),
        "{}",
        run.dump()
    );
}

/// Files of root's own ids skip the chown; a target top directory with the
/// set-group-ID bit would give them its group, so there they are chowned.
#[test]
fn owners_stay_exact_under_a_set_group_id_target_top() {
    require_root();
    let dir = test_dir("setgid-top");
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    sh(&format!(
        "mkdir -p {s}/sub {d} && echo a > {s}/top && echo b > {s}/sub/f \
         && chown -R 0:0 {s} && chgrp 4242 {d} && chmod 2775 {d}",
        s = src.display(),
        d = dst.display()
    ));
    let run = copy(&src, &dst).run();
    run.success();
    for rel in ["top", "sub", "sub/f"] {
        let m = std::fs::symlink_metadata(dst.join(rel)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{rel}{}", run.dump());
    }
    assert_rsync_identical(&src, &dst, &run);
}

#[test]
fn a_killed_copy_resumes_when_run_again() {
    require_root();
    let dir = test_dir("resume");
    let src = volume(&dir, "src", GIB, Fs::Ext4);
    let dst = volume(&dir, "dst", GIB, Fs::Ext4);
    for i in 0..12 {
        random_file(
            &src.mount_point().join(format!("part{i}")),
            32 * MIB,
            100 + i,
        );
    }
    make_tree(src.mount_point());
    let cmd = copy(src.mount_point(), dst.mount_point()).args(["--jobs", "1"]);
    let spawned = cmd.spawn();
    // Killed once two files are complete (one thread copies them in turn),
    // well before the end.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30)
        && (0..12)
            .filter(|i| dst.mount_point().join(format!("part{i}")).exists())
            .count()
            < 3
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    spawned.signal(libc::SIGKILL);
    let killed = spawned.wait();
    assert_eq!(killed.code, 128 + libc::SIGKILL, "{}", killed.dump());
    assert!(
        dst.mount_point().join(".pvc-copy-state").exists(),
        "no resume state after the kill{}",
        killed.dump()
    );
    let run = copy(src.mount_point(), dst.mount_point())
        .arg("--verify")
        .run();
    run.success().stderr_contains("resuming");
    assert!(
        run.result()["resumedFiles"].as_u64().unwrap() > 0,
        "nothing was resumed{}",
        run.dump()
    );
    assert_rsync_identical(src.mount_point(), dst.mount_point(), &run);
}

#[test]
fn a_killed_block_copy_resumes_when_run_again() {
    require_root();
    let dir = test_dir("block-resume");
    let image = half_zero_image();
    let dev = LoopDevice::new(&dir, "blk", GIB);
    dev.fill_random();
    let cmd = copy(&image, &dev.device).args(["--commit-interval", "0"]);
    let spawned = cmd.spawn();
    // With no least interval, the copy records its progress in the last
    // chunk every 256 MiB (by default at most every 2 s): killed
    // once the first record is there, three quarters before the end.
    let record = GIB - 4 * MIB;
    let started = std::time::Instant::now();
    let mut magic = [0u8; 8];
    while started.elapsed() < Duration::from_secs(60) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&dev.device).unwrap();
        if f.read_exact_at(&mut magic, record).is_ok() && &magic == b"PVCLOCAL" {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    spawned.signal(libc::SIGKILL);
    let killed = spawned.wait();
    assert_eq!(killed.code, 128 + libc::SIGKILL, "{}", killed.dump());
    assert_eq!(&magic, b"PVCLOCAL", "no progress record{}", killed.dump());
    let run = copy(&image, &dev.device).arg("--verify").run();
    run.success().stderr_contains("resuming");
    let resumed = run.result()["resumedBytes"].as_u64().unwrap();
    assert!(
        (256 * MIB..GIB).contains(&resumed),
        "resumed {resumed} bytes{}",
        run.dump()
    );
    cmp_equal(&image, &dev.device, GIB);
    // A finished copy leaves no record: a third run copies everything.
    let again = copy(&image, &dev.device).run();
    again.success();
    assert_eq!(
        again.result()["resumedBytes"].as_u64(),
        Some(0),
        "{}",
        again.dump()
    );
}

// ---- Network mode: sender and receiver in two namespaces joined by a veth pair.

use populator_tests::netns::NetnsPair;
use populator_tests::run::Spawned;
use populator_tests::tcpproxy::TcpProxy;

const PORT: u16 = 9443;
const TOKEN: &str = "s3cret-token-for-tests";

fn token_file(dir: &Path, value: &str) -> PathBuf {
    let path = dir.join(format!("token-{}", value.len()));
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path
}

fn receive_cmd(net: &NetnsPair, dir: &Path, target: &Path) -> WorkerCmd {
    worker("pvc-copy")
        .in_netns(&net.a)
        .arg("receive")
        .args(["--listen", &format!("{}:{PORT}", net.addr_a)])
        .arg("--target")
        .arg(target)
        .arg("--token-file")
        .arg(token_file(dir, TOKEN))
        .args(["--progress", "log", "--progress-interval", "0.2"])
}

fn send_cmd(net: &NetnsPair, dir: &Path, source: &Path, to: &str, fingerprint: &str) -> WorkerCmd {
    worker("pvc-copy")
        .in_netns(&net.b)
        .arg("send")
        .arg("--source")
        .arg(source)
        .args(["--to", to, "--server-fingerprint", fingerprint])
        .arg("--token-file")
        .arg(token_file(dir, TOKEN))
        .args(["--progress", "none", "--retry-backoff", "0.2"])
}

/// Starts a receiver and reads its certificate fingerprint from its log.
fn start_receiver(cmd: &WorkerCmd) -> (Spawned<'_>, String) {
    use std::io::{BufRead, BufReader};
    let mut spawned = cmd.spawn();
    let stderr = spawned.child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let fingerprint = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the receiver ended early: {seen:?}"))
            .unwrap();
        if let Some(rest) = line.split("fingerprint ").nth(1) {
            break rest.split(' ').next().unwrap().to_string();
        }
        seen.push(line);
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    wait_listening(cmd);
    (spawned, fingerprint)
}

fn wait_listening(_cmd: &WorkerCmd) {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn network_tree_and_block_arrive_identical_between_namespaces() {
    require_root();
    let dir = test_dir("net-basic");
    let net = NetnsPair::new();
    let src = volume(&dir, "src", GIB, Fs::Ext4);
    let dst = volume(&dir, "dst", GIB, Fs::Xfs);
    make_tree(src.mount_point());
    let to = format!("{}:{PORT}", net.addr_a);

    let recv = receive_cmd(&net, &dir, dst.mount_point());
    let (receiver, fp) = start_receiver(&recv);
    let send = send_cmd(&net, &dir, src.mount_point(), &to, &fp)
        .args(["--streams", "4", "--compress", "zstd"])
        .run();
    let received = receiver.wait();
    send.success();
    received.code(0);
    let digest = send.result()["digests"]["tree"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        received.result()["digests"]["tree"].as_str(),
        Some(&*digest)
    );
    // The receiver hashed what arrived as it arrived: nothing read back.
    assert_eq!(received.result()["digestRereadItems"].as_u64(), Some(0));
    assert_rsync_identical(src.mount_point(), dst.mount_point(), &send);
    for sparse in ["sparse", "all-hole"] {
        assert!(blocks(&dst.mount_point().join(sparse)) <= blocks(&src.mount_point().join(sparse)));
    }
    assert!(!dst.mount_point().join(".pvc-copy-state").exists());

    // A block device: 256 MiB, half zeros, onto a device full of noise.
    let image = dir.join("half-zero.img");
    mostly_zero_file(&image, 256 * MIB, 2, 21);
    let dev = LoopDevice::new(&dir, "blk", 256 * MIB);
    dev.fill_random();
    let recv = receive_cmd(&net, &dir, &dev.device);
    let (receiver, fp) = start_receiver(&recv);
    let send = send_cmd(&net, &dir, &image, &to, &fp).run();
    let received = receiver.wait();
    send.success();
    received.code(0);
    assert_eq!(received.result()["target"]["kind"], "block");
    assert_eq!(received.result()["digestRereadItems"].as_u64(), Some(0));
    assert_eq!(
        received.result()["digests"]["device"],
        send.result()["digests"]["device"]
    );
    cmp_equal(&image, &dev.device, 256 * MIB);
}

#[test]
fn network_wrong_token_and_wrong_fingerprint_are_refused() {
    require_root();
    let dir = test_dir("net-auth");
    let net = NetnsPair::new();
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("file"), "data").unwrap();
    let dst = dir.join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let to = format!("{}:{PORT}", net.addr_a);
    let recv = receive_cmd(&net, &dir, &dst);
    let (receiver, fp) = start_receiver(&recv);

    let wrong = worker("pvc-copy")
        .in_netns(&net.b)
        .arg("send")
        .arg("--source")
        .arg(&src)
        .args([
            "--to",
            &to,
            "--server-fingerprint",
            &fp,
            "--progress",
            "none",
        ])
        .arg("--token-file")
        .arg(token_file(&dir, "not-the-token"))
        .run();
    wrong
        .code(5)
        .reason("Unauthorized")
        .message_contains("wrong token");
    wrong.never_shows(TOKEN);
    assert_eq!(
        std::fs::read_dir(&dst).unwrap().count(),
        0,
        "something was written{}",
        wrong.dump()
    );

    let mut bad_fp = fp.clone();
    bad_fp.replace_range(0..2, if fp.starts_with("00") { "11" } else { "00" });
    let untrusted = send_cmd(&net, &dir, &src, &to, &bad_fp).run();
    untrusted
        .code(5)
        .reason("UntrustedServer")
        .message_contains("fingerprint");
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 0);

    // The receiver still waits for the right sender, and then exits.
    let good = send_cmd(&net, &dir, &src, &to, &fp).run();
    good.success();
    receiver.wait().code(0);
    assert_eq!(std::fs::read_to_string(dst.join("file")).unwrap(), "data");
}

#[test]
fn network_cut_connection_resumes_and_arrives_identical() {
    require_root();
    let dir = test_dir("net-cut");
    let net = NetnsPair::new();
    let image = dir.join("random.img");
    random_file(&image, 192 * MIB, 31);
    let dev = LoopDevice::new(&dir, "blk", 192 * MIB);
    dev.fill_random();
    let upstream: std::net::SocketAddr = format!("{}:{PORT}", net.addr_a).parse().unwrap();
    let proxy = TcpProxy::start(Some(&net.b), "127.0.0.1:0".parse().unwrap(), upstream);
    proxy.cut_after(64 * MIB);
    let recv = receive_cmd(&net, &dir, &dev.device);
    let (receiver, fp) = start_receiver(&recv);
    let send = send_cmd(&net, &dir, &image, &proxy.addr.to_string(), &fp).run();
    let received = receiver.wait();
    send.success();
    received.code(0);
    assert_eq!(
        proxy.cuts(),
        1,
        "the proxy never cut the transfer{}",
        send.dump()
    );
    assert!(
        send.result()["resumes"].as_u64().unwrap() >= 1,
        "{}",
        send.dump()
    );
    assert!(
        received.result()["resumedItems"].as_u64().unwrap() > 0,
        "the receiver resumed nothing{}",
        received.dump()
    );
    // The same receiver process kept the hashes of what arrived before the
    // cut: its digest reads nothing back.
    assert_eq!(
        received.result()["digestRereadItems"].as_u64(),
        Some(0),
        "{}",
        received.dump()
    );
    cmp_equal(&image, &dev.device, 192 * MIB);
}

#[test]
fn network_receiver_killed_and_restarted_resumes() {
    require_root();
    let dir = test_dir("net-restart");
    let net = NetnsPair::new();
    let src = volume(&dir, "src", GIB, Fs::Ext4);
    let dst = volume(&dir, "dst", GIB, Fs::Ext4);
    for i in 0..16 {
        random_file(
            &src.mount_point().join(format!("part{i:02}")),
            16 * MIB,
            200 + i,
        );
    }
    sh(&format!(
        "mkdir {0}/d && echo x > {0}/d/f && ln {0}/d/f {0}/hl",
        src.mount_point().display()
    ));
    let ca = populator_tests::tls::make_ca(&dir.join("tls"));
    let upstream: std::net::SocketAddr = format!("{}:{PORT}", net.addr_a).parse().unwrap();
    // Slow enough to kill the receiver halfway: 256 MiB at 40 MB/s.
    let proxy = TcpProxy::start(Some(&net.b), "127.0.0.1:0".parse().unwrap(), upstream);
    proxy.throttle(40_000_000);
    let recv = receive_cmd(&net, &dir, dst.mount_point())
        .arg("--tls-cert-file")
        .arg(&ca.server_cert)
        .arg("--tls-key-file")
        .arg(&ca.server_key)
        .args(["--commit-interval", "0.2"]);
    let (first, _) = start_receiver(&recv);
    let send_cmd = worker("pvc-copy")
        .in_netns(&net.b)
        .arg("send")
        .arg("--source")
        .arg(src.mount_point())
        .args([
            "--to",
            &proxy.addr.to_string(),
            "--tls-server-name",
            "localhost",
            "--ca-file",
        ])
        .arg(&ca.ca_cert)
        .arg("--token-file")
        .arg(token_file(&dir, TOKEN))
        .args([
            "--progress",
            "none",
            "--retry-backoff",
            "0.5",
            "--streams",
            "2",
        ]);
    let sender = send_cmd.spawn();
    // Kill the receiver once its journal records finished files.
    let journal = dst.mount_point().join(".pvc-copy-state/done");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60)
        && !std::fs::read(&journal)
            .is_ok_and(|b| b.iter().map(|x| x.count_ones()).sum::<u32>() >= 3)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal(libc::SIGKILL);
    let killed = first.wait();
    assert_eq!(
        killed.code,
        128 + libc::SIGKILL,
        "the receiver was not killed mid-transfer{}",
        killed.dump()
    );
    proxy.throttle(0);
    let (second, _) = start_receiver(&recv);
    let sent = sender.wait();
    let received = second.wait();
    sent.success();
    received.code(0);
    assert!(
        received.result()["resumedItems"].as_u64().unwrap() >= 3,
        "{}",
        received.dump()
    );
    // A restarted receiver hashes only the files of the first run again.
    assert_eq!(
        received.result()["digestRereadItems"].as_u64(),
        received.result()["resumedItems"].as_u64(),
        "{}",
        received.dump()
    );
    assert!(
        sent.result()["resumes"].as_u64().unwrap() >= 1,
        "{}",
        sent.dump()
    );
    assert_rsync_identical(src.mount_point(), dst.mount_point(), &sent);
}

// ---- The image: FROM scratch, uid 107, under podman.

fn image_name() -> String {
    let repo =
        std::env::var("POPULATOR_IMAGE_REPO").unwrap_or_else(|_| "localhost/populator".into());
    let tag = std::env::var("POPULATOR_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("{repo}/pvc-copy:{tag}")
}

#[test]
fn pvc_copy_image_copies_a_tree_and_an_image_file_as_uid_107_under_podman() {
    require_root();
    let image = image_name();
    let exists = std::process::Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .unwrap();
    assert!(
        exists.success(),
        "image {image} is missing: build it with `make images` (make test does)"
    );
    let dir = test_dir("image");
    let src = dir.join("src");
    let dst = dir.join("dst");
    let out = dir.join("out");
    for d in [&src, &dst, &out] {
        std::fs::create_dir_all(d).unwrap();
    }
    sh(&format!(
        "cd {src} && mkdir -p a/b && echo hello > a/b/f && ln -s b/f a/l && truncate -s 8M sparse \
         && printf x | dd of=sparse bs=1 seek=4M conv=notrunc status=none \
         && touch -d '2001-01-01 00:00:00.5' a/b/f && chown -R 107:107 . && chown 107:107 {dst} {out}",
        src = src.display(),
        dst = dst.display(),
        out = out.display()
    ));
    let disk = dir.join("disk.img");
    mostly_zero_file(&disk, 24 * MIB, 2, 41);
    let dev = LoopDevice::new(&dir, "blk", 32 * MIB);
    dev.fill_random();
    let device = dev.device.to_str().unwrap().to_string();
    // What a runtime with device_ownership_from_security_context does for uid 107.
    sh(&format!("chown 107:107 {device} {}", disk.display()));
    let podman = |args: &[&str]| {
        std::process::Command::new("podman")
            .args([
                "run",
                "--rm",
                "--runtime",
                "runc",
                "--read-only",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:20000",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(args)
            .output()
            .expect("running podman")
    };
    let tree = podman(&[
        "-v",
        &format!("{}:/source:ro", src.display()),
        "-v",
        &format!("{}:/mnt", dst.display()),
        "-v",
        &format!("{}:/out", out.display()),
        &image,
        "--source",
        "/source",
        "--verify",
        "--termination-log",
        "/out/tree.json",
    ]);
    let block = podman(&[
        "-v",
        &format!("{}:/images:ro", dir.display()),
        "--device",
        &format!("{device}:/dev/block:rw"),
        "-v",
        &format!("{}:/out", out.display()),
        &image,
        "--source",
        "/images",
        "--source-file",
        "disk.img",
        "--termination-log",
        "/out/block.json",
    ]);
    sh(&format!("chown 0:0 {device}"));
    for (what, output) in [("tree", &tree), ("block", &block)] {
        let result = std::fs::read_to_string(out.join(format!("{what}.json"))).unwrap_or_default();
        assert!(
            output.status.success(),
            "the {what} copy failed: {}\n{result}",
            String::from_utf8_lossy(&output.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&result).unwrap();
        assert_eq!(v["status"], "Succeeded");
    }
    assert_eq!(
        std::fs::read_to_string(dst.join("a/b/f")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_link(dst.join("a/l")).unwrap(),
        Path::new("b/f")
    );
    let (a, b) = (
        std::fs::metadata(src.join("a/b/f")).unwrap(),
        std::fs::metadata(dst.join("a/b/f")).unwrap(),
    );
    assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()));
    assert!(blocks(&dst.join("sparse")) <= blocks(&src.join("sparse")) + 8);
    cmp_equal(&disk, &dev.device, 24 * MIB);
}
