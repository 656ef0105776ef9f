//! End-to-end tests of backup-restore (issue 7): repositories written by the
//! real restic (versions 1 and 2) on a local directory, on `rclone serve
//! restic` (REST) and on SeaweedFS S3 (signatures checked); archives from
//! nginx and from a path; a raw image onto a loop device; every bad input of
//! the issue. The fixture tree and the repositories are made once per test
//! process.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use populator_tests::daemon::{tls_front, RestServer, S3Server, S3_ACCESS_KEY, S3_SECRET_KEY};
use populator_tests::fixtures::{random_file, sha256_file, Noise};
use populator_tests::loopdev::{Fs, LoopDevice};
use populator_tests::nginx::{free_port, nginx};
use populator_tests::proxy::{Fault, FaultProxy};
use populator_tests::run::{worker, Run, WorkerCmd};
use populator_tests::{require_root, scratch, sh, test_dir};

const MIB: u64 = 1 << 20;
const PASSWORD: &str = "restic-test-pw-6b1e";
/// Files of the small-file part of the tree.
const SMALL_FILES: u64 = 10_000;

struct Fixture {
    /// The tree of the newer snapshot (and its backed-up path).
    vol: PathBuf,
    /// A copy of the tree as the older snapshot saw it.
    vol_first: PathBuf,
    password_file: PathBuf,
    rest: RestServer,
    s3: S3Server,
    /// Snapshot IDs per repository name: (older, newer).
    snapshots: std::collections::HashMap<String, (String, String)>,
    tar_zst: PathBuf,
    tar_gz: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(make_fixture)
}

fn make_fixture() -> Fixture {
    require_root();
    let dir = scratch().join("br-fixture");
    std::fs::create_dir_all(&dir).unwrap();
    let vol = dir.join("vol");
    make_tree(&vol);
    let vol_first = dir.join("vol-first");
    sh(&format!("cp -a {} {}", vol.display(), vol_first.display()));
    let password_file = dir.join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();

    let rest = RestServer::start(&dir.join("rest-root"), &dir.join("rclone.log"));
    let s3 = S3Server::start(&dir.join("seaweed"));
    let mut repos: Vec<(String, String)> = Vec::new();
    for version in [1, 2] {
        repos.push((
            format!("local-v{version}"),
            dir.join(format!("local-v{version}")).display().to_string(),
        ));
        repos.push((
            format!("rest-v{version}"),
            rest.repo(&format!("v{version}")),
        ));
        repos.push((
            format!("s3-v{version}"),
            s3.repo(&format!("restic/v{version}/prefix")),
        ));
    }
    let mut snapshots = std::collections::HashMap::new();
    // The older snapshot of every repository first, then change the tree,
    // then the newer ones.
    for (name, repo) in &repos {
        let version = &name[name.len() - 1..];
        restic(
            repo,
            &password_file,
            &format!("init --repository-version {version}"),
        );
        let first = backup(repo, &password_file, &vol, "host-old", "first,daily");
        snapshots.insert(name.clone(), (first, String::new()));
    }
    change_tree(&vol);
    for (name, repo) in &repos {
        let second = backup(repo, &password_file, &vol, "host-new", "second");
        snapshots.get_mut(name).unwrap().1 = second;
    }

    let tar_zst = dir.join("vol.tar.zst");
    let tar_gz = dir.join("vol.tar.gz");
    for (path, filter) in [(&tar_zst, "zstd -q -T2"), (&tar_gz, "gzip -1")] {
        sh(&format!(
            "cd {} && tar --xattrs --xattrs-include='user.*' --sparse --numeric-owner -cf - . | {filter} > {}",
            vol.display(),
            path.display()
        ));
    }
    Fixture {
        vol,
        vol_first,
        password_file,
        rest,
        s3,
        snapshots,
        tar_zst,
        tar_gz,
    }
}

