//! The clone: fetch and check out in a hidden staging directory on the
//! target's filesystem, then move the result into place, so a killed run
//! never looks complete and a rerun starts clean.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use git2::{ConfigLevel, Repository};
use populator_core::error::{fail, Kind};
use populator_core::target::{free_inodes, short_bytes, Target, TargetKind};
use populator_core::writeback::EarlyWriteback;
use populator_core::Context;

use crate::auth::Session;
use crate::checkout::{self, Limits};
use crate::cli::{AuthConfig, Config};
use crate::fetch;
use crate::repo_url::Scheme;
use crate::submodules::{self, Parent, Summary};

/// Where a run builds the checkout, next to its final place.
const STAGING: &str = ".git-clone-staging";

/// What a successful clone produced.
struct Cloned {
    commit: String,
    refname: String,
    commit_time: i64,
    files: usize,
    submodules: Summary,
    /// Flushing since the checkout began; finished before success.
    writeback: EarlyWriteback,
}

pub fn run(args: crate::cli::Args, ctx: &Context) -> Result<String> {
    let cfg = args.config()?;
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    if target.kind != TargetKind::Filesystem {
        return Err(fail(
            Kind::Usage,
            "InvalidTarget",
            format!(
                "git-clone needs a directory (a filesystem volume); {} is a {}",
                target.path.display(),
                target.kind.name()
            ),
        ));
    }
    ctx.report.set("repo", cfg.repo.url.clone());
    configure_libgit2(&cfg.auth)?;
    let staging = target.path.join(STAGING);
    if fs::symlink_metadata(&staging).is_ok() {
        populator_core::log::info("removing the staging directory of an earlier, interrupted run");
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let cloned = match clone_into(&staging, &cfg, &target, ctx) {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    ctx.report.set("commit", cloned.commit.clone());
    ctx.report.set("ref", cloned.refname.clone());
    ctx.report.set("commitTime", rfc3339(cloned.commit_time));
    ctx.report.set("files", cloned.files);
    ctx.report.set("submodules", cloned.submodules.count);
    ctx.report.set("depth", cfg.depth);
    let finished = finish(
        &staging,
        &target.path,
        &cfg,
        args.common.owner,
        cloned.writeback,
        ctx,
    );
    if finished.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    let final_dir = finished?;
    if let Some(path) = &cfg.commit_file {
        fs::write(path, format!("{}\n", cloned.commit))
            .with_context(|| format!("writing the commit file {}", path.display()))?;
    }
    Ok(format!(
        "cloned {} at {} (commit {}, {} files{}, {} received) into {}",
        cfg.repo.url,
        cloned.refname,
        &cloned.commit[..12],
        cloned.files,
        match cloned.submodules.count {
            0 => String::new(),
            n => format!(" and {n} submodules with {} files", cloned.submodules.files),
        },
        short_bytes(ctx.progress.bytes_read()),
        final_dir.display()
    ))
}

fn clone_into(staging: &Path, cfg: &Config, target: &Target, ctx: &Context) -> Result<Cloned> {
    ctx.progress.set_stage("fetching");
    let repo = crate::checkout::init_repo(staging)?;
    repo.remote("origin", &cfg.repo.url)?;
    if cfg.repo.scheme == Scheme::File && cfg.depth > 0 {
        populator_core::log::info(
            "file:// repositories are fetched in full (libgit2's local transport cannot fetch shallow)",
        );
    }
    let session = Session::new(cfg.repo.clone(), &cfg.auth, true, ctx);
    let mut clock = Stopwatch::new(ctx);
    let fetched = fetch::fetch(&repo, &session, &cfg.want, cfg.depth, ctx)?;
    clock.lap("fetch");
    let (received, total) = session.objects();
    populator_core::log::info(format!(
        "fetched {} ({received}/{total} objects, {})",
        fetched.refname,
        short_bytes(ctx.progress.bytes_read())
    ));
    let commit = repo.find_commit(fetched.commit)?;
    let sha = commit.id().to_string();
    if let Some(expected) = &cfg.expect_commit {
        if !sha.starts_with(expected.as_str()) {
            return Err(fail(
                Kind::Integrity,
                "CommitMismatch",
                format!(
                    "{} resolved to commit {sha}, not the expected {expected}",
                    fetched.refname
                ),
            ));
        }
    }
    match &fetched.branch {
        Some(branch) => {
            let mut local = repo.branch(branch, &commit, true)?;
            local.set_upstream(Some(&format!("origin/{branch}")))?;
            repo.set_head(&format!("refs/heads/{branch}"))?;
        }
        None => repo.set_head_detached(commit.id())?,
    }

    ctx.progress.set_stage("checking out");
    ctx.progress.restart();
    let tree = commit.tree()?;
    let plan = checkout::plan(&repo, &tree, &cfg.sparse)?;
    if let Some(warning) = checkout::describe_collisions(&plan) {
        populator_core::log::warn(warning);
    }
    let entries = (plan.files.len() + plan.symlinks.len() + plan.dirs.len()) as u64;
    let inodes = free_inodes(&target.path)?;
    if inodes > 0 && entries > inodes {
        return Err(fail(
            Kind::Capacity,
            "InsufficientCapacity",
            format!(
                "the checkout has {entries} files and directories but the target has only {inodes} free inodes"
            ),
        ));
    }
    let limits = Limits {
        capacity: target
            .capacity
            .map(|c| c.saturating_sub(ctx.progress.bytes_read())),
        threads: cfg.threads,
    };
    clock.lap("plan");
    let writeback = EarlyWriteback::start(staging)?;
    let stats = checkout::write(repo.path(), staging, &plan, &limits, ctx)?;
    clock.lap("files");
    if !cfg.no_git_dir {
        checkout::write_index(&repo, &tree, &plan, &stats)?;
        if !cfg.sparse.is_empty() {
            write_sparse_config(&repo, &cfg.sparse)?;
        }
    }
    let mut subs = Summary::default();
    let parent = Parent {
        repo: &repo,
        tree: &tree,
        workdir: staging,
        url: &cfg.repo,
        gitlinks: &plan.gitlinks,
        level: 0,
    };
    clock.lap("index");
    submodules::update(&parent, cfg, ctx, &mut subs)?;
    clock.lap("submodules");
    Ok(Cloned {
        commit: sha,
        refname: fetched.refname,
        commit_time: commit.time().seconds(),
        files: plan.files.len() + plan.symlinks.len(),
        submodules: subs,
        writeback,
    })
}

/// Seconds per stage, in the result (`stageSeconds`), to see where time goes.
struct Stopwatch<'a> {
    ctx: &'a Context,
    at: std::time::Instant,
    laps: serde_json::Map<String, serde_json::Value>,
}

impl<'a> Stopwatch<'a> {
    fn new(ctx: &'a Context) -> Self {
        Stopwatch {
            ctx,
            at: std::time::Instant::now(),
            laps: serde_json::Map::new(),
        }
    }

    fn lap(&mut self, stage: &str) {
        let secs = (self.at.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        self.laps.insert(stage.into(), secs.into());
        self.at = std::time::Instant::now();
        self.ctx.report.set("stageSeconds", self.laps.clone());
    }
}

/// Tells git which paths a sparse checkout holds, so it keeps them that way.
fn write_sparse_config(repo: &Repository, sparse: &[String]) -> Result<()> {
    let info = repo.path().join("info");
    fs::create_dir_all(&info)?;
    let patterns: String = sparse.iter().map(|p| format!("/{p}\n")).collect();
    fs::write(info.join("sparse-checkout"), patterns)?;
    repo.config()?.set_bool("core.sparseCheckout", true)?;
    Ok(())
}

/// Drops what was not asked for, sets owners and modes, flushes, and moves
/// the checkout into place; returns where it landed.
fn finish(
    staging: &Path,
    root: &Path,
    cfg: &Config,
    owner: Option<(u32, u32)>,
    writeback: EarlyWriteback,
    ctx: &Context,
) -> Result<PathBuf> {
    if cfg.no_git_dir {
        remove_git_dirs(staging)?;
    }
    if owner.is_some() || cfg.group_write {
        adjust_tree(staging, owner, cfg.group_write)?;
    }
    let synced = std::time::Instant::now();
    // The flush the contract asks for: most of the checkout went to the
    // disk while it was written (see populator_core::writeback).
    writeback.finish()?;
    ctx.report.set(
        "syncSeconds",
        (synced.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    );
    let final_dir = match &cfg.subdir {
        Some(sub) => {
            let dst = root.join(sub);
            remove_any(&dst)?;
            fs::rename(staging, &dst)
                .with_context(|| format!("moving the checkout to {}", dst.display()))?;
            dst
        }
        None => {
            move_entries(staging, root)?;
            root.to_path_buf()
        }
    };
    fs::File::open(root)?.sync_all()?;
    Ok(final_dir)
}

/// Moves every entry of `staging` into `root`, `.git` last so that a run
/// killed meanwhile does not leave something that looks like a clone.
fn move_entries(staging: &Path, root: &Path) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(staging)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort_by_key(|n| n == ".git");
    for name in names {
        let dst = root.join(&name);
        remove_any(&dst)?;
        fs::rename(staging.join(&name), &dst)
            .with_context(|| format!("moving {} into place", dst.display()))?;
    }
    fs::remove_dir(staging).with_context(|| format!("removing {}", staging.display()))?;
    Ok(())
}

fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// Removes `.git` of the checkout and of every submodule in it.
fn remove_git_dirs(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if entry.file_name() == ".git" {
            remove_any(&entry.path())?;
        } else if ft.is_dir() {
            remove_git_dirs(&entry.path())?;
        }
    }
    Ok(())
}

/// `--owner` and `--group-write` over everything under `dir`.
fn adjust_tree(dir: &Path, owner: Option<(u32, u32)>, group_write: bool) -> Result<()> {
    let apply = |path: &Path, meta: &fs::Metadata| -> Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .with_context(|| format!("changing the owner of {}", path.display()))?;
        }
        if group_write && !meta.file_type().is_symlink() {
            let mode = meta.permissions().mode() | 0o020;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    apply(dir, &fs::symlink_metadata(dir)?)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            adjust_tree(&entry.path(), owner, group_write)?;
        } else {
            apply(&entry.path(), &meta)?;
        }
    }
    Ok(())
}

