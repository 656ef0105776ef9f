//! Loop devices, optionally with a filesystem mounted: real block devices and
//! real ext4/xfs volumes for the tests. Always detached and removed on drop.

use std::path::{Path, PathBuf};

use crate::sh;

pub struct LoopDevice {
    pub device: PathBuf,
    backing: PathBuf,
    pub mount: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
pub enum Fs {
    Ext4,
    Xfs,
}

impl LoopDevice {
    /// A raw block device of `size` bytes over a sparse file in `dir`.
    pub fn new(dir: &Path, name: &str, size: u64) -> LoopDevice {
        crate::require_root();
        let backing = dir.join(format!("{name}.loop"));
        let file = std::fs::File::create(&backing).unwrap();
        file.set_len(size).unwrap();
        drop(file);
        let device = sh(&format!("losetup --find --show {}", backing.display()))
            .trim()
            .to_string();
        LoopDevice {
            device: PathBuf::from(device),
            backing,
            mount: None,
        }
    }

    /// A device with a fresh filesystem mounted under `dir`.
    pub fn with_fs(dir: &Path, name: &str, size: u64, fs: Fs) -> LoopDevice {
        let mut dev = LoopDevice::new(dir, name, size);
        let mnt = dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mkfs = match fs {
            Fs::Ext4 => "mkfs.ext4 -q -F",
            Fs::Xfs => "mkfs.xfs -q -f",
        };
        sh(&format!(
            "{mkfs} {} && mount {} {}",
            dev.device.display(),
            dev.device.display(),
            mnt.display()
        ));
        dev.mount = Some(mnt);
        dev
    }

    pub fn mount_point(&self) -> &Path {
        self.mount.as_deref().expect("a mounted loop device")
    }

    /// Fills the device with noise, so zero regions must really be written.
    pub fn fill_random(&self) {
        sh(&format!(
            "openssl enc -aes-128-ctr -pass pass:fill -nosalt -pbkdf2 < /dev/zero 2>/dev/null | dd of={} bs=4M iflag=fullblock oflag=direct status=none || true",
            self.device.display()
        ));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(m) = &self.mount {
            let _ = std::process::Command::new("umount").arg(m).status();
            let _ = std::fs::remove_dir(m);
        }
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .status();
        let _ = std::fs::remove_file(&self.backing);
    }
}
