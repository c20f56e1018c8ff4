//! `toolsight silence`: a client of the admin API's silences.

use anyhow::Context;

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
    let url = format!("{}/api/v1/silences", base.trim_end_matches('/'));
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
            let author = author.unwrap_or_else(default_author);
            let body = serde_json::json!({"matchers": matchers, "duration": duration.to_string(), "comment": comment, "createdBy": author});
            let s = answer(send(http.post(&url).json(&body)).await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "silence {} until {}",
                    s["id"],
                    s["ends_at"].as_str().unwrap_or("?")
                );
            }
        }
        SilenceCommand::List { json } => {
            let s = answer(send(http.get(&url)).await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let rows = s["silences"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("no silences");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
                .set_header(["id", "state", "matchers", "ends", "by", "comment"]);
            for r in rows {
                let matchers: Vec<String> = r["matchers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect();
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                t.add_row([
                    r["id"].to_string(),
                    text("state"),
                    matchers.join(" "),
                    text("ends_at"),
                    text("created_by"),
                    text("comment"),
                ]);
            }
            println!("{t}");
        }
        SilenceCommand::Expire { id } => {
            let r = send(http.delete(format!("{url}/{id}"))).await?;
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