/// Process-wide libgit2 settings: no system or user git config (a host's
/// `url.insteadOf` must not redirect a clone), timeouts, extra CAs.
fn configure_libgit2(auth: &AuthConfig) -> Result<()> {
    let ms = auth.network.timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: called once, before any other libgit2 use in this process.
    unsafe {
        for level in [
            ConfigLevel::System,
            ConfigLevel::Global,
            ConfigLevel::XDG,
            ConfigLevel::ProgramData,
        ] {
            git2::opts::set_search_path(level, "")?;
        }
        git2::opts::set_server_connect_timeout_in_milliseconds(ms)?;
        git2::opts::set_server_timeout_in_milliseconds(ms)?;
        if let Some(ca) = &auth.network.ca_file {
            fs::File::open(ca).map_err(|e| {
                fail(
                    Kind::Usage,
                    "InvalidConfiguration",
                    format!("cannot read the CA file {}: {e}", ca.display()),
                )
            })?;
            git2::opts::set_ssl_cert_file(ca)?;
        }
    }
    // The indexer hashes every object it receives; hashing each blob again
    // when the checkout reads it would double the work for nothing.
    git2::opts::strict_hash_verification(false);
    if auth.network.insecure_skip_tls_verify {
        populator_core::log::warn(
            "--insecure-skip-tls-verify: the server's TLS certificate is NOT verified",
        );
    }
    if auth.accept_any_host_key {
        populator_core::log::warn(
            "--ssh-accept-any-host-key: the SSH server's host key is NOT verified",
        );
    }
    Ok(())
}

/// Seconds since the epoch as `2024-05-01T12:00:00Z`.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