/// 10k small files in 100 directories, plus every kind of entry restic keeps.
fn make_tree(vol: &Path) {
    let _ = std::fs::remove_dir_all(vol);
    let mut noise = Noise::new(7);
    let mut sizes = [0u8; 8];
    for d in 0..SMALL_FILES / 100 {
        let sub = vol.join(format!("d{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            noise.fill(&mut sizes);
            let size = u64::from_le_bytes(sizes) % 6000;
            let mut data = vec![0u8; size as usize];
            noise.fill(&mut data);
            std::fs::write(sub.join(format!("f{f:03}")), data).unwrap();
        }
    }
    let big = vol.join("big");
    std::fs::create_dir_all(&big).unwrap();
    random_file(&big.join("random-6m.bin"), 6 * MIB, 11);
    let v = vol.display();
    sh(&format!(
        r#"set -e
cd {v}
# A sparse file: holes around two data regions.
truncate -s 48M big/sparse.img
head -c 1048576 /dev/urandom | dd of=big/sparse.img bs=1M seek=8 conv=notrunc status=none
head -c 65536 /dev/urandom | dd of=big/sparse.img bs=64K seek=767 conv=notrunc status=none
# Zeros written out (restic stores them as one repeated blob).
head -c 8388608 /dev/zero > big/zeros-8m.bin
mkdir -p links empty/nested/deeper attrs special modes/dir-700 modes/sticky owners/dir times
head -c 3000 /dev/urandom > links/hard-a
ln links/hard-a links/hard-b
ln links/hard-a d000/hard-c
ln -s ../d000/f000 links/sym-rel
ln -s /etc/hostname links/sym-abs
ln -s does/not/exist links/dangling
echo hello > attrs/file
setfattr -n user.comment -v 'a comment' attrs/file
setfattr -n user.binary -v 0x00ff10 attrs/file
setfattr -n user.dir -v yes attrs
mkfifo special/fifo
echo s > modes/setuid && chmod 4755 modes/setuid
echo p > modes/private && chmod 600 modes/private
chmod 700 modes/dir-700
chmod 1777 modes/sticky
echo o > owners/file && chown 1234:5678 owners/file
chown 4321:8765 owners/dir
chown -h 2222:3333 links/sym-rel
echo t > times/file && touch -d '2001-02-03 04:05:06.123456789' times/file
touch -h -d '2002-03-04 05:06:07' links/sym-abs
find . -type d -exec touch -d '2020-01-02 03:04:05.5' {{}} +
"#
    ));
}

/// What changes between the older and the newer snapshot.
fn change_tree(vol: &Path) {
    sh(&format!(
        "set -e; cd {}; echo new > d000/new-in-second; head -c 5000 /dev/urandom > d001/f000; rm d002/f001; touch -d '2021-01-01' d000 d001 d002",
        vol.display()
    ));
}

fn restic_cmd(repo: &str, password_file: &Path, args: &str) -> String {
    format!(
        "env -u AWS_CA_BUNDLE AWS_ACCESS_KEY_ID={S3_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET_KEY} RESTIC_CACHE_DIR={cache} restic --no-cache -q -r '{repo}' --password-file {pw} {args}",
        cache = scratch().join("restic-cache").display(),
        pw = password_file.display()
    )
}

fn restic(repo: &str, password_file: &Path, args: &str) -> String {
    sh(&restic_cmd(repo, password_file, args))
}

/// Backs up `vol` and returns the new snapshot's full ID.
fn backup(repo: &str, password_file: &Path, vol: &Path, host: &str, tags: &str) -> String {
    let out = restic(
        repo,
        password_file,
        &format!("backup --json --host {host} --tag {tags} {}", vol.display()),
    );
    let summary = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .unwrap_or_else(|| panic!("no summary from restic backup:\n{out}"));
    // restic 0.14 prints the short ID there; the result carries the full one.
    let short = summary["snapshot_id"].as_str().unwrap();
    let list = restic(repo, password_file, &format!("snapshots --json {short}"));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    list[0]["id"].as_str().unwrap().to_string()
}

fn restore(repo: &str, target: &Path) -> WorkerCmd {
    restore_with_password(repo, target, &fixture().password_file)
}

fn restore_with_password(repo: &str, target: &Path, password_file: &Path) -> WorkerCmd {
    worker("backup-restore")
        .arg("--repository")
        .arg(repo)
        .arg("--password-file")
        .arg(password_file)
        .arg("--target")
        .arg(target)
        .args(["--access-key-id-file", &key_file("id", S3_ACCESS_KEY)])
        .args([
            "--secret-access-key-file",
            &key_file("secret", S3_SECRET_KEY),
        ])
}

fn key_file(name: &str, value: &str) -> String {
    let path = scratch().join(format!("s3-{name}"));
    std::fs::write(&path, value).unwrap();
    path.display().to_string()
}

/// `rsync -aHAX --checksum --dry-run --itemize-changes` prints nothing.
fn assert_same_tree(expected: &Path, actual: &Path, run: &Run) {
    let out = std::process::Command::new("rsync")
        .args([
            "-aHAX",
            "--checksum",
            "--dry-run",
            "--itemize-changes",
            "--delete",
        ])
        .arg(format!("{}/", expected.display()))
        .arg(format!("{}/", actual.display()))
        .output()
        .unwrap();
    let changes = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && changes.trim().is_empty(),
        "restored tree {} differs from {}:\n{changes}{}{}",
        actual.display(),
        expected.display(),
        String::from_utf8_lossy(&out.stderr),
        run.dump()
    );
}

