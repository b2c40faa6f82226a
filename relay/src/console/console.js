// TAAS console: live updates of the labels table. Polls /labels.json every 2 s and rewrites
// the table's rows with textContent (never innerHTML), so nothing from a label file can
// become markup. Without JavaScript the page still works: reload it for fresh numbers.
"use strict";

(function () {
  const table = document.getElementById("labels");
  if (!table) {
    return;
  }
  const live = document.getElementById("live");
  const body = table.tBodies[0];
  const stateText = { serving: "serving", disabled: "disabled", builtin: "built in" };
  const actionText = {
    disable: "Disable",
    enable: "Enable",
    rotate: "Rotate secret",
    delete: "Delete",
  };

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function row(l) {
    const tr = document.createElement("tr");
    tr.dataset.label = l.label;
    tr.className = (stateText[l.state] || l.state).replace(" ", "-");
    cell(tr, l.label);
    cell(tr, l.id);
    cell(tr, stateText[l.state] || l.state);
    cell(tr, String(l.parked));
    cell(tr, String(l.active_pairs));
    const last = l.last_registration;
    cell(tr, last ? last.when + " from " + last.source : "never");
    cell(tr, l.unauthorized + " / " + l.rate_limited);
    cell(tr, String(l.bytes_to_server));
    cell(tr, String(l.bytes_to_client));
    cell(tr, l.file || "");
    const actions = cell(tr, "");
    for (const a of l.actions) {
      const link = document.createElement("a");
      link.className = "action " + a;
      link.href =
        "/labels/" + encodeURIComponent(l.label) + "/confirm?action=" + encodeURIComponent(a);
      link.textContent = actionText[a] || a;
      actions.appendChild(link);
      actions.appendChild(document.createTextNode(" "));
    }
    return tr;
  }

  async function refresh() {
    try {
      const answer = await fetch("/labels.json", {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!answer.ok) {
        throw new Error("HTTP " + answer.status);
      }
      const data = await answer.json();
      const rows = data.labels.map(row);
      if (rows.length === 0) {
        const tr = document.createElement("tr");
        tr.className = "empty";
        const td = cell(tr, "No labels yet: create one below.");
        td.colSpan = 11;
        rows.push(tr);
      }
      body.replaceChildren(...rows);
      if (live) {
        live.textContent = "Live: updated " + new Date().toLocaleTimeString() + ".";
        live.classList.remove("stale");
      }
    } catch (e) {
      if (live) {
        live.textContent = "Live updates paused (" + e.message + "); retrying.";
        live.classList.add("stale");
      }
    }
  }

  if (live) {
    live.textContent = "Live: updates every 2 s.";
  }
  setInterval(refresh, 2000);
})();
