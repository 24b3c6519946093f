// Sluice UI: live updates, nothing else. A live run's page listens to its run's server-sent
// events (states only) and fetches the page's live part again while the run changes (one
// fetch at a time, 250 ms after a change); a live task's page appends its new log lines; the
// newest page of the runs list fetches itself again every 3 s while it is visible. Pages work
// without it.
"use strict";

// A page's fresh HTML from `url`; to the sign-in page when the session is gone (the server
// answers with a redirect there).
function fetchPage(url) {
  return fetch(url, { credentials: "same-origin" }).then((r) => {
    // Sent elsewhere (signed out, or an operator's tenant gone): go there, not into this page.
    if (r.redirected && new URL(r.url).pathname !== new URL(url, window.location.href).pathname) {
      window.location.assign(r.url);
      return Promise.reject("redirected");
    }
    return r.ok ? r.text() : Promise.reject(r.status);
  });
}

function replaceFrom(url, id) {
  return fetchPage(url).then((text) => {
    const doc = new DOMParser().parseFromString(text, "text/html");
    const fresh = doc.getElementById(id);
    const here = document.getElementById(id);
    if (fresh && here) here.replaceWith(fresh);
  });
}

function followRun(live) {
  const run = live.dataset.run;
  // One fetch at a time; a change during it fetches once more after it.
  let fetching = false;
  let again = false;
  const refresh = () => {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    again = false;
    setTimeout(() => {
      fetchPage("/ui/runs/" + run + "/live")
        .then((html) => {
          // Keyboard focus survives the refresh: the same link or button again.
          const active = document.activeElement;
          const key = active && live.contains(active) ? active.getAttribute("href") || active.textContent : null;
          live.innerHTML = html;
          if (key !== null) {
            const again = [...live.querySelectorAll("a, button")].find(
              (e) => (e.getAttribute("href") || e.textContent) === key,
            );
            if (again) again.focus();
          }
        })
        .catch(() => {})
        .finally(() => {
          fetching = false;
          if (again) refresh();
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

// A task run's new log lines, appended to its `pre` as the server sends them.
function tailLogs(pre) {
  const events = new EventSource(pre.dataset.tail);
  events.addEventListener("log", (e) => {
    const line = JSON.parse(e.data);
    const level = String(line.level);
    const span = document.createElement("span");
    span.className = "log " + level.toLowerCase();
    span.textContent =
      new Date(line.time).toISOString().slice(11, 23) + " " + level.toUpperCase() + " " + line.message;
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(span, "\n");
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  });
  // The run ended: the page again, with the task's final state.
  events.addEventListener("end", () => {
    events.close();
    window.location.reload();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const logs = document.getElementById("logs");
  if (logs && logs.dataset.tail) tailLogs(logs);
  const live = document.getElementById("live");
  // A run that has ended does not change: nothing to follow.
  if (live && live.dataset.run && live.dataset.live === "true") followRun(live);
  const runs = document.getElementById("runs");
  if (runs && runs.dataset.refresh) {
    setInterval(() => {
      if (!document.hidden) replaceFrom(runs.dataset.refresh, "runs").catch(() => {});
    }, 3000);
  }
});
