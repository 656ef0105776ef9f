//! End-to-end tests of git-clone (issue 4): real git-http-backend behind
//! nginx (open, basic auth, TLS), git daemon, sshd and file://, fixture
//! repositories built with the git CLI and plumbing, loop devices for
//! capacity, as root.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use populator_tests::fixtures::secret_file;
use populator_tests::git_servers::{
    blob, git, git_daemon, git_http, git_root, raw_tree, sshd, GIT_PASSWORD, GIT_TOKEN, GIT_USER,
};
use populator_tests::loopdev::{Fs, LoopDevice};
use populator_tests::podman::{podman_run, require_image, ContainerRun};
use populator_tests::run::{worker, Run, WorkerCmd};
use populator_tests::{require_root, scratch, sh, test_dir};

/// Commits of the fixture repository `main.git`.
struct MainRepo {
    /// c1 (lightweight tag `light`), c2 (no ref: a non-tip commit), c3
    /// (annotated tag `v1.0`), c4 (tip of `main`).
    c1: String,
    c2: String,
    c3: String,
    c4: String,
    /// Tip of branch `feature`, forked at c2.
    feature: String,
}

fn bare(name: &str) -> PathBuf {
    git_root().join(name)
}

/// Publishes the work repository `work` as the bare `name` under the git root.
fn publish(work: &Path, name: &str) {
    let dst = bare(name);
    let _ = std::fs::remove_dir_all(&dst);
    sh(&format!(
        "git clone -q --bare {} {} && git -C {} config uploadpack.allowReachableSHA1InWant false",
        work.display(),
        dst.display(),
        dst.display()
    ));
    // The tags of the work repository, and only its branches.
    git(&dst, "fetch -q --tags origin 'refs/heads/*:refs/heads/*'");
    git(&dst, "remote remove origin");
}

fn main_repo() -> &'static MainRepo {
    static REPO: OnceLock<MainRepo> = OnceLock::new();
    REPO.get_or_init(|| {
        let work = scratch().join("src-main");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, "init -q");
        let w = |rel: &str, content: &str| {
            let p = work.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        };
        w("README.md", "# fixture\nversion 1\n");
        w("bin/run.sh", "#!/bin/sh\necho run\n");
        std::fs::set_permissions(work.join("bin/run.sh"), PermissionsExt::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("README.md", work.join("link-to-readme")).unwrap();
        std::os::unix::fs::symlink("../README.md", work.join("bin/up-link")).unwrap();
        w("dir/nested/deep.txt", "deep\n");
        w("space name.txt", "spaces\n");
        w("ünïcödé.txt", "unicode\n");
        w("empty", "");
        w("docs/api/index.md", "api\n");
        w("docs/guide.md", "guide\n");
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(work.join("data.bin"), noise).unwrap();
        git(&work, "add -A && git commit -q -m c1");
        let c1 = git(&work, "rev-parse HEAD");
        git(&work, "tag light");
        w("README.md", "# fixture\nversion 2\n");
        w("second.txt", "two\n");
        git(&work, "add -A && git commit -q -m c2");
        let c2 = git(&work, "rev-parse HEAD");
        git(&work, "checkout -q -b feature");
        w("feature.txt", "feature work\n");
        git(&work, "add -A && git commit -q -m f1");
        let feature = git(&work, "rev-parse HEAD");
        git(&work, "checkout -q main");
        w("README.md", "# fixture\nversion 3\n");
        git(&work, "add -A && git commit -q -m c3");
        let c3 = git(&work, "rev-parse HEAD");
        git(&work, "tag -a v1.0 -m 'release 1.0'");
        w("README.md", "# fixture\nversion 4\n");
        git(
            &work,
            "rm -q second.txt && git add -A && git commit -q -m c4",
        );
        let c4 = git(&work, "rev-parse HEAD");
        publish(&work, "main.git");
        MainRepo {
            c1,
            c2,
            c3,
            c4,
            feature,
        }
    })
}

fn clone(repo: &str, target: &Path) -> WorkerCmd {
    worker("git-clone")
        .arg("--repo")
        .arg(repo)
        .arg("--target")
        .arg(target)
        .args(["--retry-backoff", "0.1", "--progress", "log"])
}

