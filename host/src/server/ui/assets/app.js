// Sluice UI: live updates, nothing else. A run page listens to its run's server-sent events
// and fetches the page's live part again (at most every 250 ms) while the run changes; the
// newest page of the runs list fetches itself again every 3 s. Pages work without it.
"use strict";

function replaceFrom(url, id) {
  return fetch(url, { credentials: "same-origin" })
    .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
    .then((text) => {
      const doc = new DOMParser().parseFromString(text, "text/html");
      const fresh = doc.getElementById(id);
      const here = document.getElementById(id);
      if (fresh && here) here.replaceWith(fresh);
    });
}

function followRun(live) {
  const run = live.dataset.run;
  let pending = false;
  const refresh = () => {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      fetch("/ui/runs/" + run + "/live", { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => {
          document.getElementById("live").innerHTML = html;
        })
        .catch(() => {})
        .finally(() => {
          pending = false;
        });
    }, 250);
  };
  const events = new EventSource("/ui/runs/" + run + "/events");
  events.addEventListener("flow", refresh);
  events.addEventListener("task", refresh);
  events.addEventListener("end", () => {
    events.close();
    refresh();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live && live.dataset.run) followRun(live);
  const runs = document.getElementById("runs");
  if (runs && runs.dataset.refresh) {
    setInterval(() => replaceFrom(runs.dataset.refresh, "runs").catch(() => {}), 3000);
  }
});
