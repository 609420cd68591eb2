//! Enrolment and renewal with the real binary: the key is made on the device and never
//! overwritten, a CSR goes to the CA (the dev CA here), and `certs install` refuses what the
//! platform would refuse (another CN, another key, another CA, expired) and swaps a good one
//! in while the gateway runs, which reloads it and keeps delivering.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use shuyuan::sim;
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(shuyuan_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sign_and_install_while_running_and_refuse_what_the_platform_would() {
    let world = World::new();
    let w = world.path().to_str().unwrap().to_string();
    let stop = CancellationToken::new();
    let addr = start_sim(sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    gateway_config(
        &world,
        &rx.url(),
        "200ms",
        &format!("[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{addr}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"),
    );
    let config = format!("{w}/gateway.toml");
    let install = |cert: &str, key: Option<&str>| {
        let mut args = vec!["certs", "install", "--config", &config, "--cert", cert];
        if let Some(k) = key {
            args.extend(["--key", k]);
        }
        cli(&args)
    };
    let log = world.path().join("gateway.log");
    let mut gw = spawn_gateway_process(&world, &log);

    // The key is made here, 0600, and never overwritten.
    let (ok, text) = cli(&[
        "certs",
        "request",
        "--id",
        GATEWAY_ID,
        "--out",
        &format!("{w}/next"),
    ]);
    assert!(ok, "{text}");
    let mode = std::fs::metadata(format!("{w}/next/gateway.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (ok, text) = cli(&[
        "certs",
        "request",
        "--id",
        GATEWAY_ID,
        "--out",
        &format!("{w}/next"),
    ]);
    assert!(!ok && text.contains("a key is already there"), "{text}");
    let sign = |csr: &str, days: &str, out: &str, ca_dir: &str| {
        cli(&[
            "certs",
            "dev-sign",
            "--ca-cert",
            &format!("{ca_dir}/platform-ca.pem"),
            "--ca-key",
            &format!("{ca_dir}/platform-ca.key"),
            "--csr",
            csr,
            "--days",
            days,
            "--out",
            out,
        ])
    };
    let certs = format!("{w}/certs");
    let (ok, text) = sign(
        &format!("{w}/next/gateway.csr"),
        "90",
        &format!("{w}/next/gateway.pem"),
        &certs,
    );
    assert!(ok, "{text}");

    // Refused: the new certificate with the old key.
    let (ok, text) = install(&format!("{w}/next/gateway.pem"), None);
    assert!(!ok && text.contains("is not for the key"), "{text}");
    // Refused: another gateway's certificate.
    cli(&[
        "certs",
        "request",
        "--id",
        "GW-OTHER",
        "--out",
        &format!("{w}/other"),
    ]);
    sign(
        &format!("{w}/other/gateway.csr"),
        "90",
        &format!("{w}/other/gateway.pem"),
        &certs,
    );
    let (ok, text) = install(
        &format!("{w}/other/gateway.pem"),
        Some(&format!("{w}/other/gateway.key")),
    );
    assert!(!ok && text.contains("is for CN \"GW-OTHER\""), "{text}");
    // Refused: expired.
    sign(
        &format!("{w}/next/gateway.csr"),
        "0",
        &format!("{w}/next/expired.pem"),
        &certs,
    );
    let (ok, text) = install(
        &format!("{w}/next/expired.pem"),
        Some(&format!("{w}/next/gateway.key")),
    );
    assert!(
        !ok && text.contains("not accepted") && text.to_lowercase().contains("expired"),
        "{text}"
    );
    // Refused: signed by a CA the platform does not use.
    let stranger = World::new();
    let sca = stranger.path().join("certs");
    sign(
        &format!("{w}/next/gateway.csr"),
        "90",
        &format!("{w}/next/stranger.pem"),
        sca.to_str().unwrap(),
    );
    let (ok, text) = install(
        &format!("{w}/next/stranger.pem"),
        Some(&format!("{w}/next/gateway.key")),
    );
    assert!(!ok && text.contains("not accepted"), "{text}");
    let before = std::fs::read(format!("{certs}/gateway.pem")).unwrap();

    // Installed while running: swapped in, and the gateway reloads it.
    assert!(
        wait_until(Duration::from_secs(15), || async {
            !rx.records(GATEWAY_ID).is_empty()
        })
        .await
    );
    let (ok, text) = install(
        &format!("{w}/next/gateway.pem"),
        Some(&format!("{w}/next/gateway.key")),
    );
    assert!(ok && text.contains("reloads it now"), "{text}");
    assert_ne!(
        std::fs::read(format!("{certs}/gateway.pem")).unwrap(),
        before
    );
    assert!(world.path().join("certs/gateway.key.previous").exists());
    let reloaded = wait_until(Duration::from_secs(15), || async {
        shuyuan::outbox::admin::audit_list(&world.path().join("state"), 0, 100_000)
            .map(|t| {
                t.iter()
                    .filter(|e| e.kind == "certificate_installed")
                    .count()
                    == 2
            })
            .unwrap_or(false)
    })
    .await;
    assert!(
        reloaded,
        "the new certificate is on the trail after the reload"
    );
    let n = rx.records(GATEWAY_ID).len();
    assert!(
        wait_until(Duration::from_secs(15), || async {
            rx.records(GATEWAY_ID).len() > n + 5
        })
        .await,
        "records keep coming with the new certificate"
    );
    let status = terminate(&mut gw, Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()));
    stop.cancel();
    rx.shutdown().await;
}