/// The commit `git archive` unpacked into a fresh directory.
fn archive_of(repo: &Path, commit: &str) -> PathBuf {
    let out = scratch().join(format!("archive-{commit}"));
    if !out.exists() {
        let tmp = out.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        sh(&format!(
            "git -C {} archive {commit} | tar -x -C {}",
            repo.display(),
            tmp.display()
        ));
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { exec: bool, content: Vec<u8> },
    Link(PathBuf),
}

/// Every path under `root` (without `.git` and `skip`), with type, exec bit,
/// content and link target.
fn snapshot(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<PathBuf, Node>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let name = e.file_name();
            if name == ".git" || skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, Node::Link(std::fs::read_link(&p).unwrap()));
            } else if m.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &p, skip, out);
            } else {
                out.insert(
                    rel,
                    Node::File {
                        exec: m.permissions().mode() & 0o111 != 0,
                        content: std::fs::read(&p).unwrap(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn assert_same_tree(expected: &Path, actual: &Path, run: &Run) {
    let want = snapshot(expected, &[]);
    let got = snapshot(actual, &["lost+found"]);
    if want != got {
        let only_want: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let only_got: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .map(|(k, _)| k)
            .collect();
        panic!(
            "the checkout differs from git archive: missing {only_want:?}, extra {only_got:?}, different {differ:?}{}",
            run.dump()
        );
    }
}

/// The checkout is a working git repository at `commit`, clean, with a
/// remote URL free of credentials.
fn assert_git_state(dir: &Path, commit: &str, run: &Run) {
    assert_eq!(
        git(dir, "rev-parse HEAD"),
        commit,
        "HEAD is not the commit{}",
        run.dump()
    );
    assert_eq!(
        git(dir, "status --porcelain --untracked-files=no"),
        "",
        "git status is not clean{}",
        run.dump()
    );
    assert_eq!(run.result()["commit"], commit, "{}", run.dump());
    let hooks = sh(&format!(
        "find {}/.git -path '*hooks*' -type f",
        dir.display()
    ));
    assert_eq!(hooks.trim(), "", "hook files in the clone{}", run.dump());
}

fn check_ref(url: &str, git_ref: &str, commit: &str, depth: &str, name: &str) -> Run {
    let dir = test_dir(name);
    let run = clone(url, &dir)
        .args(["--ref", git_ref, "--depth", depth])
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), commit), &dir, &run);
    assert_git_state(&dir, commit, &run);
    assert!(
        run.result()["commitTime"]
            .as_str()
            .is_some_and(|t| t == "2024-01-02T03:04:05Z"),
        "{}",
        run.dump()
    );
    let count: usize = git(&dir, "rev-list --count HEAD").parse().unwrap();
    // A commit no ref advertises is found by deepening: more history comes.
    if depth == "1" && commit != main_repo().c2 {
        assert_eq!(count, 1, "depth 1 fetched {count} commits{}", run.dump());
    } else if depth == "0" {
        let want: usize = git(&bare("main.git"), &format!("rev-list --count {commit}"))
            .parse()
            .unwrap();
        assert_eq!(count, want, "full clone misses history{}", run.dump());
        assert!(!dir.join(".git/shallow").exists());
    }
    assert!(!dir.join(".git-clone-staging").exists());
    run
}

#[test]
fn refs_over_smart_http_match_git_archive_and_rev_parse() {
    require_root();
    let r = main_repo();
    let url = git_http().url("main.git");
    let run = check_ref(&url, "HEAD", &r.c4, "1", "http-head");
    assert_eq!(run.result()["ref"], "refs/heads/main");
    let dir = scratch().join("http-head");
    assert_eq!(git(&dir, "symbolic-ref HEAD"), "refs/heads/main");
    assert_eq!(git(&dir, "config remote.origin.url"), url);
    check_ref(&url, "feature", &r.feature, "1", "http-branch");
    let run = check_ref(&url, "v1.0", &r.c3, "1", "http-annotated");
    assert_eq!(run.result()["ref"], "refs/tags/v1.0");
    check_ref(&url, "light", &r.c1, "1", "http-light");
    check_ref(&url, &r.c4, &r.c4, "1", "http-tip-sha");
    // c2 is advertised by no ref: the fallback fetches and deepens.
    check_ref(&url, &r.c2, &r.c2, "1", "http-non-tip-sha");
    check_ref(&url, "main", &r.c4, "0", "http-full");
    check_ref(&url, &r.c2, &r.c2, "0", "http-full-non-tip");
}

#[test]
fn git_daemon_file_and_tls_transports() {
    require_root();
    let r = main_repo();
    check_ref(
        &git_daemon().url("main.git"),
        "v1.0",
        &r.c3,
        "1",
        "daemon-tag",
    );
    check_ref(
        &git_daemon().url("main.git"),
        &r.c2,
        &r.c2,
        "1",
        "daemon-non-tip",
    );
    let file_url = format!("file://{}", bare("main.git").display());
    // libgit2's local transport fetches file:// in full, whatever --depth says.
    check_ref(&file_url, "main", &r.c4, "0", "file-main");
    let dir = test_dir("file-depth-1");
    let run = clone(&file_url, &dir).run();
    run.success().stderr_contains("fetched in full");
    assert_same_tree(&archive_of(&bare("main.git"), &r.c4), &dir, &run);
    check_ref(&file_url, &r.c2, &r.c2, "0", "file-full-sha");

    let server = git_http();
    let dir = test_dir("tls-ca");
    let run = clone(&server.tls_url("main.git"), &dir)
        .arg("--ca-file")
        .arg(&server.ca.ca_cert)
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), &r.c4), &dir, &run);

    let dir = test_dir("tls-no-ca");
    let run = clone(&server.tls_url("main.git"), &dir).run();
    run.code(5).reason("TlsVerificationFailed");
    assert_eq!(snapshot(&dir, &[]).len(), 0, "{}", run.dump());

    let dir = test_dir("tls-insecure");
    let run = clone(&server.tls_url("main.git"), &dir)
        .arg("--insecure-skip-tls-verify")
        .run();
    run.success().stderr_contains("NOT verified");
}

