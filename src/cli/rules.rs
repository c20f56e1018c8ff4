//! `toolsight rules backtest`: its time arguments and its report.

/// An instant given as RFC 3339, `now`, or a duration before `now` (`24h`, `7d`).
pub(super) fn parse_instant(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if s == "now" {
        return Ok(now);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now - chrono::Duration::from_std(d)?),
        Err(_) => anyhow::bail!(
            "{s:?} is neither an RFC 3339 time (2026-11-20T08:00:00Z), `now`, nor a duration ago (24h)"
        ),
    }
}

pub(super) fn print_backtest(r: &toolsight::evaluate::backtest::Report) {
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    println!(
        "replayed {} rules over {} .. {} ({} evaluations, {} rows of history)",
        r.rules.len(),
        fmt(r.from),
        fmt(r.to),
        r.evaluations,
        r.rows
    );
    if r.episodes.is_empty() {
        println!("no alert would have fired");
        return;
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header([
            "alert",
            "key",
            "pending since",
            "fired",
            "resolved",
            "firing for",
            "value",
        ]);
    for e in &r.episodes {
        let end = e.resolved_at.unwrap_or(r.to);
        let firing = humantime::format_duration(std::time::Duration::from_secs(
            (end - e.fired_at).num_seconds().max(0) as u64,
        ));
        t.add_row([
            e.alert.clone(),
            e.key.clone(),
            fmt(e.pending_since),
            fmt(e.fired_at),
            e.resolved_at.map_or("still firing".into(), fmt),
            firing.to_string(),
            e.value.map_or("-".into(), |v| format!("{v:.3}")),
        ]);
    }
    println!("{t}");
    let mut per_rule: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &r.episodes {
        *per_rule.entry(e.alert.as_str()).or_default() += 1;
    }
    let quiet: Vec<&str> = r
        .rules
        .iter()
        .map(String::as_str)
        .filter(|a| !per_rule.contains_key(a))
        .collect();
    for (alert, n) in &per_rule {
        println!("{alert}: fired {n} time(s)");
    }
    if !quiet.is_empty() {
        println!("never fired: {}", quiet.join(", "));
    }
}
