//! `toolsight demo` as a newcomer runs it: every alert kind of the demo rules fires on the
//! incidents scenario, and the command ends with its summary.

use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_every_alert_kind_fire() {
    // Fails with how to start PostgreSQL when there is none.
    common::admin_pool().await;
    let out = tokio::task::spawn_blocking(|| {
        common::toolsight()
            .args(["demo", "--duration", "3m"])
            .env(
                "DATABASE_URL",
                format!("{}/toolsight", common::server_url()),
            )
            .env_remove("TOOLSIGHT_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    for alert in [
        "ToolLatencyRegression",
        "ToolLatencyHigh",
        "ToolErrorRate",
        "ToolEmptyResults",
        "RetryLoop",
        "TokenBurn",
        "RateLimitHeadroom",
    ] {
        assert!(
            stderr.contains(&format!("FIRING   {alert} service=demo-mcp")),
            "{alert} did not fire:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("every alert kind fired"),
        "{stdout}\n{stderr}"
    );
    // The story is told in order: the incidents come before the first alert.
    let incidents = stderr.find("traffic: incidents").unwrap();
    assert!(stderr.find("FIRING").unwrap() > incidents, "{stderr}");
}
