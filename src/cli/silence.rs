//! `toolsight silence`: a client of the admin API's silences, in Alertmanager's API v2 (as
//! `amtool silence` is).

use anyhow::Context;

use toolsight::admin::alertmanager::ApiMatcher;

use crate::SilenceCommand;

pub(super) async fn silence(
    base: &str,
    token: Option<&str>,
    command: SilenceCommand,
) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the admin token is not a valid header value")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let api = format!("{}/api/v2", base.trim_end_matches('/'));
    let answer = |r: reqwest::Response| async move {
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "{status}: {}",
                body["error"].as_str().unwrap_or("no error message")
            );
        }
        Ok(body)
    };
    let send = |r: reqwest::RequestBuilder| async move {
        r.send()
            .await
            .with_context(|| format!("reaching the admin API at {base}"))
    };
    match command {
        SilenceCommand::Add {
            matchers,
            duration,
            comment,
            author,
            json,
        } => {
            let matchers = matchers
                .iter()
                .map(|m| ApiMatcher::parse(m))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let starts = chrono::Utc::now();
            let ends = starts + chrono::Duration::from_std(duration.into())?;
            let body = serde_json::json!({
                "matchers": matchers, "startsAt": starts, "endsAt": ends,
                "comment": comment, "createdBy": author.unwrap_or_else(default_author),
            });
            let created =
                answer(send(http.post(format!("{api}/silences")).json(&body)).await?).await?;
            let id = created["silenceID"].as_str().unwrap_or("?").to_owned();
            if json {
                let shown = answer(send(http.get(format!("{api}/silence/{id}"))).await?).await?;
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                println!("silence {id} until {}", ends.to_rfc3339());
            }
        }
        SilenceCommand::List { json } => {
            let s = answer(send(http.get(format!("{api}/silences"))).await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let rows = s.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("no silences");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
                .set_header(["id", "state", "matchers", "ends", "by", "comment"]);
            for r in rows {
                let matchers: Vec<String> =
                    serde_json::from_value::<Vec<ApiMatcher>>(r["matchers"].clone())
                        .unwrap_or_default()
                        .iter()
                        .map(ApiMatcher::to_text)
                        .collect();
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                t.add_row([
                    text(&r["id"]),
                    text(&r["status"]["state"]),
                    matchers.join(" "),
                    text(&r["endsAt"]),
                    text(&r["createdBy"]),
                    text(&r["comment"]),
                ]);
            }
            println!("{t}");
        }
        SilenceCommand::Expire { id } => {
            let r = send(http.delete(format!("{api}/silence/{id}"))).await?;
            if r.status().is_success() {
                println!("silence {id} expired");
            } else {
                answer(r).await?;
            }
        }
    }
    Ok(())
}

/// Who silences when `--author` is not given: `$USER`, else `$LOGNAME`, else
/// `toolsight@<hostname>` (containers often set neither).
fn default_author() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("toolsight@{host}")
        })
}