/// Nothing the worker left behind mentions `secret`.
fn assert_secret_nowhere(dir: &Path, secret: &str, run: &Run) {
    run.never_shows(secret);
    let found = sh(&format!(
        "grep -rlF -- '{secret}' {} || true",
        dir.display()
    ));
    assert!(
        found.trim().is_empty(),
        "the secret is in {found}{}",
        run.dump()
    );
}

#[test]
fn basic_auth_and_token_work_and_never_leak() {
    require_root();
    let r = main_repo();
    let server = git_http();
    let secrets = test_dir("auth-secrets");
    let user = secret_file(&secrets, "user", GIT_USER);
    let pass = secret_file(&secrets, "pass", GIT_PASSWORD);
    let token = secret_file(&secrets, "token", GIT_TOKEN);
    let wrong = secret_file(&secrets, "wrong", "not-the-password");

    let dir = test_dir("auth-basic");
    let run = clone(&server.auth_url("main.git"), &dir)
        .arg("--username-file")
        .arg(&user)
        .arg("--password-file")
        .arg(&pass)
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), &r.c4), &dir, &run);
    assert_secret_nowhere(&dir, GIT_PASSWORD, &run);
    assert_eq!(
        git(&dir, "config remote.origin.url"),
        server.auth_url("main.git")
    );

    let dir = test_dir("auth-token");
    let run = clone(&server.auth_url("main.git"), &dir)
        .arg("--token-file")
        .arg(&token)
        .run();
    run.success();
    assert_secret_nowhere(&dir, GIT_TOKEN, &run);

    let dir = test_dir("auth-wrong");
    let run = clone(&server.auth_url("main.git"), &dir)
        .arg("--username-file")
        .arg(&user)
        .arg("--password-file")
        .arg(&wrong)
        .run();
    run.code(5).reason("AuthenticationFailed");
    run.never_shows("not-the-password");
    assert_eq!(snapshot(&dir, &[]).len(), 0, "{}", run.dump());

    let dir = test_dir("auth-wrong-token");
    let run = clone(&server.auth_url("main.git"), &dir)
        .arg("--token-file")
        .arg(&wrong)
        .run();
    run.code(5);

    let dir = test_dir("auth-none");
    let run = clone(&server.auth_url("main.git"), &dir).run();
    run.code(5).message_contains("--username-file");

    // A password in the URL is refused before anything is sent.
    let dir = test_dir("auth-in-url");
    let run = clone(
        &format!("http://u:secretpw@127.0.0.1:{}/auth/main.git", server.port),
        &dir,
    )
    .run();
    run.code(2).message_contains("--password-file");
    run.never_shows("secretpw");
}

