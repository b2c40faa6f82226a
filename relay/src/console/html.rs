//! The console's pages, rendered to strings (pure). Every value that comes from a file, a
//! form or the network goes through [`escape`]; no page has inline script or style (the CSP
//! forbids both), so the live updates are `/console.js` and the look is `/console.css`.

use std::fmt::Write as _;

use super::form::{CreateForm, FieldErrors};
use super::model::{Action, Row, State};

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What the page header offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header<'a> {
    /// No session yet (the login page).
    Plain,
    /// Logged in where a token is configured: a log-out button (a POST with the token).
    LogOut { csrf: &'a str },
    /// No token configured (loopback): nothing to log out of.
    Open,
}

/// A whole page.
pub fn page(title: &str, header: Header<'_>, body: &str) -> String {
    let logout = match header {
        Header::LogOut { csrf } => format!(
            "<form method=\"post\" action=\"/logout\" class=\"logout\">{}\
             <button type=\"submit\">Log out</button></form>",
            hidden_csrf(csrf)
        ),
        Header::Plain | Header::Open => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · TAAS console</title>\
         <link rel=\"stylesheet\" href=\"/console.css\">\
         <script src=\"/console.js\" defer></script></head>\n<body>\
         <header><a href=\"/\" class=\"home\">TAAS console</a>{logout}</header>\n<main>\n{body}\n</main></body></html>\n",
        title = escape(title),
    )
}

fn hidden_csrf(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        super::security::CSRF_FIELD,
        escape(csrf)
    )
}

fn state_text(state: State) -> &'static str {
    match state {
        State::Serving => "serving",
        State::Disabled => "disabled",
        State::Builtin => "built in",
    }
}

/// The label's cells after LABEL and ID, in column order (the JSON's fields, rendered the
/// same way by `console.js`).
fn cells(row: &Row) -> [String; 7] {
    let last = match &row.last_registration {
        Some(last) => format!("{} from {}", last.when, last.source),
        None => "never".into(),
    };
    [
        state_text(row.state).into(),
        row.parked.to_string(),
        row.active_pairs.to_string(),
        last,
        format!("{} / {}", row.unauthorized, row.rate_limited),
        row.bytes_to_server.to_string(),
        row.bytes_to_client.to_string(),
    ]
}

/// The actions cell: links to each action's confirmation page.
fn actions(row: &Row) -> String {
    let mut out = String::new();
    for action in &row.actions {
        let _ = write!(
            out,
            "<a class=\"action {a}\" href=\"/labels/{label}/confirm?action={a}\">{text}</a> ",
            a = action.as_str(),
            label = escape(&row.label),
            text = match action {
                Action::Disable => "Disable",
                Action::Enable => "Enable",
                Action::Rotate => "Rotate secret",
                Action::Delete => "Delete",
            }
        );
    }
    out
}

/// The table of labels.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "<table id=\"labels\"><thead><tr><th>LABEL</th><th>ID</th><th>State</th>\
         <th>Parked</th><th>Active pairs</th><th>Last registration</th>\
         <th>401 / 429</th><th>Bytes to server</th><th>Bytes to client</th><th>File</th>\
         <th>Actions</th></tr></thead>\n<tbody>\n",
    );
    for row in rows {
        let _ = write!(
            out,
            "<tr data-label=\"{l}\" class=\"{state}\"><td>{l}</td><td>{id}</td>",
            l = escape(&row.label),
            id = escape(&row.id),
            state = state_text(row.state).replace(' ', "-"),
        );
        for cell in cells(row) {
            let _ = write!(out, "<td>{}</td>", escape(&cell));
        }
        let _ = writeln!(
            out,
            "<td>{}</td><td>{}</td></tr>",
            escape(row.file.as_deref().unwrap_or("")),
            actions(row)
        );
    }
    if rows.is_empty() {
        out.push_str(
            "<tr class=\"empty\"><td colspan=\"11\">No labels yet: create one below.</td></tr>\n",
        );
    }
    out.push_str("</tbody></table>\n");
    out
}

fn field_error(errors: &FieldErrors, field: &str) -> String {
    match errors.get(field) {
        Some(e) => format!("<p class=\"error\" id=\"{field}-error\">{}</p>", escape(e)),
        None => String::new(),
    }
}

fn invalid(errors: &FieldErrors, field: &str) -> &'static str {
    if errors.contains_key(field) {
        " aria-invalid=\"true\""
    } else {
        ""
    }
}