fn restore_and_compare(name: &str, repo: &str) {
    let f = fixture();
    let (first, second) = &f.snapshots[name];
    let target = test_dir(&format!("restore-{name}"));
    let run = restore(repo, &target).args(["--progress", "json"]).run();
    run.success();
    assert_same_tree(&f.vol, &target, &run);
    let r = run.result();
    assert_eq!(r["snapshotId"], second.as_str(), "{}", run.dump());
    assert_eq!(r["snapshotHost"], "host-new");
    // The small files, 3 in big/, 5 single files, links/hard-a (its other
    // names are hardlinks); the newer snapshot added one file and removed one.
    assert_eq!(r["files"], SMALL_FILES + 9, "{}", run.dump());
    assert_eq!(r["hardlinks"], 2);
    assert!(run.stderr.contains("\"totalFiles\""), "{}", run.dump());
    // Holes stay holes: the 48 MiB sparse file and 8 MiB of zeros take
    // little space.
    let sparse = std::fs::metadata(target.join("big/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 48 * MIB);
    assert!(
        sparse.blocks() * 512 < 4 * MIB,
        "{} blocks",
        sparse.blocks()
    );
    assert!(
        std::fs::metadata(target.join("big/zeros-8m.bin"))
            .unwrap()
            .blocks()
            * 512
            < MIB
    );

    // The older snapshot, by its ID (a prefix), into a fresh directory.
    let target = test_dir(&format!("restore-{name}-first"));
    let run = restore(repo, &target)
        .args(["--snapshot", &first[..10]])
        .run();
    run.success();
    assert_same_tree(&f.vol_first, &target, &run);
    assert_eq!(run.result()["snapshotId"], first.as_str());
}

#[test]
fn restores_local_repositories_v1_and_v2() {
    let f = fixture();
    for v in [1, 2] {
        let repo = f.vol.parent().unwrap().join(format!("local-v{v}"));
        restore_and_compare(&format!("local-v{v}"), repo.to_str().unwrap());
    }
}

#[test]
fn restores_over_rest_v1_and_v2() {
    let f = fixture();
    for v in [1, 2] {
        restore_and_compare(&format!("rest-v{v}"), &f.rest.repo(&format!("v{v}")));
    }
}

/// `rest:https://…` with a private CA: trusted through --ca-file, refused
/// without it (the server's certificate is checked).
#[test]
fn restores_over_rest_with_tls_and_a_private_ca() {
    let dir = test_dir("rest-tls");
    let ca = populator_tests::tls::make_ca(&dir.join("tls"));
    let rest = RestServer::start_tls(
        &dir.join("root"),
        &dir.join("rclone.log"),
        &ca.server_cert,
        &ca.server_key,
    );
    backup_and_restore_over_tls(&rest.repo("tls"), &ca.ca_cert, "rest-tls");
}

/// `s3:https://…` (the fixture's SeaweedFS behind an nginx TLS front) with a
/// private CA, as a private MinIO or Ceph RGW would be.
#[test]
fn restores_from_s3_with_tls_and_a_private_ca() {
    let f = fixture();
    let dir = test_dir("s3-tls");
    let ca = populator_tests::tls::make_ca(&dir.join("tls"));
    let port = tls_front(
        &dir.join("front"),
        f.s3.port,
        &ca.server_cert,
        &ca.server_key,
    );
    let repo = format!("s3:https://127.0.0.1:{port}/tlsbucket/repo");
    backup_and_restore_over_tls(&repo, &ca.ca_cert, "s3-tls");
}

/// A --ca-file that holds no certificate is a usage error naming the file,
/// for REST and S3 repositories alike, before any connection is tried.
#[test]
fn a_ca_file_without_a_certificate_is_a_usage_error() {
    let dir = test_dir("bad-ca");
    let bad_ca = dir.join("not-a-ca.pem");
    std::fs::write(&bad_ca, "this is not PEM\n").unwrap();
    for repo in [
        "rest:https://127.0.0.1:9/repo/",
        "s3:https://127.0.0.1:9/bucket/repo",
    ] {
        let target = test_dir(&format!("bad-ca-{}", &repo[..4]));
        let run = restore(repo, &target).arg("--ca-file").arg(&bad_ca).run();
        run.code(2)
            .reason("InvalidConfiguration")
            .message_contains("holds no PEM certificate")
            .message_contains("not-a-ca.pem");
    }
}

/// restic (trusting `ca`) backs up one directory to `repo`; backup-restore
/// fails without --ca-file, naming the certificate, and restores it with.
fn backup_and_restore_over_tls(repo: &str, ca: &Path, name: &str) {
    let f = fixture();
    let restic_tls = |args: &str| {
        restic(
            repo,
            &f.password_file,
            &format!("--cacert {} {args}", ca.display()),
        )
    };
    restic_tls("init");
    let source = f.vol.join("d003");
    restic_tls(&format!("backup {}", source.display()));

    let untrusted = test_dir(&format!("{name}-untrusted"));
    let run = restore(repo, &untrusted).run();
    assert_ne!(run.code, 0, "an unknown CA must be refused{}", run.dump());
    assert!(
        run.stderr.to_lowercase().contains("certificate"),
        "the message should name the certificate{}",
        run.dump()
    );
    assert_eq!(run.result()["status"], "Failed");

    let target = test_dir(&format!("{name}-restore"));
    let run = restore(repo, &target).arg("--ca-file").arg(ca).run();
    run.success();
    assert_same_tree(&source, &target, &run);
}

#[test]
fn restores_from_seaweedfs_s3_v1_and_v2() {
    let f = fixture();
    for v in [1, 2] {
        restore_and_compare(
            &format!("s3-v{v}"),
            &f.s3.repo(&format!("restic/v{v}/prefix")),
        );
    }
    // Credentials from the AWS environment variables instead of files.
    let target = test_dir("restore-s3-env");
    let run = worker("backup-restore")
        .args(["--repository", &f.s3.repo("restic/v2/prefix")])
        .arg("--password-file")
        .arg(&f.password_file)
        .arg("--target")
        .arg(&target)
        .args(["--include", "d007"])
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .run();
    run.success();
    run.never_shows(S3_SECRET_KEY);
    assert_same_tree(&f.vol.join("d007"), &target.join("d007"), &run);
}

#[test]
fn host_tag_path_filters_and_includes_pick_the_right_data() {
    let f = fixture();
    let repo = f.vol.parent().unwrap().join("local-v2");
    let repo = repo.to_str().unwrap();
    let (first, second) = &f.snapshots["local-v2"];
    for (args, expected) in [
        (vec!["--host", "host-old"], first),
        (vec!["--tag", "daily"], first),
        (vec!["--tag", "first,daily"], first),
        (vec!["--tag", "second"], second),
        (vec!["--host", "host-new", "--host", "host-old"], second),
        (vec!["--path", f.vol.to_str().unwrap()], second),
    ] {
        let target = test_dir("filters");
        let run = restore(repo, &target)
            .args(&args)
            .args(["--include", "d001"])
            .run();
        run.success();
        assert_eq!(
            run.result()["snapshotId"],
            expected.as_str(),
            "{args:?}{}",
            run.dump()
        );
        let source = if expected == first {
            &f.vol_first
        } else {
            &f.vol
        };
        assert_eq!(
            sha256_file(&target.join("d001/f000")),
            sha256_file(&source.join("d001/f000")),
            "{args:?}"
        );
    }

    // Includes: a directory and a single file, nothing else.
    let target = test_dir("includes");
    let run = restore(repo, &target)
        .args([
            "--include",
            "d005",
            "--include",
            "big/sparse.img",
            "--include",
            "/links",
        ])
        .run();
    run.success();
    assert_same_tree(&f.vol.join("d005"), &target.join("d005"), &run);
    assert_same_tree(&f.vol.join("links"), &target.join("links"), &run);
    assert_eq!(
        sha256_file(&target.join("big/sparse.img")),
        sha256_file(&f.vol.join("big/sparse.img"))
    );
    let mut top: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["big", "d005", "links"], "{}", run.dump());
    assert_eq!(std::fs::read_dir(target.join("big")).unwrap().count(), 1);
    assert_eq!(run.result()["files"], 100 + 1 + 1);

    // Filters that match nothing, and an include that is not there.
    let run = restore(repo, &test_dir("nomatch"))
        .args(["--host", "nobody"])
        .run();
    run.code(2)
        .reason("SnapshotNotFound")
        .message_contains("host nobody");
    let run = restore(repo, &test_dir("noinclude"))
        .args(["--include", "no/such"])
        .run();
    run.code(2)
        .reason("IncludeNotFound")
        .message_contains("no/such");
}

#[test]
fn velero_repository_path_and_default_password() {
    let dir = test_dir("velero");
    let bucket = dir.join("bucket");
    let repo = bucket.join("restic/app-ns");
    let pw = dir.join("velero-pw");
    std::fs::write(&pw, "static-passw0rd").unwrap();
    let f = fixture();
    restic(repo.to_str().unwrap(), &pw, "init");
    backup(
        repo.to_str().unwrap(),
        &pw,
        &f.vol.join("d003"),
        "node-1",
        "velero",
    );
    let target = test_dir("velero-target");
    let run = worker("backup-restore")
        .args(["--velero-namespace", "app-ns"])
        .arg("--velero-bucket-url")
        .arg(&bucket)
        .arg("--target")
        .arg(&target)
        .run();
    run.success();
    assert_same_tree(&f.vol.join("d003"), &target, &run);
    assert_eq!(run.result()["repository"], repo.display().to_string());
}

#[test]
fn archives_from_http_and_a_path_restore_identically() {
    let f = fixture();
    for archive in [&f.tar_zst, &f.tar_gz] {
        let name = archive.file_name().unwrap().to_str().unwrap();
        let url = nginx().serve(&format!("br/{name}"), archive);
        for source in [url.as_str(), archive.to_str().unwrap()] {
            let target = test_dir("archive");
            let run = worker("backup-restore")
                .args(["--archive", source])
                .arg("--target")
                .arg(&target)
                .args(["--progress", "json"])
                .run();
            run.success();
            // The target root keeps its own metadata (the contract's choice
            // for archives): align it before comparing the rest.
            sh(&format!(
                "touch -r {v} {t} && chmod --reference={v} {t}",
                v = f.vol.display(),
                t = target.display()
            ));
            assert_same_tree(&f.vol, &target, &run);
            assert_eq!(run.sha256(), sha256_file(archive), "{}", run.dump());
            assert!(run.stderr.contains("\"files\""), "{}", run.dump());
        }
    }
}

#[test]
fn raw_images_onto_a_block_device_and_into_disk_img() {
    require_root();
    let dir = test_dir("image");
    let raw = dir.join("disk.raw");
    random_file(&raw, 24 * MIB, 5);
    let expected = sha256_file(&raw);
    sh(&format!("gzip -1 -k {}", raw.display()));
    let gz = dir.join("disk.raw.gz");
    let url = nginx().serve("br/disk.raw.gz", &gz);
    let dev = LoopDevice::new(&dir, "block", 32 * MIB);
    let run = worker("backup-restore")
        .args(["--image", &url])
        .arg("--target")
        .arg(&dev.device)
        .run();
    run.success();
    assert_eq!(run.result()["target"]["kind"], "block");
    assert_eq!(
        sh(&format!(
            "head -c {} {} | sha256sum",
            24 * MIB,
            dev.device.display()
        ))[..64],
        expected
    );
    let fs_dir = test_dir("image-dir");
    let run = worker("backup-restore")
        .arg("--image")
        .arg(&raw)
        .arg("--target")
        .arg(&fs_dir)
        .run();
    run.success();
    assert_eq!(sha256_file(&fs_dir.join("disk.img")), expected);

    // A qcow2 backup (zlib-compressed clusters) is converted to raw as it
    // streams, through the core's disk content.
    let qcow2 = dir.join("disk.qcow2");
    sh(&format!(
        "qemu-img convert -c -f raw -O qcow2 {} {}",
        raw.display(),
        qcow2.display()
    ));
    let qcow2_dir = test_dir("image-qcow2");
    let run = worker("backup-restore")
        .arg("--image")
        .arg(&qcow2)
        .arg("--target")
        .arg(&qcow2_dir)
        .run();
    run.success();
    assert_eq!(run.result()["format"], "qcow2", "result: {}", run.result());
    assert_eq!(sha256_file(&qcow2_dir.join("disk.img")), expected);
}

#[test]
fn wrong_password_exits_5_and_missing_repository_or_snapshot_exits_2() {
    let f = fixture();
    let dir = test_dir("bad-password");
    let bad = dir.join("pw");
    std::fs::write(&bad, "not-the-password").unwrap();
    let repo = f.vol.parent().unwrap().join("local-v2");
    let repo = repo.to_str().unwrap().to_string();
    for repository in [
        repo.clone(),
        f.rest.repo("v1"),
        f.s3.repo("restic/v2/prefix"),
    ] {
        let run = restore_with_password(&repository, &dir, &bad).run();
        run.code(5)
            .reason("WrongPassword")
            .message_contains("--password-file");
        run.never_shows("not-the-password");
    }
    let run = restore("/nonexistent/repo", &dir).run();
    run.code(2)
        .reason("RepositoryNotFound")
        .message_contains("/nonexistent/repo");
    let run = restore(&f.rest.repo("missing"), &dir).run();
    run.code(2).reason("RepositoryNotFound");
    let run = restore(&f.s3.repo("restic/missing"), &dir).run();
    run.code(2).reason("RepositoryNotFound");
    let run = restore(&repo, &dir).args(["--snapshot", "deadbeef"]).run();
    run.code(2)
        .reason("SnapshotNotFound")
        .message_contains("deadbeef");
    let run = restore_with_password(&repo, &dir, &dir.join("nope")).run();
    run.code(2).reason("SecretUnreadable");
}

#[test]
fn wrong_s3_credentials_exit_5() {
    let f = fixture();
    let dir = test_dir("bad-s3");
    let run = worker("backup-restore")
        .args(["--repository", &f.s3.repo("restic/v2/prefix")])
        .arg("--password-file")
        .arg(&f.password_file)
        .arg("--target")
        .arg(&dir)
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-1234")
        .run();
    run.code(5).reason("Unauthorized");
    run.never_shows("wrong-secret-1234");
}

#[test]
fn a_corrupted_pack_exits_3_naming_the_file() {
    let f = fixture();
    let dir = test_dir("corrupt");
    let repo = dir.join("repo");
    sh(&format!(
        "cp -a {} {}",
        f.vol.parent().unwrap().join("local-v1").display(),
        repo.display()
    ));
    // The largest pack holds file data; flip bytes in its middle.
    let pack = sh(&format!(
        "find {}/data -type f -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2",
        repo.display()
    ));
    let pack = PathBuf::from(pack.trim());
    let size = std::fs::metadata(&pack).unwrap().len();
    sh(&format!(
        "chmod u+w {p}; printf 'XXXXXXXX' | dd of={p} bs=1 seek={} conv=notrunc status=none",
        size / 2,
        p = pack.display()
    ));
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let run = restore(repo.to_str().unwrap(), &target).run();
    let pack_name = pack.file_name().unwrap().to_str().unwrap();
    run.code(3)
        .reason("CorruptPack")
        .message_contains(pack_name);
}

#[test]
fn a_target_too_small_exits_4() {
    require_root();
    let f = fixture();
    let dir = test_dir("small");
    let fs = LoopDevice::with_fs(&dir, "small", 24 * MIB, Fs::Ext4);
    let repo = f.vol.parent().unwrap().join("local-v2");
    let run = restore(repo.to_str().unwrap(), fs.mount_point()).run();
    run.code(4)
        .reason("InsufficientCapacity")
        .message_contains("can take only");
}

#[test]
fn hostile_archive_entries_exit_3_and_nothing_lands_outside() {
    let dir = test_dir("hostile");
    let tar = dir.join("evil.tar");
    sh(&format!(
        r#"python3 - <<'EOF'
import tarfile, io
with tarfile.open("{}", "w") as t:
    for name in ["ok.txt", "../escaped.txt"]:
        data = b"payload"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
EOF"#,
        tar.display()
    ));
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let run = worker("backup-restore")
        .arg("--archive")
        .arg(&tar)
        .arg("--target")
        .arg(&target)
        .run();
    run.code(3).message_contains("escaped.txt");
    assert!(!dir.join("escaped.txt").exists());
    assert!(!target.join("ok.txt").exists(), "{}", run.dump());
}

/// The image (FROM scratch, uid 107, read-only root) restores a snapshot
/// over REST into a directory under podman. `make test` builds the image
/// first (`make images`).
#[test]
fn backup_restore_image_restores_a_snapshot_under_podman() {
    require_root();
    let repo =
        std::env::var("POPULATOR_IMAGE_REPO").unwrap_or_else(|_| "localhost/populator".into());
    let tag = std::env::var("POPULATOR_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    let image = format!("{repo}/backup-restore:{tag}");
    let exists = std::process::Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .unwrap();
    assert!(
        exists.success(),
        "image {image} is missing: build it with `make images` (make test does)"
    );
    let f = fixture();
    let dir = test_dir("podman");
    let (target, secrets) = (dir.join("target"), dir.join("secrets"));
    for d in [&target, &secrets] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::copy(&f.password_file, secrets.join("password")).unwrap();
    sh(&format!(
        "chmod 777 {} && chmod 755 {s} && chmod 444 {s}/password",
        target.display(),
        s = secrets.display()
    ));
    let output = std::process::Command::new("podman")
        .args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "host",
            "--read-only",
        ])
        .args([
            "--ulimit",
            "nofile=1024:20000",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .arg("-v")
        .arg(format!("{}:/mnt", target.display()))
        .arg("-v")
        .arg(format!("{}:/secrets:ro", secrets.display()))
        .arg(&image)
        .args(["--repository", &f.rest.repo("v2")])
        .args(["--password-file", "/secrets/password"])
        .args([
            "--termination-log",
            "/mnt/.result.json",
            "--include",
            "d004",
        ])
        .output()
        .expect("running podman");
    let result = std::fs::read_to_string(target.join(".result.json")).unwrap_or_default();
    let dump = format!(
        "\nstatus: {}\nstderr:\n{}\nresult:\n{result}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the container failed{dump}");
    let v: serde_json::Value = serde_json::from_str(&result).expect("a JSON result");
    assert_eq!(v["status"], "Succeeded", "{dump}");
    assert_eq!(
        v["target"]["path"], "/mnt",
        "the default target /mnt was not used{dump}"
    );
    assert_eq!(v["files"], 100, "{dump}");
    // As uid 107 the owners are not restored; contents, modes and times are.
    let out = sh(&format!(
        "rsync -rlptc --dry-run --itemize-changes {}/d004/ {}/d004/",
        f.vol.display(),
        target.display()
    ));
    assert!(out.trim().is_empty(), "differences:\n{out}{dump}");
    let owner = std::fs::metadata(target.join("d004/f000")).unwrap().uid();
    assert_eq!(owner, 107);
}

/// `restic backup d008` run in the parent directory keeps the tree as
/// `d008/…` while the snapshot records the absolute path.
#[test]
fn a_relative_backup_path_lands_at_the_target_root() {
    let f = fixture();
    let dir = test_dir("relative");
    let repo = dir.join("repo");
    let repo = repo.to_str().unwrap();
    restic(repo, &f.password_file, "init");
    sh(&format!(
        "cd {} && {}",
        f.vol.display(),
        restic_cmd(repo, &f.password_file, "backup d008")
    ));
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let run = restore(repo, &target).run();
    run.success();
    assert_same_tree(&f.vol.join("d008"), &target, &run);
}

/// `restic backup .` run inside the volume (how VolSync's restic mover
/// backs up its mount point) records the absolute directory as the
/// snapshot's path but puts the entries at the tree's root.
#[test]
fn a_backup_of_dot_inside_the_volume_lands_at_the_target_root() {
    let f = fixture();
    let dir = test_dir("dot");
    let repo = dir.join("repo");
    let repo = repo.to_str().unwrap();
    restic(repo, &f.password_file, "init");
    let source = f.vol.join("d008");
    sh(&format!(
        "cd {} && {}",
        source.display(),
        restic_cmd(repo, &f.password_file, "backup .")
    ));
    let listed = restic(repo, &f.password_file, "ls --json latest");
    assert!(
        listed.contains(&format!("\"paths\":[\"{}\"]", source.display())),
        "restic should record the absolute path of '.':\n{listed}"
    );
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let run = restore(repo, &target).run();
    run.success();
    // restic stores no node for '.' itself, so the volume root keeps its
    // own times; every entry below it is compared.
    sh(&format!(
        "touch -r {} {}",
        source.display(),
        target.display()
    ));
    assert_same_tree(&source, &target, &run);
}

/// The progress percentage in a scrape of the metrics endpoint.
fn scraped_progress(port: u16, owner: &str) -> Option<f64> {
    let body = populator_tests::run::scrape_metrics(port);
    let prefix = format!("populator_progress{{ownerUID=\"{owner}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// Starts a restore of the REST v2 repository through a throttling proxy,
/// waits until the metrics endpoint reports it partway, and sends `signal`.
fn interrupt_midway(proxy: &FaultProxy, target: &Path, signal: i32) -> (Run, Vec<f64>) {
    let port = free_port();
    let cmd = restore(&format!("rest:{}", proxy.url("v2/")), target).args([
        "--connections",
        "2",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--owner-uid",
        "br-interrupt",
    ]);
    let child = cmd.spawn();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if let Some(p) = scraped_progress(port, "br-interrupt") {
            seen.push(p);
            if p > 5.0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.signal(signal);
    (child.wait(), seen)
}

#[test]
fn sigterm_or_kill_midway_then_a_rerun_restores_the_whole_tree() {
    let f = fixture();
    let proxy = FaultProxy::start(f.rest.port);
    // About 4 MiB/s over the two connections: the restore takes seconds.
    proxy.default_fault(Fault::Throttle(2 * MIB));
    let target = test_dir("interrupted");

    // SIGTERM while files are being written: 143, a Failed result, no
    // success message; the metrics endpoint served rising progress.
    let (run, seen) = interrupt_midway(&proxy, &target, libc::SIGTERM);
    run.code(143).reason("Terminated");
    assert!(
        !run.stdout.contains("verified") && !run.stderr.contains("verified"),
        "{}",
        run.dump()
    );
    assert!(
        seen.last().is_some_and(|&p| p > 5.0 && p < 100.0),
        "the metrics never showed a restore partway: {seen:?}{}",
        run.dump()
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress fell: {seen:?}"
    );

    // SIGKILL leaves no result and half-written files behind; a rerun
    // (unthrottled) must not take them for restored.
    let (run, _) = interrupt_midway(&proxy, &target, libc::SIGKILL);
    assert_eq!(run.code, 128 + libc::SIGKILL, "{}", run.dump());
    proxy.default_fault(Fault::Pass);
    let run = restore(&f.rest.repo("v2"), &target).run();
    run.success();
    assert_same_tree(&f.vol, &target, &run);
    assert_eq!(run.result()["files"], SMALL_FILES + 9, "{}", run.dump());
}