#[test]
fn ssh_with_keys_and_strict_host_keys() {
    require_root();
    let r = main_repo();
    let s = sshd();
    let url = s.url("main.git");
    let ssh = |dir: &Path, key: &Path, known: &Path| {
        clone(&url, dir)
            .arg("--ssh-key-file")
            .arg(key)
            .arg("--known-hosts-file")
            .arg(known)
    };
    for (name, key) in [
        ("ed25519", &s.key),
        ("rsa", &s.rsa_key),
        ("ecdsa", &s.ecdsa_key),
    ] {
        let dir = test_dir(&format!("ssh-{name}"));
        let run = ssh(&dir, key, &s.known_hosts).args(["--ref", "v1.0"]).run();
        run.success();
        assert_same_tree(&archive_of(&bare("main.git"), &r.c3), &dir, &run);
        assert_git_state(&dir, &r.c3, &run);
    }
    // A non-tip SHA over SSH: the fallback deepens.
    let dir = test_dir("ssh-non-tip");
    let run = ssh(&dir, &s.key, &s.known_hosts)
        .args(["--ref", &r.c2])
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), &r.c2), &dir, &run);

    // The scp-like form (user@host:path) reaches port 22: its own sshd.
    let s22 = populator_tests::git_servers::sshd_port_22();
    let dir = test_dir("ssh-scp-like");
    let run = clone(&s22.scp_url("main.git"), &dir)
        .arg("--ssh-key-file")
        .arg(&s22.key)
        .arg("--known-hosts-file")
        .arg(&s22.known_hosts)
        .args(["--ref", "feature"])
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), &r.feature), &dir, &run);
    assert_eq!(
        git(&dir, "config remote.origin.url"),
        s22.scp_url("main.git")
    );

    let dir = test_dir("ssh-passphrase");
    let pass = secret_file(&test_dir("ssh-pass-secret"), "pass", s.passphrase);
    let run = ssh(&dir, &s.key_with_passphrase, &s.known_hosts)
        .arg("--ssh-key-passphrase-file")
        .arg(&pass)
        .run();
    run.success();
    assert_secret_nowhere(&dir, s.passphrase, &run);

    let dir = test_dir("ssh-changed");
    let run = ssh(&dir, &s.key, &s.wrong_known_hosts).run();
    run.code(5).reason("HostKeyChanged");

    let dir = test_dir("ssh-unknown");
    let run = ssh(&dir, &s.key, &s.other_known_hosts).run();
    run.code(5)
        .reason("HostKeyUnknown")
        .message_contains("not in the known_hosts");

    let dir = test_dir("ssh-no-known-hosts");
    let run = clone(&url, &dir).arg("--ssh-key-file").arg(&s.key).run();
    run.code(5).message_contains("--known-hosts-file");

    let dir = test_dir("ssh-accept-any");
    let run = clone(&url, &dir)
        .arg("--ssh-key-file")
        .arg(&s.key)
        .arg("--ssh-accept-any-host-key")
        .run();
    run.success().stderr_contains("NOT verified");

    let dir = test_dir("ssh-stranger");
    let run = ssh(&dir, &s.stranger_key, &s.known_hosts).run();
    run.code(5).reason("AuthenticationFailed");

    let dir = test_dir("ssh-missing-key");
    let run = ssh(&dir, &dir.join("no-such-key"), &s.known_hosts).run();
    run.code(2).message_contains("no-such-key");
}

