//! What the package installs, checked with systemd's own tools (no running systemd needed):
//! the unit verifies cleanly and is rated at most 2.5 ("OK") by `systemd-analyze security`;
//! the sysusers.d and tmpfiles.d files are accepted and make the user and the spool.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("systemd tools (installed by .ci/run)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_dir(&src, &dst);
        } else if ft.is_symlink() {
            let _ = std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn the_unit_verifies_cleanly_and_is_rated_ok() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // verify resolves the unit's dependencies and executables inside --root.
    copy_dir(
        Path::new("/usr/lib/systemd/system"),
        &r.join("usr/lib/systemd/system"),
    );
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::create_dir_all(r.join("etc/shuyuan")).unwrap();
    std::fs::copy(shuyuan_tests::shuyuan_bin(), r.join("usr/bin/shuyuan")).unwrap();
    std::fs::copy("/usr/bin/kill", r.join("usr/bin/kill")).unwrap();
    std::fs::write(r.join("etc/shuyuan/gateway.toml"), "").unwrap();
    let unit = r.join("usr/lib/systemd/system/shuyuan.service");
    std::fs::copy(repo().join("systemd/shuyuan.service"), &unit).unwrap();
    let (ok, text) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("/usr/lib/systemd/system/shuyuan.service"));
    // A misspelt key is only a warning with exit 0: any output fails the gate.
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The gate catches a typo (so it can fail).
    let typo = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    std::fs::write(&unit, typo).unwrap();
    let (_, text) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("/usr/lib/systemd/system/shuyuan.service"));
    assert!(text.contains("Unknown key"), "{text}");

    let (ok, text) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=25"])
        .arg(repo().join("systemd/shuyuan.service")));
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for shuyuan.service: ")
                .nth(1)
        })
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(
        ok && score <= 2.5,
        "exposure {score} (at most 2.5):\n{text}"
    );
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_the_spool() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    for f in ["passwd", "group"] {
        std::fs::copy(Path::new("/etc").join(f), r.join("etc").join(f)).unwrap();
    }
    let (ok, text) = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.display()))
        .arg(repo().join("systemd/shuyuan.sysusers")));
    assert!(ok, "{text}");
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("shuyuan:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
    let dialout = group.lines().find(|l| l.starts_with("dialout:")).unwrap();
    assert!(dialout.contains("shuyuan"), "{dialout}");

    let (ok, text) = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(repo().join("systemd/shuyuan.tmpfile")));
    assert!(ok, "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(r.join("var/spool/shuyuan"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o770);
}
