//! `toolsight tools`: the per-tool table.

use toolsight::admin::ToolStats;

pub(super) fn print_tools(rows: &[ToolStats], since: &str) {
    if rows.is_empty() {
        println!("no tool calls in the last {since}");
        return;
    }
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header([
            "service",
            "tool",
            "side",
            "calls",
            "errors",
            "cancelled",
            "empty",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean bytes",
            "overhead ms",
        ]);
    for r in rows {
        t.add_row([
            r.service.clone(),
            r.tool.clone(),
            r.side.clone(),
            r.calls.to_string(),
            r.errors.to_string(),
            r.cancellations.to_string(),
            if r.with_result > 0 {
                format!("{}/{}", r.empty_results, r.with_result)
            } else {
                "-".into()
            },
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.mean_result_bytes
                .map_or("-".into(), |b| format!("{b:.0}")),
            ms(r.mean_overhead_ms),
        ]);
    }
    println!("tool calls in the last {since}\n{t}");
}