/// `subsub.git` (one file), `sub.git` (its c2 records subsub through a
/// relative URL; c3 is its tip), `super.git` (sub at c2 through "../sub.git",
/// subsub through an absolute git:// URL).
fn submodule_repos() -> &'static (String, String) {
    static REPOS: OnceLock<(String, String)> = OnceLock::new();
    REPOS.get_or_init(|| {
        let base = scratch().join("src-submodules");
        let _ = std::fs::remove_dir_all(&base);
        let mk = |name: &str| {
            let d = base.join(name);
            std::fs::create_dir_all(&d).unwrap();
            git(&d, "init -q");
            d
        };
        let subsub = mk("subsub");
        std::fs::write(subsub.join("deep.txt"), "deepest\n").unwrap();
        git(&subsub, "add -A && git commit -q -m s1");
        let subsub_tip = git(&subsub, "rev-parse HEAD");
        publish(&subsub, "subsub.git");

        let sub = mk("sub");
        std::fs::write(sub.join("sub.txt"), "sub v1\n").unwrap();
        git(&sub, "add -A && git commit -q -m s1");
        std::fs::write(sub.join("sub.txt"), "sub v2\n").unwrap();
        std::fs::write(
            sub.join(".gitmodules"),
            "[submodule \"nested\"]\n\tpath = nested\n\turl = ../subsub.git\n",
        )
        .unwrap();
        git(&sub, "add sub.txt .gitmodules");
        git(
            &sub,
            &format!("update-index --add --cacheinfo 160000,{subsub_tip},nested"),
        );
        git(&sub, "commit -q -m s2");
        let sub_c2 = git(&sub, "rev-parse HEAD");
        std::fs::write(sub.join("sub.txt"), "sub v3\n").unwrap();
        git(&sub, "add -A && git commit -q -m s3");
        publish(&sub, "sub.git");

        let sup = mk("super");
        std::fs::write(sup.join("top.txt"), "top\n").unwrap();
        std::fs::write(
            sup.join(".gitmodules"),
            format!(
                "[submodule \"libs/sub\"]\n\tpath = libs/sub\n\turl = ../sub.git\n\
                 [submodule \"abs\"]\n\tpath = abs\n\turl = {}\n",
                git_daemon().url("subsub.git")
            ),
        )
        .unwrap();
        git(&sup, "add top.txt .gitmodules");
        git(
            &sup,
            &format!("update-index --add --cacheinfo 160000,{sub_c2},libs/sub"),
        );
        git(
            &sup,
            &format!("update-index --add --cacheinfo 160000,{subsub_tip},abs"),
        );
        git(&sup, "commit -q -m super");
        let super_tip = git(&sup, "rev-parse HEAD");
        publish(&sup, "super.git");
        (super_tip, sub_c2)
    })
}

#[test]
fn submodules_relative_and_absolute_recursive_shallow_and_off() {
    require_root();
    let (super_tip, sub_c2) = submodule_repos().clone();
    let server = git_http();
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();

    let dir = test_dir("sub-recursive");
    let run = clone(&server.url("super.git"), &dir).run();
    run.success();
    assert_eq!(read(dir.join("top.txt")), "top\n", "{}", run.dump());
    assert_eq!(
        read(dir.join("libs/sub/sub.txt")),
        "sub v2\n",
        "{}",
        run.dump()
    );
    assert_eq!(
        read(dir.join("libs/sub/nested/deep.txt")),
        "deepest\n",
        "{}",
        run.dump()
    );
    assert_eq!(
        read(dir.join("abs/deep.txt")),
        "deepest\n",
        "{}",
        run.dump()
    );
    assert_eq!(git(&dir.join("libs/sub"), "rev-parse HEAD"), sub_c2);
    assert_eq!(run.result()["submodules"], 3, "{}", run.dump());
    assert_git_state(&dir, &super_tip, &run);
    assert_eq!(
        git(&dir, "config submodule.abs.url"),
        git_daemon().url("subsub.git")
    );

    let dir = test_dir("sub-shallow");
    let run = clone(&server.url("super.git"), &dir)
        .args(["--submodules", "shallow"])
        .run();
    run.success();
    assert_eq!(
        read(dir.join("libs/sub/sub.txt")),
        "sub v2\n",
        "{}",
        run.dump()
    );
    assert!(dir.join("libs/sub/nested").is_dir());
    assert!(
        !dir.join("libs/sub/nested/deep.txt").exists(),
        "{}",
        run.dump()
    );
    assert_eq!(run.result()["submodules"], 2);

    let dir = test_dir("sub-off");
    let run = clone(&server.url("super.git"), &dir)
        .args(["--submodules", "off", "--no-git-dir"])
        .run();
    run.success();
    assert_same_tree(&archive_of(&bare("super.git"), &super_tip), &dir, &run);
}

#[test]
fn sparse_subdir_no_git_dir_owner_group_write_and_commit_file() {
    require_root();
    let r = main_repo();
    let url = git_http().url("main.git");

    let dir = test_dir("sparse");
    let run = clone(&url, &dir)
        .args(["--sparse", "docs/api", "--sparse", "bin/run.sh"])
        .run();
    run.success();
    let got: Vec<String> = snapshot(&dir, &[])
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        got,
        ["bin", "bin/run.sh", "docs", "docs/api", "docs/api/index.md"],
        "{}",
        run.dump()
    );
    assert_eq!(git(&dir, "status --porcelain"), "", "{}", run.dump());

    let dir = test_dir("subdir");
    let commit_file = dir.join("commit.txt");
    let run = clone(&url, &dir)
        .args([
            "--subdir",
            "src",
            "--no-git-dir",
            "--owner",
            "1234:2345",
            "--group-write",
        ])
        .arg("--commit-file")
        .arg(&commit_file)
        .run();
    run.success();
    assert_same_tree(
        &archive_of(&bare("main.git"), &r.c4),
        &dir.join("src"),
        &run,
    );
    assert!(!dir.join("src/.git").exists(), "{}", run.dump());
    assert_eq!(
        std::fs::read_to_string(&commit_file).unwrap(),
        format!("{}\n", r.c4)
    );
    let out = sh(&format!(
        "find {} -xdev ! -user 1234 -o ! -group 2345",
        dir.join("src").display()
    ));
    assert_eq!(
        out.trim(),
        "",
        "entries not owned by 1234:2345{}",
        run.dump()
    );
    let out = sh(&format!(
        "find {} ! -type l ! -perm -g+w",
        dir.join("src").display()
    ));
    assert_eq!(out.trim(), "", "entries not group-writable{}", run.dump());
}

