//! Submodules: each gitlink of the checked-out tree is matched with its
//! `.gitmodules` entry, its URL resolved (relative ones against the
//! superproject's), and the recorded commit fetched at the same depth and
//! checked out in place, with its own `.git` directory. Credentials go along
//! only to the host they were given for.

use std::path::Path;

use anyhow::{Context as _, Result};
use git2::{Repository, Tree};
use populator_core::Context;

use crate::auth::Session;
use crate::checkout::{self, Entry, Limits};
use crate::cli::{Config, SubmoduleMode, WantRef};
use crate::fetch;
use crate::repo_url::RepoUrl;

/// How deep submodules may nest before the repository is taken for a loop.
const MAX_NESTING: u32 = 8;

/// What was checked out, for the result.
#[derive(Default)]
pub struct Summary {
    pub count: usize,
    pub files: usize,
}

pub struct Parent<'a> {
    pub repo: &'a Repository,
    pub tree: &'a Tree<'a>,
    pub workdir: &'a Path,
    pub url: &'a RepoUrl,
    pub gitlinks: &'a [Entry],
    pub level: u32,
}

pub fn update(parent: &Parent<'_>, cfg: &Config, ctx: &Context, out: &mut Summary) -> Result<()> {
    if parent.gitlinks.is_empty() || cfg.submodules == SubmoduleMode::Off {
        return Ok(());
    }
    if parent.level >= MAX_NESTING {
        populator_core::log::warn(format!(
            "submodules nest deeper than {MAX_NESTING} levels under {}; not going further",
            parent.url.url
        ));
        return Ok(());
    }
    let modules = read_gitmodules(parent.repo, parent.tree)?;
    let mut config = parent.repo.config()?;
    for link in parent.gitlinks {
        ctx.cancel.check()?;
        let path = String::from_utf8_lossy(&link.path).into_owned();
        let Some((name, url)) = modules.iter().find(|m| m.1 == path).map(|m| (&m.0, &m.2)) else {
            populator_core::log::warn(format!(
                "submodule at '{path}' has no entry in .gitmodules; left empty"
            ));
            continue;
        };
        let Some(url) = url else {
            populator_core::log::warn(format!(
                "submodule '{name}' has no url in .gitmodules; left empty"
            ));
            continue;
        };
        let sub_url = parent
            .url
            .join_submodule(url)
            .with_context(|| format!("submodule '{name}' at '{path}'"))?;
        config.set_str(&format!("submodule.{name}.url"), &sub_url.url)?;
        config.set_bool(&format!("submodule.{name}.active"), true)?;
        populator_core::log::info(format!(
            "submodule '{name}': {} at {}",
            sub_url.url, link.oid
        ));
        clone_one(parent, link, &sub_url, cfg, ctx, out)
            .with_context(|| format!("submodule '{name}' ({}) at '{path}'", sub_url.url))?;
    }
    Ok(())
}

fn clone_one(
    parent: &Parent<'_>,
    link: &Entry,
    url: &RepoUrl,
    cfg: &Config,
    ctx: &Context,
    out: &mut Summary,
) -> Result<()> {
    let dir = checkout::root_path(parent.workdir, &link.path);
    let repo = crate::checkout::init_repo(&dir)?;
    repo.remote("origin", &url.url)?;
    let trusted = cfg.repo.same_origin(url);
    let session = Session::new(url.clone(), &cfg.auth, trusted, ctx);
    let fetched = fetch::fetch(&repo, &session, &WantRef::Commit(link.oid), cfg.depth, ctx)?;
    repo.set_head_detached(fetched.commit)?;
    let commit = repo.find_commit(fetched.commit)?;
    let tree = commit.tree()?;
    let plan = checkout::plan(&repo, &tree, &[])?;
    let limits = Limits {
        capacity: None,
        threads: cfg.threads,
    };
    let stats = checkout::write(repo.path(), &dir, &plan, &limits, ctx)?;
    checkout::write_index(&repo, &tree, &plan, &stats)?;
    out.count += 1;
    out.files += plan.files.len() + plan.symlinks.len();
    if cfg.submodules == SubmoduleMode::Recursive {
        let child = Parent {
            repo: &repo,
            tree: &tree,
            workdir: &dir,
            url,
            gitlinks: &plan.gitlinks,
            level: parent.level + 1,
        };
        update(&child, cfg, ctx, out)?;
    }
    Ok(())
}

/// (name, path, url) of every submodule in the tree's `.gitmodules`.
fn read_gitmodules(
    repo: &Repository,
    tree: &Tree<'_>,
) -> Result<Vec<(String, String, Option<String>)>> {
    let Ok(entry) = tree.get_path(Path::new(".gitmodules")) else {
        return Ok(Vec::new());
    };
    let blob = repo.find_blob(entry.id())?;
    // libgit2 parses config files only from disk.
    let tmp = repo.path().join("populator-gitmodules");
    std::fs::write(&tmp, blob.content())?;
    let parsed = git2::Config::open(&tmp).and_then(|c| {
        let mut found: Vec<(String, String, Option<String>)> = Vec::new();
        let mut entries = c.entries(Some(r"submodule\..*\.path"))?;
        while let Some(e) = entries.next() {
            let e = e?;
            let key = e.name().unwrap_or("");
            let name = key
                .strip_prefix("submodule.")
                .and_then(|k| k.strip_suffix(".path"))
                .unwrap_or("")
                .to_string();
            let path = e.value().unwrap_or("").trim_end_matches('/').to_string();
            let url = c.get_string(&format!("submodule.{name}.url")).ok();
            found.push((name, path, url));
        }
        Ok(found)
    });
    let _ = std::fs::remove_file(&tmp);
    parsed.context("reading .gitmodules")
}