/// The creation form, with the values typed and an error beside each bad field.
pub fn create_form(
    form: &CreateForm,
    errors: &FieldErrors,
    general: Option<&str>,
    csrf: &str,
) -> String {
    let text_field = |name: &str, label: &str, value: &str, hint: &str| {
        format!(
            "<div class=\"field\"><label for=\"{name}\">{label}</label>\
             <input id=\"{name}\" name=\"{name}\" value=\"{value}\" autocomplete=\"off\"{inv}>\
             <small>{hint}</small>{err}</div>\n",
            value = escape(value),
            inv = invalid(errors, name),
            err = field_error(errors, name),
        )
    };
    let checked = |on: bool| if on { " checked" } else { "" };
    let mut out = String::from("<section id=\"create\"><h2>Create a label</h2>\n");
    if let Some(general) = general {
        let _ = writeln!(
            out,
            "<p class=\"error\" id=\"form-error\">{}</p>",
            escape(general)
        );
    }
    let _ = writeln!(
        out,
        "<form method=\"post\" action=\"/labels\" novalidate>{}",
        hidden_csrf(csrf)
    );
    out.push_str(&text_field(
        "id",
        "ID",
        &form.id,
        "the hidden server's TOTP username",
    ));
    out.push_str(&text_field(
        "label",
        "LABEL",
        &form.label,
        "clients ask for LABEL.&lt;domain&gt; (DNS syntax)",
    ));
    out.push_str("<div class=\"field\"><label for=\"algorithm\">Algorithm</label><select id=\"algorithm\" name=\"algorithm\">");
    for a in ["SHA1", "SHA256", "SHA512"] {
        let selected = if form.algorithm.eq_ignore_ascii_case(a) {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, "<option value=\"{a}\"{selected}>{a}</option>");
    }
    let _ = writeln!(out, "</select>{}</div>", field_error(errors, "algorithm"));
    out.push_str(&text_field(
        "period",
        "Period (s)",
        &form.period,
        "the TOTP step",
    ));
    out.push_str(&text_field(
        "max_parked",
        "Max parked",
        &form.max_parked,
        "parked connections at once",
    ));
    let _ = write!(
        out,
        "<fieldset><legend>Options</legend>\
         <input type=\"hidden\" name=\"source_pinning_shown\" value=\"1\">\
         <label><input type=\"checkbox\" name=\"source_pinning\"{sp}> source pinning (a rendezvous port accepts only the address that registered)</label>\
         <label><input type=\"checkbox\" name=\"direct\"{d}> direct (https://LABEL.&lt;domain&gt;/ on the relay's HTTPS port, no 307)</label>\
         <label><input type=\"checkbox\" name=\"steward\"{st}> also make the original steward's provisioning file</label>{err}\
         </fieldset>\n<button type=\"submit\">Create</button></form></section>\n",
        sp = checked(form.source_pinning),
        d = checked(form.direct),
        st = checked(form.steward),
        err = field_error(errors, "steward"),
    );
    out
}

/// The main page: a notice, the table, the creation form.
pub fn main_page(
    rows: &[Row],
    notice: Option<&str>,
    form: &CreateForm,
    errors: &FieldErrors,
    general: Option<&str>,
    csrf: &str,
    header: Header<'_>,
) -> String {
    let mut body = String::new();
    if let Some(notice) = notice {
        let _ = writeln!(
            body,
            "<p class=\"notice\" id=\"notice\">{}</p>",
            escape(notice)
        );
    }
    body.push_str("<section id=\"table\"><h2>Labels</h2>\n<p class=\"live\" id=\"live\">Reload the page for fresh numbers (live updates need JavaScript).</p>\n");
    body.push_str(&table(rows));
    body.push_str("</section>\n");
    body.push_str(&create_form(form, errors, general, csrf));
    page("Labels", header, &body)
}

/// A file offered for download from the page itself (a `data:` URI: it exists nowhere else
/// to be fetched again).
pub struct Download {
    pub name: String,
    pub content: Vec<u8>,
    pub what: &'static str,
}

/// What is shown once after a creation or a rotation.
pub struct Secret<'a> {
    pub heading: &'a str,
    pub label: &'a str,
    pub id: &'a str,
    pub file: &'a str,
    pub secret_b32: &'a str,
    pub uri: &'a str,
    pub qr_svg: &'a str,
    pub agent_command: &'a str,
    pub downloads: &'a [Download],
}

/// The one page that shows a secret (served with `Cache-Control: no-store`).
pub fn secret_page(s: &Secret<'_>, header: Header<'_>) -> String {
    use base64::Engine as _;
    let mut body = format!(
        "<section id=\"secret\"><h2>{heading}: {label}</h2>\n\
         <p class=\"warning\">This secret is shown <strong>once</strong>: it is not shown again \
         on any page. Copy what you need now.</p>\n\
         <dl><dt>LABEL</dt><dd id=\"label\">{label}</dd><dt>ID</dt><dd id=\"id\">{id}</dd>\
         <dt>Label file</dt><dd><code id=\"file\">{file}</code></dd>\
         <dt>TOTP secret (base32)</dt><dd><code id=\"secret-b32\">{b32}</code></dd>\
         <dt>otpauth URI</dt><dd><code id=\"uri\">{uri}</code></dd></dl>\n\
         <div class=\"qr\" id=\"qr\">{qr}</div>\n\
         <h3>Run the hidden server's agent</h3><p>Copy the label file to the hidden server and \
         replace <code>--forward</code> with your service's address:</p>\n\
         <pre id=\"agent-command\">{cmd}</pre>\n<h3>Downloads</h3><ul class=\"downloads\">",
        heading = escape(s.heading),
        label = escape(s.label),
        id = escape(s.id),
        file = escape(s.file),
        b32 = escape(s.secret_b32),
        uri = escape(s.uri),
        qr = s.qr_svg,
        cmd = escape(s.agent_command),
    );
    for d in s.downloads {
        let data = base64::engine::general_purpose::STANDARD.encode(&d.content);
        let _ = write!(
            body,
            "<li><a download=\"{name}\" href=\"data:application/octet-stream;base64,{data}\">{name}</a> ({what})</li>",
            name = escape(&d.name),
            what = escape(d.what),
        );
    }
    body.push_str(
        "</ul>\n<p><a href=\"/\" id=\"done\">Done: back to the labels</a></p></section>\n",
    );
    page(s.heading, header, &body)
}