#[test]
fn expect_commit_and_bad_refs() {
    require_root();
    let r = main_repo();
    let url = git_http().url("main.git");
    let dir = test_dir("expect-ok");
    clone(&url, &dir)
        .args(["--ref", "v1.0", "--expect-commit", &r.c3[..10]])
        .run()
        .success();

    let dir = test_dir("expect-bad");
    let run = clone(&url, &dir)
        .args(["--ref", "v1.0", "--expect-commit", &r.c4])
        .run();
    run.code(3).reason("CommitMismatch").message_contains(&r.c3);
    assert_eq!(snapshot(&dir, &[]).len(), 0, "{}", run.dump());

    let dir = test_dir("unknown-ref");
    let run = clone(&url, &dir).args(["--ref", "no-such-branch"]).run();
    run.code(2)
        .reason("UnknownRef")
        .message_contains("no-such-branch");

    let dir = test_dir("unknown-sha");
    let run = clone(&url, &dir)
        .args(["--ref", "0123456789abcdef0123456789abcdef01234567"])
        .run();
    run.code(2).reason("UnknownRef");

    for (name, missing) in [
        ("missing-http", git_http().url("nope.git")),
        ("missing-daemon", git_daemon().url("nope.git")),
        (
            "missing-file",
            format!("file://{}", bare("nope.git").display()),
        ),
    ] {
        let dir = test_dir(name);
        let run = clone(&missing, &dir).run();
        run.code(2).reason("RepositoryNotFound");
    }
}

#[test]
fn unreachable_hosts_exit_75_after_retries() {
    require_root();
    let port = populator_tests::nginx::free_port();
    for url in [
        format!("http://127.0.0.1:{port}/git/main.git"),
        format!("git://127.0.0.1:{port}/main.git"),
        format!("ssh://git@127.0.0.1:{port}/main.git"),
    ] {
        let dir = test_dir("unreachable");
        let started = Instant::now();
        let run = clone(&url, &dir)
            .args(["--retries", "2", "--ssh-accept-any-host-key"])
            .run();
        run.code(75).message_contains("gave up after 3 attempts");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(
            run.stderr.matches("retrying in").count(),
            2,
            "{}",
            run.dump()
        );
    }
}

