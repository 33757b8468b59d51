//! The Audit page (admin only): the audit log with the filters of `GET /api/v2/audit`, newest first,
//! paged with "Older →".

use std::collections::HashMap;

use maud::{Markup, html};

use crate::audit::AuditPage;

/// The filters a page was asked for, kept in the form and the "Older →" link.
pub const FILTERS: [&str; 4] = ["actor", "action", "target", "since"];

pub fn page(list: &AuditPage, p: &HashMap<String, String>) -> Markup {
    let value = |name: &str| p.get(name).map(String::as_str).unwrap_or("");
    let mut older = form_urlencoded::Serializer::new(String::new());
    for name in FILTERS {
        if !value(name).is_empty() {
            older.append_pair(name, value(name));
        }
    }
    html! {
        div.page-head { h1 { "Audit" } p.muted { "Every change made by a person or a key: who, from where, what, before and after." } }
        form.filters method="get" action="/dashboard/audit" {
            label { "Actor" input type="text" name="actor" value=(value("actor")) placeholder="key id, name or cli:user" maxlength="256"; }
            label { "Action" input type="text" name="action" value=(value("action")) placeholder="build.cancel or build.*" maxlength="256"; }
            label { "Target" input type="text" name="target" value=(value("target")) placeholder="build, worker or key id" maxlength="256"; }
            label { "Since" input type="text" name="since" value=(value("since")) placeholder="2026-01-01T00:00:00Z" maxlength="64"; }
            button.btn type="submit" { "Filter" }
        }
        div.table-wrap { table.audit {
            thead { tr {
                th scope="col" { "At" } th scope="col" { "Actor" } th scope="col" { "Role" } th scope="col" { "Action" }
                th scope="col" { "Target" } th scope="col" { "From" } th scope="col" { "Change" }
            } }
            tbody {
                @if list.items.is_empty() { tr { td colspan="7" { p.empty { "Nothing recorded that matches." } } } }
                @for row in &list.items { tr data-audit=(row.id) {
                    td.mono { (row.at.format("%Y-%m-%d %H:%M:%S")) }
                    td { (row.actor_name) }
                    td { (row.role) }
                    td.mono { (row.action) }
                    td { (row.target_kind.as_deref().unwrap_or("")) " " span.mono { (row.target_id.as_deref().unwrap_or("")) } }
                    td { (row.client_ip.as_deref().unwrap_or("—")) @if let Some(agent) = &row.user_agent { br; small.muted { (agent) } } }
                    td.mono { small {
                        @if let Some(before) = &row.before { "before " (before.to_string()) br; }
                        @if let Some(after) = &row.after { "after " (after.to_string()) }
                    } }
                } }
            }
        } }
        @if let Some(cursor) = &list.next_cursor {
            p { a.btn.ghost href={ "/dashboard/audit?" (older.append_pair("cursor", cursor).finish()) } { "Older →" } }
        }
    }
}