/// The confirmation asked before an action.
pub fn confirm_page(label: &str, action: Action, csrf: &str, header: Header<'_>) -> String {
    let body = format!(
        "<section id=\"confirm\"><h2>{title} {label}</h2><p>{question}</p>\
         <form method=\"post\" action=\"/labels/{label}/{a}\">{csrf}\
         <button type=\"submit\" class=\"{a}\" id=\"confirm-button\">{title}</button> \
         <a href=\"/\">Cancel</a></form></section>",
        title = match action {
            Action::Disable => "Disable",
            Action::Enable => "Enable",
            Action::Rotate => "Rotate the secret of",
            Action::Delete => "Delete",
        },
        label = escape(label),
        question = escape(action.question()),
        a = action.as_str(),
        csrf = hidden_csrf(csrf),
    );
    page("Confirm", header, &body)
}

/// The login form (a console with a token).
pub fn login_page(error: Option<&str>, csrf: &str) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" id=\"login-error\">{}</p>", escape(e)))
        .unwrap_or_default();
    let body = format!(
        "<section id=\"login\"><h2>Log in</h2>{error}\
         <form method=\"post\" action=\"/login\">{csrf}\
         <div class=\"field\"><label for=\"token\">Console token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\"></div>\
         <button type=\"submit\">Log in</button></form></section>",
        csrf = hidden_csrf(csrf),
    );
    page("Log in", Header::Plain, &body)
}

/// A short page for an error (403, 404, ...).
pub fn error_page(title: &str, message: &str) -> String {
    let body = format!(
        "<section id=\"problem\"><h2>{}</h2><p class=\"error\">{}</p><p><a href=\"/\">Back to the labels</a></p></section>",
        escape(title),
        escape(message)
    );
    page(title, Header::Plain, &body)
}

/// `uri` as an SVG QR code (dark modules on white, with the quiet zone), to be inlined.
pub fn qr_svg(uri: &str) -> Result<String, String> {
    let code = qrcode::QrCode::with_error_correction_level(uri.as_bytes(), qrcode::EcLevel::M)
        .map_err(|e| e.to_string())?;
    let width = code.width();
    let size = width + 8;
    let mut path = String::new();
    for (i, color) in code.to_colors().iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let _ = write!(path, "M{} {}h1v1h-1z", i % width + 4, i / width + 4);
        }
    }
    Ok(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" width=\"264\" \
         height=\"264\" role=\"img\" aria-label=\"QR code of the otpauth URI\" \
         shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/>\
         <path fill=\"#000\" d=\"{path}\"/></svg>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn markup_characters_are_escaped() {
        assert_eq!(
            escape("<script>alert('x\" & y')</script>"),
            "&lt;script&gt;alert(&#39;x&quot; &amp; y&#39;)&lt;/script&gt;"
        );
        assert_eq!(escape("plain é"), "plain é");
    }

    #[test]
    fn a_bad_form_shows_each_error_beside_its_field_and_keeps_the_values() {
        let form = CreateForm {
            id: "a b\"><script>".into(),
            label: "a..b".into(),
            ..CreateForm::default()
        };
        let errors = form.validate().unwrap_err();
        let html = create_form(&form, &errors, None, "tok");
        assert!(html.contains("id=\"id-error\""), "{html}");
        assert!(html.contains("id=\"label-error\""), "{html}");
        assert!(
            html.contains("value=\"a b&quot;&gt;&lt;script&gt;\""),
            "{html}"
        );
        assert!(!html.contains("<script>"));
        assert!(html.contains("name=\"csrf\" value=\"tok\""));
    }

    #[test]
    fn the_qr_code_is_an_svg_of_squares() {
        let svg = qr_svg("otpauth://totp/x:y?secret=GEZDGNBV").unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("h1v1h-1z"));
    }

    proptest! {
        #[test]
        fn escaped_text_never_holds_markup(s in ".{0,200}") {
            let e = escape(&s);
            prop_assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''));
        }
    }
}