/// A bare repository whose main branch's tree is built from raw entries.
fn hostile_repo(name: &str, build: impl Fn(&Path) -> String) -> String {
    let dst = bare(name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    git(&dst, "init -q --bare");
    let tree = build(&dst);
    let commit = git(&dst, &format!("commit-tree {tree} -m hostile"));
    git(&dst, &format!("update-ref refs/heads/main {commit}"));
    git_http().url(name)
}

#[test]
fn hostile_trees_are_refused_or_checked_out_safely() {
    require_root();
    let hook = "#!/bin/sh\ntouch /tmp/git-clone-hook-ran\n";
    let url = hostile_repo("dotgit.git", |r| {
        let b = blob(r, hook);
        let hooks = raw_tree(r, &[("100755", b"post-checkout", &b)]);
        let dotgit = raw_tree(r, &[("40000", b"hooks", &hooks)]);
        let ok = blob(r, "fine\n");
        raw_tree(
            r,
            &[("40000", b".git", &dotgit), ("100644", b"ok.txt", &ok)],
        )
    });
    let dir = test_dir("hostile-dotgit");
    let run = clone(&url, &dir).run();
    run.code(3)
        .reason("HostileRepository")
        .message_contains(".git");
    assert_eq!(snapshot(&dir, &[]).len(), 0, "{}", run.dump());

    let url = hostile_repo("dotgit-upper.git", |r| {
        let b = blob(r, hook);
        let hooks = raw_tree(r, &[("100755", b"post-checkout", &b)]);
        let dotgit = raw_tree(r, &[("40000", b"hooks", &hooks)]);
        let sub = raw_tree(r, &[("40000", b".GIT", &dotgit)]);
        raw_tree(r, &[("40000", b"sub", &sub)])
    });
    let dir = test_dir("hostile-dotgit-upper");
    clone(&url, &dir).run().code(3).reason("HostileRepository");

    let outside = scratch().join("escaped.txt");
    let _ = std::fs::remove_file(&outside);
    let url = hostile_repo("dotdot.git", |r| {
        let b = blob(r, "escaped\n");
        let inner = raw_tree(r, &[("100644", b"escaped.txt", &b)]);
        raw_tree(r, &[("40000", b"..", &inner)])
    });
    let dir = test_dir("hostile-dotdot");
    let run = clone(&url, &dir).run();
    run.code(3)
        .reason("HostileRepository")
        .message_contains("..");
    assert!(!outside.exists() && !dir.parent().unwrap().join("escaped.txt").exists());

    let url = hostile_repo("case.git", |r| {
        let a = blob(r, "upper\n");
        let b = blob(r, "lower\n");
        raw_tree(r, &[("100644", b"README", &a), ("100644", b"readme", &b)])
    });
    let dir = test_dir("hostile-case");
    let run = clone(&url, &dir).run();
    run.success().stderr_contains("differing only in case");
    assert_eq!(
        std::fs::read_to_string(dir.join("README")).unwrap(),
        "upper\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("readme")).unwrap(),
        "lower\n"
    );

    // A symlink to outside the target, then a path through it: the link
    // is created, but nothing is written through it.
    let url = hostile_repo("symlink-escape.git", |r| {
        let target = blob(r, "/tmp");
        let b = blob(r, "through\n");
        let inner = raw_tree(r, &[("100644", b"planted.txt", &b)]);
        raw_tree(
            r,
            &[("120000", b"link", &target), ("40000", b"link", &inner)],
        )
    });
    let _ = std::fs::remove_file("/tmp/planted.txt");
    let dir = test_dir("hostile-symlink");
    let run = clone(&url, &dir).run();
    run.code(3).reason("HostileRepository");
    assert!(!Path::new("/tmp/planted.txt").exists(), "{}", run.dump());
    assert!(!Path::new("/tmp/git-clone-hook-ran").exists());
}

/// A repository big enough that its checkout takes a while: 6,000 files.
fn big_repo() -> &'static String {
    static REPO: OnceLock<String> = OnceLock::new();
    REPO.get_or_init(|| {
        let work = scratch().join("src-big");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, "init -q");
        sh(&format!(
            "cd {} && for d in $(seq -w 0 59); do mkdir d$d; for f in $(seq -w 0 99); do \
             head -c 2000 /dev/urandom | base64 > d$d/f$f.txt; done; done",
            work.display()
        ));
        git(&work, "add -A && git commit -q -m big");
        publish(&work, "big.git");
        git(&work, "rev-parse HEAD")
    })
}

#[test]
fn killed_during_checkout_leaves_nothing_that_looks_done_and_a_rerun_is_correct() {
    require_root();
    let commit = big_repo().clone();
    let url = git_http().url("big.git");
    let dir = test_dir("killed");
    let staging = dir.join(".git-clone-staging");
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let cmd = clone(&url, &dir).args(["--checkout-threads", "1"]);
        let child = cmd.spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !staging.join("d30").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.signal(signal);
        let run = child.wait();
        let left: Vec<_> = snapshot(&dir, &[".git-clone-staging"])
            .into_keys()
            .collect();
        assert!(
            left.is_empty(),
            "a killed run left {left:?} in place{}",
            run.dump()
        );
        assert!(!dir.join(".git").exists());
        if signal == libc::SIGTERM {
            run.code(143).reason("Terminated");
            assert!(!staging.exists(), "SIGTERM should clean up{}", run.dump());
        } else {
            assert!(
                staging.exists(),
                "SIGKILL came too late to test anything{}",
                run.dump()
            );
        }
        let run = clone(&url, &dir).run();
        run.success();
        assert_same_tree(&archive_of(&bare("big.git"), &commit), &dir, &run);
        assert_git_state(&dir, &commit, &run);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_target_too_small_exits_4_and_keeps_nothing() {
    require_root();
    big_repo();
    let url = git_http().url("big.git");
    let dir = test_dir("too-small");
    let fs = LoopDevice::with_fs(&dir, "small", 16 << 20, Fs::Ext4);
    let run = clone(&url, fs.mount_point()).run();
    run.code(4);
    assert_eq!(
        snapshot(fs.mount_point(), &["lost+found"]).len(),
        0,
        "{}",
        run.dump()
    );

    let dir = test_dir("pvc-size");
    let run = clone(&url, &dir).args(["--pvc-size", "4Mi"]).run();
    run.code(4).reason("InsufficientCapacity");
    assert_eq!(snapshot(&dir, &[]).len(), 0, "{}", run.dump());
}

#[test]
fn usage_errors_exit_2() {
    require_root();
    let dir = test_dir("usage");
    for (args, text) in [
        (vec!["--repo", "ftp://h/x"], "not supported"),
        (vec!["--repo", "nonsense"], "neither a URL"),
        (vec!["--repo", "/x", "--ref", "a..b"], "not a valid"),
        (
            vec!["--repo", "/x", "--expect-commit", "xyz"],
            "not a commit SHA",
        ),
        (
            vec!["--repo", "/x", "--sparse", "../up"],
            "inside the repository",
        ),
        (vec!["--repo", "/x", "--subdir", "../up"], "--subdir"),
    ] {
        let run = worker("git-clone")
            .args(&args)
            .arg("--target")
            .arg(&dir)
            .run();
        run.code(2).message_contains(text);
    }
}

#[test]
fn git_clone_image_clones_as_uid_107_under_podman() {
    require_root();
    let r = main_repo();
    let image = require_image("git-clone");
    let dir = test_dir("image");
    let (vol, out) = (dir.join("vol"), dir.join("out"));
    for d in [&vol, &out] {
        std::fs::create_dir_all(d).unwrap();
        sh(&format!("chown 107:107 {}", d.display()));
    }
    let run = ContainerRun::run(
        podman_run().args([
            "--network",
            "host",
            "--read-only",
            "-v",
            &format!("{}:/mnt", vol.display()),
            "-v",
            &format!("{}:/out", out.display()),
            &image,
            "--repo",
            &git_http().url("main.git"),
            "--ref",
            "v1.0",
            "--termination-log",
            "/out/result.json",
        ]),
        &out.join("result.json"),
    );
    let v = run.success();
    let dump = run.dump();
    assert_eq!(v["commit"], r.c3.as_str(), "{dump}");
    assert_eq!(v["target"]["path"], "/mnt", "{dump}");
    let want = snapshot(&archive_of(&bare("main.git"), &r.c3), &[]);
    assert_eq!(snapshot(&vol, &[]), want, "{dump}");
    let owners = sh(&format!("find {} ! -user 107", vol.display()));
    assert_eq!(owners.trim(), "", "files not owned by uid 107{dump}");
}

#[test]
fn proxies_from_the_flag_and_the_environment_with_no_proxy() {
    require_root();
    let r = main_repo();
    let server = git_http();
    let proxy = populator_tests::forward_proxy::ForwardProxy::start();
    let tls = server.tls_url("main.git");
    let with_ca = |name: &str| {
        let dir = test_dir(name);
        let cmd = clone(&tls, &dir).arg("--ca-file").arg(&server.ca.ca_cert);
        (dir, cmd)
    };
    let connect = format!("CONNECT localhost:{}", server.tls_port);

    let (dir, cmd) = with_ca("proxy-flag");
    let run = cmd.arg("--proxy").arg(proxy.url()).run();
    run.success();
    assert_same_tree(&archive_of(&bare("main.git"), &r.c4), &dir, &run);
    assert!(
        proxy.seen().iter().any(|l| l.starts_with(&connect)),
        "no CONNECT through the proxy: {:?}{}",
        proxy.seen(),
        run.dump()
    );

    let before = proxy.seen().len();
    let (_, cmd) = with_ca("proxy-env");
    cmd.env("HTTPS_PROXY", &proxy.url()).run().success();
    assert!(proxy.seen().len() > before, "HTTPS_PROXY was not used");

    let before = proxy.seen().len();
    let (_, cmd) = with_ca("proxy-no-proxy");
    cmd.env("HTTPS_PROXY", &proxy.url())
        .env("NO_PROXY", "example.com,localhost")
        .run()
        .success();
    assert_eq!(proxy.seen().len(), before, "NO_PROXY was not honoured");
}
